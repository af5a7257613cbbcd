"""The p (prepare) and f (flatten) steps on arrays: pure functions, no I/O.

Units: raw and masters in ADU (dark in ADU/s); the outputs are in electrons. Uncertainties
are 1-sigma; masks are uint16 bitmasks (:mod:`reducer.ops.bits`).

prepare::

    adu    = raw_os - bias - dark_rate * t              (raw_os: overscan-subtracted, trimmed)
    data   = gain * adu                                  [e-]
    var    = rdnoise^2 + max(data + gain * dark_rate * t, 0)      (read + Poisson, e-^2)
             + (gain * bias_unc)^2 + (gain * t * dark_unc)^2      (the masters' own noise)

flatten::

    data'  = data / flat
    var'   = var / flat^2 + (data * flat_unc / flat^2)^2
    LOWFLAT where flat < low (or not finite): those pixels keep data / 1 and are flagged.
"""
from __future__ import annotations

import numpy as np

from .bits import BAD, LOWFLAT, NONFINITE, SATURATED


def prepare(raw_os: np.ndarray, *, gain: float, rdnoise_e: float, exptime: float,
            bias: np.ndarray | None = None, bias_unc: np.ndarray | None = None,
            dark_rate: np.ndarray | None = None, dark_unc: np.ndarray | None = None,
            saturated: np.ndarray | None = None, defects: np.ndarray | None = None):
    """Bias- and dark-subtract a trimmed frame and convert it to electrons.

    Parameters
    ----------
    raw_os : ndarray
        Overscan-subtracted, trimmed raw pixels (ADU).
    gain : float
        e-/ADU.
    rdnoise_e : float
        Read noise (e-).
    exptime : float
        Exposure time (s).
    bias, bias_unc : ndarray, optional
        Master bias and its uncertainty (ADU).
    dark_rate, dark_unc : ndarray, optional
        Master dark rate and its uncertainty (ADU/s).
    saturated : ndarray of bool, optional
        Pixels at or above the saturation level in the raw frame.
    defects : ndarray of uint8, optional
        Defects map (nonzero = bad pixel).

    Returns
    -------
    data, unc : ndarray of float32 (e-)
    mask : ndarray of uint16
    """
    x = np.asarray(raw_os, dtype=np.float64)
    for name, arr in (("bias", bias), ("dark_rate", dark_rate), ("defects", defects)):
        if arr is not None and np.shape(arr) != x.shape:
            raise ValueError(f"{name} shape {np.shape(arr)} differs from the frame's {x.shape}")
    adu = x.copy()
    var_adu = np.zeros_like(x)
    if bias is not None:
        adu -= bias
        if bias_unc is not None:
            var_adu += np.square(bias_unc, dtype=np.float64)
    dark_e = 0.0
    if dark_rate is not None:
        adu -= dark_rate * exptime
        dark_e = gain * np.asarray(dark_rate, np.float64) * exptime
        if dark_unc is not None:
            var_adu += np.square(np.asarray(dark_unc, np.float64) * exptime)
    data = gain * adu
    var = rdnoise_e ** 2 + np.clip(data + dark_e, 0, None) + gain ** 2 * var_adu
    mask = np.zeros(x.shape, np.uint16)
    if saturated is not None:
        mask[np.asarray(saturated, bool)] |= SATURATED
    if defects is not None:
        mask[np.asarray(defects) != 0] |= BAD
    bad = ~np.isfinite(data) | ~np.isfinite(var)
    mask[bad] |= NONFINITE
    data = np.where(bad, 0.0, data)
    var = np.where(bad, 0.0, var)
    return data.astype(np.float32), np.sqrt(var).astype(np.float32), mask


def flatten(data: np.ndarray, unc: np.ndarray, mask: np.ndarray, flat: np.ndarray,
            flat_unc: np.ndarray | None = None, *, low: float = 0.5):
    """Divide by a normalised flat, propagating uncertainty; flag low response.

    Parameters
    ----------
    data, unc : ndarray (e-)
    mask : ndarray of uint16
    flat : ndarray
        Normalised flat (dimensionless).
    flat_unc : ndarray, optional
        Its uncertainty.
    low : float
        Response below which a pixel is flagged LOWFLAT (and not divided).

    Returns
    -------
    data, unc : ndarray of float32 (e-)
    mask : ndarray of uint16
    """
    if np.shape(flat) != np.shape(data):
        raise ValueError(f"flat shape {np.shape(flat)} differs from the frame's {np.shape(data)}")
    f = np.asarray(flat, np.float64)
    lowresp = ~np.isfinite(f) | (f < low)
    fs = np.where(lowresp, 1.0, f)
    d = np.asarray(data, np.float64) / fs
    var = np.square(np.asarray(unc, np.float64) / fs)
    if flat_unc is not None:
        fu = np.where(lowresp, 0.0, np.nan_to_num(np.asarray(flat_unc, np.float64)))
        var += np.square(d * fu / fs)
    m = np.asarray(mask, np.uint16).copy()
    m[lowresp] |= LOWFLAT
    return d.astype(np.float32), np.sqrt(var).astype(np.float32), m
