"""Typing base of the Kernel's domain mixins (they share the Kernel's state)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any


class KernelPart:
    """Each domain module contributes one mixin to ``Kernel``; attributes set
    up in ``Kernel.__init__`` are visible to all of them."""

    if TYPE_CHECKING:
        pkrs_pkey_allowed_mask: int

        def __getattr__(self, name: str) -> Any: ...
