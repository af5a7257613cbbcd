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
    inmask = bad pixels (BAD | SATURATED | LOWFLAT | OFFIMAGE | NONFINITE, non-finite data)

and the cleaned image is brought back to sky-subtracted units by subtracting ``sky_e``
from ``cleanarr`` *only at the flagged pixels*: every other pixel of the output is the
input value, bit for bit (no ``+sky-sky`` float32 rounding).

Passing the sky-subtracted data alone (no sky) would make the noise model
``sqrt(|data| + rn^2) ~ rn`` on blank sky, far below the true ``sqrt(sky + rn^2)``: pure
noise peaks would be flagged (``tests/test_sky_cosmics.py`` measures this); passing the
sky-subtracted data *with* ``inbkg = sky`` subtracts the sky twice and gives the same
underestimate.

Choices
-------
``cleantype='meanmask'`` (default here and in astroscrappy): a flagged pixel is replaced
by the mean of the unflagged, unmasked pixels of its 5 x 5 neighbourhood, computed on the
sky-subtracted image (astroscrappy cleans after removing ``inbkg``), so the local sky and
gradient are handled by the model and the mean of up to 24 pixels is the least noisy
estimate on blank sky.  ``'idw'`` (inverse-distance weights) follows steep profiles
better (on star wings); ``'medmask'`` is more robust when several unflagged CR wings are
in the window.  (measured: see the tests' docstring.)

Fine-structure image: with ``fwhm_px`` given, astroscrappy's ``fsmode='convolve'`` is
used (the image convolved with a PSF kernel of that FWHM, ``psfmodel``, a matched
filter that tells stars, broad as the PSF, from sharp cosmic rays better than the
classic 3 x 3 / 7 x 7 median difference); without it the classic ``fsmode='median'``.
``psfmodel='gauss'`` (circular) is the default for direct images; ``'gaussx'`` /
``'gaussy'`` are one-dimensional kernels meant for spectra (the spatial profile along one
axis) and ``'moffat'`` uses ``psfbeta``.

Borders: astroscrappy neither cleans nor fully detects within 2 pixels of the edges; the
image is padded by reflection (8 pixels) for the call and cropped afterwards.

Defaults (``sigclip=4.5, sigfrac=0.3, objlim=5.0, niter=4``) were checked on simulated
frames (``tests/test_sky_cosmics.py``): >= 95 % of the cosmic-ray pixels whose deposit
exceeds 5 sigma of the local noise are flagged, and < 0.1 % of the pixels within 2 FWHM
of stars up to near saturation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bits import COSMIC, UNUSABLE

__all__ = ["CosmicResult", "clean_cosmics"]

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
    """

    data: np.ndarray
    crmask: np.ndarray
    ncosmic: int

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


def clean_cosmics(data_e: np.ndarray, mask: np.ndarray | None = None, *, sky_e,
                  rdnoise_e: float, saturate_e: float, sigclip: float = 4.5,
                  sigfrac: float = 0.3, objlim: float = 5.0, niter: int = 4,
                  fwhm_px: float | None = None, psfmodel: str = "gauss",
                  psfbeta: float = 4.765, cleantype: str = "meanmask",
                  sepmed: bool = True, mask_bits: int = UNUSABLE) -> CosmicResult:
    """Detect and repair cosmic rays in a sky-subtracted image in electrons.

    Parameters
    ----------
    data_e : ndarray (ny, nx)
        Sky-subtracted image [e-] (output of the s step).  Not modified.
    mask : ndarray (ny, nx) of uint16, optional
        Bitmask (:mod:`reducer.ops.bits`).  Pixels with any of ``mask_bits`` set, and
        non-finite pixels, are neither flagged nor used to repair neighbours; astroscrappy
        grows this mask by one pixel.  Not modified.
    sky_e : ndarray (ny, nx) or float
        The sky [e-] that was subtracted from ``data_e`` (the s step's model); it is
        added back for the noise model (module docstring).
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
    objlim : float
        Minimum contrast between the Laplacian and the fine-structure image (raise it if
        star cores are flagged).
    niter : int
        Maximum number of L.A.Cosmic iterations.
    fwhm_px : float, optional
        Seeing FWHM [pixel]; given, the fine-structure image is a PSF-matched
        convolution (``fsmode='convolve'``), otherwise the classic median one.
    psfmodel : {'gauss', 'gaussx', 'gaussy', 'moffat'}
        Kernel of the convolution (with ``fwhm_px``); 'gauss' for direct images.
    psfbeta : float
        Moffat beta (``psfmodel='moffat'``).
    cleantype : {'meanmask', 'medmask', 'idw', 'median'}
        Repair of the flagged pixels (module docstring).
    sepmed : bool
        Separable median filters (faster, almost identical results).
    mask_bits : int
        Bits of ``mask`` that exclude a pixel (default: every unusable bit;
        :data:`~reducer.ops.bits.COSMIC` is not among them).

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
    if psfmodel not in PSFMODELS:
        raise ValueError(f"psfmodel {psfmodel!r} is not one of {', '.join(PSFMODELS)}")
    if not (rdnoise_e >= 0 and saturate_e > 0 and sigclip > 0 and sigfrac > 0
            and objlim > 0 and int(niter) >= 1):
        raise ValueError("need rdnoise_e >= 0, saturate_e > 0, sigclip, sigfrac, objlim > 0 "
                         "and niter >= 1")
    if fwhm_px is not None and not fwhm_px > 0:
        raise ValueError("fwhm_px must be > 0")
    try:
        import astroscrappy
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the z step needs astroscrappy (pip install astroscrappy)") from exc

    # total signal in e- (sky restored); bad pixels set to the sky (their value is unused
    # by astroscrappy except through the median filters, where a sane value matters)
    total = np.where(bad, sky, d + sky)
    pad = ((PAD, PAD), (PAD, PAD)) if min(shape) > PAD else ((0, 0), (0, 0))
    mode = "reflect"
    indat = np.ascontiguousarray(np.pad(total, pad, mode=mode), dtype=np.float32)
    inbkg = np.ascontiguousarray(np.pad(sky, pad, mode=mode), dtype=np.float32)
    inmask = np.ascontiguousarray(np.pad(bad, pad, mode=mode))
    kw = dict(inmask=inmask, inbkg=inbkg, sigclip=float(sigclip), sigfrac=float(sigfrac),
              objlim=float(objlim), gain=1.0, readnoise=float(rdnoise_e),
              satlevel=float(saturate_e), niter=int(niter), sepmed=bool(sepmed),
              cleantype=cleantype, verbose=False)
    if fwhm_px is not None:
        size = max(7, 2 * int(np.ceil(1.5 * fwhm_px)) + 1)
        kw.update(fsmode="convolve", psfmodel=psfmodel, psffwhm=float(fwhm_px),
                  psfsize=size, psfbeta=float(psfbeta))
    else:
        kw.update(fsmode="median")
    crmask, clean = astroscrappy.detect_cosmics(indat, **kw)
    (y0, y1), (x0, x1) = pad
    crmask = np.asarray(crmask[y0:y0 + shape[0], x0:x0 + shape[1]], dtype=bool) & ~bad
    clean = np.asarray(clean[y0:y0 + shape[0], x0:x0 + shape[1]], dtype=np.float64)
    out = np.array(d, dtype=np.float32, copy=True)
    out[crmask] = (clean[crmask] - sky[crmask]).astype(np.float32)

    from scipy.ndimage import label
    _, nev = label(crmask, structure=np.ones((3, 3), bool))
    return CosmicResult(data=out, crmask=crmask, ncosmic=int(nev))
