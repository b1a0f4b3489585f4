"""Module parameters: the switches a Linux host sets on the kernel command line or with modprobe.

A topology sets them per module, under the kernel's names::

    [module.vfio]
    enable_unsafe_noiommu_mode = true

    [module.vfio_iommu_type1]
    dma_entry_limit = 262144

    [module.vfio_pci]
    disable_idle_d3 = true

``PARAMETERS`` is the table of every parameter the emulated kernel knows:
its type, default and sysfs permission (``module_param_named`` in the
module's source, Linux 6.1), and where its effect is implemented.  The
values live in one ``ModuleParams`` the machine hands to the drivers and to
the sysfs view, so ``/sys/module/NAME/parameters/`` shows what the drivers
do.

What each does, as the kernel does it:

vfio
  ``enable_unsafe_noiommu_mode`` (bool, N, 0644; ``CONFIG_VFIO_NOIOMMU``):
  a device without an IOMMU (``iommu = false`` in its ``[[device]]``)
  gets a noiommu group ``/dev/vfio/noiommu-N`` that only the noiommu IOMMU
  driver (VFIO_NOIOMMU_IOMMU) accepts.  Off, such a device cannot be bound
  to vfio-pci (the topology is refused) and the noiommu driver refuses
  SET_IOMMU.  ``--noiommu`` sets it.
vfio_iommu_type1
  ``dma_entry_limit`` (uint, 65535, 0644): the number of mappings a
  container may hold; MAP_DMA past it fails with ENOSPC, and GET_INFO's
  DMA-avail capability counts down from it (read when the container's IOMMU
  is set, as ``vfio_iommu_type1_open`` does).
  ``allow_unsafe_interrupts`` (bool, N, 0644): type1 refuses to attach a
  group whose IOMMU cannot isolate MSIs (EPERM, "No interrupt remapping
  support") unless this is set.  The emulated IOMMU remaps interrupts
  (QEMU's ``intremap=on``) unless ``[iommu] intremap = false``; only then
  does the parameter change anything.
  ``disable_hugepages`` (bool, N, 0644): ``vfio_pin_pages_remote`` pins one
  page at a time and the IOMMU maps every 4 KiB page separately instead of
  in superpage-sized runs; GET_INFO's page sizes do not change.  The
  emulated IOMMU records, per mapping, the page sizes its page table would
  use (``DmaMapping.iommu_pages``).
vfio_pci
  ``nointxmask`` (bool, N, 0644): in the kernel, vfio-pci then does not use
  the function's INTx-disable bit (PCI 2.3 masking, ``vdev->pci_2_3``) and
  masks INTx by disabling the host's interrupt line instead.  The emulated
  vfio-pci always masks with the bit, so the parameter is shown at its
  default and cannot be set yet.
  ``disable_vga`` (bool, N, 0444; ``CONFIG_VFIO_PCI_VGA``): without it a VGA
  class device gets the legacy VGA region; no emulated model is VGA class,
  so on this machine VGA region info is EINVAL either way.
  ``disable_idle_d3`` (bool, N, 0644): by default the kernel's vfio-pci
  runtime-suspends a device no one has open, which puts a function with a
  PM capability into D3hot (``pm_runtime_put`` at probe and at last close).
  The emulated vfio-pci keeps idle devices in D0, which is this parameter
  set; it is shown as N (the kernel's default) and cannot be set yet.
  ``disable_denylist``, ``enable_sriov`` are shown at their defaults and
  cannot be set here (no model is on the denylist; vfio-pci's SR-IOV is not
  emulated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

U32_MAX = (1 << 32) - 1


@dataclass(frozen=True)
class ParameterSpec:
    kind: str          # "bool" or "uint", the kernel's param type
    default: object
    mode: int          # sysfs permission; 0444 parameters are fixed once loaded
    settable: bool = True


PARAMETERS: Dict[str, Dict[str, ParameterSpec]] = {
    "vfio": {
        "enable_unsafe_noiommu_mode": ParameterSpec("bool", False, 0o644),
    },
    "vfio_iommu_type1": {
        "allow_unsafe_interrupts": ParameterSpec("bool", False, 0o644),
        "disable_hugepages": ParameterSpec("bool", False, 0o644),
        "dma_entry_limit": ParameterSpec("uint", 0xFFFF, 0o644),
    },
    "vfio_pci": {
        "disable_denylist": ParameterSpec("bool", False, 0o444, settable=False),
        "disable_idle_d3": ParameterSpec("bool", False, 0o644, settable=False),
        "disable_vga": ParameterSpec("bool", False, 0o444),
        "enable_sriov": ParameterSpec("bool", False, 0o644, settable=False),
        "nointxmask": ParameterSpec("bool", False, 0o644, settable=False),
    },
}


def module_name(name: str) -> str:
    """The kernel treats '-' and '_' in module names alike; sysfs shows '_'."""
    return name.replace("-", "_")


class ModuleParams:
    """The live value of every parameter in ``PARAMETERS``."""

    def __init__(self, values: Optional[Mapping[str, Mapping[str, object]]] = None):
        self._values = {m: {p: spec.default for p, spec in params.items()} for m, params in PARAMETERS.items()}
        for module, params in (values or {}).items():
            for name, value in params.items():
                self.set(module, name, value)

    def __repr__(self) -> str:
        changed = {f"{m}.{p}": v for m, ps in self._values.items() for p, v in ps.items()
                   if v != PARAMETERS[m][p].default}
        return f"ModuleParams({changed})"

    def get(self, module: str, name: str):
        return self._values[module_name(module)][name]

    def set(self, module: str, name: str, value) -> None:
        """Set one parameter; ValueError (a sentence) for an unknown name or a bad value."""
        module = module_name(module)
        spec = check(module, name, value)
        self._values[module][name] = bool(value) if spec.kind == "bool" else value

    def getter(self, module: str, name: str) -> Callable[[], object]:
        return lambda: self.get(module, name)


def check(module: str, name: str, value) -> ParameterSpec:
    """The spec of ``module.name`` if ``value`` is acceptable for it (``param_set_bool``/``_uint``)."""
    params = PARAMETERS.get(module)
    if params is None:
        raise ValueError(f"unknown module {module!r}: the modules with parameters are {', '.join(PARAMETERS)}")
    spec = params.get(name)
    if spec is None:
        raise ValueError(f"module {module} has no parameter {name!r} (it has {', '.join(sorted(params))})")
    if not spec.settable:
        raise ValueError(f"{module}.{name} is shown at its default and cannot be set here")
    if spec.kind == "bool":
        # param_set_bool takes y/n/1/0; TOML's booleans (and 0/1) say the same
        if not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
            raise ValueError(f"{module}.{name} is a bool: write true or false, not {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MAX:
        raise ValueError(f"{module}.{name} is an unsigned 32-bit number, not {value!r}")
    return spec
