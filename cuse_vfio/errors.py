"""The one exception every layer raises for a client-visible failure.

A rule raises ``VfioError(errno.EINVAL, "argsz smaller than minsz")`` where it
is checked; only the dispatcher turns it into the negative errno the client
sees, and the sentence into the log.
"""

import errno as _errno
import os


class VfioError(OSError):
    """A VFIO call failed with ``errno``; ``strerror`` says why, for a person."""

    errno: int  # always given, unlike OSError's

    def __init__(self, err: int, message: str = ""):
        super().__init__(err, message or os.strerror(err))

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        return f"{self.errno_name}: {self.strerror}"


class RetryRequest(Exception):
    """Not an error: a transport's memory does not hold these argument bytes yet.

    The CUSE transport raises it from a handler's first read of bytes the
    kernel has not copied in; it answers with a retry and runs the handler
    again.  A read of client memory that stalls on the serving thread raises
    one too (``memory.CopyStalled``): the request runs again on a thread that
    may wait.  Every layer that catches Exception lets it through untouched.
    """
