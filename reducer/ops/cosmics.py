"""The z step on arrays: cosmic-ray detection and repair with L.A.Cosmic (pure, no I/O).

Units: images in electrons (e-); ``mask`` is the uint16 bitmask of :mod:`reducer.ops.bits`.
Inputs are never modified.

How astroscrappy is called
--------------------------
:func:`astroscrappy.detect_cosmics` (van Dokkum 2001, PASP 113, 1420) builds its noise
model from the data values, so ``indat`` must *contain* the sky.  Its ``inbkg`` is a
background that it subtracts from ``indat`` itself before the Laplacian, adds to the
variance unsmoothed (``var = median5(indat - inbkg + rn^2) + inbkg``) and adds back to
the cleaned output.  The z step works on *sky-subtracted* data (after the s step), so::

    indat  = data_e + sky_e          (the sky restored: total e-, what was collected)
    inbkg  = sky_e                   (the s step's model; removed again internally)
    gain   = 1.0                     (data already in e-)
    readnoise = rdnoise_e [e-],  satlevel = saturate_e [e-, compared with indat]
    inmask = bad pixels (``mask_bits`` = BAD | SATURATED | LOWFLAT | OFFIMAGE | NONFINITE,
             non-finite data) and the halo of saturated stars (below)

and the cleaned image is brought back to sky-subtracted units by subtracting ``sky_e``
from ``cleanarr`` *only at the flagged pixels*: every other pixel of the output is the
input value, bit for bit (no ``+sky-sky`` float32 rounding).

Passing the sky-subtracted data alone (no sky) makes the noise model
``sqrt(max(data, 0) + rn^2) ~ rn`` on blank sky, far below the true ``sqrt(sky + rn^2)``;
passing the sky-subtracted data *with* ``inbkg = sky`` subtracts the sky twice and gives
the same underestimate.  Either way pure noise is "cosmic rays": on a cosmic-ray-free
1000 e- sky frame more than 20 % of the pixels are flagged after one iteration, against
at most a few with the sky restored (``tests/test_sky_cosmics.py``).

Masked pixels
-------------
Pixels with any of ``mask_bits`` set (and non-finite ones) are given to astroscrappy as
``inmask``: never flagged, never used to repair a neighbour, returned unchanged.  Their
values still enter its median filters, so SATURATED pixels keep theirs (astroscrappy grows
saturated cores from ``satlevel``) while the others (defects, off-image, NaN) are replaced,
for the call only, by the mean of their usable neighbours (no hole or spike next to good
pixels).  The halo of saturated stars, ``sat_protect_px`` = 8 px around any SATURATED pixel
or pixel at/above ``saturate_e``, is not searched: the 7 x 7 median there sits on the
saturated plateau, the fine-structure test no longer protects blended neighbours, and on
the simulator a 6 000 e- star 6 px from a saturated one lost 17 pixels.

Choices (measured, ``tests/test_sky_cosmics.py``)
-------------------------------------------------
"Strong" = cosmic-ray pixels whose deposit exceeds 5 sigma of the local noise,
sigma = sqrt(sky + star + rn^2); "star pixels" = unmasked pixels within 2 FWHM of a star,
minus those within 1 px of a deposit.  Synthetic: 8 frames 256 x 256, sky 1000 e-, FWHM
2.0-3.5 px, 40 stars each with peaks 50 e- to 95 % of saturation (2 saturated), the
simulator's cosmic-ray model (60 % Gaussian spots of sigma 0.25-0.9 px, 40 % tracks).
Simulator: one r-band 300 s frame, sky 9000 e-, FWHM 2.4 px, 2 x 320 x 320 px.

- ``sigclip=4.5, sigfrac=0.1, objlim=5.0, niter=4, sepmed=True, fsmode='median'``.
  ``objlim`` is the star protection: 4.0 gains 1.7 % completeness (86.8 % of the strong
  pixels) but flags 0.14 % of the star pixels (0.53 % at FWHM 2.0 px; 5.0: 0.11 %).
  ``sigfrac=0.1`` instead of astroscrappy's 0.3 adds the faint edges of detected events
  (+2.1 %; star pixels 0.06 % against 0.05 %).  ``sigclip=4.0`` gains 3-5 % but flags ~6x
  more noise pixels.  ``sepmed=False`` (exact median filters) is far more conservative at
  the same ``objlim`` (44 % of the strong pixels); it needs ``objlim`` ~1, which flagged
  0.4 % of the simulator's star pixels.
- ``cleantype='meanmask'`` (astroscrappy's default): a flagged pixel becomes the mean of
  the unflagged, unmasked pixels of its 5 x 5 box, computed on the sky-subtracted image
  (astroscrappy cleans after removing ``inbkg``).  On blank sky the repaired values are
  off by +0.23 sigma (the unflagged faint wings of the event) with 0.44 sigma rms.
  ``'medmask'`` repairs slightly better (+0.10 sigma; on stars -0.2 sigma rms 3.2 against
  +1.5 / 4.3) but its repairs feed L.A.Cosmic's later iterations differently and let a
  flag on a bright blended star grow (11 -> 31 pixels in one synthetic frame; star
  pixels flagged 0.16 % against 0.06 %); ``'idw'`` +0.26 / 0.41.  No 5 x 5 estimate follows
  a stellar core: a cosmic ray on a star is repaired to a few sigma only.
- ``fsmode='convolve'`` (PSF-matched fine structure, needs ``fwhm_px``) was not better at
  equal star protection (exploratory simulator run: 69 % of the strong pixels at
  ``objlim=1.5`` against 76 % with the defaults), so
  it is opt-in; its ``objlim`` scale differs (default 1.5 there; 1.0 flags 0.26 % of the
  star pixels).  ``psfmodel='gauss'`` is the kernel for direct images: ``'gaussy'`` /
  ``'gaussx'`` are one-dimensional kernels meant for spectra and protect no star (37 % of
  the star pixels flagged at ``objlim=1``); ``'moffat'`` uses ``psfbeta``.

Second pass (``psf_test``, ``grow_sigma``)
------------------------------------------
Measured on the frames above, L.A.Cosmic's misses (587 strong pixels of 3933 on the
synthetic frames, 256 of 883 on the simulator) are mostly whole events it did not find:
broad spots (sigma 0.5-0.9 px: 298 pixels, S/N 5 to > 20) and faint (5-10 sigma) tracks
and spots; then the faint ends and gaps of found tracks (~160 pixels); on the simulator
also 32 pixels in the unsearched saturated halos and 10 within 2 px of the edges.  Two
cheap steps follow astroscrappy (vectorised, near candidates only):

1. PSF test (after Rhoads 2000, PASP 112, 703: a cosmic ray is sharper than the PSF
   allows).  The seeing FWHM is ``fwhm_px`` or, when not given, estimated from the
   frame (:func:`estimate_psf_fwhm`: Moffat grid fits of the bright star-like peaks;
   on the test frames within 4 % of the truth; NaN, and no PSF test, when fewer than 5
   stars of S/N > 30 qualify).  Every remaining local maximum above 4 sigma is fitted in
   its 7 x 7 window by a constant plus a star (Moffat, 0.85-1.35 x FWHM, beta 2.5-4.5)
   and by a constant plus a Gaussian spot (sigma 0.25-1.0 px), at 5 x 5 sub-pixel
   centres (a 9 x 9 grid flagged the same pixels); the spot wins when it is better by
   ``psf_delta`` = 9 in chi^2 and is itself an acceptable fit.  The spot's pixels above
   1.5 sigma are flagged.  Saturated halos are searched here (no false flag in them on
   the test frames).
2. Growing: neighbours of flagged pixels above ``grow_sigma`` = 3 sigma over the median
   of their unflagged 5 x 5 neighbourhood, iterated, on blank sky only (5 x 5 mean of
   the repaired image below 2.5 sigma of the sky: growing into a star's flank from a
   flag on the star was seen otherwise).

Flagged pixels are then all repaired again with the final mask (astroscrappy's
``'meanmask'`` rule).  Cost: ~10-20 ms per 256 x 256 frame (templates cached).

Results with the defaults (L.A.Cosmic alone in brackets):

=====================  ========  ==========  ==========  ===========  ========
data                   strong    > 10 sigma  > 20 sigma  star pixels  noise px
                       flagged   flagged     flagged     flagged      flagged
=====================  ========  ==========  ==========  ===========  ========
synthetic (8 frames)   91.3 %    95.2 %      97.3 %      0.064 %      0.010 %
                       (85.1 %)  (92.7 %)    (95.8 %)    (0.060 %)    (0.010 %)
simulator (2 frames)   75.1 %    90.7 %      95 % (37)   0.037 %      0.012 %
                       (71.0 %)  (89.9 %)    (92 %)      (0.028 %)    (0.010 %)
=====================  ========  ==========  ==========  ===========  ========

The goal of >= 95 % of the strong pixels is not reached.  What is left, and why:

- broad spots as wide as the PSF: in the FWHM 2.0-2.2 px frames spots of sigma 0.7-0.9
  px (FWHM 1.6-2.1 px) fit the star family as well as the spot family even at S/N 20-40
  (chi^2 differences of +-5), so no single-frame shape test separates them from stars
  without flagging stars; 178 strong pixels (4.5 %) of unfound broad spots remain, half
  of them in those frames;
- 5-10 sigma pixels: at that S/N a spot's width is barely measured (the two fits differ
  by < 9 in chi^2 for most of them); on the simulator (sky 9000 e-) most strong pixels
  are 5-10 sigma and 64 % of those are found;
- cosmic rays on a star's core or flank: the constant-background fits fail for both
  families there, and growing is not done on stars (to protect them); a single-pixel
  event 3 px from a FWHM 2 px star of S/N 50 is found only by L.A.Cosmic.

Those are left to the comparison with companion exposures (below) and to the
sigma-clipped stack of dithered frames.

Comparison with companion exposures (``companions``, ``compare``)
-----------------------------------------------------------------
Given other dithered exposures of the same detector, field and filter (sky-subtracted,
with their uncertainty and mask, not registered), :mod:`reducer.ops.crcompare`
registers and scales each, builds a model of this frame from them and flags the pixels
above it (``compare_nsigma`` = 4.5 sigma, with ``compare_scale_noise`` = 0.15 of the
model in the noise), grows every flag into neighbours above the model, and clears the
single-frame flags on sources all the companions show.  The goal is reached there: >=
95 % of the strong pixels with 2 companions (synthetic 97.7 %, simulator 95.5 %; star
pixels 0.035 % / 0.044 %), figures in that module's docstring.  Without companions,
none usable, or ``compare = false``, the result is the single-frame one, bit for bit.
Settings (``[cosmics]``): ``compare``, ``compare_nsigma``, ``compare_scale_noise``.

Borders: astroscrappy neither cleans nor fully detects within 2 pixels of the edges; the
image is padded by reflection (8 pixels) for the call and cropped afterwards.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .bits import COSMIC, SATURATED, UNUSABLE

__all__ = ["CosmicResult", "clean_cosmics", "estimate_psf_fwhm"]

#: Reflection padding [pixel] around the image for the astroscrappy call.
PAD = 8
CLEANTYPES = ("meanmask", "medmask", "idw", "median")
PSFMODELS = ("gauss", "gaussx", "gaussy", "moffat")


@dataclass(frozen=True)
class CosmicResult:
    """Result of :func:`clean_cosmics`.

    Attributes
    ----------
    data : ndarray of float32
        The image with the flagged pixels repaired [e-, sky-subtracted like the input];
        all other pixels are the input values unchanged.
    crmask : ndarray of bool
        Pixels flagged as cosmic rays.
    ncosmic : int
        Number of cosmic-ray events: 8-connected groups of flagged pixels (the number of
        flagged pixels is ``crmask.sum()``, :attr:`npix`).
    npix_second : int
        Pixels flagged by the second pass (PSF test and growing), not by L.A.Cosmic.
    psf_fwhm : float
        Seeing FWHM [pixel] the PSF test used (given or estimated); NaN when the test
        did not run (off, or too few stars to estimate it).
    npix_compare : int
        Pixels flagged by the comparison with the companion exposures and by no
        single-frame pass (:mod:`reducer.ops.crcompare`).
    ncompanions : int
        Companions used in the comparison (registered and scaled).
    companions : tuple of :class:`~reducer.ops.crcompare.CompanionFit`
        One per companion given: used or not (and why), shift (dy, dx) [pixel], flux
        scale, matched stars; empty when none was given or ``compare`` is off.
    npix_cleared : int
        Single-frame flags the comparison cleared: on a source all the companions show,
        not above their model (a star, not a cosmic ray).
    """

    data: np.ndarray
    crmask: np.ndarray
    ncosmic: int
    npix_second: int = 0
    psf_fwhm: float = float("nan")
    npix_compare: int = 0
    ncompanions: int = 0
    companions: tuple = ()
    npix_cleared: int = 0

    @property
    def npix(self) -> int:
        """Number of flagged pixels."""
        return int(np.count_nonzero(self.crmask))

    def flag(self, mask: np.ndarray) -> np.ndarray:
        """A copy of the uint16 bitmask ``mask`` with :data:`~reducer.ops.bits.COSMIC` set
        on the flagged pixels."""
        m = np.array(mask, dtype=np.uint16, copy=True)
        m[self.crmask] |= np.uint16(COSMIC)
        return m


def _as_image(name, value, shape):
    a = np.asarray(value, dtype=np.float64)
    if a.ndim == 0:
        return np.full(shape, float(a))
    if a.shape != shape:
        raise ValueError(f"{name} shape {a.shape} differs from the data shape {shape}")
    return a


def _fill_from_neighbours(img: np.ndarray, holes: np.ndarray, default: np.ndarray) -> np.ndarray:
    """Values for the ``holes`` of ``img``: mean of the non-hole pixels in a 5 x 5 box,
    growing the box (x3) until found, else ``default``.

    The 5 x 5 means are computed at the holes only (borders reflected as scipy's
    ``'reflect'`` mode); the few holes with no usable pixel in their 5 x 5 box (inside a
    bad region) are filled by :func:`_fill_growing`.  Values equal those of
    ``uniform_filter``-based means (to float64 round-off) at a cost proportional to the
    number of holes instead of the image size.
    """
    ny, nx = img.shape
    yy, xx = np.nonzero(holes)
    out = np.empty(yy.size, np.float64)
    o = np.arange(-2, 3)
    step = 200_000
    for i in range(0, yy.size, step):
        Y = yy[i:i + step, None, None] + o[None, :, None]
        X = xx[i:i + step, None, None] + o[None, None, :]
        Y = np.where(Y < 0, -Y - 1, np.where(Y >= ny, 2 * ny - Y - 1, Y))
        X = np.where(X < 0, -X - 1, np.where(X >= nx, 2 * nx - X - 1, X))
        good = ~holes[Y, X]
        num = np.where(good, img[Y, X], 0.0).sum(axis=(1, 2))
        den = good.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i:i + step] = np.where(den > 0, num / den, np.nan)
    lost = ~np.isfinite(out)
    if lost.any():
        out[lost] = _fill_growing(img, holes, default)[lost]
    return out


def _fill_growing(img: np.ndarray, holes: np.ndarray, default: np.ndarray) -> np.ndarray:
    """Values for the ``holes`` of ``img``: mean of the non-hole pixels in a box of 5,
    15, 45, ... pixels (whole-image ``uniform_filter`` passes), else ``default``."""
    from scipy.ndimage import uniform_filter

    good = (~holes).astype(np.float64)
    vals = np.where(holes, 0.0, img)
    out = np.array(default, dtype=np.float64, copy=True)
    todo = holes.copy()
    size = 5
    while todo.any() and size <= 3 * max(img.shape):
        num = uniform_filter(vals, size=size, mode="reflect")
        den = uniform_filter(good, size=size, mode="reflect")
        ok = todo & (den > 0.5 / size ** 2)
        out[ok] = num[ok] / den[ok]
        todo &= ~ok
        size *= 3
    return out[holes]


# --------------------------------------------------------------------------- second pass
#: Half-size [pixel] of the fitting window of the PSF test (7 x 7 pixels).
_HW = 3
#: Sub-pixel centre offsets [pixel] of the templates (5 x 5 grid over one pixel; a 9 x 9
#: grid flagged the same pixels on the test frames, at 3x the cost).
_OFFSETS = np.arange(-0.5, 0.5 + 1e-9, 0.25)
#: Gaussian widths sigma [pixel] of the cosmic-ray family of the PSF test.
_CR_SIGMAS = (0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 1.0)
#: Moffat FWHM factors (x the frame's FWHM) and betas of the star family of the PSF test.
_STAR_FWHM = (0.85, 0.92, 1.0, 1.1, 1.2, 1.35)
_STAR_BETAS = (2.5, 3.0, 4.5)


def _gauss_templates(sigmas, step_offsets=_OFFSETS) -> np.ndarray:
    """Pixel-integrated unit-flux circular Gaussians on the (2 _HW + 1)^2 window, one per
    sigma [pixel] and sub-pixel centre offset: array (len(sigmas) * noff^2, npix)."""
    from scipy.special import erf

    i = np.arange(-_HW, _HW + 1, dtype=np.float64)
    out = []
    for s in sigmas:
        s2 = s * math.sqrt(2.0)
        f = 0.5 * (erf((i[None, :] + 0.5 - step_offsets[:, None]) / s2)
                   - erf((i[None, :] - 0.5 - step_offsets[:, None]) / s2))   # (noff, n)
        out.append((f[:, None, :, None] * f[None, :, None, :]).reshape(-1, i.size ** 2))
    return np.concatenate(out)


def _moffat_templates(fwhms, betas, step_offsets=_OFFSETS, nsub: int = 7) -> np.ndarray:
    """Pixel-integrated (``nsub`` x ``nsub`` samples) unit-flux circular Moffats on the
    window, one per (FWHM [pixel], beta) and sub-pixel centre offset."""
    i = np.arange(-_HW, _HW + 1, dtype=np.float64)
    s = (np.arange(nsub) + 0.5) / nsub - 0.5
    u = i[:, None] + s[None, :]                                 # (n, nsub) sample coordinates
    out = []
    for fw in fwhms:
        for beta in betas:
            alpha = fw / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
            norm = (beta - 1.0) / (math.pi * alpha ** 2)
            dx = u[None, :, :] - step_offsets[:, None, None]        # (noff, n, nsub)
            r2 = (dx[:, None, :, None, :, None] ** 2 + dx[None, :, None, :, None, :] ** 2)
            # (offy, offx, ny, nx, suby, subx) -> mean over the samples
            v = ((1.0 + r2 / alpha ** 2) ** -beta).mean(axis=(4, 5)) * norm
            out.append(v.reshape(-1, i.size ** 2))
    return np.concatenate(out)


@functools.lru_cache(maxsize=16)
def _cached_templates(kind: str, params: tuple) -> np.ndarray:
    """Template sets of the PSF test, cached (read-only): ``('g', sigmas)`` or
    ``('m', (fwhms, betas))`` on the default offsets."""
    t = _gauss_templates(params) if kind == "g" else _moffat_templates(*params)
    t.setflags(write=False)
    return t


def _windows(img: np.ndarray, yy: np.ndarray, xx: np.ndarray):
    """The (2 _HW + 1)^2 windows of ``img`` centred on (yy, xx): values (N, npix) (edge
    pixels repeated outside), inside-the-image flags (N, npix), and the pixel indices."""
    o = np.arange(-_HW, _HW + 1)
    ny, nx = img.shape
    Y = yy[:, None, None] + o[None, :, None]
    X = xx[:, None, None] + o[None, None, :]
    Y, X = np.broadcast_arrays(Y, X)
    inside = (Y >= 0) & (Y < ny) & (X >= 0) & (X < nx)
    Yc, Xc = np.clip(Y, 0, ny - 1), np.clip(X, 0, nx - 1)
    n = yy.size
    return img[Yc, Xc].reshape(n, -1), inside.reshape(n, -1), Yc.reshape(n, -1), Xc.reshape(n, -1)


def _fit_templates(D: np.ndarray, W: np.ndarray, T: np.ndarray):
    """Weighted linear least squares of ``A * T_k + b`` to every window, every template.

    D, W: (N, npix) data and weights (1 / variance, 0 = not used); T: (K, npix).
    Returns chi^2, A and b, each (N, K) (NaN where singular).
    """
    WD = W * D
    St, Stt, Std = W @ T.T, W @ (T * T).T, WD @ T.T
    S1, Sd = W.sum(1)[:, None], WD.sum(1)[:, None]
    Sdd = (WD * D).sum(1)[:, None]
    det = Stt * S1 - St * St
    with np.errstate(invalid="ignore", divide="ignore"):
        A = (Std * S1 - St * Sd) / det
        b = (Stt * Sd - St * Std) / det
    return Sdd - A * Std - b * Sd, A, b


def _best(D, W, T, chunk: int = 1000):
    """Per window: the smallest chi^2 over the templates, its template index and A."""
    n = D.shape[0]
    chi, k, amp = np.full(n, np.inf), np.zeros(n, int), np.zeros(n)
    for i in range(0, n, chunk):
        c, A, _ = _fit_templates(D[i:i + chunk], W[i:i + chunk], T)
        c = np.where(np.isfinite(c), c, np.inf)
        j = np.argmin(c, axis=1)
        r = np.arange(j.size)
        chi[i:i + chunk], k[i:i + chunk], amp[i:i + chunk] = c[r, j], j, A[r, j]
    return chi, k, amp


def _peaks(img, sig, excl, size: int, snr_min: float):
    """Local maxima of ``img`` (the largest in their size x size box, ties included) with
    ``img / sig`` above ``snr_min``, outside ``excl``: pixel indices (yy, xx).  Only the
    pixels above the threshold are examined (no whole-image filter)."""
    yy, xx = np.nonzero((img > snr_min * sig) & ~excl)
    if yy.size == 0:
        return yy, xx
    ny, nx = img.shape
    h = size // 2
    o = np.arange(-h, h + 1)
    keep = np.ones(yy.size, bool)
    v = img[yy, xx]
    for dy in o:
        for dx in o:
            if dy or dx:
                keep &= v >= img[np.clip(yy + dy, 0, ny - 1), np.clip(xx + dx, 0, nx - 1)]
    return yy[keep], xx[keep]


def estimate_psf_fwhm(img: np.ndarray, var: np.ndarray, excl: np.ndarray, *,
                      snr_min: float = 30.0, nmax: int = 40, nmin: int = 5) -> float:
    """Seeing FWHM [pixel] from the frame's bright, star-like sources (for the PSF test).

    Local maxima (7 x 7) of the sky-subtracted ``img`` [e-] with peak S/N above
    ``snr_min`` whose 7 x 7 window holds no ``excl`` pixel (masked, saturated, flagged
    cosmic rays) are fitted with pixel-integrated Moffats (FWHM 1.0-6.0 px, beta 2.5, 3,
    4.5, 10) and with the cosmic-ray family (Gaussians of sigma 0.25-1.0 px); sources
    better fitted by the latter are left out; the median FWHM of the ``nmax`` brightest
    of the others is returned.  NaN when fewer than ``nmin`` qualify (the PSF test is
    then not run).
    """
    yy, xx = _peaks(img, np.sqrt(var), excl, 2 * _HW + 1, snr_min)
    ny, nx = img.shape
    keep = (yy >= _HW) & (yy < ny - _HW) & (xx >= _HW) & (xx < nx - _HW)
    yy, xx = yy[keep], xx[keep]
    if yy.size:
        E, _, _, _ = _windows(excl, yy, xx)          # no excluded pixel in the window
        yy, xx = yy[~E.any(axis=1)], xx[~E.any(axis=1)]
    if yy.size < nmin:
        return float("nan")
    order = np.argsort(-img[yy, xx])[: 3 * nmax]
    yy, xx = yy[order], xx[order]
    D, _, _, _ = _windows(img, yy, xx)
    V, _, _, _ = _windows(var, yy, xx)
    W = 1.0 / V
    fwhms = tuple(np.round(np.geomspace(1.0, 6.0, 25), 4))
    betas = (2.5, 3.0, 4.5, 10.0)
    chi_s, k_s, _ = _best(D, W, _cached_templates("m", (fwhms, betas)))
    chi_c, _, _ = _best(D, W, _cached_templates("g", _CR_SIGMAS))
    starlike = chi_s <= chi_c
    fw = np.asarray(fwhms)[k_s // (len(betas) * _OFFSETS.size ** 2)][starlike][:nmax]
    return float(np.median(fw)) if fw.size >= nmin else float("nan")


def _psf_test(img, var, excl, crmask, fwhm: float, delta: float, *, snr_min: float = 4.0,
              flag_sigma: float = 1.5, accept: float = 4.0, rfrac: float = 0.3) -> np.ndarray:
    """Pixels of the sources sharper than the PSF allows (module docstring, second pass).

    Every local maximum (3 x 3) of ``img`` [e-, sky-subtracted, cosmic rays of the first
    pass repaired] with S/N above ``snr_min``, outside ``excl`` and not next to a flagged
    pixel, is fitted in its 7 x 7 window (weights 1 / ``var``, ``excl`` and flagged pixels
    left out) by a constant plus a star (Moffat, FWHM 0.85-1.35 x ``fwhm``, beta 2.5-4.5)
    and by a constant plus a cosmic ray (Gaussian, sigma 0.25-1.0 px), each at 81
    sub-pixel centres.  It is a cosmic ray when the cosmic-ray fit is better by more than
    ``delta`` in chi^2, positive, and acceptable (chi^2 below nu + ``accept`` sqrt(2 nu),
    or its excess over nu below ``rfrac`` of the star fit's).  Its pixels where the fitted
    Gaussian exceeds ``flag_sigma`` of the noise are returned.
    """
    yy, xx = _peaks(img, np.sqrt(var), excl, 3, snr_min)
    new = np.zeros(img.shape, bool)
    if yy.size:                                   # not next to a flagged pixel
        ny, nx = img.shape
        near = np.zeros(yy.size, bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= crmask[np.clip(yy + dy, 0, ny - 1), np.clip(xx + dx, 0, nx - 1)]
        yy, xx = yy[~near], xx[~near]
    if yy.size == 0:
        return new
    D, inside, Y, X = _windows(img, yy, xx)
    E, _, _, _ = _windows(excl | crmask, yy, xx)
    V, _, _, _ = _windows(var, yy, xx)
    W = np.where(inside & ~E, 1.0 / V, 0.0)
    Tc = _cached_templates("g", _CR_SIGMAS)
    fws = tuple(round(fwhm * f, 3) for f in _STAR_FWHM)
    chi_s, _, _ = _best(D, W, _cached_templates("m", (fws, _STAR_BETAS)))
    chi_c, k_c, a_c = _best(D, W, Tc)
    nu = np.count_nonzero(W, axis=1) - 2
    ok = ((chi_s - chi_c > delta) & (a_c > 0)
          & ((chi_c < nu + accept * np.sqrt(2.0 * np.maximum(nu, 1)))
             | (chi_c - nu < rfrac * (chi_s - nu))))
    if ok.any():
        model = a_c[ok, None] * Tc[k_c[ok]]
        sel = (model > flag_sigma * np.sqrt(V[ok])) & (W[ok] > 0)
        new[Y[ok][sel], X[ok][sel]] = True
    return new & ~excl


def _grow(d, rep, sky, rdnoise, crmask, excl, k: float, *, blank: float = 2.5,
          maxiter: int = 6) -> np.ndarray:
    """Grow ``crmask`` into neighbours (8-connected) that exceed the median of their
    unflagged 5 x 5 neighbourhood by ``k`` sigma (sigma = sqrt(sky + max(median, 0) +
    rn^2)), on blank sky only: where the 5 x 5 mean of ``rep`` (the image with the first
    pass's cosmic rays repaired) is below ``blank`` sigma of the sky (a star's flank is
    not); iterated while it grows, at most ``maxiter`` times.  Returns the grown mask.
    Only the neighbours of the pixels flagged last are examined at each iteration."""
    import warnings

    cm = crmask.copy()
    ny, nx = d.shape
    o = np.arange(-2, 3)
    fy, fx = np.nonzero(cm)                          # the frontier: pixels flagged last
    tried = np.zeros(d.shape, bool)                  # examined and not taken (stay so)
    for _ in range(maxiter):
        if fy.size == 0:
            break
        ny8 = (fy[:, None] + np.array([-1, -1, -1, 0, 0, 1, 1, 1])[None, :]).ravel()
        nx8 = (fx[:, None] + np.array([-1, 0, 1, -1, 1, -1, 0, 1])[None, :]).ravel()
        ok = (ny8 >= 0) & (ny8 < ny) & (nx8 >= 0) & (nx8 < nx)
        idx = np.unique(ny8[ok] * nx + nx8[ok])
        yy, xx = idx // nx, idx % nx
        sel = ~cm[yy, xx] & ~excl[yy, xx] & ~tried[yy, xx]
        yy, xx = yy[sel], xx[sel]
        if yy.size == 0:
            break
        Y = np.clip(yy[:, None, None] + o[None, :, None], 0, ny - 1)
        X = np.clip(xx[:, None, None] + o[None, None, :], 0, nx - 1)
        s_sky = np.sqrt(sky[yy, xx] + rdnoise ** 2)
        blank_sky = rep[Y, X].reshape(yy.size, -1).mean(axis=1) < blank * s_sky
        vals = np.where(cm[Y, X] | excl[Y, X], np.nan, d[Y, X]).reshape(yy.size, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # all-NaN boxes
            loc = np.nanmedian(vals, axis=1)
        loc = np.where(np.isfinite(loc), loc, 0.0)
        s = np.sqrt(sky[yy, xx] + np.maximum(loc, 0.0) + rdnoise ** 2)
        add = (d[yy, xx] - loc > k * s) & blank_sky
        tried[yy[~add & ~blank_sky], xx[~add & ~blank_sky]] = True
        fy, fx = yy[add], xx[add]
        cm[fy, fx] = True
    return cm


def clean_cosmics(data_e: np.ndarray, mask: np.ndarray | None = None, *, sky_e,
                  rdnoise_e: float, saturate_e: float, sigclip: float = 4.5,
                  sigfrac: float = 0.1, objlim: float | None = None, niter: int = 4,
                  fwhm_px: float | None = None, fsmode: str = "median",
                  psfmodel: str = "gauss", psfbeta: float = 4.765,
                  cleantype: str = "meanmask", sepmed: bool = True,
                  sat_protect_px: float = 8.0, mask_bits: int = UNUSABLE,
                  psf_test: bool = True, psf_delta: float = 9.0,
                  grow_sigma: float = 3.0, unc_e=None, companions=None,
                  compare: bool = True, compare_nsigma: float = 4.5,
                  compare_scale_noise: float = 0.15) -> CosmicResult:
    """Detect and repair cosmic rays in a sky-subtracted image in electrons.

    Parameters
    ----------
    data_e : ndarray (ny, nx)
        Sky-subtracted image [e-] (output of the s step).  Not modified.
    mask : ndarray (ny, nx) of uint16, optional
        Bitmask (:mod:`reducer.ops.bits`).  Pixels with any of ``mask_bits`` set, and
        non-finite pixels, are neither flagged nor used to repair neighbours (astroscrappy
        grows this mask by one pixel) and keep their values in the output.  For the
        detection, SATURATED pixels keep their values; the other masked pixels are
        replaced by the mean of their usable neighbours.  Not modified.
    sky_e : ndarray (ny, nx) or float
        The sky [e-] that was subtracted from ``data_e`` (the s step's model); it is
        added back for the noise model (module docstring).  0 when ``data_e`` still
        contains its sky (no s step): the noise model is then right as it is.
    rdnoise_e : float
        Read noise [e-].
    saturate_e : float
        Saturation level [e-] of the sky-included signal (``data_e + sky_e``).
        Pixels at or above it inside extended bright cores are masked with a 2-pixel
        margin by astroscrappy.  For flat-fielded data use the lowest level at which a
        pixel can be saturated, e.g. ``(SATURATE - bias) * gain / max(flat)``; pixels
        already flagged SATURATED in ``mask`` are masked regardless.
    sigclip : float
        Detection limit of the Laplacian-to-noise ratio [sigma].
    sigfrac : float
        Limit for the neighbours of flagged pixels, as a fraction of ``sigclip``.
    objlim : float, optional
        Minimum contrast between the Laplacian and the fine-structure image (raise it if
        star cores are flagged).  Default 5.0 with ``fsmode='median'``, 1.5 with
        ``'convolve'`` (the two scales differ).
    niter : int
        Maximum number of L.A.Cosmic iterations.
    fwhm_px : float, optional
        Seeing FWHM [pixel]; required by ``fsmode='convolve'``; the PSF test's star
        width (estimated from the frame's bright stars when not given:
        :func:`estimate_psf_fwhm`).
    fsmode : {'median', 'convolve'}
        Fine-structure image: classic median filters, or the image convolved with a
        PSF kernel of FWHM ``fwhm_px`` (module docstring: not better, opt-in).
    psfmodel : {'gauss', 'gaussx', 'gaussy', 'moffat'}
        Kernel of the convolution; 'gauss' for direct images.
    psfbeta : float
        Moffat beta (``psfmodel='moffat'``).
    cleantype : {'meanmask', 'medmask', 'idw', 'median'}
        Repair of the flagged pixels (module docstring).
    sepmed : bool
        Separable median filters (astroscrappy's default, with which ``objlim`` was
        tuned); False = exact medians, far more conservative at the same ``objlim``
        (module docstring).
    sat_protect_px : float
        Pixels within this distance [pixel] of a SATURATED pixel (of ``mask``) or of a
        pixel at or above ``saturate_e`` are not searched (module docstring); 0 = off.
    mask_bits : int
        Bits of ``mask`` that exclude a pixel (default: every unusable bit;
        :data:`~reducer.ops.bits.COSMIC` is not among them).
    psf_test : bool
        Second pass, PSF test: flag the sources L.A.Cosmic left that a cosmic-ray profile
        fits better than the seeing PSF (module docstring).  Not run (and said so by
        ``psf_fwhm = nan``) when ``fwhm_px`` is not given and cannot be estimated.
    psf_delta : float
        Chi^2 margin by which the cosmic-ray fit must beat the star fit (9 = 3 sigma
        for one parameter).
    grow_sigma : float
        Second pass, growing: neighbours of flagged pixels above this many sigma over
        their local median (off stars) are flagged too, iterated; 0 = off.
    unc_e : ndarray (ny, nx) or float, optional
        1-sigma uncertainty of ``data_e`` [e-], for the comparison with companions;
        default the noise model ``sqrt(max(data_e + sky_e, 0) + rdnoise_e^2)``.
    companions : sequence of (data_e, unc_e, mask), optional
        0 to 4 other exposures of the same detector, field and filter (sky-subtracted
        [e-], 1-sigma uncertainty [e-], uint16 bitmask or None), not registered: pixels
        above the model they give of this frame are flagged too
        (:func:`reducer.ops.crcompare.compare_companions`).  None, none usable or
        ``compare=False``: the single-frame result, unchanged.
    compare : bool
        Use the companions when given.
    compare_nsigma : float
        Seed limit of the comparison [sigma_d] (module docstring of
        :mod:`reducer.ops.crcompare`).
    compare_scale_noise : float
        Fraction of the companions' model added to the comparison's noise (seeing
        differences, misregistration on stars).

    Returns
    -------
    CosmicResult
        ``data`` (float32, repaired, e-), ``crmask`` (bool), ``ncosmic`` (events).

    Raises
    ------
    ValueError
        For a non-2-D image, ``mask`` or ``sky_e`` of another shape, or invalid
        parameters.
    ImportError
        When astroscrappy is not installed.
    """
    d = np.asarray(data_e)
    if d.ndim != 2:
        raise ValueError(f"data_e must be a 2-D image, got shape {d.shape}")
    shape = d.shape
    sky = _as_image("sky_e", sky_e, shape)
    bad = ~np.isfinite(d)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != shape:
            raise ValueError(f"mask shape {m.shape} differs from the data shape {shape}")
        bad |= (m.astype(np.int64) & int(mask_bits)) != 0
    if not np.isfinite(sky).all():
        raise ValueError("sky_e must be finite")
    if cleantype not in CLEANTYPES:
        raise ValueError(f"cleantype {cleantype!r} is not one of {', '.join(CLEANTYPES)}")
    if fsmode not in ("median", "convolve"):
        raise ValueError(f"fsmode {fsmode!r} is not 'median' or 'convolve'")
    if fsmode == "convolve" and fwhm_px is None:
        raise ValueError("fsmode='convolve' needs fwhm_px")
    if objlim is None:
        objlim = 5.0 if fsmode == "median" else 1.5
    if psfmodel not in PSFMODELS:
        raise ValueError(f"psfmodel {psfmodel!r} is not one of {', '.join(PSFMODELS)}")
    if not (rdnoise_e >= 0 and saturate_e > 0 and sigclip > 0 and sigfrac > 0
            and objlim > 0 and int(niter) >= 1):
        raise ValueError("need rdnoise_e >= 0, saturate_e > 0, sigclip, sigfrac, objlim > 0 "
                         "and niter >= 1")
    if fwhm_px is not None and not fwhm_px > 0:
        raise ValueError("fwhm_px must be > 0")
    if not (psf_delta > 0 and grow_sigma >= 0):
        raise ValueError("need psf_delta > 0 and grow_sigma >= 0")
    if not (compare_nsigma > 0 and compare_scale_noise >= 0):
        raise ValueError("need compare_nsigma > 0 and compare_scale_noise >= 0")
    if companions is not None and len(companions) > 8:
        raise ValueError(f"at most 8 companions, got {len(companions)}")
    if unc_e is not None:
        unc_arr = np.asarray(unc_e, dtype=np.float32)
        if unc_arr.ndim and unc_arr.shape != shape:
            raise ValueError(f"unc_e shape {unc_arr.shape} differs from the data shape {shape}")
    try:
        import astroscrappy
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the z step needs astroscrappy (pip install astroscrappy)") from exc

    # total signal in e- (sky restored).  Masked pixels stay masked (never flagged, never
    # used to repair), but their values still enter astroscrappy's median filters and
    # Laplacian: SATURATED ones keep theirs (astroscrappy grows saturated cores from
    # satlevel), the others (non-finite, defects, off-image) are filled with the mean of
    # their usable neighbours so that no hole or spike is seen next to good pixels.
    total = d.astype(np.float64) + sky
    fill = bad.copy()
    if mask is not None:
        fill &= ~(((m.astype(np.int64) & SATURATED) != 0) & np.isfinite(d))
    if fill.any():
        total[fill] = _fill_from_neighbours(total, fill, sky)
    # the halo of saturated stars is not searched: the 7 x 7 median there sits on the
    # saturated plateau, so the fine-structure test no longer protects the neighbouring
    # (blended) stars
    nosearch = bad.copy()
    if sat_protect_px > 0:
        sat = np.isfinite(total) & (total >= float(saturate_e))
        if mask is not None:
            sat |= (m.astype(np.int64) & SATURATED) != 0
        if sat.any():
            from .morphology import dilate_disc
            nosearch |= dilate_disc(sat, float(sat_protect_px))
    pad = ((PAD, PAD), (PAD, PAD)) if min(shape) > PAD else ((0, 0), (0, 0))
    mode = "reflect"
    indat = np.ascontiguousarray(np.pad(total, pad, mode=mode), dtype=np.float32)
    inbkg = np.ascontiguousarray(np.pad(sky, pad, mode=mode), dtype=np.float32)
    inmask = np.ascontiguousarray(np.pad(nosearch, pad, mode=mode))
    kw = dict(inmask=inmask, inbkg=inbkg, sigclip=float(sigclip), sigfrac=float(sigfrac),
              objlim=float(objlim), gain=1.0, readnoise=float(rdnoise_e),
              satlevel=float(saturate_e), niter=int(niter), sepmed=bool(sepmed),
              cleantype=cleantype, verbose=False)
    if fsmode == "convolve":
        size = max(7, 2 * int(np.ceil(1.5 * fwhm_px)) + 1)
        kw.update(fsmode="convolve", psfmodel=psfmodel, psffwhm=float(fwhm_px),
                  psfsize=size, psfbeta=float(psfbeta))
    else:
        kw.update(fsmode="median")
    crmask, clean = astroscrappy.detect_cosmics(indat, **kw)
    (y0, y1), (x0, x1) = pad
    crmask = np.asarray(crmask[y0:y0 + shape[0], x0:x0 + shape[1]], dtype=bool) & ~nosearch
    clean = np.asarray(clean[y0:y0 + shape[0], x0:x0 + shape[1]], dtype=np.float64)
    out = np.array(d, dtype=np.float32, copy=True)
    out[crmask] = (clean[crmask] - sky[crmask]).astype(np.float32)

    # second pass (module docstring): PSF test on the sources left, then growing.  Not
    # searched: masked pixels and pixels at/above saturation (the halo is searched here:
    # both tests compare a pixel with its own neighbourhood, not with a 7 x 7 median)
    first = crmask
    fwhm_used = float("nan")
    if psf_test or grow_sigma > 0:
        excl = bad | ~np.isfinite(total) | (total >= float(saturate_e))
        if mask is not None:
            excl |= (m.astype(np.int64) & SATURATED) != 0
        rep = out.astype(np.float64)
        rep[bad] = 0.0
        var = sky + np.maximum(rep, 0.0) + float(rdnoise_e) ** 2
        if psf_test:
            fwhm_used = (float(fwhm_px) if fwhm_px is not None
                         else estimate_psf_fwhm(rep, var, excl | crmask))
            if np.isfinite(fwhm_used):
                crmask = crmask | _psf_test(rep, var, excl, crmask, fwhm_used, float(psf_delta))
        if grow_sigma > 0 and crmask.any():
            crmask = _grow(np.where(bad, 0.0, d.astype(np.float64)), rep, sky, float(rdnoise_e),
                           crmask, excl, float(grow_sigma))

    # comparison with the companion exposures (reducer.ops.crcompare): the pixels above
    # the model they give of this frame, and growing there from every flag
    single = crmask
    fits: tuple = ()
    ncleared = 0
    if compare and companions:
        from .crcompare import compare_companions
        if unc_e is None:
            unc = np.sqrt(np.maximum(d.astype(np.float64) + sky, 0.0)
                          + float(rdnoise_e) ** 2).astype(np.float32)
        else:
            unc = unc_arr
        cmp = compare_companions(d, unc, bad | ~np.isfinite(total) | (total >= float(saturate_e)),
                                 companions, nsigma=float(compare_nsigma),
                                 scale_noise=float(compare_scale_noise), start=crmask,
                                 mask_bits=mask_bits)
        fits = cmp.companions
        if cmp.cleared is not None:
            ncleared = int(np.count_nonzero(crmask & cmp.cleared))
            crmask = crmask & ~cmp.cleared
            single = crmask
        crmask = crmask | (cmp.crmask & ~bad)

    if (crmask & ~first).any():
        # repair every flagged pixel again with the final mask: the mean of the
        # unflagged, unmasked pixels of its 5 x 5 box (astroscrappy's 'meanmask')
        holes = crmask | bad
        vals = _fill_from_neighbours(np.where(bad, 0.0, d.astype(np.float64)), holes,
                                     np.zeros(shape))
        filled = np.zeros(shape)
        filled[holes] = vals
        out = np.array(d, dtype=np.float32, copy=True)
        out[crmask] = filled[crmask].astype(np.float32)

    from scipy.ndimage import label
    _, nev = label(crmask, structure=np.ones((3, 3), bool))
    return CosmicResult(data=out, crmask=crmask, ncosmic=int(nev),
                        npix_second=int(np.count_nonzero(single & ~first)), psf_fwhm=fwhm_used,
                        npix_compare=int(np.count_nonzero(crmask & ~single)),
                        ncompanions=sum(1 for c in fits if c.used), companions=fits,
                        npix_cleared=ncleared)
