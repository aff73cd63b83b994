"""The record of one injected nodule: what an annotation row is made from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InjectedNodule:
    """One injected nodule, ready for an annotation row.

    Args:
        site: the requested world point ``(x, y, z)`` mm.
        center: the centre of the injected nodule (world mm, weighted by the HU it added); the
            site when no nodule formed.
        diameter_mm: equivalent-sphere diameter at half the added HU (0 when no nodule formed).
        volume_mm3: its volume.

    Example:
        >>> n = InjectedNodule((1.0, 2.0, 3.0), (1.2, 2.0, 3.1), 6.5, 143.8)
        >>> n.diameter_mm > 0
        True
    """

    site: tuple[float, float, float]
    center: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
