"""What scripts/vm and scripts/guest share: a throw-away qemu guest (TCG,
Debian's stock kernel, busybox initramfs, the host's root read-only over 9p
with a tmpfs overlay) that runs one command and hands back its output and
exit status.

* :mod:`.image` -- packages, the cached kernel, module lists, initramfs images.
* :mod:`.boot`  -- the qemu command line, the run directory, the outcome.
* ``init.sh``   -- the guest's /init; ``hooks/`` what one kind of guest adds to it.
"""

import os

HOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hooks")


def hook(name):
    """The text of hooks/NAME.sh, for image.setup's ``hook``."""
    with open(os.path.join(HOOKS, name + ".sh")) as f:
        return f.read()
