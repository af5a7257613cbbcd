"""Master sky on arrays: illumination and fringe maps from dithered science frames (pure, no I/O).

Units: images in electrons (e-); the master sky and its maps are dimensionless (fractions of
the frame's sky level).  ``mask`` arrays are the uint16 bitmask of :mod:`reducer.ops.bits`
(any nonzero value excludes a pixel).  Inputs are never modified.

Why
---
A dome flat is lit differently from the night sky (a lamp gradient, scattered light), so a
flat-fielded science frame can still carry a large-scale *illumination* error that multiplies
sky and stars alike; in red filters thin CCDs add *fringes*, an additive interference
pattern proportional to the night-sky emission lines.  Both are the same in every science
frame of a filter, while the stars move from frame to frame when the telescope dithers.

How (:func:`combine_master_sky`)
--------------------------------
1. Each frame (all its detectors) is divided by its own sky level ``L`` (median over the
   detectors of the :func:`reducer.ops.sky.estimate_sky` level, in e-), so a frame becomes
   ``1 + (illumination - 1) + fringe + noise`` on blank sky.  Its sources
   (``estimate_sky``'s dilated source mask) and bad pixels are excluded.
2. The frames are combined per pixel with the masters' clipping engine
   (:func:`reducer.ops.combine.clipped_mean`, ``nsigma``, inverse-variance propagation from
   the frames' uncertainty planes divided by ``L``): the normalised master sky ``M``, its
   uncertainty and the count of frames per pixel.  Pixels with no frame left (a source
   at the same place in every frame: the frames were not dithered) are NaN there.
3. *Illumination* ``I``: the large-scale part of ``M``, the sky model of
   :mod:`reducer.ops.sky` run on ``M`` (meshes of ``box`` pixels, trend surface, spline),
   without source masking.  Its noise (a median over ~box^2 pixels and N frames) is far below
   0.1 % and is neglected, as the s step neglects its own model's noise.
4. *Fringes* ``F = M / I - 1``, smoothed by a normalised Gaussian of ``fringe_sigma`` px
   (NaN-aware).  The smoothing cuts the master's pixel noise by ``sqrt(4 pi sigma^2)``
   (x3.5 at 1 px) and damps a fringe of wavelength ``lambda`` by
   ``exp(-2 pi^2 sigma^2 / lambda^2)`` (0.92 at 15 px, 0.98 at 30 px); the per-frame fitted
   scale absorbs most of that.  ``FRINGE_UNC`` is the smoothed uncertainty (exact for the
   continuous kernel: ``var = G_{sigma/sqrt2}[w u^2] / (4 pi sigma^2 G_sigma[w]^2)``).
   Where ``M`` has no data, ``F = 0`` and ``FRINGE_UNC`` is the rms of ``F`` elsewhere.

How it is applied (:func:`apply_master_sky`, in the s step before the sky is fitted)
----------------------------------------------------------------------------------
- illumination: ``data / I`` and ``unc / I`` (stars and sky alike: the flat's error
  scaled both);
- fringes: ``data - c * S * F`` with ``S`` the frame's smooth sky model and ``c`` fitted by
  weighted least squares on its blank-sky pixels (``c = 1`` when the fringes scale with the
  sky level; clouds, moon and the sky's emission-line mix change it), with its error
  ``sigma_c``; the master's own noise is added to the uncertainty plane:
  ``unc^2 + (c S FRINGE_UNC)^2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["MasterSky", "FrameSky", "frame_sky", "combine_master_sky", "apply_master_sky",
           "MODES"]

#: what a master sky can correct
MODES = ("illumination", "fringe")


@dataclass(frozen=True)
class FrameSky:
    """One frame prepared for the master sky (:func:`frame_sky`).

    Attributes
    ----------
    level : float
        The frame's sky level L [e-/pixel] (median over detectors).
    ratio : dict of str to ndarray (float32)
        ``data / L`` per detector (dimensionless).
    unc : dict of str to ndarray (float32)
        ``unc / L`` per detector.
    excluded : dict of str to ndarray (bool)
        Pixels left out: bad pixels, non-finite values and the frame's sources.
    """

    level: float
    ratio: dict
    unc: dict
    excluded: dict


@dataclass(frozen=True)
class MasterSky:
    """A master sky (:func:`combine_master_sky`); dicts are per detector.

    Attributes
    ----------
    sky, unc : dict of str to ndarray (float32)
        Normalised clipped mean ``M`` and its 1-sigma uncertainty (dimensionless; NaN
        where no frame had a usable pixel).
    cnt : dict of str to ndarray (int16)
        Frames used per pixel.
    illum : dict of str to ndarray (float32)
        Large-scale illumination ``I`` (median over all detectors normalised to 1).
    fringe, fringe_unc : dict of str to ndarray (float32)
        Smoothed fringe pattern ``F`` (fraction of the sky) and its uncertainty.
    levels : tuple of float
        Sky level of each input frame [e-/pixel].
    empty_fraction : float
        Fraction of pixels with no usable frame (non-dithered frames: stars overlap).
    """

    sky: dict
    unc: dict
    cnt: dict
    illum: dict
    fringe: dict
    fringe_unc: dict
    levels: tuple
    empty_fraction: float


def frame_sky(detectors, *, box: int = 64, dilate: int = 5, nsigma_src: float = 4.0) -> FrameSky:
    """Normalise one frame by its sky level and find what the master sky must not use.

    Parameters
    ----------
    detectors : mapping of str to (data, unc, mask)
        Per detector: flat-fielded image [e-] with its sky, 1-sigma uncertainty [e-] and
        uint16 bitmask.  Not modified.
    box : int
        Mesh size [pixel] of the sky estimate that finds the sources and the level.
    dilate : int
        Radius [pixel] by which the sources are grown.

    Returns
    -------
    FrameSky

    Raises
    ------
    ValueError
        No detector, or a sky level that is not positive (a master sky needs sky).
    """
    from .sky import estimate_sky
    if not detectors:
        raise ValueError("frame_sky needs at least one detector")
    levels, excl = [], {}
    for name, (data, unc, mask) in detectors.items():
        res = estimate_sky(data, mask, box=box, dilate=dilate, nsigma_src=nsigma_src)
        levels.append(res.level)
        excl[name] = res.source_mask | (np.asarray(mask) != 0) | ~np.isfinite(data)
    level = float(np.median(levels))
    if not level > 0:
        raise ValueError(f"sky level {level:.3g} e- is not positive: no sky to build a master sky from")
    ratio = {n: (np.asarray(d, np.float64) / level).astype(np.float32) for n, (d, _, _) in detectors.items()}
    unc = {n: (np.asarray(u, np.float64) / level).astype(np.float32) for n, (_, u, _) in detectors.items()}
    return FrameSky(level, ratio, unc, excl)


def _smooth_nan(img: np.ndarray, unc: np.ndarray, sigma: float):
    """NaN-aware normalised Gaussian smoothing of ``img`` and its uncertainty."""
    from scipy.ndimage import gaussian_filter
    w = np.isfinite(img) & np.isfinite(unc)
    v = np.where(w, img, 0.0)
    u2 = np.where(w, unc.astype(np.float64) ** 2, 0.0)
    if sigma <= 0:
        return np.where(w, v, np.nan), np.where(w, np.sqrt(u2), np.nan)
    wf = w.astype(np.float64)
    den = gaussian_filter(wf, sigma, mode="reflect")
    num = gaussian_filter(v * wf, sigma, mode="reflect")
    var = gaussian_filter(u2, sigma / math.sqrt(2.0), mode="reflect") / (4 * math.pi * sigma ** 2)
    ok = den > 0.05
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(ok, num / den, np.nan)
        sig = np.where(ok, np.sqrt(var) / den, np.nan)
    return out, sig


def combine_master_sky(frames, *, nsigma: float = 3.0, box: int = 64,
                       fringe_sigma: float = 1.0) -> MasterSky:
    """Combine normalised frames into a master sky with illumination and fringe maps.

    Parameters
    ----------
    frames : sequence of FrameSky
        The frames (:func:`frame_sky`), all with the same detectors and shapes.
    nsigma : float
        Clipping half-width of the combination (robust sigmas).
    box : int
        Mesh size [pixel] of the illumination map (larger than the fringes' wavelength,
        smaller than the illumination's scale).
    fringe_sigma : float
        Gaussian sigma [pixel] of the fringe map's smoothing; 0 = none.

    Returns
    -------
    MasterSky

    Raises
    ------
    ValueError
        Fewer than 2 frames, detectors or shapes that differ, or no usable pixel.
    """
    from .combine import clipped_mean
    from .sky import estimate_sky
    frames = list(frames)
    if len(frames) < 2:
        raise ValueError(f"a master sky needs at least 2 frames, got {len(frames)}")
    names = list(frames[0].ratio)
    for i, f in enumerate(frames[1:], 1):
        if list(f.ratio) != names:
            raise ValueError(f"frame {i} has detectors {list(f.ratio)}, the first {names}")
        for n in names:
            if f.ratio[n].shape != frames[0].ratio[n].shape:
                raise ValueError(f"frame {i} detector {n} has shape {f.ratio[n].shape}, "
                                 f"the first {frames[0].ratio[n].shape}")
    sky, unc, cnt = {}, {}, {}
    for n in names:
        cube = np.stack([f.ratio[n] for f in frames])
        m, u, c = clipped_mean(cube, nsigma, masks=np.stack([f.excluded[n] for f in frames]),
                               uncs=np.stack([f.unc[n] for f in frames]), unc_from="input")
        sky[n], unc[n], cnt[n] = m, u, c.astype(np.int16)
    npix = sum(v.size for v in sky.values())
    empty = sum(int(np.count_nonzero(~np.isfinite(v))) for v in sky.values()) / npix
    if empty >= 1.0:
        raise ValueError("master sky: no pixel is free of sources and defects in any frame")
    illum = {}
    for n in names:
        bad = ~np.isfinite(sky[n])
        illum[n] = estimate_sky(np.where(bad, 1.0, sky[n]), bad, box=box, nsigma_src=1e30).sky
    norm = float(np.median(np.concatenate([v.ravel() for v in illum.values()])))
    illum = {n: (v / norm).astype(np.float32) for n, v in illum.items()}
    fringe, fringe_unc = {}, {}
    for n in names:
        f, fu = _smooth_nan(sky[n] / illum[n] - 1.0, unc[n] / illum[n], fringe_sigma)
        fringe[n], fringe_unc[n] = f, fu
    allf = np.concatenate([v[np.isfinite(v)] for v in fringe.values()])
    rms = float(np.std(allf)) if allf.size else 0.0
    for n in names:
        bad = ~np.isfinite(fringe[n]) | ~np.isfinite(fringe_unc[n])
        fringe[n] = np.where(bad, 0.0, fringe[n]).astype(np.float32)
        fringe_unc[n] = np.where(bad, rms, fringe_unc[n]).astype(np.float32)
    return MasterSky(sky=sky, unc=unc, cnt=cnt, illum=illum, fringe=fringe, fringe_unc=fringe_unc,
                     levels=tuple(f.level for f in frames), empty_fraction=float(empty))


@dataclass(frozen=True)
class Applied:
    """Result of :func:`apply_master_sky` for one frame; dicts are per detector.

    Attributes
    ----------
    data, unc : dict of str to ndarray (float32)
        Corrected image and uncertainty [e-].
    fringe_scale, fringe_scale_err : float
        Fitted fringe scale ``c`` and its 1-sigma error (NaN without fringe correction).
    """

    data: dict
    unc: dict
    fringe_scale: float
    fringe_scale_err: float


def apply_master_sky(detectors, master: MasterSky, modes=MODES, *, box: int = 64) -> Applied:
    """Correct one frame's illumination and fringes with a master sky.

    Parameters
    ----------
    detectors : mapping of str to (data, unc, mask)
        Flat-fielded image with its sky [e-], 1-sigma uncertainty [e-], uint16 bitmask,
        per detector (those of the master).  Not modified.
    master : MasterSky
    modes : sequence of {'illumination', 'fringe'}
        What to correct; illumination first.
    box : int
        Mesh size [pixel] of the sky model ``S`` that scales the fringes.

    Returns
    -------
    Applied

    Raises
    ------
    ValueError
        An unknown mode, a detector the master does not have, or shapes that differ.
    """
    from .sky import estimate_sky
    modes = tuple(modes)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"master sky mode {m!r} is not one of {', '.join(MODES)}")
    data, unc = {}, {}
    for n, (d, u, _) in detectors.items():
        if n not in master.illum:
            raise ValueError(f"the master sky has no detector {n} (it has {', '.join(master.illum)})")
        if np.shape(d) != master.illum[n].shape:
            raise ValueError(f"detector {n}: frame shape {np.shape(d)} differs from the master "
                             f"sky's {master.illum[n].shape}")
        d = np.asarray(d, np.float64)
        u = np.asarray(u, np.float64)
        if "illumination" in modes:
            d, u = d / master.illum[n], u / master.illum[n]
        data[n], unc[n] = d, u
    c = cerr = float("nan")
    if "fringe" in modes:
        num = den = 0.0
        model, skys = {}, {}
        for n, (_, _, mask) in detectors.items():
            res = estimate_sky(data[n], mask, box=box)
            s = skys[n] = res.sky.astype(np.float64)
            model[n] = s * master.fringe[n]
            use = (~res.source_mask & (np.asarray(mask) == 0) & np.isfinite(data[n])
                   & (unc[n] > 0))
            w = 1.0 / (unc[n][use] ** 2 + (s[use] * master.fringe_unc[n][use]) ** 2)
            num += float(np.sum(w * (data[n][use] - s[use]) * model[n][use]))
            den += float(np.sum(w * model[n][use] ** 2))
        if den > 0:
            c, cerr = num / den, 1.0 / math.sqrt(den)
            for n in data:
                data[n] = data[n] - c * model[n]
                unc[n] = np.sqrt(unc[n] ** 2 + (c * skys[n] * master.fringe_unc[n]) ** 2)
    return Applied({n: v.astype(np.float32) for n, v in data.items()},
                   {n: v.astype(np.float32) for n, v in unc.items()}, c, cerr)
