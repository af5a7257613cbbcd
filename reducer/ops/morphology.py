"""Binary morphology on masks, exact and fast for the shapes the chain uses (pure, no I/O).

:func:`dilate_disc` grows a boolean mask by a disc: the result is exactly
``scipy.ndimage.binary_dilation(mask, structure=disc(radius))`` and
``distance_transform_edt(~mask) <= radius``, (the disc is the set of integer offsets
``dy^2 + dx^2 <= radius^2``), computed either by stamping the disc on the set pixels (few
of them) or, for many, as the union over the disc's rows ``dy`` of the mask shifted by
``dy`` and grown along x by the row's half-width (a running maximum,
:func:`scipy.ndimage.maximum_filter1d`).  On a 2048 x 4096 frame: 0.1-0.2 s against
0.8 s for either scipy call.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["disc_offsets", "dilate_disc"]


def disc_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets ``(dy, dx)`` with ``dy^2 + dx^2 <= radius^2`` (1e-9 tolerance).

    Parameters
    ----------
    radius : float
        Disc radius [pixel], >= 0.

    Returns
    -------
    dy, dx : ndarray of int
    """
    r = int(math.floor(float(radius) + 1e-9))
    o = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(o, o, indexing="ij")
    keep = dy * dy + dx * dx <= float(radius) ** 2 + 1e-9
    return dy[keep], dx[keep]


def dilate_disc(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within ``radius`` (Euclidean, pixel centres) of a True pixel of ``mask``.

    Parameters
    ----------
    mask : ndarray of bool (ny, nx)
        Not modified.
    radius : float
        Disc radius [pixel]; 0 returns a copy of ``mask``.

    Returns
    -------
    ndarray of bool (ny, nx)
        Identical to ``binary_dilation(mask, disc)`` (pixels beyond the image borders
        count as False) and to ``distance_transform_edt(~mask) <= radius``.

    Raises
    ------
    ValueError
        For a non-2-D mask or a negative radius.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if not float(radius) >= 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    ny, nx = m.shape
    dy, dx = disc_offsets(radius)
    yy, xx = np.nonzero(m)
    out = m.copy()
    if yy.size == 0 or dy.size == 1:
        return out
    if yy.size * dy.size <= m.size // 8:
        # few set pixels: stamp the disc on each, in chunks (bounded memory)
        step = max(1, 2_000_000 // dy.size)
        for i in range(0, yy.size, step):
            Y = (yy[i:i + step, None] + dy[None, :]).ravel()
            X = (xx[i:i + step, None] + dx[None, :]).ravel()
            ok = (Y >= 0) & (Y < ny) & (X >= 0) & (X < nx)
            out[Y[ok], X[ok]] = True
        return out
    from scipy.ndimage import maximum_filter1d

    r = int(dy.max())
    u8 = m.view(np.uint8)
    grown = {}
    for oy in range(-r, r + 1):
        hw = int(dx[dy == oy].max())
        if hw not in grown:
            grown[hw] = (maximum_filter1d(u8, size=2 * hw + 1, axis=1, mode="constant",
                                          cval=0).view(bool) if hw else m)
        g = grown[hw]
        # out[y] |= g[y - oy]: the mask shifted by oy rows
        if oy > 0:
            out[oy:] |= g[:-oy]
        elif oy < 0:
            out[:oy] |= g[-oy:]
        else:
            out |= g
    return out
