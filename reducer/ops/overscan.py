"""Overscan subtraction and trimming (pure functions; no I/O).

The overscan strip is read out after the pixels of each row (``axis='columns'``: a block of
columns, one level per row) or after the last row (``axis='rows'``: a block of rows, one
level per column). Its level per line is the median (or mean, or 3-sigma clipped mean) across
the strip, then modelled along the lines by ``fit``:

- ``constant``: one number, the median of the line levels;
- ``row``: each line's own level (noisiest, follows every jump);
- ``smooth``: a running median over ``smooth_rows`` lines (default; follows slow drifts);
- ``poly:N``: a Legendre polynomial of degree N, fitted with 3-sigma clipping.
"""
from __future__ import annotations

import numpy as np

FITS = ("constant", "row", "smooth")


def line_levels(region: np.ndarray, axis: str = "columns", method: str = "median") -> np.ndarray:
    """Overscan level of each line (ADU): one per row for ``axis='columns'``.

    Parameters
    ----------
    region : ndarray (ny, nx)
        The overscan pixels (ADU).
    axis : {'columns', 'rows'}
    method : {'median', 'mean', 'clipped_mean'}
    """
    reg = np.asarray(region, dtype=np.float64)
    ax = 1 if axis == "columns" else 0
    if method == "median":
        return np.median(reg, axis=ax)
    if method == "mean":
        return reg.mean(axis=ax)
    if method == "clipped_mean":
        from astropy.stats import sigma_clipped_stats
        mean, _, _ = sigma_clipped_stats(reg, axis=ax, sigma=3.0)
        return np.asarray(mean)
    raise ValueError(f"overscan method {method!r} is not one of median, mean, clipped_mean")


def model_levels(levels: np.ndarray, fit: str = "smooth", smooth_rows: int = 15) -> np.ndarray:
    """Model the line levels along the lines (see the module docstring for ``fit``)."""
    lv = np.asarray(levels, dtype=np.float64)
    if fit == "constant":
        return np.full_like(lv, np.median(lv))
    if fit == "row":
        return lv.copy()
    if fit == "smooth":
        from scipy.ndimage import median_filter
        size = max(1, min(int(smooth_rows), lv.size))
        return median_filter(lv, size=size, mode="nearest")
    if fit.startswith("poly:"):
        try:
            deg = int(fit.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"overscan fit {fit!r}: the degree after 'poly:' must be an integer") from None
        x = np.linspace(-1, 1, lv.size)
        keep = np.ones(lv.size, bool)
        for _ in range(5):
            coef = np.polynomial.legendre.legfit(x[keep], lv[keep], deg)
            model = np.polynomial.legendre.legval(x, coef)
            resid = lv - model
            s = 1.4826 * np.median(np.abs(resid[keep] - np.median(resid[keep])))
            new = np.abs(resid) <= 3 * s if s > 0 else keep
            if np.array_equal(new, keep):
                break
            keep = new
        return model
    raise ValueError(f"overscan fit {fit!r} is not one of constant, row, smooth, poly:N")


def subtract_overscan(data: np.ndarray, biassec, trimsec, *, axis: str = "columns",
                      method: str = "median", fit: str = "smooth", smooth_rows: int = 15):
    """Overscan-subtract and trim one detector image.

    Parameters
    ----------
    data : ndarray (ny, nx)
        Raw pixels (ADU); not modified.
    biassec : (slice, slice) or None
        Overscan section (rows, columns), 0-based; ``None``: no overscan, only trimming.
    trimsec : (slice, slice)
        The section to keep.

    Returns
    -------
    trimmed : ndarray of float32
        ``data[trimsec] - level`` (ADU).
    level : ndarray or None
        The modelled level per line of the trimmed image (ADU).
    """
    img = np.asarray(data)
    if biassec is None:
        return img[trimsec].astype(np.float32), None
    model = model_levels(line_levels(img[biassec], axis, method), fit, smooth_rows)
    ax = 0 if axis == "columns" else 1            # image axis the levels run along
    lines = range(img.shape[ax])[biassec[ax]]
    full = np.interp(np.arange(img.shape[ax]), np.asarray(lines, float), model)  # nearest beyond the ends
    lv = full[trimsec[ax]]
    out = img[trimsec].astype(np.float32)
    if axis == "columns":
        out -= lv[:, None].astype(np.float32)
    else:
        out -= lv[None, :].astype(np.float32)
    return out, lv
