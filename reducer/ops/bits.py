"""Bits of the uint16 mask plane carried by every science product (0 = good pixel).

=====  ==========  ==========================================================
bit    name        meaning
=====  ==========  ==========================================================
1      BAD         defect: hot, dead or weak pixel of the defects map
2      SATURATED   at or above the detector's saturation level in the raw frame
4      LOWFLAT     flat response below the low limit (not flat-fielded)
8      COSMIC      cosmic ray found by the z step (repaired in the data)
16     OFFIMAGE    outside the input's footprint after resampling
32     NONFINITE   not a finite number somewhere along the chain
=====  ==========  ==========================================================
"""
from __future__ import annotations

import numpy as np

BAD = 1
SATURATED = 2
LOWFLAT = 4
COSMIC = 8
OFFIMAGE = 16
NONFINITE = 32

NAMES = {BAD: "BAD", SATURATED: "SATURATED", LOWFLAT: "LOWFLAT", COSMIC: "COSMIC",
         OFFIMAGE: "OFFIMAGE", NONFINITE: "NONFINITE"}
#: bits that make a pixel unusable for measurements
UNUSABLE = BAD | SATURATED | LOWFLAT | OFFIMAGE | NONFINITE


def bad(mask: np.ndarray, bits: int = UNUSABLE) -> np.ndarray:
    """Boolean array: pixels with any of ``bits`` set."""
    return (np.asarray(mask) & bits) != 0


def header_cards() -> list[tuple[str, int, str]]:
    """FITS cards documenting the bits, for a mask HDU's header."""
    return [(f"MASKB{b.bit_length() - 1}", b, NAMES[b]) for b in NAMES]
