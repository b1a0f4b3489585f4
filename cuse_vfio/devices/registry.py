"""Device models by name, so a topology file can say ``model = "edu"``.

    @register_model("edu")
    class Edu(PciDevice): ...

    create_model("edu", name="0000:00:02.0", dma_delay=0.01)   # options from the topology entry

A model file outside the package (``examples/devices/scratchpad.py``) is
loaded with :func:`load_model_file`; importing it registers its models.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Dict, List, Optional, Type

from .pci import PciDevice

_models: Dict[str, Callable[..., PciDevice]] = {}


def register_model(name: str):
    """Class decorator: make ``cls(**options)`` available as model ``name``."""

    def decorate(cls: Type[PciDevice]) -> Type[PciDevice]:
        if not (isinstance(cls, type) and issubclass(cls, PciDevice)):
            raise TypeError(f"model {name!r} must be a PciDevice subclass")
        other = _models.get(name)
        # The same class loaded again (a model file imported twice) replaces itself.
        if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"device model {name!r} is already registered by {other.__module__}.{other.__name__}")
        _models[name] = cls
        cls.model_name = name
        return cls

    return decorate


def create_model(model_name: str, /, name: Optional[str] = None, **options) -> PciDevice:
    """A new device of model ``model_name``, called ``name`` (a topology uses the BDF).

    ``model_name`` is positional-only, so a model may itself take an option
    called ``name`` or ``model_name`` without a clash; ``options`` are the
    topology entry's extra keys, and a key the model does not know is a
    TypeError naming it.
    """
    try:
        factory = _models[model_name]
    except KeyError:
        raise KeyError(f"unknown device model {model_name!r}: choose one of {', '.join(model_names())}") from None
    return factory(name=name, **options)


def model_names() -> List[str]:
    return sorted(_models)


def model_class(model_name: str) -> Optional[Type[PciDevice]]:
    """The class registered as ``model_name`` (its identity is class attributes), or None."""
    factory = _models.get(model_name)
    return factory if isinstance(factory, type) else None


def load_model_file(path: str) -> None:
    """Import a Python file that registers models (its ``@register_model`` runs on import)."""
    module_name = "cuse_vfio_model_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
