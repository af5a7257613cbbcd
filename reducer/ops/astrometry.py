"""Astrometric calibration of one detector image (pure functions; no I/O).

The ``a`` step solves each detector of each science frame in three stages:

1. :func:`initial_wcs` builds a TAN WCS from the header pointing and the nominal plate
   geometry of the instrument profile (pixel scale, orientation, detector position);
2. :func:`detect_stars` finds point sources (photutils ``DAOStarFinder``) and refines
   their centroids with an iterative Gaussian-windowed centroid (SExtractor's
   ``XWIN_IMAGE`` algorithm), dropping masked, saturated, edge and cosmic-ray-like
   sources;
3. :func:`match_and_fit` projects the reference catalogue through the initial WCS,
   finds the pattern match between the brightest detections and the brightest
   catalogue sources with :func:`astroalign.find_transform` (triangle invariants; the
   similarity transform absorbs pointing errors, rotation and a scale error of a few
   per cent; a fallback votes on star-catalogue offsets for crowded fields and lists
   ranked differently), then refines: nearest-neighbour matching, a least-squares TAN
   fit with :func:`astropy.wcs.utils.fit_wcs_from_points` polished by an exact linear
   fit on the tangent plane (optionally with SIP distortion polynomials), sigma
   clipping of the residuals, iterated until the matched set no longer changes.

Conventions
-----------
Pixel coordinates are **zero-based** (the centre of ``data[j, i]`` is ``x = i, y = j``),
as in astropy's ``pixel_to_world`` and photutils; only FITS ``CRPIX`` is one-based.

Orientation follows the instrument profiles (``[wcs]`` table): ``rotation_deg`` is the
position angle of the detector's +y axis, measured from north through east;
``flip_x=True`` means east is to the *left* (+x points west at rotation 0), the parity
of the sky seen on a normal (unmirrored) detector: ``det(CD) < 0``.  ``flip_x=False`` is
the mirrored parity (``det(CD) > 0``).  For example a frame with north down and east
left (``CD1_1 < 0``, ``CD2_2 < 0``, as ARCSAT's PinPoint solutions) is
``rotation_deg=180, flip_x=False``.  The CD matrix [deg/px] is::

    flip_x=True :  s * [[-cos t, sin t], [sin t, cos t]]
    flip_x=False:  s * [[ cos t, sin t], [-sin t, cos t]]      (s = scale / 3600, t = rotation)

A frame that cannot be solved is not an error: :func:`match_and_fit` returns an
:class:`AstrometryResult` whose ``reason`` says why in one line.  ``ValueError`` is raised
only for invalid arguments (programming errors).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "AstrometryResult",
    "FLAG_CROWDED",
    "FLAG_EDGE",
    "FLAG_EXTENDED",
    "FLAG_MASKED",
    "FLAG_NOCONV",
    "FLAG_SATURATED",
    "FLAG_SHARP",
    "cd_matrix",
    "detect_stars",
    "initial_wcs",
    "match_and_fit",
    "wcs_offset_arcsec",
    "wcs_orientation",
]

#: Source flags of :func:`detect_stars` (bit values of the ``flags`` column).
FLAG_EDGE = 1        # the measurement stamp crosses the image edge          (dropped)
FLAG_MASKED = 2      # a masked / non-finite pixel within 1.5 FWHM             (dropped)
FLAG_SATURATED = 4   # a pixel at or above ``saturation`` within 1.5 FWHM      (dropped)
FLAG_NOCONV = 8      # windowed centroid did not converge or ran off           (dropped)
FLAG_SHARP = 16      # FWHM < 0.5 x the median: cosmic ray / hot pixel         (dropped)
FLAG_CROWDED = 32    # another detection within 2.5 FWHM                      (kept)
FLAG_EXTENDED = 64   # FWHM > 1.6 x the median: galaxy, blend                  (kept)
_DROP = FLAG_EDGE | FLAG_MASKED | FLAG_SATURATED | FLAG_NOCONV | FLAG_SHARP

_GAUSS_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))   # FWHM / sigma of a Gaussian
_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))    # median |r| / sigma (2-D Gaussian)


# --------------------------------------------------------------------------- initial WCS
def cd_matrix(pixel_scale_arcsec: float, rotation_deg: float = 0.0, flip_x: bool = True) -> np.ndarray:
    """CD matrix [deg/px] of a plate of given scale and orientation.

    Parameters
    ----------
    pixel_scale_arcsec : float
        Pixel scale [arcsec/px], > 0.
    rotation_deg : float
        Position angle of the detector +y axis [deg], north through east.
    flip_x : bool
        True: east to the left (standard sky parity, ``det(CD) < 0``).

    Returns
    -------
    ndarray (2, 2)
        ``[[CD1_1, CD1_2], [CD2_1, CD2_2]]`` [deg/px].
    """
    s = float(pixel_scale_arcsec) / 3600.0
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"pixel scale must be a positive number, not {pixel_scale_arcsec!r}")
    t = math.radians(float(rotation_deg))
    c, n = math.cos(t), math.sin(t)
    if flip_x:
        return s * np.array([[-c, n], [n, c]])
    return s * np.array([[c, n], [-n, c]])


def initial_wcs(ra_deg: float, dec_deg: float, *, shape: tuple[int, int], pixel_scale_arcsec: float,
                rotation_deg: float = 0.0, flip_x: bool = True, crpix=None):
    """A TAN WCS from a pointing and the nominal plate geometry.

    Parameters
    ----------
    ra_deg, dec_deg : float
        Sky position [deg, ICRS] of the reference pixel ``crpix`` (the header pointing).
    shape : (int, int)
        Image shape (rows, columns) [px].
    pixel_scale_arcsec : float
        Pixel scale [arcsec/px].
    rotation_deg : float
        Position angle of the detector +y axis [deg], measured from north through east.
    flip_x : bool
        True: east to the left (standard sky parity); see the module docstring.
    crpix : (float, float) or None
        FITS (one-based) pixel of the pointing; default the image centre
        ``((nx + 1) / 2, (ny + 1) / 2)``.  For a detector of a mosaic whose header
        pointing refers to the mosaic centre, pass that centre in the detector's pixel
        frame (it may lie off the detector).

    Returns
    -------
    astropy.wcs.WCS
        Celestial TAN WCS with a CD matrix, ``RADESYS = 'ICRS'`` and ``pixel_shape``.
    """
    from astropy.wcs import WCS

    ny, nx = _shape(shape)
    ra, dec = float(ra_deg), float(dec_deg)
    if not (math.isfinite(ra) and math.isfinite(dec) and -90.0 <= dec <= 90.0):
        raise ValueError(f"invalid pointing ra={ra_deg!r}, dec={dec_deg!r} [deg]")
    if crpix is None:
        crpix = ((nx + 1) / 2.0, (ny + 1) / 2.0)
    crpix = np.asarray(crpix, dtype=float)
    if crpix.shape != (2,) or not np.all(np.isfinite(crpix)):
        raise ValueError(f"crpix must be two finite numbers, not {crpix!r}")
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [ra % 360.0, dec]
    w.wcs.crpix = crpix
    w.wcs.cd = cd_matrix(pixel_scale_arcsec, rotation_deg, flip_x)
    w.wcs.radesys = "ICRS"
    w.wcs.set()
    w.pixel_shape = (nx, ny)
    return w


def wcs_orientation(wcs) -> tuple[float, float, bool]:
    """Pixel scale, rotation and parity of a celestial WCS (inverse of :func:`cd_matrix`).

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Celestial WCS (its linear part is used; SIP is ignored).

    Returns
    -------
    scale_arcsec : float
        ``sqrt(|det CD|)`` [arcsec/px].
    rotation_deg : float
        Position angle of +y [deg], north through east, in [0, 360).
    flip_x : bool
        True for standard sky parity (``det(CD) < 0``, east left at rotation 0).
    """
    cd = np.asarray(wcs.celestial.pixel_scale_matrix, dtype=float)
    det = float(np.linalg.det(cd))
    scale = math.sqrt(abs(det)) * 3600.0
    rot = math.degrees(math.atan2(cd[0, 1], cd[1, 1])) % 360.0
    return scale, rot, det < 0


def wcs_offset_arcsec(wcs_a, wcs_b, shape: tuple[int, int], n: int = 10) -> tuple[float, float]:
    """Compare two WCSs over an image: sky separation of the same pixels.

    Parameters
    ----------
    wcs_a, wcs_b : astropy.wcs.WCS
        Celestial WCSs of the same image (SIP distortion, if any, is applied).
    shape : (int, int)
        Image shape (rows, columns) [px].
    n : int
        Grid of ``n x n`` pixels spanning the image, corners included.

    Returns
    -------
    median, max : float
        Median and maximum separation over the grid [arcsec].
    """
    ny, nx = _shape(shape)
    if int(n) < 2:
        raise ValueError("n must be >= 2")
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, int(n)), np.linspace(0, ny - 1, int(n)))
    ra1, de1 = wcs_a.celestial.all_pix2world(gx.ravel(), gy.ravel(), 0)
    ra2, de2 = wcs_b.celestial.all_pix2world(gx.ravel(), gy.ravel(), 0)
    sep = _sep_deg(ra1, de1, ra2, de2) * 3600.0
    return float(np.median(sep)), float(np.max(sep))


# --------------------------------------------------------------------------- detection
def detect_stars(data, mask=None, *, fwhm_px: float = 3.0, nsigma: float = 5.0, max_stars: int = 300,
                 bkg_rms: float | None = None, saturation: float | None = None,
                 box_size: int | None = None, keep_flagged: bool = False,
                 sky_subtracted: bool = False):
    """Detect stars and measure accurate centroids.

    Background: a photutils ``Background2D`` map (sigma-clipped medians in boxes of
    ``box_size`` px, default ``max(64, 16 * fwhm_px)``) on images at least two boxes
    wide, else one sigma-clipped median; with ``sky_subtracted`` (the chain's s step has
    already removed a source-masked sky model) none: the level is 0 and the RMS the
    robust scatter of the image (:func:`_flat_background`), which saves a second sky
    estimate of the frame (3 s on 2048 x 4096 px).  Candidates: ``DAOStarFinder`` above
    ``nsigma`` x the background RMS.  Centroids: iterative Gaussian-windowed centroid
    (SExtractor ``XWIN``), first with a window from ``fwhm_px``, then from the measured
    stellar FWHM (the densest mode of the sources' FWHMs, so that hot pixels, cosmic
    rays and galaxy knots do not bias it): window sigma = FWHM / 2.355.  For a bright
    isolated star the centroid error is set by photon noise alone (well below 0.02 px).

    Parameters
    ----------
    data : ndarray (ny, nx)
        Image [ADU or e-]; any constant or smooth background is removed here.
    mask : ndarray of bool (ny, nx) or None
        True for bad pixels; non-finite pixels are masked too.
    fwhm_px : float
        First guess of the stellar FWHM [px] (detection kernel, first centroid window).
    nsigma : float
        Detection threshold in units of the background RMS.
    max_stars : int
        Keep the ``max_stars`` brightest sources (by flux).
    bkg_rms : float or None
        Background RMS [data units]; None measures it.
    saturation : float or None
        Saturation level in the units of ``data`` as given (before background removal);
        sources with such a pixel within 1.5 FWHM are dropped.  None: only ``mask``.
    box_size : int or None
        Background box size [px].
    keep_flagged : bool
        Also return the dropped sources (flags EDGE, MASKED, SATURATED, NOCONV, SHARP).
    sky_subtracted : bool
        The image's sky has been subtracted already (level 0): no background map is
        made.  ``saturation`` is still compared with the values as given.

    Returns
    -------
    astropy.table.Table
        Sorted by decreasing flux: ``x``, ``y`` (zero-based) [px], ``flux`` (background-
        subtracted sum within 2 FWHM) [data units], ``peak`` [data units above the
        background], ``fwhm`` (from the windowed second moments, Gaussian-equivalent)
        [px] and ``flags`` (``FLAG_*`` bits).  ``meta``: ``fwhm_px`` (the stellar FWHM
        [px]), ``bkg_rms``, ``threshold`` [data units], ``n_candidates``.
    """
    from astropy.table import Table

    img = np.asarray(data, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"data must be a 2-D image, not shape {img.shape}")
    if not (float(fwhm_px) > 0 and float(nsigma) > 0 and int(max_stars) > 0):
        raise ValueError("fwhm_px, nsigma and max_stars must be positive")
    bad = ~np.isfinite(img)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != img.shape:
            raise ValueError(f"mask shape {m.shape} differs from data shape {img.shape}")
        bad |= m
    sat = np.zeros(img.shape, bool) if saturation is None else (img >= float(saturation)) & ~bad
    box = int(box_size) if box_size else int(max(64, round(16 * float(fwhm_px))))
    if sky_subtracted:
        bkg, rms = _flat_background(img, bad | sat)
    else:
        bkg, rms = _background(img, bad | sat, box)
    sub = np.where(bad, 0.0, img - bkg)
    if bkg_rms is not None:
        rms = float(bkg_rms)
    if not (rms > 0 and math.isfinite(rms)):
        rms = float(np.std(sub[~bad])) if (~bad).any() else 1.0
    threshold = float(nsigma) * rms

    cols = ("x", "y", "flux", "peak", "fwhm", "flags")
    empty = Table({c: np.zeros(0, dtype=np.int32 if c == "flags" else np.float64) for c in cols})
    empty.meta.update(fwhm_px=float(fwhm_px), bkg_rms=rms, threshold=threshold, n_candidates=0)

    x0, y0 = _dao_candidates(sub, bad, threshold, float(fwhm_px))
    x0, y0 = x0[:max(10 * int(max_stars), 3000)], y0[:max(10 * int(max_stars), 3000)]  # memory
    if x0.size == 0:
        return empty
    ncand = int(x0.size)

    # pass 1: window from the guessed FWHM; measure FWHMs; pass 2: window from their median
    fw = float(fwhm_px)
    res = _measure(sub, img, bad, sat, x0, y0, fw, gain=1.0)
    fw_star = _stellar_fwhm(res, float(fwhm_px))
    if fw_star is not None:
        fw = float(np.clip(fw_star, 0.4 * fwhm_px, 4.0 * fwhm_px))
    ok = (res["flags"] & (FLAG_EDGE | FLAG_NOCONV)) == 0
    xs = np.where(ok, res["x"], x0)
    ys = np.where(ok, res["y"], y0)
    res = _measure(sub, img, bad, sat, xs, ys, fw, gain=2.0)

    # shape flags relative to the stellar FWHM
    flags = res["flags"]
    fw_med = _stellar_fwhm(res, fw) or fw
    f = res["fwhm"]
    with np.errstate(invalid="ignore"):
        flags |= np.where(~np.isfinite(f) | (f < 0.6 * fw_med), FLAG_SHARP, 0).astype(np.int32)
        flags |= np.where(f > 1.6 * fw_med, FLAG_EXTENDED, 0).astype(np.int32)

    # brightest first; merge duplicates (two candidates converging on one star)
    order = np.argsort(-np.nan_to_num(res["flux"], nan=-np.inf), kind="stable")
    x, y = res["x"][order], res["y"][order]
    keep = np.ones(order.size, bool)
    from scipy.spatial import cKDTree
    finite = np.isfinite(x) & np.isfinite(y)
    if finite.sum() > 1:
        idx = np.nonzero(finite)[0]
        tree = cKDTree(np.column_stack([x[idx], y[idx]]))
        for a, b in sorted(tree.query_pairs(0.5 * fw_med)):
            ia, ib = idx[a], idx[b]
            if keep[ia] and keep[ib]:
                keep[max(ia, ib)] = False   # the fainter one (order is by flux)
    order = order[keep]
    out = {k: np.asarray(v)[order] for k, v in res.items()}
    out["flags"] = flags[order]
    # crowding among the surviving sources
    fin = np.isfinite(out["x"]) & np.isfinite(out["y"])
    if fin.sum() > 1:
        idx = np.nonzero(fin)[0]
        tree = cKDTree(np.column_stack([out["x"][idx], out["y"][idx]]))
        for a, b in tree.query_pairs(2.5 * fw_med):
            out["flags"][idx[a]] |= FLAG_CROWDED
            out["flags"][idx[b]] |= FLAG_CROWDED
    if not keep_flagged:
        sel = (out["flags"] & _DROP) == 0
        out = {k: v[sel] for k, v in out.items()}
    n = min(int(max_stars), out["x"].size)
    t = Table({c: np.asarray(out[c][:n], dtype=np.int32 if c == "flags" else np.float64) for c in cols})
    t["x"].unit = t["y"].unit = t["fwhm"].unit = "pix"
    t.meta.update(fwhm_px=fw_med, bkg_rms=rms, threshold=threshold, n_candidates=ncand)
    return t


def _stellar_fwhm(res: dict, guess: float) -> float | None:
    """Typical stellar FWHM [px] of the measured sources, or None (fewer than 3 usable).

    On raw frames hot pixels and cosmic rays can outnumber the stars, and on galaxy
    fields bright HII regions and cores can dominate the brightest sources, so neither
    the median nor the brightest sources give the stellar FWHM.  Stars share one FWHM:
    the estimate is the median FWHM inside the densest +-15 % window of the FWHM
    distribution, ignoring sources narrower than ``max(1.0, 0.4 * guess)`` px.
    """
    f = np.asarray(res["fwhm"], dtype=float)
    with np.errstate(invalid="ignore"):
        ok = ((res["flags"] & (FLAG_EDGE | FLAG_MASKED | FLAG_SATURATED | FLAG_NOCONV)) == 0) \
            & np.isfinite(f) & (f >= max(1.0, 0.4 * guess))
    if ok.sum() < 3:
        return None
    lf = np.sort(np.log(f[ok]))
    half = math.log(1.15)
    counts = np.searchsorted(lf, lf + half, side="right") - np.searchsorted(lf, lf - half, side="left")
    best = np.flatnonzero(counts == counts.max())
    centre = lf[best[best.size // 2]]
    win = np.abs(lf - centre) <= half
    return float(np.exp(np.median(lf[win])))


def _background(img: np.ndarray, bad: np.ndarray, box: int) -> tuple[np.ndarray | float, float]:
    """Background map (or level) and its typical RMS [data units]."""
    from astropy.stats import SigmaClip, sigma_clipped_stats

    ny, nx = img.shape
    if min(ny, nx) >= 2 * box:
        try:
            from photutils.background import Background2D, MedianBackground, StdBackgroundRMS
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b = Background2D(img, box, mask=bad, filter_size=3, sigma_clip=SigmaClip(sigma=3.0),
                                 bkg_estimator=MedianBackground(),
                                 bkgrms_estimator=StdBackgroundRMS())
            bkg = np.asarray(b.background, dtype=np.float64)
            rms = float(np.nanmedian(np.asarray(b.background_rms)[~bad])) if (~bad).any() else float("nan")
            if np.all(np.isfinite(bkg)):
                return bkg, rms
        except Exception:   # too few unmasked pixels per box and the like: global statistics
            pass
    vals = img[~bad]
    if vals.size == 0:
        return 0.0, float("nan")
    _, med, std = sigma_clipped_stats(vals, sigma=3.0, maxiters=5)
    return float(med), float(std)


def _flat_background(img: np.ndarray, bad: np.ndarray) -> tuple[float, float]:
    """Level 0 and the RMS of a sky-subtracted image [data units].

    RMS = 1.4826 x the median absolute deviation from the median of the usable pixels
    (stars are a small minority, so the MAD ignores them), on a 1-in-4 x 1-in-4 grid of
    pixels when the image has more than a million (a 1/16 sample still holds > 60 000
    pixels, a 0.3 % error on the RMS).
    """
    step = 4 if img.size > 1_000_000 else 1
    v = img[::step, ::step][~bad[::step, ::step]]
    if v.size < 100:
        v = img[~bad]
    if v.size == 0:
        return 0.0, float("nan")
    med = float(np.median(v))
    return 0.0, 1.482602218505602 * float(np.median(np.abs(v - med)))


def _dao_candidates(sub: np.ndarray, bad: np.ndarray, threshold: float, fwhm: float):
    """DAOStarFinder candidate positions (x, y) [px], brightest first."""
    from photutils.detection import DAOStarFinder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finder = DAOStarFinder(threshold=threshold, fwhm=fwhm, exclude_border=True)
        tab = finder(sub, mask=bad)
    if tab is None or len(tab) == 0:
        return np.zeros(0), np.zeros(0)
    xc = "x_centroid" if "x_centroid" in tab.colnames else "xcentroid"
    yc = "y_centroid" if "y_centroid" in tab.colnames else "ycentroid"
    x = np.asarray(tab[xc], dtype=float)
    y = np.asarray(tab[yc], dtype=float)
    flux = np.asarray(tab["flux"], dtype=float)
    order = np.argsort(-np.nan_to_num(flux, nan=-np.inf), kind="stable")
    ok = np.isfinite(x[order]) & np.isfinite(y[order])
    return x[order][ok], y[order][ok]


def _measure(sub, raw, bad, sat, x0, y0, fwhm, *, gain: float, max_iter: int = 40, tol: float = 1e-4):
    """Windowed centroids, fluxes, peaks, FWHMs and flags of sources near (x0, y0)."""
    ny, nx = sub.shape
    n = x0.size
    sw = fwhm / _GAUSS_FWHM                       # window sigma [px]
    R = int(math.ceil(max(4.0 * sw, 2.0 * fwhm))) + 1
    flags = np.zeros(n, np.int32)
    xo = np.full(n, np.nan)
    yo = np.full(n, np.nan)
    flux = np.full(n, np.nan)
    peak = np.full(n, np.nan)
    fw = np.full(n, np.nan)
    ix = np.round(x0).astype(np.int64)
    iy = np.round(y0).astype(np.int64)
    inside = (ix - R >= 0) & (ix + R < nx) & (iy - R >= 0) & (iy + R < ny)
    flags[~inside] |= FLAG_EDGE
    sel = np.nonzero(inside)[0]
    if sel.size == 0:
        return dict(x=xo, y=yo, flux=flux, peak=peak, fwhm=fw, flags=flags)
    off = np.arange(-R, R + 1)
    YY = iy[sel, None, None] + off[None, :, None]
    XX = ix[sel, None, None] + off[None, None, :]
    st = sub[YY, XX]
    bst = bad[YY, XX]
    sst = sat[YY, XX]
    st = np.where(bst, 0.0, st)
    gx = XX.astype(np.float64)
    gy = YY.astype(np.float64)
    x = x0[sel].astype(np.float64).copy()
    y = y0[sel].astype(np.float64).copy()
    active = np.ones(sel.size, bool)
    conv = np.zeros(sel.size, bool)
    rlim2 = float(R - 0.5) ** 2
    def window(x, y):
        """Offsets, squared radius, Gaussian-windowed stamps and their sums at centres x, y."""
        dx = gx - x[:, None, None]
        dy = gy - y[:, None, None]
        r2 = dx * dx + dy * dy
        wi = np.exp(-0.5 * r2 / sw ** 2) * (r2 <= rlim2) * (~bst) * st
        return dx, dy, r2, wi, wi.sum(axis=(1, 2))

    for _ in range(max_iter):
        dx, dy, r2, wi, norm = window(x, y)
        with np.errstate(invalid="ignore", divide="ignore"):
            sx = (wi * dx).sum(axis=(1, 2)) / norm
            sy = (wi * dy).sum(axis=(1, 2)) / norm
        bad_norm = ~(norm > 0) | ~np.isfinite(sx) | ~np.isfinite(sy)
        step_x = np.where(active & ~bad_norm, gain * sx, 0.0)
        step_y = np.where(active & ~bad_norm, gain * sy, 0.0)
        x += step_x
        y += step_y
        active &= ~bad_norm
        done = active & (np.abs(step_x) < tol) & (np.abs(step_y) < tol)
        conv |= done
        active &= ~done
        if not active.any():
            break
    moved = np.hypot(x - x0[sel], y - y0[sel])
    okc = conv & (moved <= max(1.0, fwhm)) & (np.abs(x - ix[sel]) <= R - 2) & (np.abs(y - iy[sel]) <= R - 2)
    flags[sel[~okc]] |= FLAG_NOCONV
    # moments, flux, peak, mask / saturation within 1.5 FWHM, at the final centre
    dx, dy, r2, wi, norm = window(x, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        m2 = 0.5 * (wi * r2).sum(axis=(1, 2)) / norm - 1.0 / 12.0   # per-axis, pixel-corrected
        sig2 = m2 * sw ** 2 / (sw ** 2 - m2)
        fwhm_est = np.where((m2 > 0) & (m2 < sw ** 2), _GAUSS_FWHM * np.sqrt(np.abs(sig2)), np.nan)
    core = r2 <= (1.5 * fwhm) ** 2
    ap = r2 <= (2.0 * fwhm) ** 2
    flags[sel[(bst & core).any(axis=(1, 2))]] |= FLAG_MASKED
    flags[sel[(sst & core).any(axis=(1, 2))]] |= FLAG_SATURATED
    xo[sel] = x
    yo[sel] = y
    flux[sel] = (st * ap).sum(axis=(1, 2))
    peak[sel] = np.where(r2 <= 2.0, st, -np.inf).max(axis=(1, 2))
    fw[sel] = fwhm_est
    return dict(x=xo, y=yo, flux=flux, peak=peak, fwhm=fw, flags=flags)


# --------------------------------------------------------------------------- matching
@dataclass
class AstrometryResult:
    """Outcome of :func:`match_and_fit`.

    Attributes
    ----------
    wcs : astropy.wcs.WCS or None
        The fitted WCS (TAN or TAN-SIP, ``pixel_shape`` set); None when unsolved.
    rms_arcsec : float
        2-D RMS of the on-sky separations between the matched stars (through ``wcs``)
        and their catalogue positions [arcsec] (NaN when unsolved).
    rms_px : float
        The same in pixels: ``sqrt(mean(dx**2 + dy**2))`` [px].
    nmatch : int
        Number of star-catalogue pairs used in the final fit.
    matched : astropy.table.Table
        One row per pair: ``star`` and ``cat`` (row indices into the inputs), ``x``,
        ``y`` [px], ``ra``, ``dec`` [deg], ``dx``, ``dy`` (star minus catalogue position
        projected through ``wcs``) [px], ``sep`` [arcsec].
    reason : str or None
        One line saying why the frame is unsolved; None when solved.
    n_stars, n_catalog : int
        Detections used, catalogue sources within the search area.
    offset_arcsec : float
        Distance between the initial and the fitted WCS at the image centre [arcsec]
        (the pointing error of the header).
    notes : list of str
        Non-fatal remarks (e.g. SIP degree lowered for lack of matches).
    """

    wcs: object
    rms_arcsec: float
    rms_px: float
    nmatch: int
    matched: object
    reason: str | None = None
    n_stars: int = 0
    n_catalog: int = 0
    offset_arcsec: float = float("nan")
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the frame was solved."""
        return self.reason is None


def match_and_fit(stars, cat_ra, cat_dec, wcs0, *, shape: tuple[int, int], sip_degree: int | None = None,
                  max_iter: int = 5, clip_sigma: float = 3.0, search_radius_arcsec: float | None = None,
                  cat_mag=None, min_stars: int = 6, n_pattern: int = 40,
                  max_scale_error: float = 0.1) -> AstrometryResult:
    """Match detected stars to a reference catalogue and fit the WCS.

    Parameters
    ----------
    stars : astropy.table.Table (or mapping of columns)
        Detections with ``x``, ``y`` (zero-based) [px] and, optionally, ``flux`` (used
        to pick the brightest for the pattern match; else the given order is used).
    cat_ra, cat_dec : array-like
        Catalogue positions [deg, ICRS] at the epoch of the observation.
    wcs0 : astropy.wcs.WCS
        Initial WCS (e.g. :func:`initial_wcs`): it must have the right parity; its
        pointing may be off by up to ``search_radius_arcsec``, its rotation is free
        (any angle) and its scale may be off by ``max_scale_error``.
    shape : (int, int)
        Image shape (rows, columns) [px].
    sip_degree : int or None
        Fit TAN-SIP distortion of this degree (2-5) once enough stars are matched
        (1.5 x the number of free parameters); None fits pure TAN.
    max_iter : int
        Maximum number of match / fit / clip iterations.
    clip_sigma : float
        Pairs whose residual exceeds ``clip_sigma`` sigma are rejected (sigma per axis,
        from the median residual length).
    search_radius_arcsec : float or None
        Largest expected error of ``wcs0`` at the image centre [arcsec]; catalogue
        sources up to this far outside the image are used.  Default: 10 % of the image
        diagonal, at least 30".
    cat_mag : array-like or None
        Catalogue magnitudes (to pick the brightest for the pattern match); None keeps
        the given order (assumed brightest first).
    min_stars : int
        Fewest detections and catalogue sources accepted (>= 3); the final matches must
        number at least this and well above the pairs expected by chance (3 x the
        expected number of unrelated pairs within 3 px, plus 3).
    n_pattern : int
        Number of bright detections used for the pattern match (the catalogue list is
        scaled by the ratio of the search area to the image area).
    max_scale_error : float
        Largest accepted fractional scale error of ``wcs0``.

    Returns
    -------
    AstrometryResult
        ``reason`` is None when solved, else a one-line explanation (no exception).

    Notes
    -----
    astroalign is tried on the ``n_pattern // 2`` and ``n_pattern`` brightest isolated
    detections against as many catalogue sources per unit area; an answer is accepted
    when it implies a scale within ``max_scale_error``, a shift within 1.5 x the search
    radius and enough one-to-one pairs within 3 px.  If astroalign finds nothing good,
    offsets between the 200 brightest detections and 400 brightest catalogue sources are
    histogrammed (3 px cells) over a grid of rotations (+-2 deg) and scales (+-3 %), and
    the best cell is taken when significant.  astroalign's RANSAC draws from an unseeded
    generator, so the first-stage answer may vary between runs; the refined WCS does not
    depend on it beyond its noise.  Clipping: sigma per axis is the median residual
    length of all pairs within the matching radius / 1.1774 (Rayleigh), pairs beyond
    ``clip_sigma`` sigma are dropped, and the next matching radius is
    ``clip(2 * clip_sigma * sigma, 1, 3)`` px.

    Raises
    ------
    ValueError
        Invalid arguments (missing columns, mismatched lengths, non-celestial WCS...).
    """
    from astropy.table import Table

    ny, nx = _shape(shape)
    if min_stars < 3:
        raise ValueError("min_stars must be >= 3")
    if not (clip_sigma > 0) or int(max_iter) < 1:
        raise ValueError("clip_sigma must be > 0 and max_iter >= 1")
    if sip_degree is not None and not (isinstance(sip_degree, (int, np.integer)) and 2 <= sip_degree <= 5):
        raise ValueError(f"sip_degree must be None or an integer 2..5, not {sip_degree!r}")
    try:
        sx_all = _floats(stars["x"])
        sy_all = _floats(stars["y"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"stars must have numeric 'x' and 'y' columns ({e})") from None
    if sx_all.shape != sy_all.shape or sx_all.ndim != 1:
        raise ValueError("stars 'x' and 'y' must be 1-D columns of equal length")
    ra_all = _floats(cat_ra)
    dec_all = _floats(cat_dec)
    if ra_all.shape != dec_all.shape:
        raise ValueError(f"cat_ra and cat_dec differ in length ({ra_all.size} vs {dec_all.size})")
    mag_all = None
    if cat_mag is not None:
        mag_all = _floats(cat_mag)
        if mag_all.shape != ra_all.shape:
            raise ValueError("cat_mag must have the length of cat_ra")
    if wcs0 is None or not getattr(wcs0, "has_celestial", False):
        raise ValueError("wcs0 must be a celestial astropy WCS")
    wcs0 = wcs0.celestial

    cols = ("star", "cat", "x", "y", "ra", "dec", "dx", "dy", "sep")

    def table(s=None, c=None, dx=None, dy=None, sep=None):
        if s is None:
            return Table({k: np.zeros(0, dtype=np.int64 if k in ("star", "cat") else float) for k in cols})
        return Table({"star": s, "cat": c, "x": sx_all[s], "y": sy_all[s], "ra": ra_all[c],
                      "dec": dec_all[c], "dx": dx, "dy": dy, "sep": sep})

    def fail(reason, n_stars=0, n_cat=0, nmatch=0):
        return AstrometryResult(None, float("nan"), float("nan"), int(nmatch), table(), reason,
                                n_stars=int(n_stars), n_catalog=int(n_cat))

    # detections, brightest first
    sidx = np.nonzero(np.isfinite(sx_all) & np.isfinite(sy_all))[0]
    flux = None
    try:
        flux = _floats(stars["flux"])
    except (KeyError, TypeError, ValueError):
        flux = None
    if flux is not None and flux.shape == sx_all.shape:
        sidx = sidx[np.argsort(-np.nan_to_num(flux[sidx], nan=-np.inf), kind="stable")]
    n_det = int(sidx.size)
    if n_det < min_stars:
        return fail(f"only {n_det} stars detected (need {min_stars})", n_det)

    # catalogue sources within the image plus the search margin, through wcs0
    scale0 = float(np.mean(_pixel_scales_arcsec(wcs0)))
    search = (float(search_radius_arcsec) if search_radius_arcsec is not None
              else max(30.0, 0.1 * math.hypot(nx, ny) * scale0))
    if not (search > 0):
        raise ValueError("search_radius_arcsec must be > 0")
    margin = search / scale0
    rc, dc = wcs0.all_pix2world([(nx - 1) / 2.0], [(ny - 1) / 2.0], 0)
    rc, dc = float(rc[0]), float(dc[0])
    ok = np.isfinite(ra_all) & np.isfinite(dec_all)
    near = np.zeros(ra_all.size, bool)
    near[ok] = _sep_deg(ra_all[ok], dec_all[ok], rc, dc) <= (0.5 * math.hypot(nx, ny) * scale0 + 1.5 * search) / 3600.0
    cidx = np.nonzero(near)[0]
    cx = cy = np.zeros(0)
    if cidx.size:
        cx, cy = wcs0.all_world2pix(ra_all[cidx], dec_all[cidx], 0)
        inside = (np.isfinite(cx) & np.isfinite(cy) & (cx > -margin) & (cx < nx - 1 + margin)
                  & (cy > -margin) & (cy < ny - 1 + margin))
        cidx, cx, cy = cidx[inside], cx[inside], cy[inside]
    if mag_all is not None and cidx.size:
        o = np.argsort(np.nan_to_num(mag_all[cidx], nan=np.inf), kind="stable")
        cidx, cx, cy = cidx[o], cx[o], cy[o]
    n_cat = int(cidx.size)
    if n_cat < min_stars:
        return fail(f"only {n_cat} catalogue sources in the field (need {min_stars})", n_det, n_cat)

    # ---- pattern match: detections (pixels) -> catalogue projected through wcs0 (pixels)
    sxy = np.column_stack([sx_all[sidx], sy_all[sidx]])
    cxy = np.column_stack([cx, cy])
    area_ratio = (nx + 2 * margin) * (ny + 2 * margin) / float(nx * ny)
    # pattern lists: isolated sources only (blends have biased centroids and appear
    # differently in the two lists), brightest first
    try:
        fwhm = float(stars.meta.get("fwhm_px", 3.0))
    except AttributeError:
        fwhm = 3.0
    r_iso = 2.5 * (fwhm if math.isfinite(fwhm) and fwhm > 0 else 3.0)
    piso_s = np.flatnonzero(_isolated(sxy, r_iso))
    ncap = min(n_cat, int(math.ceil(2 * n_pattern * area_ratio)) * 4 + 20)
    piso_c = np.flatnonzero(_isolated(cxy[:ncap], r_iso))
    if piso_s.size < 3 or piso_c.size < 3:   # a dense field: use everything
        piso_s, piso_c = np.arange(n_det), np.arange(n_cat)
    r_match0 = 3.0   # px, pairs accepted after the pattern transform
    centre = np.array([[(nx - 1) / 2.0, (ny - 1) / 2.0]])
    # chance pairs within r_match0 for unrelated lists; demand well above that
    chance = n_det * n_cat * math.pi * r_match0 ** 2 / ((nx + 2 * margin) * (ny + 2 * margin))
    need = max(min_stars, int(math.ceil(3.0 * chance)) + 3)
    good = max(need, int(0.25 * min(n_det, n_cat)))
    best = None   # (transform, number of pairs, description)

    def evaluate(T, how: str) -> bool:
        nonlocal best
        if T is None:
            return False
        shift = float(np.hypot(*(T(centre)[0] - centre[0])))
        if abs(float(T.scale) - 1.0) > max_scale_error or shift > 1.5 * margin:
            return False
        nm = int(_nn_pairs(T(sxy), cxy, r_match0)[0].size)
        if best is None or nm > best[1]:
            best = (T, nm, how)
        return nm >= good

    # astroalign on the brightest isolated sources; small lists first (a search that
    # finds nothing costs ~ the square of the number of similar triangles), at most
    # n_pattern stars (an exhausted search on 80 crowded stars takes tens of seconds)
    tried = set()
    for ns in (max(12, n_pattern // 2), n_pattern):
        ns = min(int(ns), piso_s.size)
        nc = min(piso_c.size, int(math.ceil(ns * area_ratio)) + 5)
        if (ns, nc) in tried or ns < 3 or nc < 3:
            continue
        tried.add((ns, nc))
        for _attempt in range(2):   # astroalign's RANSAC is randomised: retry a weak answer once
            T = _find_transform(sxy[piso_s[:ns]], cxy[piso_c[:nc]])
            if T is None or evaluate(T, f"astroalign ({ns} stars, {nc} catalogue sources)"):
                break               # None: search exhausted, a retry would fail again
        if best is not None and best[1] >= good:
            break
    if best is None or best[1] < good:
        # fallback for crowded fields and lists ranked differently (other band): vote on
        # star-catalogue offsets over a grid of small rotation / scale corrections
        T = _vote_transform(sxy[:200], cxy[:400], centre[0], 1.5 * margin,
                            min(max_scale_error, 0.03), 2.0)
        evaluate(T, "offset vote")
    if best is None or best[1] < need:
        return fail(f"no pattern match between {n_det} stars and {n_cat} catalogue sources",
                    n_det, n_cat, 0 if best is None else best[1])
    T = best[0]
    notes: list[str] = [f"pattern match: {best[2]}, {best[1]} pairs within {r_match0:g} px"]

    # ---- refinement: TAN fit from the pattern pairs, then match / fit / clip
    s_m, c_m, _ = _nn_pairs(T(sxy), cxy, r_match0)
    wcs = _fit(sxy[s_m], ra_all[cidx[c_m]], dec_all[cidx[c_m]], wcs0, None, (nx, ny))
    radius = r_match0
    prev = None
    sigma = float("nan")
    use_sip = None
    for it in range(int(max_iter)):
        if sip_degree and it >= 1 and use_sip is None:
            nfree = 6 + 2 * ((sip_degree + 1) * (sip_degree + 2) // 2 - 3)
            if s_m.size >= 1.5 * nfree:
                use_sip = int(sip_degree)
            else:
                notes.append(f"SIP degree {sip_degree} needs {math.ceil(1.5 * nfree)} matches, "
                             f"have {s_m.size}: pure TAN")
                sip_degree = None
        px, py = wcs.all_world2pix(ra_all[cidx], dec_all[cidx], 0)
        s_m, c_m, _ = _nn_pairs(sxy, np.column_stack([px, py]), radius)
        if s_m.size < min_stars:
            break
        keep = np.ones(s_m.size, bool)
        for _ in range(10):   # fit, clip, refit until stable
            wcs = _fit(sxy[s_m[keep]], ra_all[cidx[c_m[keep]]], dec_all[cidx[c_m[keep]]], wcs, use_sip, (nx, ny))
            qx, qy = wcs.all_world2pix(ra_all[cidx[c_m]], dec_all[cidx[c_m]], 0)
            r = np.hypot(sxy[s_m, 0] - qx, sxy[s_m, 1] - qy)
            sigma = max(float(np.median(r)) / _RAYLEIGH_MEDIAN, 0.01)
            new = r <= clip_sigma * sigma
            if new.sum() < min_stars or np.array_equal(new, keep):
                break
            keep = new
        s_m, c_m = s_m[keep], c_m[keep]
        pairs = set(zip(s_m.tolist(), c_m.tolist()))
        if pairs == prev:
            break
        prev = pairs
        radius = float(np.clip(2.0 * clip_sigma * sigma, 1.0, r_match0))
    if s_m.size < need:
        return fail(f"only {s_m.size} matches after refinement (need {need}) between "
                    f"{n_det} stars and {n_cat} catalogue sources", n_det, n_cat, s_m.size)

    # ---- final residuals
    ra_m, dec_m = ra_all[cidx[c_m]], dec_all[cidx[c_m]]
    qx, qy = wcs.all_world2pix(ra_m, dec_m, 0)
    dx = sxy[s_m, 0] - qx
    dy = sxy[s_m, 1] - qy
    wr, wd = wcs.all_pix2world(sxy[s_m, 0], sxy[s_m, 1], 0)
    sep = _sep_deg(wr, wd, ra_m, dec_m) * 3600.0
    rms_px = float(np.sqrt(np.mean(dx * dx + dy * dy)))
    rms_as = float(np.sqrt(np.mean(sep * sep)))
    r1, d1 = wcs.all_pix2world([(nx - 1) / 2.0], [(ny - 1) / 2.0], 0)
    offset = float(_sep_deg(r1[0], d1[0], rc, dc) * 3600.0)
    matched = table(sidx[s_m], cidx[c_m], dx, dy, sep)
    return AstrometryResult(wcs, rms_as, rms_px, int(s_m.size), matched, None, n_stars=n_det,
                            n_catalog=n_cat, offset_arcsec=offset, notes=notes)


def _find_transform(src: np.ndarray, dst: np.ndarray):
    """astroalign similarity transform src -> dst, or None when no match is found."""
    import astroalign

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            T, _ = astroalign.find_transform(src, dst, max_control_points=max(len(src), len(dst)))
    except Exception:   # MaxIterError (no match), ValueError (< 3 points), degenerate fits
        return None
    if not np.all(np.isfinite(T.params)):
        return None
    return T


class _Similarity:
    """x' = c + s R(theta) (x - c) + t on (N, 2) point arrays (mimics skimage's transform)."""

    def __init__(self, scale: float, rotation: float, translation, centre):
        self.scale = float(scale)
        self.rotation = float(rotation)   # [rad]
        c, n = math.cos(self.rotation), math.sin(self.rotation)
        a = self.scale * np.array([[c, -n], [n, c]])
        ctr = np.asarray(centre, dtype=float)
        b = ctr - a @ ctr + np.asarray(translation, dtype=float)
        self.params = np.array([[a[0, 0], a[0, 1], b[0]], [a[1, 0], a[1, 1], b[1]], [0.0, 0.0, 1.0]])
        self.translation = self.params[:2, 2].copy()

    def __call__(self, xy):
        xy = np.atleast_2d(np.asarray(xy, dtype=float))
        return xy @ self.params[:2, :2].T + self.params[:2, 2]


def _vote_transform(sxy: np.ndarray, cxy: np.ndarray, centre: np.ndarray, max_shift: float,
                    max_scale: float, max_rot_deg: float, bin_px: float = 3.0):
    """Pattern match by offset voting: the (rotation, scale) whose star-to-catalogue
    offsets pile up most in one ``bin_px`` cell, with that cell's mean offset.

    Handles any translation up to ``max_shift`` [px] but only small rotation and scale
    errors (grid steps keep the misfit at the image corners within one bin).  None when
    the best cell is not significant given the number of cells and hypotheses tried.
    """
    from scipy.spatial import cKDTree

    if len(sxy) < 3 or len(cxy) < 3:
        return None
    rmax = float(np.max(np.hypot(*(sxy - centre).T))) or 1.0
    step = bin_px / rmax
    rots = np.arange(-math.radians(max_rot_deg), math.radians(max_rot_deg) + 0.5 * step, step)
    scales = 1.0 + np.arange(-max_scale, max_scale + 0.5 * step, step)
    # candidate pairs once, with room for the largest rotation / scale correction
    reach = max_shift + rmax * (max_scale + math.radians(max_rot_deg)) + 2 * bin_px
    lists = cKDTree(cxy).query_ball_point(sxy, reach)
    ii = np.repeat(np.arange(len(sxy)), [len(v) for v in lists])
    if ii.size == 0:
        return None
    jj = np.fromiter((j for v in lists for j in v), dtype=np.int64, count=ii.size)
    nb = int(math.ceil(2 * max_shift / bin_px))
    best = None
    for th in rots:
        for sc in scales:
            T = _Similarity(sc, th, (0.0, 0.0), centre)
            d = cxy[jj] - T(sxy)[ii]
            k = np.floor((d + max_shift) / bin_px).astype(np.int64)
            inb = (k[:, 0] >= 0) & (k[:, 0] < nb) & (k[:, 1] >= 0) & (k[:, 1] < nb)
            h = np.bincount(k[inb, 0] * nb + k[inb, 1], minlength=nb * nb).reshape(nb, nb)
            h2 = h[:-1, :-1] + h[1:, :-1] + h[:-1, 1:] + h[1:, 1:]   # 2x2 cells: no edge splits
            kk = int(np.argmax(h2))
            peak = int(h2.flat[kk])
            if best is None or peak > best[0]:
                i, j = np.unravel_index(kk, h2.shape)
                best = (peak, th, sc, -max_shift + (i + 1) * bin_px, -max_shift + (j + 1) * bin_px, d)
    if best is None:
        return None
    # significance: the best cell of n_trials (cells x hypotheses) must beat pure chance,
    # P(Poisson(lambda) >= peak) * n_trials < 1e-3 with lambda the mean pairs per cell
    from scipy.stats import poisson
    n_trials = (nb - 1) ** 2 * rots.size * scales.size
    lam = 4.0 * ii.size / float(nb * nb)
    need = float(poisson.isf(1e-3 / n_trials, lam)) + 1.0
    if best[0] < max(3.0, need):
        return None
    _, th, sc, ox, oy, d = best
    near = np.hypot(d[:, 0] - ox, d[:, 1] - oy) <= bin_px
    off = d[near].mean(axis=0) if near.any() else np.array([ox, oy])
    return _Similarity(sc, th, off, centre)


def _isolated(xy: np.ndarray, radius: float) -> np.ndarray:
    """True for points without another point of the set within radius [px]."""
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return np.ones(len(xy), bool)
    d, _ = cKDTree(xy).query(xy, k=2)
    return d[:, 1] > radius


def _nn_pairs(a: np.ndarray, b: np.ndarray, radius: float):
    """One-to-one nearest-neighbour pairs between point sets a and b within radius [px].

    Returns index arrays into a and b and the distances, sorted by the index into a.
    """
    from scipy.spatial import cKDTree

    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    tree = cKDTree(b)
    d, j = tree.query(a, k=1, distance_upper_bound=radius)
    i = np.nonzero(np.isfinite(d))[0]
    j, d = j[i], d[i]
    # one-to-one: for each catalogue source keep the closest detection
    o = np.lexsort((d, j))
    i, j, d = i[o], j[o], d[o]
    first = np.ones(j.size, bool)
    first[1:] = j[1:] != j[:-1]
    i, j, d = i[first], j[first], d[first]
    o = np.argsort(i, kind="stable")
    return i[o], j[o], d[o]


def _fit(xy: np.ndarray, ra: np.ndarray, dec: np.ndarray, template, sip_degree, pixel_shape):
    """Fit a TAN (or TAN-SIP) WCS to matched pairs.

    :func:`astropy.wcs.utils.fit_wcs_from_points` fits the TAN solution, started from
    the template's linear terms, with the tangent point at the matched stars' centroid.
    Its ``least_squares`` stops on a parameter tolerance relative to CRPIX (hundreds of
    px), which can leave the CD matrix off by ~1e-3 (px to tens of px at the edges)
    when it starts far from the answer, so the result is polished by an exact linear
    least-squares fit on the tangent plane of its CRVAL (:func:`_polish`), which also
    fits the SIP polynomials when asked (the SIP polynomials are linear in their
    coefficients there; fit_wcs_from_points' own nonlinear SIP fit takes ~0.6 s a call
    and has the same tolerance problem, so it is not used).
    """
    from astropy.coordinates import SkyCoord
    from astropy.wcs import WCS
    from astropy.wcs.utils import fit_wcs_from_points

    t = WCS(naxis=2)
    t.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    t.wcs.cunit = ["deg", "deg"]
    t.wcs.crval = template.wcs.crval
    t.wcs.crpix = template.wcs.crpix
    t.wcs.cd = np.asarray(template.pixel_scale_matrix, dtype=float)
    t.wcs.radesys = "ICRS"
    t.wcs.set()
    # tangent point: the sky position of the centroid of the matched stars, which keeps
    # the fitted CRPIX inside the bounds fit_wcs_from_points imposes (the points' span)
    mx, my = float(np.mean(xy[:, 0])), float(np.mean(xy[:, 1]))
    pr, pd = template.all_pix2world([mx], [my], 0)
    proj = SkyCoord(float(pr[0]), float(pd[0]), unit="deg", frame="icrs")
    world = SkyCoord(ra, dec, unit="deg", frame="icrs")
    deg = int(sip_degree) if sip_degree else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = fit_wcs_from_points((xy[:, 0], xy[:, 1]), world, proj_point=proj, projection=t)
        crval, crpix = np.array(w.wcs.crval, float), np.array(w.wcs.crpix, float)
    except Exception:   # degenerate geometry for scipy: start the linear fit from the template
        crval = np.array([float(pr[0]), float(pd[0])])
        crpix = np.array([mx + 1.0, my + 1.0])
    return _polish(xy, ra, dec, crval, crpix, deg, pixel_shape)


def _polish(xy, ra, dec, crval, crpix, sip_degree, pixel_shape):
    """Exact linear least-squares TAN(-SIP) fit with the tangent point fixed at crval.

    On the tangent plane the standard coordinates are polynomials of the pixel offsets
    ``u, v`` from CRPIX: ``(xi, eta) = CD (u + f(u, v), v + g(u, v))`` with SIP
    polynomials ``f, g`` of orders 2..degree (none for TAN), linear in the unknowns once
    CRPIX is fixed; a constant term ``c0`` means CRPIX is off by ``-CD^-1 c0``: CRPIX is
    moved and the fit repeated (exact in one step for TAN).  The inverse
    SIP polynomials (AP, BP) are fitted on a grid over the image.
    """
    from astropy.wcs import WCS, Sip

    xi, eta = _gnomonic(ra, dec, crval[0], crval[1])
    deg = int(sip_degree) if sip_degree else 1
    terms = [(p, q) for p in range(deg + 1) for q in range(deg + 1) if p + q <= deg]
    crpix = np.array(crpix, dtype=float)
    for _ in range(6):
        u = xy[:, 0] + 1.0 - crpix[0]
        v = xy[:, 1] + 1.0 - crpix[1]
        m = np.column_stack([u ** p * v ** q for p, q in terms])
        cx = np.linalg.lstsq(m, xi, rcond=None)[0]
        cy = np.linalg.lstsq(m, eta, rcond=None)[0]
        co = dict(zip(terms, zip(cx, cy)))
        cd = np.array([[co[(1, 0)][0], co[(0, 1)][0]], [co[(1, 0)][1], co[(0, 1)][1]]])
        delta = np.linalg.solve(cd, np.array(co[(0, 0)]))   # xi = c0 + CD u: CRPIX moves by -CD^-1 c0
        crpix = crpix - delta
        if np.max(np.abs(delta)) < 1e-7:
            break
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = crval
    w.wcs.crpix = crpix
    w.wcs.cd = cd
    w.wcs.radesys = "ICRS"
    if deg >= 2:
        cdi = np.linalg.inv(cd)
        a = np.zeros((deg + 1, deg + 1))
        b = np.zeros((deg + 1, deg + 1))
        for (p, q), (c1, c2) in co.items():
            if p + q >= 2:
                a[p, q], b[p, q] = cdi @ np.array([c1, c2])
        # inverse polynomials on a grid spanning the image (and the matched stars)
        nx, ny = pixel_shape
        gx, gy = np.meshgrid(np.linspace(min(0.0, xy[:, 0].min()), max(nx - 1.0, xy[:, 0].max()), 30),
                             np.linspace(min(0.0, xy[:, 1].min()), max(ny - 1.0, xy[:, 1].max()), 30))
        gu = gx.ravel() + 1.0 - crpix[0]
        gv = gy.ravel() + 1.0 - crpix[1]
        fu = gu + sum(a[p, q] * gu ** p * gv ** q for p, q in terms if p + q >= 2)
        fv = gv + sum(b[p, q] * gu ** p * gv ** q for p, q in terms if p + q >= 2)
        iterms = [(p, q) for p in range(deg + 2) for q in range(deg + 2) if p + q <= deg + 1]
        mi = np.column_stack([fu ** p * fv ** q for p, q in iterms])
        ia = np.linalg.lstsq(mi, gu - fu, rcond=None)[0]
        ib = np.linalg.lstsq(mi, gv - fv, rcond=None)[0]
        ap = np.zeros((deg + 2, deg + 2))
        bp = np.zeros((deg + 2, deg + 2))
        for (p, q), c1, c2 in zip(iterms, ia, ib):
            ap[p, q], bp[p, q] = c1, c2
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.sip = Sip(a, b, ap, bp, crpix)
    w.wcs.set()
    w.pixel_shape = tuple(int(v) for v in pixel_shape)
    return w


def _gnomonic(ra, dec, ra0: float, dec0: float):
    """Standard coordinates xi (east), eta (north) [deg] of (ra, dec) on the tangent
    plane at (ra0, dec0) [deg] -- the intermediate world coordinates of RA---TAN."""
    a, d = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    a0, d0 = math.radians(float(ra0)), math.radians(float(dec0))
    cosc = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return np.degrees(xi), np.degrees(eta)


# --------------------------------------------------------------------------- helpers
def _shape(shape) -> tuple[int, int]:
    try:
        ny, nx = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (rows, columns), not {shape!r}") from None
    if ny < 1 or nx < 1:
        raise ValueError(f"shape must be positive, not {shape!r}")
    return ny, nx


def _floats(values) -> np.ndarray:
    """1-D float64 array; masked entries become NaN."""
    return np.ma.filled(np.ma.asarray(values).astype(np.float64), np.nan).ravel()


def _pixel_scales_arcsec(wcs) -> np.ndarray:
    from astropy.wcs.utils import proj_plane_pixel_scales
    return np.asarray(proj_plane_pixel_scales(wcs.celestial), dtype=float) * 3600.0


def _sep_deg(ra1, dec1, ra2, dec2):
    """Angular separation [deg] (Vincenty formula, numerically stable at all distances)."""
    l1, b1, l2, b2 = (np.radians(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    dl = l2 - l1
    num = np.hypot(np.cos(b2) * np.sin(dl), np.cos(b1) * np.sin(b2) - np.sin(b1) * np.cos(b2) * np.cos(dl))
    den = np.sin(b1) * np.sin(b2) + np.cos(b1) * np.cos(b2) * np.cos(dl)
    return np.degrees(np.arctan2(num, den))
