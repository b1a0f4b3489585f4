"""Interrupts out of a function: the VFIO irq indexes a model raises, and the sink they go to."""

from __future__ import annotations

import enum
from typing import Protocol

from ...uapi import (
    VFIO_PCI_ERR_IRQ_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_REQ_IRQ_INDEX,
)


class IrqIndex(enum.IntEnum):
    """What a model raises, named as VFIO numbers the interrupt indexes of vfio-pci."""

    INTX = VFIO_PCI_INTX_IRQ_INDEX
    MSI = VFIO_PCI_MSI_IRQ_INDEX
    MSIX = VFIO_PCI_MSIX_IRQ_INDEX
    ERR = VFIO_PCI_ERR_IRQ_INDEX
    REQ = VFIO_PCI_REQ_IRQ_INDEX


class IrqSink(Protocol):
    """Where a function's interrupts go: the interrupt controller, played by vfio-pci.

    The function calls it with its lock held; a sink must not call back into
    the model's register handlers.
    """

    def intx_line(self, asserted: bool) -> None:
        """The INTx line changed level (after the function's INTx-disable bit)."""

    def msi_message(self, index: "IrqIndex", vector: int) -> None:
        """An MSI or MSI-X message for ``vector`` left the function (enabled and unmasked)."""

    def error_signal(self) -> None:
        """An uncorrectable error the host would learn about through AER."""
