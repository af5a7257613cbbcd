"""The s (sky) step on arrays: a smooth 2-D sky model and its subtraction (pure, no I/O).

Units: ``data``, the sky model and its rms are in electrons (e-) per pixel; ``mask`` is the
uint16 bitmask of :mod:`reducer.ops.bits` (0 = good) or a boolean array (True = bad).
Inputs are never modified.

Algorithm (:func:`estimate_sky`)
--------------------------------
1. *Pixels used*: every pixel with a nonzero mask value (any bit, or True) and every
   non-finite pixel is excluded throughout.
2. *First pass*: :class:`photutils.background.Background2D` statistics on a grid of
   ``box`` x ``box`` pixel meshes (estimators below), turned into full-resolution maps
   (see "Mesh map to image"), give a first sky ``B0`` and rms ``S0``.
3. *Source mask*: ``data - B0`` (convolved with a normalised 2-D Gaussian of FWHM
   ``fwhm_px`` when that is given) is segmented as
   :func:`photutils.segmentation.detect_sources` does (the same pixels, found with one
   ``scipy.ndimage.label`` and a pixel count per label): groups of at least ``npix_src``
   8-connected pixels above ``nsigma_src * S0``.  The threshold is in units of the
   *unsmoothed* rms (photutils' convention); on the smoothed image it is therefore
   ``nsigma_src / sqrt(sum k^2)`` times the smoothed noise (x3.8 for FWHM 2.5 px), which
   keeps noise peaks out of the mask.  The segments are grown by ``dilate`` pixels
   (binary dilation with a disc of that radius, :func:`reducer.ops.morphology.dilate_disc`)
   to cover the faint wings.
4. *Final pass*: the same on ``data - B0``, with the source mask OR the bad-pixel mask;
   ``sky = B0 + model of the residual meshes``, ``rms`` from the residual meshes.

Estimator (chosen): per mesh, sigma clipping at 3 sigma (median centre, up to 10
iterations), then the **median** of the survivors for the sky
(:class:`~photutils.background.MedianBackground`) and the **MAD-based standard deviation**
(``1.4826 * MAD``, :class:`~photutils.background.MADStdBackgroundRMS`) for the rms.
Why: once the sources are masked the survivors are close to Gaussian, and

- the SExtractor mode estimator ``2.5 median - 1.5 mean`` (photutils' default) has a
  standard error of ``~2.14 sigma / sqrt(n)`` per mesh for Gaussian data, against
  ``1.25 sigma / sqrt(n)`` for the median and ``1.00 sigma / sqrt(n)`` for the mean; its
  advantage (robustness to crowding) is already provided by the source mask;
- the mean is the most precise but is pulled up by the undetected faint wings that the
  mask leaves; the median is not (much), at a 25 % noise cost;
- the clipped standard deviation is biased low by the truncation (about -1.5 % at the
  iterated 3-sigma cut); the MAD of the clipped sample is biased by only -0.3 %.

Known small biases: for Poisson-distributed sky (skewness ``1/sqrt(sky)``) the median lies
``~1/6`` e- below the mean (Pearson), i.e. 1.7e-4 of a 1000 e- sky; undetected sources add
a positive bias that depends on the field.

Mesh map to image: photutils' own median filter and spline zoom flatten a gradient near
the edges (a 10 % ramp over a 256-px frame was off by up to 37 e- on a 1000 e- sky), so
only the per-mesh statistics are taken from ``Background2D`` (``filter_size=1``).  A
robust trend surface (quadratic in x and y with at least 3 x 3 meshes, else linear) is
fitted to the mesh values; the residuals are median-filtered over
``filter_size`` meshes (NaN-aware; excluded meshes are filled from their neighbours),
interpolated by a bicubic spline through the mesh centres (the last, partial mesh centred
on its own pixels; constant beyond the outermost centres) and the trend is added back, so
a gradient or a quadratic vignetting is reproduced exactly up to the edges (the median
filter alone flattens a bowl-shaped sky on a coarse mesh grid).  The final pass measures the
meshes on ``data - sky0`` (the first-pass model) and adds the result to ``sky0``: a
gradient within a mesh then neither shifts the mesh's median (partially masked meshes)
nor inflates its rms (+3 % for a 10 % ramp over four 64-px meshes otherwise).  Meshes
with more than ``exclude_percentile`` % of their pixels masked (sources, bad pixels,
clipped) are excluded.  ``box`` is reduced to the image size when the image is smaller.

Subtraction (:func:`subtract_sky`)
----------------------------------
``data - sky``; the uncertainty is returned unchanged: the sky model's own noise is
neglected.  Numbers: a mesh value is a median over ``n ~ box^2 = 4096`` pixels, so its
error is ``1.25 sigma / sqrt(n) = 0.020 sigma``; the model error measured against the
truth on 256 x 256 synthetic frames (``tests/test_sky_cosmics.py``) is 0.012-0.020 sigma
rms.  Added in quadrature to the pixel noise it changes ``unc`` by
``sqrt(1 + 0.02^2) - 1 = 2e-4`` (0.02 %), far below the accuracy of the noise model
(gain, flat) itself.  The error is however *correlated* over a mesh: in an aperture of
``A`` pixels it adds ``A * 0.02 sigma`` coherently to ``sqrt(A) sigma`` of random noise,
i.e. +2 % in quadrature for A = 100 px and +18 % for A = 1000 px.  A per-pixel ``unc``
map cannot carry a correlated error, so it belongs to the photometry, which should
measure the local sky in an annulus (or add ``A * sky_err`` itself) for large apertures.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

__all__ = ["SkyResult", "estimate_sky", "subtract_sky"]


@dataclass(frozen=True)
class SkyResult:
    """The sky model of one image.

    Attributes
    ----------
    sky : ndarray of float32, shape of the image
        Smooth sky model [e-/pixel].
    rms : ndarray of float32, shape of the image
        Sky noise per pixel (1 sigma) [e-], from the robust scatter of the sky pixels
        (it includes read noise and the sky's Poisson noise).
    level : float
        Median of ``sky`` over the image [e-/pixel].
    rms_level : float
        Median of ``rms`` over the image [e-].
    source_mask : ndarray of bool, shape of the image
        Pixels excluded as sources (dilated segments) in the final pass; the bad-pixel
        mask is not included.
    """

    sky: np.ndarray
    rms: np.ndarray
    level: float
    rms_level: float
    source_mask: np.ndarray


def _bad_pixels(data: np.ndarray, mask) -> np.ndarray:
    bad = ~np.isfinite(data)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != data.shape:
            raise ValueError(f"mask shape {m.shape} differs from the data shape {data.shape}")
        bad |= (m != 0)
    return bad


def _mesh_stats(data, box, mask, exclude_percentile):
    """Per-mesh sky (median) and rms (MAD std) after 3-sigma clipping, via Background2D.

    Returns the two mesh maps with NaN for the excluded meshes, and the y and x centres
    [pixel] of the mesh rows and columns (the last, partial mesh centred on its pixels).
    """
    from astropy.stats import SigmaClip
    from photutils.background import Background2D, MADStdBackgroundRMS, MedianBackground

    params = inspect.signature(Background2D).parameters
    rms_kw = "bkg_rms_estimator" if "bkg_rms_estimator" in params else "bkgrms_estimator"
    kw = {rms_kw: MADStdBackgroundRMS(sigma_clip=None)}
    if "edge_method" in params:  # photutils < 2: pad like the later versions do
        kw["edge_method"] = "pad"
    try:
        # photutils judges the last, partial meshes against the whole box area and fills
        # them by interpolation: keep every mesh here and exclude below, on real areas
        b = Background2D(data, box, mask=mask, filter_size=1, exclude_percentile=100.0,
                         sigma_clip=SigmaClip(sigma=3.0, maxiters=10),
                         bkg_estimator=MedianBackground(sigma_clip=None), **kw)
        sky = np.array(b.background_mesh, dtype=np.float64)
        rms = np.array(b.background_rms_mesh, dtype=np.float64)
        ngood = np.asarray(b.n_pixels_mesh if hasattr(b, "n_pixels_mesh") else b.npixels_mesh)
    except ValueError as exc:  # every mesh excluded
        raise ValueError(f"sky: cannot estimate the background ({exc}); too many masked "
                         f"pixels for box={box} and exclude_percentile={exclude_percentile}") from exc
    cen, size = [], []
    for n, b_ in zip(data.shape, box):
        starts = np.arange(sky.shape[len(cen)]) * b_
        stops = np.minimum(starts + b_, n)
        cen.append((starts + stops - 1) / 2.0)
        size.append(stops - starts)
    # the last, partial mesh of a row or column is judged on its own pixels, not the box's
    area = size[0][:, None] * size[1][None, :]
    excluded = ngood <= (1.0 - exclude_percentile / 100.0) * area
    # a sliver (under a quarter of a box) is too noisy to pin the spline at the edge
    excluded |= area < 0.25 * box[0] * box[1]
    if excluded.all():
        raise ValueError(f"sky: every {box[0]}x{box[1]} mesh has more than "
                         f"{exclude_percentile} % of its pixels masked")
    sky[excluded] = np.nan
    rms[excluded] = np.nan
    return sky, rms, cen[0], cen[1]


def _design(y, x, ny_mesh, nx_mesh):
    """Columns of the trend surface at (y, x) (normalised coordinates).

    Quadratic in both coordinates (1, y, x, y^2, xy, x^2) with at least 3 meshes along
    both axes, otherwise linear along the axes that have more than one mesh.
    """
    cols = [np.ones_like(y)]
    if ny_mesh > 1:
        cols.append(y)
    if nx_mesh > 1:
        cols.append(x)
    if ny_mesh >= 3 and nx_mesh >= 3:
        cols += [y * y, x * y, x * x]
    return cols


def _design_names(ny_mesh, nx_mesh):
    """Names of the columns of :func:`_design`, in its order."""
    names = ["1"]
    if ny_mesh > 1:
        names.append("y")
    if nx_mesh > 1:
        names.append("x")
    if ny_mesh >= 3 and nx_mesh >= 3:
        names += ["yy", "xy", "xx"]
    return names


def _trend_fit(z, yc, xc, scale):
    """Robust (3-sigma clipped) least-squares trend surface through the finite mesh values.

    Returns a function ``f(y, x)`` (arrays of pixel coordinates) evaluating it.
    """
    yy, xx = np.meshgrid(yc / scale, xc / scale, indexing="ij")
    cols = _design(yy, xx, len(yc), len(xc))
    ok = np.isfinite(z)
    keep = ok.copy()
    npar = len(cols)
    coef = None
    for _ in range(5):
        if keep.sum() < npar + 1:  # too few meshes for this surface: a plane, else a constant
            nlin = 1 + (len(yc) > 1) + (len(xc) > 1)
            cols = cols[:nlin] if npar > nlin and keep.sum() >= nlin + 1 else cols[:1]
            npar = len(cols)
            if keep.sum() < 1:
                keep = ok
        a = np.stack([c[keep] for c in cols], axis=1)
        coef, *_ = np.linalg.lstsq(a, z[keep], rcond=None)
        res = z - sum(c * k for c, k in zip(cols, coef))
        r = res[keep]
        s = 1.4826 * np.median(np.abs(r - np.median(r)))
        new = ok & (np.abs(res) <= 3.0 * s) if s > 0 else keep
        if np.array_equal(new, keep) or new.sum() < npar + 1:
            break
        keep = new
    # f(y, x) as a polynomial in x with coefficients in y: P0(y) + P1(y) x + P2 x^2, so
    # that on a broadcast grid (y of shape (ny, 1), x of shape (1, nx)) it costs two
    # full-size operations instead of one per term
    names = _design_names(len(yc), len(xc))[:npar]
    k = dict(zip(names, coef))

    def f(y, x):
        yn, xn = np.asarray(y, float) / scale, np.asarray(x, float) / scale
        p0 = k["1"] + k.get("y", 0.0) * yn + k.get("yy", 0.0) * yn * yn
        p1 = k.get("x", 0.0) + k.get("xy", 0.0) * yn
        p2 = k.get("xx", 0.0)
        out = p0 + p1 * xn if ("x" in k or "xy" in k) else p0 + 0.0 * xn
        if "xx" in k:
            out += p2 * (xn * xn)
        return out

    return f


def _nan_median_fill(r, size):
    """Median filter (``size`` meshes, NaN-aware) of a mesh map; NaN meshes filled.

    With ``size == 1`` only the NaN (excluded) meshes are replaced, by the median of
    their 3 x 3 neighbours, repeatedly until none is left.
    """
    from scipy.ndimage import generic_filter

    def nanmed(v):
        v = v[np.isfinite(v)]
        return np.median(v) if v.size else np.nan

    out = r.copy()
    if size > 1:
        out = generic_filter(r, nanmed, size=size, mode="constant", cval=np.nan)
    for _ in range(max(out.shape)):
        holes = ~np.isfinite(out)
        if not holes.any():
            break
        fill = generic_filter(out, nanmed, size=3, mode="constant", cval=np.nan)
        out[holes] = fill[holes]
    out[~np.isfinite(out)] = 0.0
    return out


def _mesh_to_image(z, yc, xc, shape, filter_size):
    """Full-resolution smooth map from a mesh map (NaN = excluded mesh).

    A robust quadratic trend surface is fitted to the mesh values; the residuals are
    median-filtered over ``filter_size`` meshes (excluded meshes filled from their
    neighbours) and interpolated with a bicubic spline through the mesh centres (constant
    beyond the outermost centres); the trend is added back at every pixel.  A gradient or
    a quadratic vignetting is thus followed exactly, up to the image edges, and the median
    filter does not flatten it.
    """
    from scipy.interpolate import RectBivariateSpline

    ny, nx = shape
    trend = _trend_fit(z, yc, xc, float(max(ny, nx)))
    yy, xx = np.meshgrid(yc, xc, indexing="ij")
    res = _nan_median_fill(z - trend(yy, xx), int(filter_size))
    y = np.clip(np.arange(ny, dtype=float), yc[0], yc[-1])
    x = np.clip(np.arange(nx, dtype=float), xc[0], xc[-1])
    if len(yc) == 1 and len(xc) == 1:
        rimg = np.full(shape, res[0, 0])
    elif len(yc) == 1:
        rimg = np.broadcast_to(np.interp(x, xc, res[0]), shape)
    elif len(xc) == 1:
        rimg = np.broadcast_to(np.interp(y, yc, res[:, 0])[:, None], shape)
    else:
        spl = RectBivariateSpline(yc, xc, res, kx=min(3, len(yc) - 1), ky=min(3, len(xc) - 1), s=0)
        rimg = spl(y, x)
    yi = np.arange(ny, dtype=float)[:, None]   # broadcast: no full-size coordinate arrays
    xi = np.arange(nx, dtype=float)[None, :]
    return (trend(yi, xi) + rimg).astype(np.float32)


def _source_pixels(img, threshold, npix, bad):
    """Pixels of the sources: 8-connected groups of at least ``npix`` unmasked pixels
    above ``threshold`` (scalar or map).

    The pixels of ``photutils.segmentation.detect_sources(img, threshold, npix,
    mask=bad)`` (``img > threshold``, 8-connectivity), found with one
    :func:`scipy.ndimage.label` and a count per label instead of a loop over the
    segments (2 s -> 0.3 s on a 2048 x 4096 frame).
    """
    from scipy.ndimage import label

    above = img > threshold
    above &= ~bad
    lab, n = label(above, structure=np.ones((3, 3), bool))
    if n == 0:
        return above
    keep = np.bincount(lab.ravel(), minlength=n + 1) >= npix
    keep[0] = False
    return keep[lab]


def _sky_model(img, box, mask, filter_size, exclude_percentile, base=None):
    """Sky and rms maps [e-]; with ``base`` the meshes are measured on ``img - base``."""
    work = img if base is None else img - base
    sky_m, rms_m, yc, xc = _mesh_stats(work, box, mask, exclude_percentile)
    sky = _mesh_to_image(sky_m, yc, xc, img.shape, filter_size)
    rms = _mesh_to_image(rms_m, yc, xc, img.shape, filter_size)
    if base is not None:
        sky = (sky + base).astype(np.float32)
    return sky, np.maximum(rms, 0.0).astype(np.float32)


def estimate_sky(data: np.ndarray, mask: np.ndarray | None = None, *, box: int = 64,
                 filter_size: int = 3, nsigma_src: float = 2.0, npix_src: int = 5,
                 dilate: int = 5, fwhm_px: float | None = None,
                 exclude_percentile: float = 50.0) -> SkyResult:
    """Estimate a smooth sky model with sources masked (see the module docstring).

    Parameters
    ----------
    data : ndarray (ny, nx)
        Image [e-/pixel], flat-fielded, sky not subtracted.  Not modified.
    mask : ndarray (ny, nx) of uint16 or bool, optional
        Bitmask (:mod:`reducer.ops.bits`, any nonzero value excludes the pixel) or
        boolean (True = bad).  Non-finite data are always excluded.
    box : int
        Mesh size [pixel], reduced to the image size along an axis shorter than it.
        Choose several times the largest source's size and smaller than the scale of
        the sky's variations.
    filter_size : int
        Size of the median filter over the mesh map [meshes], odd; 1 = none.
    nsigma_src : float
        Source detection threshold in units of the first-pass sky rms (per unsmoothed
        pixel, also when ``fwhm_px`` smooths the detection image).
    npix_src : int
        Minimum number of connected (8-connectivity) pixels of a source.
    dilate : int
        Radius [pixel] by which the source segments are grown; 0 = no growth.
    fwhm_px : float, optional
        Seeing FWHM [pixel]; when given the detection image is convolved with a
        normalised Gaussian of that FWHM.  The threshold stays in units of the
        unsmoothed rms (photutils' convention), so this masks faint extended light and
        no noise peak, but needs brighter point sources (at FWHM 2.8 px a star of peak
        5.9 sigma was found without smoothing and missed with it).
    exclude_percentile : float
        Meshes with more than this percentage of masked pixels (bad, sources, clipped)
        are dropped from the mesh map and filled by interpolation.

    Returns
    -------
    SkyResult
        ``sky`` and ``rms`` [e-] (float32), ``level``, ``rms_level`` [e-],
        ``source_mask`` (bool).

    Raises
    ------
    ValueError
        For a non-2-D image, a mask of another shape, invalid parameters or an image
        with too few usable pixels.
    """
    img = np.asarray(data)
    if img.ndim != 2:
        raise ValueError(f"data must be a 2-D image, got shape {img.shape}")
    if int(box) < 1 or int(filter_size) < 1 or int(filter_size) % 2 == 0:
        raise ValueError("box must be >= 1 and filter_size a positive odd integer")
    if int(npix_src) < 1 or int(dilate) < 0 or not nsigma_src > 0:
        raise ValueError("npix_src must be >= 1, dilate >= 0 and nsigma_src > 0")
    if fwhm_px is not None and not fwhm_px > 0:
        raise ValueError("fwhm_px must be > 0")
    img = img.astype(np.float32, copy=False)
    badpix = _bad_pixels(img, mask)
    if (~badpix).sum() < 3:
        raise ValueError("sky: fewer than 3 usable pixels")
    ny, nx = img.shape
    boxsz = (min(int(box), ny), min(int(box), nx))

    # first pass and source detection
    sky0, rms0 = _sky_model(img, boxsz, badpix, filter_size, exclude_percentile)
    resid = np.where(badpix, 0.0, img - sky0).astype(np.float32)
    if fwhm_px is not None:
        from astropy.convolution import convolve
        from photutils.segmentation import make_2dgaussian_kernel

        size = 2 * int(np.ceil(1.5 * fwhm_px)) + 1
        kernel = make_2dgaussian_kernel(float(fwhm_px), size=size)
        resid = convolve(resid, kernel, mask=badpix, boundary="extend",
                         normalize_kernel=True, nan_treatment="fill", fill_value=0.0)
    src = _source_pixels(resid, nsigma_src * rms0, int(npix_src), badpix)
    if int(dilate) > 0 and src.any():
        from .morphology import dilate_disc
        src = dilate_disc(src, int(dilate))

    # final pass
    sky, rms = _sky_model(img, boxsz, badpix | src, filter_size, exclude_percentile, base=sky0)
    return SkyResult(sky=sky, rms=rms, level=float(np.median(sky)),
                     rms_level=float(np.median(rms)), source_mask=src)


def subtract_sky(data: np.ndarray, unc: np.ndarray | None, sky) -> tuple[np.ndarray, np.ndarray | None]:
    """Subtract a sky model; the uncertainty is passed through (model noise neglected).

    Parameters
    ----------
    data : ndarray (ny, nx)
        Image [e-].  Not modified.
    unc : ndarray (ny, nx) or None
        1-sigma uncertainty of ``data`` [e-].  Not modified.
    sky : ndarray (ny, nx), float, or SkyResult
        Sky model [e-] (a scalar is a constant sky).

    Returns
    -------
    data_sub : ndarray of float32
        ``data - sky`` [e-].
    unc : ndarray of float32 or None
        A copy of ``unc``: the sky model's own noise, ``~0.02 sigma`` per pixel for a
        64 x 64 mesh, changes it by 0.02 % and is neglected (module docstring).

    Raises
    ------
    ValueError
        When ``unc`` or ``sky`` does not have the shape of ``data``.
    """
    d = np.asarray(data)
    if d.ndim != 2:
        raise ValueError(f"data must be a 2-D image, got shape {d.shape}")
    s = sky.sky if isinstance(sky, SkyResult) else np.asarray(sky)
    if s.ndim != 0 and s.shape != d.shape:
        raise ValueError(f"sky shape {s.shape} differs from the data shape {d.shape}")
    out_unc = None
    if unc is not None:
        u = np.asarray(unc)
        if u.shape != d.shape:
            raise ValueError(f"unc shape {u.shape} differs from the data shape {d.shape}")
        out_unc = np.array(u, dtype=np.float32, copy=True)
    out = (d.astype(np.float32, copy=False) - s.astype(np.float32, copy=False)).astype(np.float32)
    return out, out_unc
