"""Verification of master calibrations before use, input-frame screening, detector health.

Everything here is a pure function of numpy arrays: no file I/O, no settings
lookups, inputs are never modified.  Thresholds come in as arguments; their
defaults live in :data:`DEFAULTS` (a flat ``name -> float`` map, the shape of an
instrument profile's ``[calib.verify]`` table, so a profile can override any of
them by name).

The checks follow the spirit of Rubin's ``cp_verify`` (DMTN-101: bias MEAN,
NOISE and CR_NOISE tests) and BANZAI's comparison of a new master with the
previous one, adapted to a single master per detector and night.

Robust statistics
-----------------
* *MAD sigma*: ``1.4826 * median(|x - median(x)|)``, the Gaussian-equivalent
  sigma of the core of a distribution, insensitive to any outlier fraction
  below ~50 %.
* *clipped sigma*: iterative clipping at ``k`` sigma (first about the median
  with the MAD sigma, then about the survivors' mean with their sigma, until
  the kept set no longer changes, at most 10 passes), standard deviation (ddof=1) of
  the survivors divided by ``sqrt(f(k))``, ``f(k) = 1 - 2 k phi(k) / (2 Phi(k) - 1)``,
  the variance kept by truncating a Gaussian at ``+-k`` sigma; so for Gaussian
  data the clipped sigma is an unbiased estimate of sigma (f(3) = 0.9733,
  f(4) = 0.9989).  It is about twice as efficient as the MAD sigma.

Non-finite pixels (NaN, +-inf) are left out of every statistic.

Thresholds (:data:`DEFAULTS`)
-----------------------------
============================ ========= =====================================================
key                           default   meaning
============================ ========= =====================================================
bias_mean_nsigma              3.0       MEAN ('overscan'): ``|median| <= max(k RN/sqrt(N), floor)``
bias_mean_min_adu             1.0       MEAN ('overscan'): that floor, ADU
bias_level_tol_adu            10.0      MEAN ('level'): ``|median - ref| <= max(k RN/sqrt(N), tol)``, ADU
bias_noise_ratio_min          0.8       NOISE: single-frame noise / profile read noise, lower bound
bias_noise_ratio_max          1.3       NOISE and CR_NOISE: upper bound of that ratio
bias_crnoise_tol              0.10      CR_NOISE: ``|CR_NOISE / NOISE - 1|`` at most this
bias_clip_nsigma              3.0       CR_NOISE: clip level (sigma) of the cosmic-ray rejection
dark_rate_max                 1.0       RATE: ``|median rate|`` at most this, e-/s
dark_hot_nsigma               5.0       hot pixel: rate > median + k * MAD sigma (and > k * unc) ...
dark_hot_min_rate             0.5       ... and rate > this, e-/s
dark_hot_frac_max             0.01      HOT_FRACTION: fraction of hot pixels at most this
flat_median_tol               0.02      FLAT_MEDIAN: median of the normalised flat within 1 +- tol
flat_snr_min                  50.0      FLAT_SNR: median of flat / unc at least this
flat_dead_below               0.5       DEAD_FRACTION: a pixel below this is dead ...
flat_hot_above                1.5       ... above this is hot ...
flat_bad_frac_max             0.01      ... fraction of dead + hot + non-finite pixels at most this
prev_nsigma                   6.0       PREV_DIFF: a pixel differs when ``|new - prev| >= k sigma`` ...
prev_max_fraction             0.05      ... fails when more than this fraction of pixels differ
screen_bias_level_nrn         3.0       bias screening: ``|level - stack level| > k RN`` rejects
screen_grid                   8         screening: the frame is cut into grid x grid blocks
screen_grad_nsigma            5.0       screening: gradient rejected when > k sigma of its fit ...
screen_grad_min_nrn           2.0       ... and > this many read noises edge to edge
screen_flat_sat_frac_max      0.01      flat screening: fraction at/over saturation, at most this
screen_flat_max_level_frac    0.9       flat screening: median (raw) below this * saturation
screen_flat_min_adu           1000.0    flat screening: median - bias at least this, ADU
screen_dark_excess_nrn        2.0       dark screening: excess counts > k RN ...
screen_dark_excess_rel        0.5       ... and > this fraction of the stack's rate
defect_weak_below             0.8       defects map: flat below this (and >= dead) is weak
============================ ========= =====================================================

Result types
------------
Each test yields a :class:`Check`; a master's checks are gathered in a
:class:`Verification`, which renders FITS header cards (``VERIFY`` overall plus
one card per check, see :data:`CARD_KEYWORDS`) and a JSON-able dict for a
sidecar file.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = [
    "DEFAULTS", "CARD_KEYWORDS", "DEFECT_BITS",
    "Check", "Verification", "GainEstimate",
    "verify_bias", "verify_dark", "verify_flat", "compare_with_previous",
    "screen_bias_frame", "screen_flat_frame", "screen_dark_frame",
    "gain_from_flat_pair", "read_noise_from_bias_pair", "defects_map",
    "mad_sigma", "clipped_stats", "clip_variance_factor",
]

#: Default thresholds, see the module docstring for their meaning and units.
DEFAULTS: dict[str, float] = {
    # bias
    "bias_mean_nsigma": 3.0,
    "bias_mean_min_adu": 1.0,
    "bias_level_tol_adu": 10.0,
    "bias_noise_ratio_min": 0.8,
    "bias_noise_ratio_max": 1.3,
    "bias_crnoise_tol": 0.10,
    "bias_clip_nsigma": 3.0,
    # dark (rates in e-/s)
    "dark_rate_max": 1.0,
    "dark_hot_nsigma": 5.0,
    "dark_hot_min_rate": 0.5,
    "dark_hot_frac_max": 0.01,
    # flat (normalised, dimensionless)
    "flat_median_tol": 0.02,
    "flat_snr_min": 50.0,
    "flat_dead_below": 0.5,
    "flat_hot_above": 1.5,
    "flat_bad_frac_max": 0.01,
    # comparison with the previous master
    "prev_nsigma": 6.0,
    "prev_max_fraction": 0.05,
    # input-frame screening
    "screen_bias_level_nrn": 3.0,
    "screen_grid": 8,
    "screen_grad_nsigma": 5.0,
    "screen_grad_min_nrn": 2.0,
    "screen_flat_sat_frac_max": 0.01,
    "screen_flat_max_level_frac": 0.9,
    "screen_flat_min_adu": 1000.0,
    "screen_dark_excess_nrn": 2.0,
    "screen_dark_excess_rel": 0.5,
    # defects map
    "defect_weak_below": 0.8,
}

#: FITS keyword (<= 8 characters) of each check name.
CARD_KEYWORDS: dict[str, str] = {
    "MEAN": "VMEAN",
    "NOISE": "VNOISE",
    "CR_NOISE": "VCRNOISE",
    "RATE": "VRATE",
    "HOT_FRACTION": "VHOTFRAC",
    "FLAT_MEDIAN": "VFLATMED",
    "FLAT_SNR": "VFLATSNR",
    "DEAD_FRACTION": "VDEADFRC",
    "PREV_DIFF": "VPREVDIF",
}

#: Bits of :func:`defects_map`.
DEFECT_BITS: dict[str, int] = {
    "hot": 1,         # dark rate significantly and absolutely high
    "dead": 2,        # flat response below dead_below
    "weak": 4,        # flat response in [dead_below, weak_below)
    "nonfinite": 8,   # NaN or inf in either input (no other bit is set then)
    "bright": 16,     # flat response above bright_above
}

_MAD_TO_SIGMA = 1.482602218505602   # 1 / Phi^-1(3/4)
_COMMENT_MAX = 47                    # room for a comment after a short string value
_NOISE_MAX_SAMPLES = 1 << 22         # noise statistics of verify_bias use at most this many values


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Check:
    """The outcome of one verification test.

    Attributes
    ----------
    name : str
        Test name, e.g. ``'NOISE'`` (see :data:`CARD_KEYWORDS`).
    passed : bool
        Whether the test passed.
    value : float
        The measured statistic, in the unit given in ``threshold``/``detail``
        (NaN when it could not be measured; the test then fails).
    threshold : str
        The pass condition on ``value``, short (it goes into a header comment).
    detail : str
        One line for people: what was measured, from what.
    """

    name: str
    passed: bool
    value: float
    threshold: str
    detail: str

    @property
    def keyword(self) -> str:
        """FITS keyword of this check: from :data:`CARD_KEYWORDS`, else ``'V'`` + name."""
        kw = CARD_KEYWORDS.get(self.name)
        if kw is None:
            kw = "V" + "".join(c for c in self.name.upper() if c.isalnum())[:7]
        return kw

    def to_dict(self) -> dict:
        """JSON-able dict (NaN and inf values become ``None``)."""
        return {"name": self.name, "keyword": self.keyword, "passed": bool(self.passed),
                "value": _json_float(self.value), "threshold": self.threshold,
                "detail": self.detail}


@dataclass
class Verification:
    """The checks of one master calibration.

    Attributes
    ----------
    imtype : str
        ``'bias'``, ``'dark'``, ``'flat'``, ...
    checks : list of Check
        The tests done; more may be appended (e.g. :func:`compare_with_previous`).
    """

    imtype: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every check passed (and there is at least one)."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[str]:
        """Names of the checks that failed, in order."""
        return [c.name for c in self.checks if not c.passed]

    def to_header_cards(self) -> list[tuple[str, str, str]]:
        """FITS cards: ``VERIFY`` overall first, then one per check.

        Returns
        -------
        list of (str, str, str)
            ``(keyword, 'PASS' | 'FAIL', comment)``; keywords have at most 8
            characters, comments at most 47 (so the card fits in 80 columns).

        Raises
        ------
        ValueError
            When two checks map to the same keyword.
        """
        cards = []
        if self.passed:
            summary = f"{self.imtype}: all {len(self.checks)} checks passed"
        elif not self.checks:
            summary = f"{self.imtype}: no checks"
        else:
            summary = f"{self.imtype} failed: " + ",".join(self.failed)
        cards.append(("VERIFY", _pf(self.passed), summary[:_COMMENT_MAX]))
        seen = {"VERIFY"}
        for c in self.checks:
            kw = c.keyword
            if kw in seen:
                raise ValueError(f"two checks map to header keyword {kw!r} (check {c.name!r})")
            seen.add(kw)
            comment = f"{_fmt(c.value)} ({c.threshold})"
            cards.append((kw, _pf(c.passed), comment[:_COMMENT_MAX]))
        return cards

    def to_dict(self) -> dict:
        """JSON-able dict for a sidecar file (NaN/inf values become ``None``)."""
        return {"imtype": self.imtype, "passed": self.passed, "failed": self.failed,
                "checks": [c.to_dict() for c in self.checks]}


class GainEstimate(NamedTuple):
    """Result of :func:`gain_from_flat_pair`.

    Attributes
    ----------
    gain : float
        Gain, e-/ADU.
    uncertainty : float
        Its 1-sigma statistical uncertainty, e-/ADU.
    signal_adu : float
        Mean bias-subtracted signal of the two flats, ADU.
    variance_adu2 : float
        Photon variance of the pair, ``var(f1 - r f2) - c var(b1 - b2)``, ADU^2.
    npix : int
        Pixels used in the flat difference.
    """

    gain: float
    uncertainty: float
    signal_adu: float
    variance_adu2: float
    npix: int


# --------------------------------------------------------------------------- statistics

def clip_variance_factor(k: float) -> float:
    """Fraction of a Gaussian's variance kept when it is truncated at +-k sigma.

    ``f(k) = 1 - 2 k phi(k) / (2 Phi(k) - 1)`` (dimensionless; f(3) = 0.97330).
    """
    k = float(k)
    if not k > 0:
        raise ValueError(f"clip level must be > 0, got {k}")
    if k > 40:
        return 1.0
    phi = math.exp(-0.5 * k * k) / math.sqrt(2.0 * math.pi)
    return 1.0 - 2.0 * k * phi / math.erf(k / math.sqrt(2.0))


def _finite(a) -> np.ndarray:
    """Finite values of ``a`` as a 1-D float64 array (a new array)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def mad_sigma(x) -> float:
    """Gaussian-equivalent sigma from the median absolute deviation.

    Parameters
    ----------
    x : array_like
        Values (any unit); non-finite values are ignored.

    Returns
    -------
    float
        ``1.4826 * median(|x - median(x)|)`` in the unit of ``x``; NaN when no
        value is finite.
    """
    v = _finite(x)
    if v.size == 0:
        return float("nan")
    return float(_MAD_TO_SIGMA * np.median(np.abs(v - np.median(v))))


def clipped_stats(x, nsigma: float = 3.0, maxiters: int = 10) -> tuple[float, float, int]:
    """Iteratively sigma-clipped mean and (truncation-corrected) sigma.

    Parameters
    ----------
    x : array_like
        Values (any unit); non-finite values are ignored.
    nsigma : float
        Clip level, sigma (dimensionless).
    maxiters : int
        Maximum number of clipping passes.

    Returns
    -------
    mean : float
        Mean of the survivors, unit of ``x``.
    sigma : float
        Standard deviation (ddof=1) of the survivors divided by
        ``sqrt(clip_variance_factor(nsigma))``, unit of ``x``: unbiased for
        Gaussian data.
    n : int
        Number of survivors.

    Notes
    -----
    The first pass clips about the median of all finite values at ``nsigma``
    MAD sigmas; later passes clip about the mean of the survivors of the
    previous pass at ``nsigma`` clipped sigmas.  NaN results when fewer
    than two values survive.
    """
    mean, sigma, n, _ = _clip(_finite(x), nsigma, maxiters)
    return mean, sigma, n


def _clip(v: np.ndarray, nsigma: float, maxiters: int = 10):
    """Clip 1-D finite ``v``; returns (mean, sigma, n, keep-mask)."""
    if v.size < 2:
        return (float(v.mean()) if v.size else float("nan")), float("nan"), int(v.size), \
            np.ones(v.size, bool)
    corr = math.sqrt(clip_variance_factor(nsigma))
    c = float(np.median(v))
    s = _MAD_TO_SIGMA * float(np.median(np.abs(v - c)))
    if s == 0.0:
        s = float(np.std(v, ddof=1))
    keep = np.ones(v.size, bool)
    for _ in range(maxiters):
        new = np.abs(v - c) <= nsigma * s
        if new.sum() < 2:
            break
        kept = v[new]
        c = float(kept.mean())
        s = float(np.std(kept, ddof=1)) / corr
        changed = not np.array_equal(new, keep)
        keep = new
        if not changed:
            break
    kept = v[keep]
    if kept.size < 2:
        return float("nan"), float("nan"), int(kept.size), keep
    return float(kept.mean()), float(np.std(kept, ddof=1)) / corr, int(kept.size), keep


def _thresholds(thresholds: Mapping[str, float] | None) -> dict[str, float]:
    """DEFAULTS overlaid with ``thresholds``; unknown names are an error."""
    t = dict(DEFAULTS)
    if thresholds:
        unknown = sorted(set(thresholds) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown threshold name(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(DEFAULTS))}")
        for k, v in thresholds.items():
            try:
                t[k] = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"threshold {k} must be a number, got {v!r}") from None
    return t


def _same_shape(**arrays) -> None:
    """Raise ValueError naming the shapes unless every given array has the same shape."""
    shapes = {k: np.shape(v) for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes do not match: " + ", ".join(f"{k} {s}" for k, s in shapes.items()))


def _positive(name: str, value) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _pf(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _json_float(x):
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- bias

def verify_bias(master, unc, cnt, *, read_noise_adu: float, gain: float, frames_diff=None,
                mean_mode: str = "overscan", reference_level: float | None = None,
                thresholds: Mapping[str, float] | None = None) -> Verification:
    """Verify a master bias: MEAN, NOISE and CR_NOISE tests.

    Parameters
    ----------
    master : ndarray
        Master bias, ADU (overscan-subtracted in ``'overscan'`` mode, raw level
        otherwise).
    unc : ndarray
        Its 1-sigma uncertainty, ADU, same shape.  Pixels where ``master`` or
        ``unc`` is non-finite are left out.
    cnt : ndarray or int
        Number of frames combined per pixel (array of the master's shape, or a
        scalar).  ``N`` below is its median over the pixels used.
    read_noise_adu : float
        The profile's read noise of one frame, ADU.
    gain : float
        Gain, e-/ADU (only to quote the noise in electrons in the details).
    frames_diff : ndarray, optional
        Difference of two single input bias frames, ADU (any shape).  When
        given, the single-frame noise is measured on it, divided by sqrt(2);
        otherwise on the master itself, from differences of vertically adjacent
        pixels (``(m[2i] - m[2i+1]) / sqrt(2)``, insensitive to smooth structure
        and column patterns), times ``sqrt(N)``.  The frame difference is the
        better estimate: the master-based one assumes a plain mean combine.
        More than 4 Mi values are regularly subsampled to 4 Mi for speed.
    mean_mode : {'overscan', 'level', 'none'}
        MEAN test.  ``'overscan'``: the level must be zero,
        ``|median| <= max(bias_mean_nsigma * RN / sqrt(N), bias_mean_min_adu)``.
        ``'level'`` (frames without overscan, real level ~1000 ADU): the level
        must match ``reference_level`` (e.g. the previous master's median),
        ``|median - reference_level| <= max(bias_mean_nsigma * RN / sqrt(N),
        bias_level_tol_adu)``.  ``'none'``: no MEAN test (first master, no
        reference).
    reference_level : float, optional
        Reference level for ``'level'`` mode, ADU.
    thresholds : mapping, optional
        Overrides of :data:`DEFAULTS` by name.

    Returns
    -------
    Verification
        Checks ``MEAN`` (value: median of the master, ADU), ``NOISE`` (value:
        MAD sigma of one frame, ADU; passes when
        ``bias_noise_ratio_min <= NOISE / RN <= bias_noise_ratio_max``) and
        ``CR_NOISE`` (value: sigma after cosmic-ray rejection, i.e. the clipped
        sigma at ``bias_clip_nsigma``, ADU; passes when ``CR_NOISE / RN <=
        bias_noise_ratio_max`` and ``|CR_NOISE / NOISE - 1| <= bias_crnoise_tol``,
        the cp_verify consistency test: the clipped distribution must be
        Gaussian-like, without excess shoulders).

    Raises
    ------
    ValueError
        On shape mismatch, a non-positive read noise or gain, an unknown
        ``mean_mode``, ``'level'`` mode without ``reference_level``, or unknown
        threshold names.
    """
    t = _thresholds(thresholds)
    rn = _positive("read_noise_adu", read_noise_adu)
    g = _positive("gain", gain)
    master = np.asarray(master)
    unc = np.asarray(unc)
    _same_shape(master=master, unc=unc)
    cnt_a = np.asarray(cnt)
    if cnt_a.ndim:
        _same_shape(master=master, cnt=cnt_a)
    if mean_mode not in ("overscan", "level", "none"):
        raise ValueError(f"mean_mode must be 'overscan', 'level' or 'none', got {mean_mode!r}")
    if mean_mode == "level" and reference_level is None:
        raise ValueError("mean_mode='level' needs reference_level (ADU)")

    good = np.isfinite(master) & np.isfinite(unc)
    if cnt_a.ndim:
        good &= np.isfinite(cnt_a) & (cnt_a > 0)
        n_frames = float(np.median(cnt_a[good])) if good.any() else float("nan")
    else:
        n_frames = float(cnt_a)
    mvals = np.asarray(master, dtype=np.float64)[good]
    checks: list[Check] = []
    sig_master = rn / math.sqrt(n_frames) if n_frames > 0 else float("nan")

    # MEAN
    if mean_mode != "none":
        level = float(np.median(mvals)) if mvals.size else float("nan")
        if mean_mode == "overscan":
            bound = max(t["bias_mean_nsigma"] * sig_master, t["bias_mean_min_adu"])
            off = level
            thr = f"|x|<={bound:.3g} ADU"
        else:
            ref = float(reference_level)
            bound = max(t["bias_mean_nsigma"] * sig_master, t["bias_level_tol_adu"])
            off = level - ref
            thr = f"|x-{ref:.6g}|<={bound:.3g} ADU"
        ok = bool(abs(off) <= bound)
        checks.append(Check("MEAN", ok, level, thr,
                            f"median level {_fmt(level)} ADU, offset {_fmt(off)} ADU "
                            f"(master noise RN/sqrt(N) = {_fmt(sig_master)} ADU, N={_fmt(n_frames)})"))

    # the noise image of one frame
    if frames_diff is not None:
        noise_img = _finite(frames_diff) / math.sqrt(2.0)
        source = "frames_diff/sqrt(2)"
    else:
        m = np.where(good, np.asarray(master, dtype=np.float64), np.nan)
        if m.ndim >= 2 and m.shape[0] >= 2:
            ny = m.shape[0] // 2 * 2
            d = (m[0:ny:2] - m[1:ny:2]) / math.sqrt(2.0)
        else:
            flat = m.ravel()
            nn = flat.size // 2 * 2
            d = (flat[0:nn:2] - flat[1:nn:2]) / math.sqrt(2.0)
        noise_img = _finite(d) * math.sqrt(n_frames) if n_frames > 0 else np.array([])
        source = f"master row pairs x sqrt(N={_fmt(n_frames)})"
    if noise_img.size > _NOISE_MAX_SAMPLES:
        # a regular subsample: 4 Mpix already give the noise to 0.05 %
        noise_img = noise_img[:: -(-noise_img.size // _NOISE_MAX_SAMPLES)]

    # NOISE: a 5-sigma clipped standard deviation (corrected for the clipping), not the MAD:
    # raw frames are integers, and the MAD of integer-valued differences is quantised
    # (measured on simulated biases: MAD 3.15 ADU against a true 3.44 ADU)
    _, noise, _, _ = _clip(noise_img, 5.0)
    lo, hi = t["bias_noise_ratio_min"] * rn, t["bias_noise_ratio_max"] * rn
    ok = bool(lo <= noise <= hi)
    checks.append(Check("NOISE", ok, noise, f"{lo:.3g}<=x<={hi:.3g} ADU",
                        f"single-frame noise {_fmt(noise)} ADU = {_fmt(noise * g)} e- "
                        f"({_fmt(noise / rn)} x RN {_fmt(rn)} ADU), 5-sigma clipped sigma of {source}"))

    # CR_NOISE
    _, crn, nkept, _ = _clip(noise_img, t["bias_clip_nsigma"])
    rel = crn / noise - 1.0 if noise > 0 else float("nan")
    ok = bool(crn <= hi and abs(rel) <= t["bias_crnoise_tol"])
    rejected = noise_img.size - nkept
    checks.append(Check("CR_NOISE", ok, crn,
                        f"x<={hi:.3g} ADU, |x/NOISE-1|<={t['bias_crnoise_tol']:.3g}",
                        f"noise after rejecting {rejected} pixels beyond "
                        f"{t['bias_clip_nsigma']:g} sigma: {_fmt(crn)} ADU = {_fmt(crn * g)} e-, "
                        f"{_fmt(rel * 100)} % from NOISE"))
    return Verification("bias", checks)


# --------------------------------------------------------------------------- dark

def _hot_mask(rate: np.ndarray, unc: np.ndarray | None, nsigma: float, min_rate: float):
    """Hot pixels of a rate map (finite pixels only); returns (mask, median, sigma)."""
    fin = np.isfinite(rate)
    vals = rate[fin]
    if vals.size == 0:
        return np.zeros(rate.shape, bool), float("nan"), float("nan")
    med = float(np.median(vals))
    sig = _MAD_TO_SIGMA * float(np.median(np.abs(vals - med)))
    with np.errstate(invalid="ignore"):
        hot = fin & (rate - med > nsigma * sig) & (rate > min_rate)
        if unc is not None:
            # significant for the pixel itself too (where its uncertainty is known)
            hot &= ~np.isfinite(unc) | (rate - med > nsigma * unc)
    return hot, med, sig


def verify_dark(rate, unc, *, gain: float | None = None,
                thresholds: Mapping[str, float] | None = None) -> Verification:
    """Verify a master dark (a dark-current rate map): RATE and HOT_FRACTION tests.

    Parameters
    ----------
    rate : ndarray
        Master dark current, e-/s (or ADU/s with ``gain`` given).
    unc : ndarray
        Its 1-sigma uncertainty, same unit and shape.
    gain : float, optional
        Gain, e-/ADU, when ``rate`` and ``unc`` are in ADU/s: they are multiplied
        by it so that the e-/s thresholds apply.
    thresholds : mapping, optional
        Overrides of :data:`DEFAULTS` by name (rates in e-/s).

    Returns
    -------
    Verification
        ``RATE`` (value: median rate over finite pixels, e-/s; passes when
        ``|median| <= dark_rate_max`` -- a clearly negative median means the
        bias subtracted was wrong) and ``HOT_FRACTION`` (value: fraction of
        finite pixels that are hot, i.e. ``rate > median + dark_hot_nsigma *
        MAD sigma``, ``rate - median > dark_hot_nsigma * unc`` where ``unc`` is
        finite, and ``rate > dark_hot_min_rate``; passes when at most
        ``dark_hot_frac_max``).

    Raises
    ------
    ValueError
        On shape mismatch, a non-positive gain or unknown threshold names.
    """
    t = _thresholds(thresholds)
    rate = np.asarray(rate, dtype=np.float64)
    unc = np.asarray(unc, dtype=np.float64)
    _same_shape(rate=rate, unc=unc)
    if gain is not None:
        g = _positive("gain", gain)
        rate = rate * g
        unc = unc * g
    nfin = int(np.isfinite(rate).sum())
    hot, med, sig = _hot_mask(rate, unc, t["dark_hot_nsigma"], t["dark_hot_min_rate"])
    bound = t["dark_rate_max"]
    checks = [Check("RATE", bool(abs(med) <= bound), med, f"|x|<={bound:.3g} e-/s",
                    f"median dark current {_fmt(med)} e-/s (MAD sigma {_fmt(sig)} e-/s) "
                    f"over {nfin} finite pixels of {rate.size}")]
    nhot = int(hot.sum())
    frac = nhot / nfin if nfin else float("nan")
    fmax = t["dark_hot_frac_max"]
    checks.append(Check("HOT_FRACTION", bool(frac <= fmax), frac, f"x<={fmax:.3g}",
                        f"{nhot} hot pixels (> median + {t['dark_hot_nsigma']:g} sigma "
                        f"and > {t['dark_hot_min_rate']:g} e-/s) of {nfin}"))
    return Verification("dark", checks)


# --------------------------------------------------------------------------- flat

def verify_flat(flat_norm, unc, *, illuminated=None,
                thresholds: Mapping[str, float] | None = None) -> Verification:
    """Verify a normalised master flat: FLAT_MEDIAN, FLAT_SNR and DEAD_FRACTION tests.

    Parameters
    ----------
    flat_norm : ndarray
        Normalised master flat (dimensionless, ~1).
    unc : ndarray
        Its 1-sigma uncertainty (dimensionless), same shape.
    illuminated : ndarray of bool, optional
        The illuminated area (True = illuminated); default every pixel.  Give
        it for vignetted or slit/fibre-fed detectors.
    thresholds : mapping, optional
        Overrides of :data:`DEFAULTS` by name.

    Returns
    -------
    Verification
        ``FLAT_MEDIAN`` (value: median of the finite illuminated pixels; passes
        within ``1 +- flat_median_tol``), ``FLAT_SNR`` (value: median of
        ``flat / unc`` over illuminated pixels with finite flat and finite
        ``unc > 0``; passes when ``>= flat_snr_min``) and ``DEAD_FRACTION``
        (value: fraction of the illuminated pixels that are dead, ``<
        flat_dead_below``, hot, ``> flat_hot_above``, or non-finite; passes
        when ``<= flat_bad_frac_max``).

    Raises
    ------
    ValueError
        On shape mismatch, an empty illuminated area or unknown threshold names.
    """
    t = _thresholds(thresholds)
    f = np.asarray(flat_norm, dtype=np.float64)
    u = np.asarray(unc, dtype=np.float64)
    _same_shape(flat_norm=f, unc=u, illuminated=illuminated)
    area = np.ones(f.shape, bool) if illuminated is None else np.asarray(illuminated, bool)
    narea = int(area.sum())
    if narea == 0:
        raise ValueError("the illuminated area is empty")
    fin = area & np.isfinite(f)
    vals = f[fin]
    med = float(np.median(vals)) if vals.size else float("nan")
    tol = t["flat_median_tol"]
    checks = [Check("FLAT_MEDIAN", bool(abs(med - 1.0) <= tol), med,
                    f"{1 - tol:.4g}<=x<={1 + tol:.4g}",
                    f"median {_fmt(med)} over {vals.size} finite illuminated pixels")]

    with np.errstate(invalid="ignore", divide="ignore"):
        ok_u = fin & np.isfinite(u) & (u > 0)
        snr_vals = f[ok_u] / u[ok_u]
    snr = float(np.median(snr_vals)) if snr_vals.size else float("nan")
    smin = t["flat_snr_min"]
    checks.append(Check("FLAT_SNR", bool(snr >= smin), snr, f"x>={smin:.3g}",
                        f"median flat/unc {_fmt(snr)} over {snr_vals.size} pixels"))

    with np.errstate(invalid="ignore"):
        dead = int((fin & (f < t["flat_dead_below"])).sum())
        hot = int((fin & (f > t["flat_hot_above"])).sum())
    nonfin = narea - int(fin.sum())
    frac = (dead + hot + nonfin) / narea
    fmax = t["flat_bad_frac_max"]
    checks.append(Check("DEAD_FRACTION", bool(frac <= fmax), frac, f"x<={fmax:.3g}",
                        f"{dead} dead (<{t['flat_dead_below']:g}), {hot} hot "
                        f"(>{t['flat_hot_above']:g}), {nonfin} non-finite of {narea} pixels"))
    return Verification("flat", checks)


# --------------------------------------------------------------------------- previous master

def compare_with_previous(master, unc, prev, prev_unc, *, nsigma: float = 6.0,
                          max_fraction: float = 0.05) -> Check:
    """Compare a new master with the previous one, pixel by pixel (BANZAI style).

    Parameters
    ----------
    master, unc : ndarray
        New master and its 1-sigma uncertainty (any one unit).
    prev, prev_unc : ndarray
        Previous master and its uncertainty, same unit and shape.
    nsigma : float
        A pixel differs when ``|master - prev| >= nsigma * sqrt(unc**2 + prev_unc**2)``
        (default ``DEFAULTS['prev_nsigma']``).
    max_fraction : float
        The check fails when more than this fraction of the compared pixels
        differ (default ``DEFAULTS['prev_max_fraction']``).

    Returns
    -------
    Check
        ``PREV_DIFF``; value: the fraction of differing pixels.  Pixels where
        any input is non-finite or the combined sigma is not > 0 are not
        compared; with no comparable pixel the check fails.

    Raises
    ------
    ValueError
        When the shapes differ (the message names them).

    Notes
    -----
    For two honest realisations with Gaussian noise the expected fraction is
    ``P(|z| >= 6) = 2.0e-9``.
    """
    nsigma = _positive("nsigma", nsigma)
    max_fraction = float(max_fraction)
    a, ua, b, ub = (np.asarray(x, dtype=np.float64) for x in (master, unc, prev, prev_unc))
    _same_shape(master=a, unc=ua, prev=b, prev_unc=ub)
    with np.errstate(invalid="ignore", over="ignore"):
        sig = np.sqrt(ua * ua + ub * ub)
        ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(sig) & (sig > 0)
        ncmp = int(ok.sum())
        ndiff = int((np.abs(a[ok] - b[ok]) >= nsigma * sig[ok]).sum())
    frac = ndiff / ncmp if ncmp else float("nan")
    passed = bool(ncmp > 0 and frac <= max_fraction)
    detail = (f"{ndiff} of {ncmp} comparable pixels differ by >= {nsigma:g} sigma from the "
              f"previous master" + ("" if ncmp else " (no comparable pixel)"))
    return Check("PREV_DIFF", passed, frac, f"x<={max_fraction:.3g}, |d|>={nsigma:g}sig", detail)


# --------------------------------------------------------------------------- screening

def _block_medians(img: np.ndarray, grid: int):
    """Medians of grid x grid blocks (remainder rows/columns dropped) and block sizes."""
    ny, nx = img.shape
    by, bx = ny // grid, nx // grid
    cut = img[: by * grid, : bx * grid]
    blocks = cut.reshape(grid, by, grid, bx).transpose(0, 2, 1, 3).reshape(grid, grid, by * bx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN blocks give NaN
        med = np.nanmedian(blocks, axis=-1)
    return med, by, bx


def _gradient(img: np.ndarray, grid: int, pixel_sigma: float):
    """Plane fit to block medians.

    Returns (amplitude, sigma_amplitude) in the unit of ``img``: the level
    difference between opposite frame edges along the steepest direction, and
    its 1-sigma uncertainty from the larger of the expected block-median noise
    (``1.2533 pixel_sigma / sqrt(block pixels)``) and the robust scatter of the
    fit residuals.  ``(nan, nan)`` when the frame is too small.
    """
    if img.ndim != 2:
        return float("nan"), float("nan")
    grid = int(min(grid, img.shape[0], img.shape[1]))
    if grid < 2:
        return float("nan"), float("nan")
    med, by, bx = _block_medians(img, grid)
    ny, nx = img.shape
    yc = ((np.arange(grid) + 0.5) * by) / ny - 0.5
    xc = ((np.arange(grid) + 0.5) * bx) / nx - 0.5
    yy, xx = np.meshgrid(yc, xc, indexing="ij")
    ok = np.isfinite(med)
    if ok.sum() < 4:
        return float("nan"), float("nan")
    A = np.column_stack([np.ones(ok.sum()), xx[ok], yy[ok]])
    z = med[ok]
    coef, *_ = np.linalg.lstsq(A, z, rcond=None)
    resid = z - A @ coef
    sig_expected = 1.2533 * pixel_sigma / math.sqrt(by * bx)
    sig_resid = _MAD_TO_SIGMA * float(np.median(np.abs(resid - np.median(resid))))
    sig_z = max(sig_expected, sig_resid)
    cov = sig_z ** 2 * np.linalg.inv(A.T @ A)
    b, c = float(coef[1]), float(coef[2])
    amp = math.hypot(b, c)
    if amp > 0:
        var_amp = (b * b * cov[1, 1] + c * c * cov[2, 2] + 2 * b * c * cov[1, 2]) / (amp * amp)
    else:
        var_amp = 0.5 * (cov[1, 1] + cov[2, 2])
    return amp, math.sqrt(max(var_amp, 0.0))


def _gradient_finding(img, grid, rn, t, unit) -> str | None:
    """'large-scale gradient ...' when the plane-fit amplitude is significant, else None."""
    pix_sig = mad_sigma(img)
    if not math.isfinite(pix_sig) or pix_sig <= 0:
        pix_sig = rn
    amp, samp = _gradient(img, grid, pix_sig)
    if not math.isfinite(amp):
        return None
    limit = max(t["screen_grad_nsigma"] * samp, t["screen_grad_min_nrn"] * rn)
    if amp > limit:
        return (f"large-scale gradient of {amp:.4g} {unit} across the frame "
                f"(limit {limit:.3g} {unit})")
    return None


def _reason(leak: list[str], other: list[str]) -> str | None:
    """One line: 'light leak: a; b; c' for leak findings, then the other findings."""
    parts = (["light leak: " + "; ".join(leak)] if leak else []) + other
    return "; ".join(parts) if parts else None


def screen_bias_frame(data, *, expected_level: float, read_noise_adu: float, reference=None,
                      thresholds: Mapping[str, float] | None = None) -> str | None:
    """Screen one input bias frame before it goes into a master.

    Parameters
    ----------
    data : ndarray
        The bias frame, ADU (2-D for the gradient test).
    expected_level : float
        The stack's level: median of the frames' median levels, ADU.
    read_noise_adu : float
        Read noise of one frame, ADU.
    reference : ndarray, optional
        Structure common to all frames (e.g. the median of the stack or the
        previous master), ADU, same shape; subtracted before the gradient test
        so that a fixed bias pattern is not mistaken for a leak.
    thresholds : mapping, optional
        Overrides of :data:`DEFAULTS` by name.

    Returns
    -------
    str or None
        None when the frame is fine, else one line listing every finding
        (``'; '``-separated), leak findings first after ``'light leak: '``:

        * level: ``median - expected_level > screen_bias_level_nrn * RN`` ->
          ``'light leak: level ... above ...'``; as far below -> ``'level ...
          below ...'`` (not a leak: a readout problem);
        * gradient: the edge-to-edge amplitude of a plane fitted to the medians
          of ``screen_grid`` x ``screen_grid`` blocks exceeds both
          ``screen_grad_nsigma`` times its uncertainty and
          ``screen_grad_min_nrn * RN`` -> ``'light leak: large-scale gradient ...'``;
        * no finite pixel -> ``'no finite pixels'``.
    """
    t = _thresholds(thresholds)
    rn = _positive("read_noise_adu", read_noise_adu)
    d = np.asarray(data, dtype=np.float64)
    if reference is not None:
        _same_shape(data=d, reference=np.asarray(reference))
    vals = _finite(d)
    if vals.size == 0:
        return "no finite pixels"
    level = float(np.median(vals))
    off = level - float(expected_level)
    lim = t["screen_bias_level_nrn"] * rn
    leak, other = [], []
    if off > lim:
        leak.append(f"level {level:.6g} ADU is {off:.4g} ADU above the stack level "
                    f"{float(expected_level):.6g} ADU (limit {lim:.3g} ADU)")
    elif off < -lim:
        other.append(f"level {level:.6g} ADU is {-off:.4g} ADU below the stack level "
                     f"{float(expected_level):.6g} ADU (limit {lim:.3g} ADU)")
    img = d if reference is None else d - np.asarray(reference, dtype=np.float64)
    grad = _gradient_finding(img, int(t["screen_grid"]), rn, t, "ADU")
    if grad:
        leak.append(grad)
    return _reason(leak, other)


def screen_flat_frame(data, *, saturate_adu: float, bias_level: float = 0.0,
                      thresholds: Mapping[str, float] | None = None) -> str | None:
    """Screen one input flat frame (raw, bias not subtracted) before it goes into a master.

    Parameters
    ----------
    data : ndarray
        The flat frame, ADU as read out (bias level included).
    saturate_adu : float
        Saturation level of the raw data, ADU.
    bias_level : float
        Bias level contained in ``data``, ADU (0 if already subtracted; the
        saturation tests then compare the subtracted data with the raw level).
    thresholds : mapping, optional
        Overrides of :data:`DEFAULTS` by name.

    Returns
    -------
    str or None
        None when the frame is fine, else a one-line reason starting with
        ``'saturated'`` (more than ``screen_flat_sat_frac_max`` of the finite
        pixels at or over ``saturate_adu``, or median at or above
        ``screen_flat_max_level_frac * saturate_adu``), ``'too faint'`` (median
        minus ``bias_level`` below ``screen_flat_min_adu``) or ``'no finite
        pixels'``.
    """
    t = _thresholds(thresholds)
    sat = _positive("saturate_adu", saturate_adu)
    vals = _finite(data)
    if vals.size == 0:
        return "no finite pixels"
    nsat = int((vals >= sat).sum())
    frac = nsat / vals.size
    fmax = t["screen_flat_sat_frac_max"]
    if frac > fmax:
        return (f"saturated: {frac * 100:.3g} % of pixels at or above saturation "
                f"{sat:.6g} ADU (limit {fmax * 100:.3g} %)")
    med = float(np.median(vals))
    hi = t["screen_flat_max_level_frac"] * sat
    if med >= hi:
        return (f"saturated: median {med:.6g} ADU at or above "
                f"{t['screen_flat_max_level_frac']:g} x saturation ({hi:.6g} ADU)")
    sig = med - float(bias_level)
    if sig < t["screen_flat_min_adu"]:
        return (f"too faint: median {sig:.6g} ADU above bias "
                f"(floor {t['screen_flat_min_adu']:.6g} ADU)")
    return None


def screen_dark_frame(data, *, exptime: float, stack_rate: float, read_noise: float,
                      reference=None, thresholds: Mapping[str, float] | None = None) -> str | None:
    """Screen one input dark frame (bias subtracted) before it goes into a master.

    Parameters
    ----------
    data : ndarray
        The bias-subtracted dark frame, counts (ADU or e-).
    exptime : float
        Its exposure time, s.
    stack_rate : float
        The stack's rate: median of the frames' median rates, counts/s.
    read_noise : float
        Read noise of one frame, counts (same unit as ``data``).
    reference : ndarray, optional
        Expected rate map (e.g. the previous master dark), counts/s, same
        shape.  Only when it is given is the gradient test done, on
        ``data - reference * exptime`` (amplifier glow is a real, repeatable
        gradient in long darks).
    thresholds : mapping, optional
        Overrides of :data:`DEFAULTS` by name.

    Returns
    -------
    str or None
        None when fine, else a one-line reason listing every finding
        (``'; '``-separated): ``'light leak: median rate ...'`` when the excess ``(rate - stack_rate) * exptime`` is above both
        ``screen_dark_excess_nrn * read_noise`` and ``screen_dark_excess_rel *
        |stack_rate| * exptime``; ``'light leak: large-scale gradient ...'``
        (see :func:`screen_bias_frame`, with a reference only); ``'no finite
        pixels'``.
    """
    t = _thresholds(thresholds)
    texp = _positive("exptime", exptime)
    rn = _positive("read_noise", read_noise)
    d = np.asarray(data, dtype=np.float64)
    if reference is not None:
        _same_shape(data=d, reference=np.asarray(reference))
    vals = _finite(d)
    if vals.size == 0:
        return "no finite pixels"
    rate = float(np.median(vals)) / texp
    stack_rate = float(stack_rate)
    excess = (rate - stack_rate) * texp
    lim = max(t["screen_dark_excess_nrn"] * rn, t["screen_dark_excess_rel"] * abs(stack_rate) * texp)
    leak = []
    if excess > lim:
        leak.append(f"median rate {rate:.4g}/s is {excess / texp:.4g}/s above the "
                    f"stack's {stack_rate:.4g}/s (limit {lim / texp:.3g}/s over {texp:g} s)")
    if reference is not None:
        img = d - np.asarray(reference, dtype=np.float64) * texp
        grad = _gradient_finding(img, int(t["screen_grid"]), rn, t, "counts")
        if grad:
            leak.append(grad)
    return _reason(leak, [])


# --------------------------------------------------------------------------- detector health

def _region(shape, region):
    if region is None:
        ny, nx = shape[-2], shape[-1]
        return (slice(ny // 4, ny - ny // 4), slice(nx // 4, nx - nx // 4))
    if len(region) != 2 or not all(isinstance(s, slice) for s in region):
        raise ValueError(f"region must be a pair of slices (rows, columns), got {region!r}")
    return tuple(region)


def gain_from_flat_pair(f1, f2, b1, b2=None, *, region=None, clip_nsigma: float = 4.0) -> GainEstimate:
    """Gain from a pair of flats and bias frames by photon transfer (Janesick).

    Parameters
    ----------
    f1, f2 : ndarray
        Two flats of the same exposure, ADU as read out (2-D, same shape).
    b1, b2 : ndarray
        Two single bias frames, ADU, same shape.  With ``b2`` None the bias
        level of both flats is taken from ``b1`` and the read-noise term
        ``var(b1 - b2)`` from differences of vertically adjacent rows of ``b1``
        (assumes white read noise; pass two frames when you can, and not a
        master bias, whose noise is lower than a frame's).
    region : (slice, slice), optional
        Rows and columns used; default the central half in each axis.
    clip_nsigma : float
        Clip level (sigma) of the outlier rejection in the difference images.

    Returns
    -------
    GainEstimate
        ``gain`` (e-/ADU), its 1-sigma statistical ``uncertainty`` and the
        intermediate numbers.

    Notes
    -----
    With bias-subtracted means ``mu1 = mean(f1) - mean(b1)``, ``mu2 = mean(f2) -
    mean(b2)``, ``r = mu1 / mu2`` and ``d = f1 - r f2`` (the scaling cancels the
    flat-field pattern even when the two exposures differ slightly),
    ``var(d) = mu1 (1 + r) / g + (1 + r^2) RN^2`` and ``var(b1 - b2) = 2 RN^2``,
    so::

        g = mu1 (1 + r) / (var(d) - (1 + r^2) / 2 var(b1 - b2))

    which is Janesick's ``(mu1 + mu2) / (var(f1 - f2) - var(b1 - b2))`` for
    ``r = 1``.  Variances are clipped sigmas squared (:func:`clipped_stats`,
    corrected for the truncation); means are over the pixels that survive the
    clipping.  The uncertainty propagates ``var(s^2) = 2 s^4 / (n - 1)`` for both
    variances and the standard error of the means.  Pixel-to-pixel correlations
    (brighter-fatter effect, inter-pixel capacitance) lower the variance and
    bias the gain high; use a moderate signal.

    Raises
    ------
    ValueError
        On shape mismatch, too few pixels, or a non-positive photon variance or
        signal.
    """
    arrs = [np.asarray(a, dtype=np.float64) for a in (f1, f2, b1)]
    a2 = None if b2 is None else np.asarray(b2, dtype=np.float64)
    _same_shape(f1=arrs[0], f2=arrs[1], b1=arrs[2], b2=a2)
    if arrs[0].ndim != 2:
        raise ValueError(f"frames must be 2-D, got shape {arrs[0].shape}")
    reg = _region(arrs[0].shape, region)
    F1, F2, B1 = (a[reg] for a in arrs)
    B2 = None if a2 is None else a2[reg]

    # bias level and read-noise term
    if B2 is not None:
        db = B1 - B2
        okb = np.isfinite(db)
        _, sb, nb, keepb = _clip(db[okb], clip_nsigma)
        mb1 = float(B1[okb][keepb].mean())
        mb2 = float(B2[okb][keepb].mean())
        var_b = sb * sb
    else:
        ny = B1.shape[0] // 2 * 2
        db = (B1[0:ny:2] - B1[1:ny:2]).ravel()
        db = db[np.isfinite(db)]
        _, sb, nb, _ = _clip(db, clip_nsigma)
        mb1, _, _ = clipped_stats(B1, clip_nsigma)
        mb2 = mb1
        var_b = sb * sb
    if nb < 10 or not math.isfinite(var_b):
        raise ValueError(f"too few usable bias pixels in the region ({nb})")

    # means of the flats and the scaled difference
    ok = np.isfinite(F1) & np.isfinite(F2)
    v1, v2 = F1[ok], F2[ok]
    if v1.size < 10:
        raise ValueError(f"too few usable flat pixels in the region ({v1.size})")
    # first pass: rough ratio from the medians, clip the difference, then refine
    r = (float(np.median(v1)) - mb1) / (float(np.median(v2)) - mb2)
    keep = np.ones(v1.size, bool)
    for _ in range(3):
        _, _, _, keep = _clip(v1 - r * v2, clip_nsigma)
        mu1 = float(v1[keep].mean()) - mb1
        mu2 = float(v2[keep].mean()) - mb2
        if not (mu1 > 0 and mu2 > 0):
            raise ValueError(f"flat signal above bias is not positive (mu1={mu1:.4g}, "
                             f"mu2={mu2:.4g} ADU)")
        r_new = mu1 / mu2
        if abs(r_new - r) < 1e-9 * abs(r):
            r = r_new
            break
        r = r_new
    _, sd, nd, keep = _clip(v1 - r * v2, clip_nsigma)
    var_d = sd * sd
    c = 0.5 * (1.0 + r * r)
    V = var_d - c * var_b
    S = mu1 * (1.0 + r)
    if not V > 0:
        raise ValueError(f"photon variance is not positive (var(d)={var_d:.4g}, "
                         f"read-noise term={c * var_b:.4g} ADU^2)")
    g = S / V
    sig_V = math.sqrt(2.0 * var_d ** 2 / (nd - 1) + c * c * 2.0 * var_b ** 2 / (nb - 1))
    sig_S = (1.0 + r) * math.sqrt(0.5 * var_d / nd)
    dg = g * math.sqrt((sig_V / V) ** 2 + (sig_S / S) ** 2)
    return GainEstimate(float(g), float(dg), float(0.5 * (mu1 + mu2)), float(V), int(nd))


def read_noise_from_bias_pair(b1, b2, gain: float, *, region=None, clip_nsigma: float = 3.0) -> float:
    """Read noise from two bias frames.

    Parameters
    ----------
    b1, b2 : ndarray
        Two single bias frames, ADU, same shape.
    gain : float
        Gain, e-/ADU.
    region : (slice, slice), optional
        Rows and columns used; default the whole frame.
    clip_nsigma : float
        Clip level (sigma) rejecting cosmic rays and hot pixels.

    Returns
    -------
    float
        Read noise, e-: ``clipped sigma(b1 - b2) / sqrt(2) * gain``.  Its
        relative statistical uncertainty is about ``1 / sqrt(2 n)`` for ``n``
        pixels (slightly more for the clipping).

    Raises
    ------
    ValueError
        On shape mismatch, non-positive gain or fewer than 10 usable pixels.
    """
    g = _positive("gain", gain)
    a = np.asarray(b1, dtype=np.float64)
    b = np.asarray(b2, dtype=np.float64)
    _same_shape(b1=a, b2=b)
    if region is not None:
        reg = _region(a.shape, region)
        a, b = a[reg], b[reg]
    _, s, n = clipped_stats(a - b, clip_nsigma)
    if n < 10:
        raise ValueError(f"too few usable bias pixels ({n})")
    return float(s / math.sqrt(2.0) * g)


def defects_map(dark_rate=None, flat_norm=None, *, dark_unc=None,
                hot_sigma: float = DEFAULTS["dark_hot_nsigma"],
                hot_min_rate: float = DEFAULTS["dark_hot_min_rate"],
                dead_below: float = DEFAULTS["flat_dead_below"],
                weak_below: float = DEFAULTS["defect_weak_below"],
                bright_above: float = DEFAULTS["flat_hot_above"]) -> np.ndarray:
    """Bad-pixel bitmask from a master dark rate map and/or a normalised flat.

    Parameters
    ----------
    dark_rate : ndarray, optional
        Dark current, e-/s (the unit of ``hot_min_rate``).
    flat_norm : ndarray, optional
        Normalised pixel-response flat (dimensionless, ~1; large-scale
        illumination removed, or vignetting will read as weak pixels).
    dark_unc : ndarray, optional
        Uncertainty of ``dark_rate``, e-/s; when given a hot pixel must also be
        ``hot_sigma`` times its own uncertainty above the median.
    hot_sigma : float
        Hot: ``rate > median + hot_sigma * MAD sigma`` of the rate map ...
    hot_min_rate : float
        ... and ``rate > hot_min_rate`` (e-/s).
    dead_below : float
        Dead: ``flat < dead_below``.
    weak_below : float
        Weak: ``dead_below <= flat < weak_below``.
    bright_above : float
        Bright: ``flat > bright_above``.

    Returns
    -------
    ndarray of uint8
        Bits (:data:`DEFECT_BITS`): 1 hot (dark), 2 dead (flat), 4 weak (flat),
        8 non-finite value in either input (no other bit is then set for that
        pixel), 16 bright (flat).  0 = good.

    Raises
    ------
    ValueError
        When both inputs are None, shapes differ, or ``weak_below < dead_below``.
    """
    if dark_rate is None and flat_norm is None:
        raise ValueError("defects_map needs dark_rate or flat_norm (both are None)")
    if weak_below < dead_below:
        raise ValueError(f"weak_below ({weak_below}) must be >= dead_below ({dead_below})")
    d = None if dark_rate is None else np.asarray(dark_rate, dtype=np.float64)
    f = None if flat_norm is None else np.asarray(flat_norm, dtype=np.float64)
    u = None if dark_unc is None else np.asarray(dark_unc, dtype=np.float64)
    _same_shape(dark_rate=d, flat_norm=f, dark_unc=u)
    shape = (d if d is not None else f).shape
    mask = np.zeros(shape, np.uint8)
    nonfin = np.zeros(shape, bool)
    if d is not None:
        nonfin |= ~np.isfinite(d)
        hot, _, _ = _hot_mask(d, u, float(hot_sigma), float(hot_min_rate))
        mask[hot] |= DEFECT_BITS["hot"]
    if f is not None:
        nonfin |= ~np.isfinite(f)
        with np.errstate(invalid="ignore"):
            mask[f < dead_below] |= DEFECT_BITS["dead"]
            mask[(f >= dead_below) & (f < weak_below)] |= DEFECT_BITS["weak"]
            mask[f > bright_above] |= DEFECT_BITS["bright"]
    mask[nonfin] = DEFECT_BITS["nonfinite"]
    return mask
