"""Cosmic rays by comparison with companion exposures of the same field (pure, no I/O).

A cosmic ray is in one exposure only, a star in all of them (the idea of CR-split,
IRAF ``crrej`` and ``driz_cr``).  The z step (:func:`reducer.ops.cosmics.clean_cosmics`)
calls :func:`compare_companions` when it is given *companions*: the same detector of other
dithered exposures of the same field and filter, sky-subtracted, in electrons, with their
1-sigma uncertainty and bitmask, *not registered*.  Inputs are never modified.

Steps
-----
1. Registration, per companion (:func:`register`): a translation.  Coarse: the peak of
   the FFT cross-correlation of the two images' bright-source maps (pixels above
   ``5`` sigma, S/N clipped at 50, masked pixels 0), block-summed by ``4`` (a
   2048 x 4096 frame correlates as 512 x 1024, zero-padded).  The peak must stand
   ``peak_min`` robust standard deviations above the correlation's median and lie within
   ``max_shift`` [pixel].  Fine: the bright local maxima (S/N > 20) of both images are
   centroided (5 x 5 first moments) and matched within 3.5 px of the coarse shift; the
   shift is the mean offset of the matched pairs after a 0.5 px clip, and the companion
   is refused when fewer than ``min_stars`` match or their offsets scatter by more than
   ``max_resid`` [pixel] rms.
2. Flux scale, per companion: the median ratio of the 11 x 11 box sums of the matched
   stars (unsaturated, unmasked, S/N of the sum > 50) (transparency, exposure time).
3. Each companion is resampled onto the frame (bilinear, the shift's fraction),
   divided by its scale; its variance follows (sum of the squared weights times the
   variances).  A companion pixel is unusable when any of the four pixels it is
   interpolated from is masked (within 2 px of a SATURATED one: clipped flanks) or off
   the companion.
4. The model: the *clipped mean* of the companions at each pixel: values more than 4
   sigma (of the pairwise difference, plus the ``scale_noise`` term) above the lowest are
   left out (the companions' own cosmic rays), the others averaged; its variance is
   that of the mean.  With one companion, that one.  (The per-pixel median of 3-4
   companions is noisier than the clipped mean and, with 2, the minimum is biased low
   by 0.56 sigma: both measured as worse on the test frames, see below.)
5. A pixel is a *seed* when ``data - model > nsigma * sigma_d``,
   ``sigma_d^2 = unc^2 + unc_model^2 + (scale_noise * max(model, 0))^2`` (the last term
   absorbs seeing differences and sub-pixel misregistration on stars), and it stands
   out locally: ``data`` minus the median of its 5 x 5 box above ``local_sigma`` x
   ``unc``.  The flags (the seeds and those the single-frame passes give) are then grown
   into 8-connected neighbours with ``data - model > grow_sigma * sigma_d`` (iterated).
   Masked pixels and pixels no usable companion covers are never flagged.
   *Variable stars*: near sources (a 7 x 7 box holding a model pixel above 5 sigma) the
   excess ``data - model`` of the box is fitted as ``a * model`` (weighted least squares;
   a second fit leaves out the first fit's pixels above 2.5 sigma and their neighbours,
   so a cosmic ray does not pull ``a``); where ``a`` is significant (> 5 sigma_a) and
   positive, the significance of the pixel is that of ``data - (1 + a) * model`` against
   sigma_d computed with ``(1 + a) * model``.  A star brighter in this frame than in its
   companions (flare, cataclysmic variable, eclipsing binary, transit host) is thus
   neither flagged nor repaired (tested at 1.3 / 2 / 5 x, and 0.5 x, at S/N 200); a
   deposit on it is still found when it exceeds ~4.5 x ``scale_noise`` of the star's
   light there (tested: a deposit equal to the star's light at 2 px from its centre).
   A 10 sigma (photon noise) deposit on a bright star's flank is not: the ``scale_noise``
   term dominates sigma_d there (as without the refit).

6. Single-frame flags (L.A.Cosmic, PSF test) on pixels the companions show as a source
   (model above ``veto_snr`` = 5 sigma) and that do not exceed the model by
   ``grow_sigma`` are *cleared*: a star seen in every exposure, not a cosmic ray.

Measured (``tests/test_sky_cosmics.py``; the frame alone / with 2 / with 3 companions)
---------------------------------------------------------------------------------------
Synthetic: 8 dithered sets (256 x 256, sky 1000 e-, FWHM 2.0-3.5 px, companions dithered
by up to 20 px sub-pixel, FWHM x 0.85-1.15, transparency x 0.9-1.1, their own noise
and cosmic rays).  Simulator: 4 dithered 300 s exposures x 2 detectors (sky 5 000-9 400
e-, dithers up to 64 px between exposures), each against the others.

==========  ======================  ======================  ======================
            > 5 sigma flagged       star pixels flagged     noise pixels flagged
==========  ======================  ======================  ======================
synthetic   88.3 / 97.7 / 98.4 %    0.81 / 0.035 / 0.032 %  19 / 21 / 18 of 468 k
simulator   80.7 / 95.9 / 96.7 %    0.054 / 0.044 / 0.003 % 32 / 35 / 30 of 650 k
==========  ======================  ======================  ======================

(> 10 sigma: synthetic 94.0 / 98.9 / 99.6 %, simulator 91.3 / 98.6 / 98.8 %; > 20 sigma
96.6 / 99.1 / 99.6 % and 95.2 / 99.8 / 99.8 %.)  The shifts agree with the truth to
< 0.1 px (matched-star rms 0.10-0.16 px), the scales with the transparency to < 3 %.
The single-frame star-pixel figure of the synthetic sets (0.81 %) is whole blended or
edge-cut bright stars flagged by the single-frame passes; step 6 clears them.
Tuning (simulator, 2 companions; synthetic in brackets): ``scale_noise`` 0.10 / 0.15 /
0.20 gives 96.4 / 95.9 / 95.3 % (97.9 / 97.7 / 97.5 %) with star pixels 0.044 % on the
simulator each and 0.06 / 0.035 / 0.03 % synthetic, noise pixels 54 / 35 / 35;
``nsigma`` 4.0 / 4.5 / 5.0 gives 96.2 / 95.9 / 95.0 % with 44 / 35 / 33 noise pixels.
What remains unflagged: pixels of 5-6 sigma at the faint edges of events that fail
``grow_sigma`` and events on bright star cores (the ``scale_noise`` term).

Cost: 1.2-2.0 s for a 2048 x 4096 frame with 2 companions (float32; registration
~0.25 s per companion), against ~10.5 s for L.A.Cosmic and the second pass on that frame
(measured on the shared 2-core machine).

Known limitation: a moving object (an asteroid in one exposure only, no source in the
companions at its place) cannot be told from a cosmic-ray spot by comparison: it is
flagged and repaired like one where the comparison runs.  ``[cosmics] compare = false``
turns the comparison off for nights where that matters.  (Variable stars are handled by
the refit of step 5.)  With the refit (2 / 3 companions): synthetic 97.7 / 98.4 % of
the > 5 sigma pixels (unchanged), simulator 95.5 / 96.4 % (was 95.9 / 96.7 %; > 10 sigma
98.4 / 98.5 %, > 20 sigma 99.6 / 99.6 %), star pixels unchanged (0.035 / 0.032 % and
0.044 / 0.003 %).  Measured without the significance gate (refit wherever a source is near):
simulator 94.5 % with 2 companions (cosmic rays near stars raise ``a``), hence the gate
and the clipped second fit.

Settings (``[cosmics]`` of the night): ``compare = true`` (use the companions when
given), ``compare_nsigma`` (``nsigma``), ``compare_scale_noise`` (``scale_noise``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .bits import SATURATED, UNUSABLE

__all__ = ["CompanionFit", "CompareResult", "compare_companions", "register"]

#: block size [pixel] of the coarse (FFT) registration
BLOCK = 4
#: half-size [pixel] of the box sums that give the flux scale (11 x 11)
_APER = 5


@dataclass(frozen=True)
class CompanionFit:
    """How one companion was registered and scaled.

    Attributes
    ----------
    index : int
        Position in the ``companions`` sequence.
    used : bool
        Whether it entered the model.
    shift : tuple of float
        (dy, dx) [pixel]: frame pixel (y, x) is companion pixel (y + dy, x + dx).
        NaN when not registered.
    scale : float
        Companion flux / frame flux (NaN when not measured).
    nstars : int
        Matched stars of the fine registration.
    resid_px : float
        rms [pixel] of the matched stars' offsets about the shift.
    why : str
        Why it was refused ('' when used).
    """

    index: int
    used: bool
    shift: tuple[float, float] = (float("nan"), float("nan"))
    scale: float = float("nan")
    nstars: int = 0
    resid_px: float = float("nan")
    why: str = ""


@dataclass(frozen=True)
class CompareResult:
    """Result of :func:`compare_companions`.

    Attributes
    ----------
    crmask : ndarray of bool
        Pixels flagged by the comparison (seeds and growing from them and from
        ``start``); all False when no companion was used.
    covered : ndarray of bool
        Pixels where at least one usable companion gives a model value.
    companions : tuple of CompanionFit
        One per companion given, in order.
    model : ndarray of float32 or None
        The companions' model of the frame [e-] (NaN where not covered); None when no
        companion was used.
    cleared : ndarray of bool or None
        Pixels of ``start`` (single-frame flags) that the companions show as a source
        (model above ``veto_snr`` sigma) and that do not exceed the model (below
        ``grow_sigma``): a star, not a cosmic ray.  None when no companion was used.
    """

    crmask: np.ndarray
    covered: np.ndarray
    companions: tuple = field(default_factory=tuple)
    model: np.ndarray | None = None
    cleared: np.ndarray | None = None

    @property
    def nused(self) -> int:
        """Number of companions that entered the model."""
        return sum(1 for c in self.companions if c.used)


# --------------------------------------------------------------------------- registration
def _source_map(d, unc, bad, clip: float = 5.0, top: float = 50.0):
    """Bright-source map (float32): S/N clipped to [clip, top], 0 below clip or masked."""
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(bad, 0.0, d / unc).astype(np.float32)
    s[~(s > clip)] = 0.0
    np.minimum(s, top, out=s)
    return s


def _block_sum(a, b: int):
    ny, nx = (a.shape[0] // b) * b, (a.shape[1] // b) * b
    return a[:ny, :nx].reshape(ny // b, b, nx // b, b).sum(axis=(1, 3))


def _peaks(d, unc, bad, snr: float, edge: int):
    """Local maxima (5 x 5) with S/N above ``snr``, away from masked pixels and edges."""
    ny, nx = d.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        yy, xx = np.nonzero((d > snr * unc) & ~bad)
    ok = (yy >= edge) & (yy < ny - edge) & (xx >= edge) & (xx < nx - edge)
    yy, xx = yy[ok], xx[ok]
    if yy.size == 0:
        return yy, xx
    v = d[yy, xx]
    keep = np.ones(yy.size, bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            if dy or dx:
                w = d[yy + dy, xx + dx]
                keep &= (v > w) | ((v == w) & ((dy < 0) | ((dy == 0) & (dx < 0))))
                keep &= ~bad[yy + dy, xx + dx]
    return yy[keep], xx[keep]


def _centroids(d, yy, xx):
    """First moments (5 x 5, positive values) about the peaks: (y, x) [pixel]."""
    o = np.arange(-2, 3)
    Y = yy[:, None, None] + o[None, :, None]
    X = xx[:, None, None] + o[None, None, :]
    w = np.maximum(d[Y, X].astype(np.float64), 0.0)
    s = w.sum(axis=(1, 2))
    s = np.where(s > 0, s, 1.0)
    cy = yy + (w.sum(axis=2) * o[None, :]).sum(axis=1) / s
    cx = xx + (w.sum(axis=1) * o[None, :]).sum(axis=1) / s
    return cy, cx


def _box_sums(d, bad, yy, xx, h: int = _APER):
    """Box sums (2h+1)^2 about integer pixels; NaN when a masked pixel or the edge is in."""
    ny, nx = d.shape
    o = np.arange(-h, h + 1)
    out = np.full(yy.size, np.nan)
    ok = (yy >= h) & (yy < ny - h) & (xx >= h) & (xx < nx - h)
    if ok.any():
        Y = yy[ok][:, None, None] + o[None, :, None]
        X = xx[ok][:, None, None] + o[None, None, :]
        s = d[Y, X].astype(np.float64).sum(axis=(1, 2))
        s[bad[Y, X].any(axis=(1, 2))] = np.nan
        out[ok] = s
    return out


def _coarse_shift(sa, sb, max_shift: float, peak_min: float):
    """Integer shift [pixel] (dy, dx) with b(y + dy, x + dx) ~ a(y, x), from the FFT
    cross-correlation of the block-summed source maps; (None, why) when refused."""
    A, B = _block_sum(sa, BLOCK), _block_sum(sb, BLOCK)
    if not (A.any() and B.any()):
        return None, "no bright source to register"
    ny, nx = A.shape
    fy, fx = 2 * ny, 2 * nx
    from scipy import fft
    fy, fx = fft.next_fast_len(fy, real=True), fft.next_fast_len(fx, real=True)
    c = fft.irfft2(np.conj(fft.rfft2(A, (fy, fx))) * fft.rfft2(B, (fy, fx)), (fy, fx))
    # c[dy, dx] = sum_y A(y) B(y + dy) (indices mod the padded size)
    lim = int(math.ceil(max_shift / BLOCK)) + 1
    iy = np.r_[0:min(lim + 1, fy), max(fy - lim, lim + 1):fy]
    ix = np.r_[0:min(lim + 1, fx), max(fx - lim, lim + 1):fx]
    sub = c[np.ix_(iy, ix)]
    k = np.unravel_index(int(np.argmax(sub)), sub.shape)
    peak = sub[k]
    med = float(np.median(sub))
    mad = float(np.median(np.abs(sub - med))) * 1.4826
    signif = (peak - med) / mad if mad > 0 else float("inf")
    dy, dx = int(iy[k[0]]), int(ix[k[1]])
    dy = dy - fy if dy > fy // 2 else dy
    dx = dx - fx if dx > fx // 2 else dx
    if not signif >= peak_min:
        return None, f"correlation peak {signif:.1f} sigma < {peak_min:g}"
    return (dy * BLOCK, dx * BLOCK), ""


def register(d, unc, bad, dc, uncc, badc, *, max_shift: float = 150.0, peak_min: float = 8.0,
             min_stars: int = 3, max_resid: float = 0.35):
    """Translation and flux scale of a companion image relative to a frame.

    Parameters
    ----------
    d, unc, bad : ndarray (ny, nx)
        The frame: sky-subtracted data [e-], 1-sigma uncertainty [e-], unusable pixels.
    dc, uncc, badc : ndarray (ny, nx)
        The same for the companion.
    max_shift : float
        Largest shift accepted [pixel, per axis].
    peak_min : float
        Least significance of the correlation peak [robust sigma of the correlation].
    min_stars : int
        Least number of matched bright stars.
    max_resid : float
        Largest rms [pixel] of the matched stars' offsets about the shift.

    Returns
    -------
    dict
        ``shift`` (dy, dx) [pixel] (companion pixel = frame pixel + shift), ``scale``
        (companion / frame flux), ``nstars``, ``resid_px``, ``why`` ('' when accepted; the
        reason otherwise, with ``shift`` / ``scale`` NaN where not measured).
    """
    from scipy.spatial import cKDTree

    nan = float("nan")
    out = dict(shift=(nan, nan), scale=nan, nstars=0, resid_px=nan, why="")
    coarse, why = _coarse_shift(_source_map(d, unc, bad), _source_map(dc, uncc, badc),
                                max_shift, peak_min)
    if coarse is None:
        out["why"] = why
        return out
    ya, xa = _peaks(d, unc, bad, 20.0, _APER)
    yb, xb = _peaks(dc, uncc, badc, 20.0, _APER)
    if ya.size < min_stars or yb.size < min_stars:
        out["why"] = f"too few bright stars ({ya.size}, {yb.size}) to refine the shift"
        return out
    cya, cxa = _centroids(d, ya, xa)
    cyb, cxb = _centroids(dc, yb, xb)
    tree = cKDTree(np.c_[cyb, cxb])
    dist, j = tree.query(np.c_[cya + coarse[0], cxa + coarse[1]], distance_upper_bound=3.5)
    ok = np.isfinite(dist)
    if np.count_nonzero(ok) < min_stars:
        out["why"] = f"{np.count_nonzero(ok)} stars matched (< {min_stars})"
        return out
    offy, offx = cyb[j[ok]] - cya[ok], cxb[j[ok]] - cxa[ok]
    my, mx = float(np.median(offy)), float(np.median(offx))
    keep = np.hypot(offy - my, offx - mx) < 0.5
    n = int(np.count_nonzero(keep))
    out["nstars"] = n
    if n < min_stars:
        out["why"] = f"{n} stars agree on the shift (< {min_stars})"
        return out
    sy, sx = float(offy[keep].mean()), float(offx[keep].mean())
    resid = float(np.sqrt(np.mean((offy[keep] - sy) ** 2 + (offx[keep] - sx) ** 2)))
    out.update(shift=(sy, sx), resid_px=resid)
    if abs(sy) > max_shift or abs(sx) > max_shift:
        out["why"] = f"shift ({sy:.1f}, {sx:.1f}) px beyond {max_shift:g}"
        return out
    if not resid <= max_resid:
        out["why"] = f"matched stars scatter by {resid:.2f} px rms (> {max_resid:g})"
        return out
    # flux scale: box sums of the matched stars (integer pixels of the peaks)
    ia, ib = np.nonzero(ok)[0][keep], j[ok][keep]
    fa = _box_sums(d, bad, ya[ia], xa[ia])
    fb = _box_sums(dc, badc, yb[ib], xb[ib])
    va = _box_sums(unc.astype(np.float64) ** 2, bad, ya[ia], xa[ia])
    vb = _box_sums(uncc.astype(np.float64) ** 2, badc, yb[ib], xb[ib])
    with np.errstate(invalid="ignore", divide="ignore"):
        good = (fa > 50 * np.sqrt(va)) & (fb > 50 * np.sqrt(vb))
    if np.count_nonzero(good) < min_stars:
        out["why"] = f"{np.count_nonzero(good)} stars to measure the flux scale (< {min_stars})"
        return out
    out["scale"] = float(np.median(fb[good] / fa[good]))
    if not out["scale"] > 0:
        out["why"] = f"flux scale {out['scale']:.3g} is not positive"
    return out


# --------------------------------------------------------------------------- resampling
def _shifted(a, iy: int, ix: int, fill):
    """out[y, x] = a[y + iy, x + ix], ``fill`` outside ``a``."""
    ny, nx = a.shape
    out = np.full(a.shape, fill, dtype=a.dtype)
    y0, y1 = max(0, -iy), min(ny, ny - iy)
    x0, x1 = max(0, -ix), min(nx, nx - ix)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = a[y0 + iy:y1 + iy, x0 + ix:x1 + ix]
    return out


def _resample(dc, varc, badc, sy: float, sx: float):
    """Companion values at frame pixel (y, x) = companion (y + sy, x + sx), bilinear:
    data, variance (float32) and unusable (bool: any contributing pixel masked or off)."""
    iy, ix = math.floor(sy), math.floor(sx)
    fy, fx = sy - iy, sx - ix
    d = np.zeros(dc.shape, np.float32)
    v = np.zeros(dc.shape, np.float32)
    b = np.zeros(dc.shape, bool)
    for oy, wy in ((0, 1.0 - fy), (1, fy)):
        for ox, wx in ((0, 1.0 - fx), (1, fx)):
            w = wy * wx
            if w <= 1e-6:
                continue
            d += np.float32(w) * _shifted(dc, iy + oy, ix + ox, np.float32(0))
            v += np.float32(w * w) * _shifted(varc, iy + oy, ix + ox, np.float32(0))
            b |= _shifted(badc, iy + oy, ix + ox, True)
    return d, v, b


# --------------------------------------------------------------------------- comparison
def _local_excess(d, bad, yy, xx):
    """``d`` minus the median of the unmasked pixels of its 5 x 5 box, at (yy, xx)."""
    import warnings

    ny, nx = d.shape
    o = np.arange(-2, 3)
    Y = np.clip(yy[:, None, None] + o[None, :, None], 0, ny - 1)
    X = np.clip(xx[:, None, None] + o[None, None, :], 0, nx - 1)
    vals = np.where(bad[Y, X], np.nan, d[Y, X]).reshape(yy.size, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(vals, axis=1)
    return d[yy, xx] - np.where(np.isfinite(med), med, 0.0)


def _grow(excess, allowed, start, maxiter: int = 8):
    """Grow ``start`` into 8-connected ``allowed`` pixels with ``excess`` (bool)."""
    cm = start & allowed
    ny, nx = cm.shape
    fy, fx = np.nonzero(cm)
    dy8 = np.array([-1, -1, -1, 0, 0, 1, 1, 1])
    dx8 = np.array([-1, 0, 1, -1, 1, -1, 0, 1])
    for _ in range(maxiter):
        if fy.size == 0:
            break
        yy = (fy[:, None] + dy8[None, :]).ravel()
        xx = (fx[:, None] + dx8[None, :]).ravel()
        ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        idx = np.unique(yy[ok] * nx + xx[ok])
        yy, xx = idx // nx, idx % nx
        add = excess[yy, xx] & allowed[yy, xx] & ~cm[yy, xx]
        fy, fx = yy[add], xx[add]
        cm[fy, fx] = True
    return cm


def _refit_sources(d, model, vmodel, unc, allowed, z, f, *, box: int, src_snr: float,
                   clip_sigma: float = 2.5, gate_sigma: float = 5.0):
    """``(data - model) / sigma_d`` with the model rescaled locally near sources.

    Where a ``box`` x ``box`` box about a pixel holds a model pixel above ``src_snr``
    sigma, the excess ``data - model`` over the box's usable pixels is fitted as ``a *
    model`` (weighted least squares, weights ``1 / sigma_d^2``; pixels of the first fit's
    residual above ``nsigma`` left out of a second fit: a cosmic ray does not pull ``a``),
    ``a`` clipped at 0, and the pixel's significance becomes ``(data - (1 + a) model) /
    sigma_d'``, ``sigma_d'^2 = unc^2 + (1 + a)^2 unc_model^2 + (f (1 + a) model)^2``: a
    star brighter in this frame than in its companions (a variable) is not an excess, a
    concentrated deposit on it still is.  Elsewhere ``z`` is returned as it is.
    """
    from scipy.ndimage import binary_dilation, maximum_filter, uniform_filter

    f32 = np.float32
    m = np.where(allowed, model, 0).astype(f32)
    vm = np.where(allowed, vmodel, 0).astype(f32)
    u2 = np.square(unc, dtype=f32) if np.ndim(unc) else np.full(m.shape, f32(unc) ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        src = allowed & (m > src_snr * np.sqrt(u2 + vm))
    if not src.any():
        return z
    region = maximum_filter(src, size=box) & allowed
    # the fits are needed at the region's pixels, and the first fit's residual also where
    # the second fit's boxes reach (for its clipping): everything else is left alone, so
    # only the box sums run over the whole image
    near = maximum_filter(region, size=box + 2) & allowed
    at_near = np.flatnonzero(near)
    e = np.where(allowed, d - model, 0).astype(f32)
    w = np.where(allowed, 1.0 / (u2 + vm + np.square(f * np.maximum(m, 0))), 0).astype(f32)

    def fit(wt, at):
        num = uniform_filter(wt * m * e, size=box, mode="constant").ravel()[at].astype(np.float64)
        den = uniform_filter(wt * m * m, size=box, mode="constant").ravel()[at].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            a = np.where(den > 0, num / den, 0.0)
        a = np.maximum(np.where(np.isfinite(a), a, 0.0), 0.0)
        g = 1.0 + a
        mm, ee = m.ravel()[at].astype(np.float64), e.ravel()[at].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            zz = (ee - a * mm) / np.sqrt(u2.ravel()[at] + g * g * vm.ravel()[at]
                                         + (f * g * np.maximum(mm, 0)) ** 2)
        # a / sigma_a (den is the box mean of w m^2: the sum over box^2 pixels)
        return zz, a * np.sqrt(np.maximum(den, 0.0) * box * box)

    z1, _ = fit(w, at_near)
    # pixels of the first residual above clip_sigma, and their 8 neighbours, left out
    high = np.zeros(m.shape, bool)
    high.ravel()[at_near[z1 > clip_sigma]] = True
    clip = binary_dilation(high, np.ones((3, 3), bool))
    at = np.flatnonzero(region)
    z2, sa = fit(np.where(clip, f32(0), w), at)
    keep = sa > gate_sigma
    out = z.copy()
    out.ravel()[at[keep]] = z2[keep].astype(z.dtype)
    return out


def compare_companions(data_e, unc_e, bad, companions, *, nsigma: float = 4.5,
                       scale_noise: float = 0.15, grow_sigma: float = 2.5,
                       local_sigma: float = 3.0, reject_sigma: float = 4.0,
                       start=None, veto_snr: float = 5.0, max_shift: float = 150.0,
                       sat_grow_px: int = 2, refit_box: int = 7, refit_snr: float = 5.0,
                       mask_bits: int = UNUSABLE) -> CompareResult:
    """Flag the pixels that exceed the companions' model of the frame (module docstring).

    Parameters
    ----------
    data_e : ndarray (ny, nx)
        Sky-subtracted frame [e-].  Not modified.
    unc_e : ndarray (ny, nx) or float
        Its 1-sigma uncertainty [e-].
    bad : ndarray of bool (ny, nx)
        Its unusable pixels (never flagged).
    companions : sequence of (data_e, unc_e, mask)
        Other exposures of the same detector and field: sky-subtracted data [e-], 1-sigma
        uncertainty [e-] (array or scalar), uint16 bitmask (or None); not registered.
    nsigma : float
        Seed limit of ``(data - model) / sigma_d``.
    scale_noise : float
        ``f``: fraction of the model added to sigma_d (seeing, misregistration).
    grow_sigma : float
        Limit for the neighbours of flagged pixels, same units; 0 = no growing.
    local_sigma : float
        A seed must also exceed the median of its 5 x 5 box by this many ``unc``.
    reject_sigma : float
        Companion values this far above the lowest (sigma of the difference plus the
        ``scale_noise`` term) are left out of the model (their own cosmic rays).
    start : ndarray of bool, optional
        Pixels already flagged (single-frame passes): grown from too, and cleared
        (``CompareResult.cleared``) where the companions show a source of more than
        ``veto_snr`` sigma that the pixel does not exceed.
    veto_snr : float
        S/N of the model above which a single-frame flag may be cleared; 0 = never.
    max_shift : float
        Largest dither accepted [pixel].
    sat_grow_px : int
        Companion pixels within this many pixels (square) of a SATURATED one are unusable.
    refit_box : int
        Side [pixel] of the box in which the model is refitted with a local flux scale
        near sources (variable stars, step 5 of the module docstring); 0 = no refit.
    refit_snr : float
        The refit applies where the box holds a model pixel above this many sigma.
    mask_bits : int
        Bits of a companion's mask that make a pixel unusable.

    Returns
    -------
    CompareResult

    Raises
    ------
    ValueError
        For a companion that is not a (data, unc, mask) triple, or invalid limits.
    """
    d = np.asarray(data_e, dtype=np.float32)
    shape = d.shape
    bad = np.asarray(bad, dtype=bool) | ~np.isfinite(d)
    unc = np.broadcast_to(np.asarray(unc_e, dtype=np.float32), shape)
    bad = bad | ~(unc > 0)
    if not (nsigma > 0 and scale_noise >= 0 and grow_sigma >= 0 and reject_sigma > 0):
        raise ValueError("need nsigma > 0, scale_noise >= 0, grow_sigma >= 0, reject_sigma > 0")
    fits, models = [], []
    dz = np.where(bad, np.float32(0), d)
    uz = np.where(bad, np.float32(1), unc)
    for i, comp in enumerate(companions or ()):
        try:
            dc, uc, mc = comp
        except (TypeError, ValueError) as exc:
            raise ValueError(f"companion {i} is not a (data_e, unc_e, mask) triple") from exc
        dc = np.asarray(dc, dtype=np.float32)
        if dc.shape != shape:
            fits.append(CompanionFit(i, False, why=f"shape {dc.shape} differs from {shape}"))
            continue
        uc = np.broadcast_to(np.asarray(uc, dtype=np.float32), shape)
        bc = ~np.isfinite(dc) | ~(uc > 0)
        if mc is not None:
            mc = np.asarray(mc)
            bc |= (mc.astype(np.int64) & int(mask_bits)) != 0
            sat = (mc.astype(np.int64) & SATURATED) != 0
            if sat.any() and sat_grow_px > 0:
                from scipy.ndimage import maximum_filter
                bc |= maximum_filter(sat, size=2 * int(sat_grow_px) + 1)
        dcz = np.where(bc, np.float32(0), dc)
        ucz = np.where(bc, np.float32(1), uc)
        r = register(dz, uz, bad, dcz, ucz, bc, max_shift=max_shift)
        if r["why"]:
            fits.append(CompanionFit(i, False, r["shift"], r["scale"], r["nstars"],
                                     r["resid_px"], r["why"]))
            continue
        sy, sx = r["shift"]
        m, v, b = _resample(dcz, ucz * ucz, bc, sy, sx)
        s = np.float32(r["scale"])
        models.append((m / s, v / (s * s), b))
        fits.append(CompanionFit(i, True, r["shift"], r["scale"], r["nstars"], r["resid_px"]))
    if not models:
        return CompareResult(np.zeros(shape, bool), np.zeros(shape, bool), tuple(fits))

    # clipped mean of the companions (their own cosmic rays left out)
    M = np.stack([np.where(b, np.float32(np.nan), m) for m, _, b in models])
    V = np.stack([np.where(b, np.float32(np.nan), v) for _, v, b in models])
    del models
    covered = np.isfinite(M).any(axis=0)
    with np.errstate(invalid="ignore"):
        lo_i = np.argmin(np.where(np.isfinite(M), M, np.inf), axis=0)
        lo = np.take_along_axis(M, lo_i[None], 0)[0]
        vlo = np.take_along_axis(V, lo_i[None], 0)[0]
        f = np.float32(scale_noise)
        lim = (np.float32(reject_sigma) * np.sqrt(V + vlo[None])
               + f * np.maximum(lo, 0)[None])
        keep = np.isfinite(M) & (M - lo[None] <= lim)
        n = keep.sum(axis=0).astype(np.float32)
        model = np.where(keep, M, 0).sum(axis=0) / n
        vmodel = np.where(keep, V, 0).sum(axis=0) / (n * n)
    del M, V, keep, lim
    model[~covered] = np.nan
    allowed = covered & ~bad
    with np.errstate(invalid="ignore"):
        sig = np.sqrt(unc * unc + vmodel + (f * np.maximum(model, 0)) ** 2)
        z = (d - model) / sig
    z[~allowed] = 0
    if refit_box > 0:
        z = _refit_sources(d, model, vmodel, unc, allowed, z, f, box=int(refit_box),
                           src_snr=refit_snr)
    yy, xx = np.nonzero(z > nsigma)
    seeds = np.zeros(shape, bool)
    if yy.size:
        loc = _local_excess(dz, bad, yy, xx) > local_sigma * unc[yy, xx]
        seeds[yy[loc], xx[loc]] = True
    # single-frame flags on sources the companions show as bright: cleared
    cleared = np.zeros(shape, bool)
    st = seeds
    if start is not None:
        start = np.asarray(start, bool)
        with np.errstate(invalid="ignore"):
            src = model > veto_snr * np.sqrt(unc * unc + vmodel)
        cleared = start & allowed & src & (z < max(grow_sigma, 1.0)) & ~seeds
        st = seeds | (start & ~cleared)
    crmask = seeds
    if grow_sigma > 0:
        crmask = _grow(z > grow_sigma, allowed, st) | seeds
    return CompareResult(crmask, covered, tuple(fits), model, cleared & ~crmask)
