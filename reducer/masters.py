"""Step 2 of a night: master bias, dark, flat (per filter) and arc (per OBJECT).

Recipes (seed 000, KPF), per detector, with the clipped-mean engine of
:mod:`reducer.ops.combine`:

- **bias**: bias frames with EXPTIME <= ``bias_exptime_max``; overscan-subtracted and trimmed
  where the profile has sections; clip 2.1. Unit ADU.
- **dark**: dark frames with EXPTIME >= ``dark_exptime_min``; minus the master bias, divided
  by the exposure time; clip 2.2. Unit ADU/s (a rate).
- **flat**: flat frames with EXPTIME <= ``flat_exptime_max``, dome and sky kept apart; minus
  the bias and the dark rate x EXPTIME; dome flats divided by EXPTIME, sky flats each by its
  own median; clip 2.3; then normalised: ``scalar`` (by one clipped median of gain x flat over
  the illuminated area of all detectors, so relative detector sensitivities are kept) or
  ``smooth`` (KPF: divided by a Gaussian-blurred copy, sigma 2, each region of an optional mask
  by its mode; pixels outside the regions or under 50 ADU before smoothing set to 1).
  Unit: none (normalised response).
- **arc**: arc frames of one OBJECT; minus bias and dark, divided by EXPTIME and by the flat
  (when one exists); clip 2.4. Unit ADU/s.

A set is keyed by what the profile declares must match (``[calib] set_keys``); frames of
different shape are never combined. A set with fewer frames than ``min_frames`` (default 3)
is not built; a profile may allow fewer (down to 1); a master of 1 or 2 frames is flagged
``FEWFRAME = T``. With fewer than :data:`SMALL_N` (5) frames the estimator is the plain mean
(``CLIPSIG = 0`` in the header): a robust sigma from the 16-84 percentiles of 2-4 values is
meaningless (with 3 frames the KPF clip rejects the farthest value about half the time,
which made the mean 1.7x noisier than the mean of 3 on simulated flats), and the
uncertainty plane is propagated from each frame's noise model (Poisson + read noise,
through the same scales) instead of the survivors' scatter, which underestimated it 3x on
simulated darks.

The output is one FITS file per set: per detector an image HDU named after the detector, plus
``<DET>_UNC`` and ``<DET>_CNT``; the primary header carries IMTYPE, NFRAMES, MINMJD, MAXMJD,
INFOBITS, CLIPSIG, the inputs with checksums, the masters used, the settings digest and the
reducer version.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMTYPE = {"bias": "Bias", "dark": "Dark", "flat": "Flat", "arc": "Arclamp"}
BUNIT = {"bias": "adu", "dark": "adu/s", "flat": "", "arc": "adu/s"}
DEFAULT_CLIP = {"bias": 2.1, "dark": 2.2, "flat": 2.3, "arc": 2.4}
DEFAULT_SET_KEYS = {
    "bias": ["binning", "shape", "readout"],
    "dark": ["binning", "shape", "readout"],
    "flat": ["binning", "shape", "readout", "filter", "subtype"],
    "arc": ["binning", "shape", "readout", "object"],
}
DEFAULT_MIN_FRAMES = 3
#: INFOBITS: bit i set when >= 1 % of detector i's pixels have fewer samples than this
INFOBITS_MIN_SAMPLES = {"bias": 10, "dark": 10, "flat": 10, "arc": 5}
FLAT_LOW_DN = 50.0
#: with fewer frames than this, a master's UNC is propagated from each frame's noise model
#: (Poisson + read noise) instead of the survivors' scatter
SMALL_N = 5
NO_CLIP = 1e9   # a clip half-width that keeps every value (the plain mean)
FLAT_SMOOTH_SIGMA = 2.0


class MasterError(ValueError):
    """A master cannot be built; the message says which set and why."""


# --------------------------------------------------------------------------- sets
@dataclass
class CalSet:
    """Frames that make one master."""

    imtype: str
    key: dict
    frames: list = field(default_factory=list)
    excluded: list = field(default_factory=list)     # (file, reason)

    @property
    def name(self) -> str:
        """File-system and doit safe name, e.g. ``flat_sdss_r_dome_1x1_1024x1024``."""
        from .inventory import safe_name
        vals = [safe_name(str(self.key[k])) for k in self.key if str(self.key[k])]
        return "_".join([self.imtype, *vals])

    @property
    def filename(self) -> str:
        return f"master_{self.name}.fits"


def calib_settings(settings: dict) -> dict:
    """The ``[calib]`` table with defaults filled in."""
    c = dict(settings.get("calib", {}))
    c.setdefault("bias_exptime_max", 0.0)
    c.setdefault("dark_exptime_min", 0.0)
    c.setdefault("flat_exptime_max", float("inf"))
    c["clip"] = {**DEFAULT_CLIP, **c.get("clip", {})}
    c["min_frames"] = {k: DEFAULT_MIN_FRAMES for k in IMTYPE} | c.get("min_frames", {})
    c["set_keys"] = {**DEFAULT_SET_KEYS, **c.get("set_keys", {})}
    c.setdefault("science_flat", "auto")
    c.setdefault("flat_normalise", "scalar")
    return c


def frame_key(frame, keys) -> dict:
    """The calibration-set key of a night-log row (fields named in ``keys``)."""
    out = {}
    for k in keys:
        v = getattr(frame, k, "")
        if k == "object":
            from .inventory import normalise_object
            v = normalise_object(v)
        out[k] = "" if v is None else str(v)
    return out


def calibration_sets(frames, settings: dict) -> list[CalSet]:
    """Group the night's usable calibration frames into sets, in a stable order.

    Frames outside a type's exposure-time limits are kept in ``excluded`` with a reason;
    sets with fewer frames than the minimum are returned too (``buildable`` says).
    """
    c = calib_settings(settings)
    sets: dict = {}
    for f in frames:
        if not f.usable or f.type not in IMTYPE:
            continue
        reason = None
        if f.type == "bias" and f.exptime > c["bias_exptime_max"]:
            reason = f"EXPTIME {f.exptime:g} s above bias_exptime_max {c['bias_exptime_max']:g} s"
        elif f.type == "dark" and f.exptime < c["dark_exptime_min"]:
            reason = f"EXPTIME {f.exptime:g} s below dark_exptime_min {c['dark_exptime_min']:g} s"
        elif f.type == "flat" and f.exptime > c["flat_exptime_max"]:
            reason = f"EXPTIME {f.exptime:g} s above flat_exptime_max {c['flat_exptime_max']:g} s"
        key = frame_key(f, c["set_keys"][f.type])
        ident = (f.type, tuple(key.items()))
        cs = sets.setdefault(ident, CalSet(f.type, key))
        if reason:
            cs.excluded.append((f.file, reason))
        else:
            cs.frames.append(f)
    order = list(IMTYPE)
    return sorted(sets.values(), key=lambda s: (order.index(s.imtype), s.name))


def buildable(cs: CalSet, settings: dict) -> str | None:
    """``None`` when the set has enough frames, else the reason it is not built."""
    need = calib_settings(settings)["min_frames"].get(cs.imtype, DEFAULT_MIN_FRAMES)
    if len(cs.frames) < max(1, need):
        return (f"{cs.name}: {len(cs.frames)} frame(s), the profile asks for at least {need}")
    return None


def matching_set(sets, imtype: str, key: dict, settings: dict) -> CalSet | None:
    """The set of ``imtype`` whose key agrees with ``key`` on the fields both have."""
    keys = calib_settings(settings)["set_keys"][imtype]
    want = {k: key[k] for k in keys if k in key}
    for cs in sets:
        if cs.imtype == imtype and all(cs.key.get(k) == v for k, v in want.items()):
            return cs
    return None


# --------------------------------------------------------------------------- pixels
@dataclass
class RawDetector:
    """Pixels of one detector of a raw frame, overscan-subtracted and trimmed on demand."""

    path: Path
    hdu: int
    sections: dict
    overscan: dict
    saturate: float | None

    def load(self):
        """Trimmed, overscan-subtracted float32 image (ADU) and its saturation mask."""
        from astropy.io import fits
        from .ops.overscan import subtract_overscan
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(self.path, memmap=False) as hdul:
                raw = np.asarray(hdul[self.hdu].data)
        trim = self.sections["trimsec"]
        img, _ = subtract_overscan(raw, self.sections["biassec"], trim, **self.overscan)
        mask = None
        if self.saturate is not None:
            mask = raw[trim] >= self.saturate
        return img, mask


def noise_model(signal_adu: np.ndarray, gain: float, rdnoise_e: float) -> np.ndarray:
    """1-sigma noise of a frame (ADU): Poisson on the signal plus read noise."""
    g = gain or 1.0
    return np.sqrt(np.clip(signal_adu, 0, None) / g + (rdnoise_e / g) ** 2).astype(np.float32)


def detector_inputs(profile, raw_dir: Path, frame, settings: dict) -> list[RawDetector]:
    """One :class:`RawDetector` per profile detector of a night-log row."""
    from .headers import read_headers
    from .instruments import detector_sections
    path = Path(raw_dir) / frame.file
    raw = read_headers(path)
    ov = settings.get("overscan", {})
    ov = {"axis": ov.get("axis", "columns"), "method": ov.get("method", "median"),
          "fit": ov.get("fit", "smooth"), "smooth_rows": int(ov.get("smooth_rows", 15))}
    out = []
    for det in profile.detectors:
        i = raw.hdu_index(det.hdu)
        secs = detector_sections(det, raw.headers[i], raw.shapes[i])
        out.append(RawDetector(path, i, secs, ov, det.saturate))
    return out


def _read_master(path: Path, det: str):
    from astropy.io import fits
    with fits.open(path, memmap=False) as h:
        return (h[det].data.astype(np.float32), h[f"{det}_UNC"].data.astype(np.float32))


def clipped_median(values: np.ndarray) -> float:
    """3-sigma clipped median of the finite values."""
    from astropy.stats import sigma_clipped_stats
    v = values[np.isfinite(values)]
    if v.size == 0:
        raise MasterError("no finite pixel to normalise by")
    _, med, _ = sigma_clipped_stats(v, sigma=3.0, maxiters=5)
    return float(med)


def illuminated(shape, fraction: float = 0.8):
    """Central ``fraction`` of an image (the area used to normalise flats)."""
    ny, nx = shape
    dy, dx = int(ny * (1 - fraction) / 2), int(nx * (1 - fraction) / 2)
    return slice(dy, ny - dy), slice(dx, nx - dx)


def smooth_normalise(flat: np.ndarray, unc: np.ndarray, regions: np.ndarray | None = None,
                     sigma: float = FLAT_SMOOTH_SIGMA, low: float = FLAT_LOW_DN):
    """KPF flat normalisation (see the module docstring); returns (norm, unc) float32."""
    from scipy.ndimage import gaussian_filter
    f = np.where(np.isfinite(flat), flat, 0.0).astype(np.float64)
    w = np.isfinite(flat).astype(np.float64)
    blur = gaussian_filter(f, sigma) / np.maximum(gaussian_filter(w, sigma), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = f / blur
        runc = unc / blur
    out = np.ones_like(ratio)
    ounc = np.zeros_like(ratio)
    labels = np.ones(flat.shape, int) if regions is None else regions.astype(int)
    for lab in np.unique(labels[labels > 0]):
        sel = (labels == lab) & np.isfinite(ratio) & (flat >= low)
        if not sel.any():
            continue
        hist, edges = np.histogram(ratio[sel], bins=200, range=(0.5, 1.5))
        mode = 0.5 * (edges[hist.argmax()] + edges[hist.argmax() + 1])
        out[sel] = ratio[sel] / mode
        ounc[sel] = runc[sel] / mode
    return out.astype(np.float32), ounc.astype(np.float32)


# --------------------------------------------------------------------------- building
@dataclass
class BuiltMaster:
    """What :func:`build_master` produced (for the report and the registry)."""

    path: Path
    imtype: str
    nframes: int
    infobits: int
    fewframes: bool
    rejected: list = field(default_factory=list)   # (file, reason) of inputs screened out
    pair_diffs: dict = field(default_factory=dict)  # bias: detector -> frame1 - frame2 (ADU)


def build_master(cs: CalSet, *, night, out_path: Path, bias: Path | None = None,
                 dark: Path | None = None, flat: Path | None = None,
                 masters_info=(), mem_limit: int | None = None) -> BuiltMaster:
    """Build one master FITS file from its calibration set (reads raw frames, writes one file).

    Parameters
    ----------
    cs : CalSet
    night : reducer.night.Night
    out_path : Path
        Where to write (atomically).
    bias, dark, flat : Path, optional
        Masters to apply (per the recipe of ``cs.imtype``).
    masters_info : iterable of (role, name, origin)
        Provenance of those masters, for the header.
    mem_limit : int, optional
        Combine memory bound, bytes.
    """
    from astropy.io import fits
    from .fitsio import add_provenance, sha256_file, write_fits
    from .fitsio_strips import ArraySource
    from .ops.combine import combine
    settings = night.settings
    c = calib_settings(settings)
    nsigma = float(c["clip"][cs.imtype])
    mem = int(mem_limit or settings.get("combine", {}).get("mem_limit_mb", 256) * 2**20)
    profile = night.profile
    frames = sorted(cs.frames, key=lambda f: f.mjd)
    inputs = [detector_inputs(profile, night.raw_dir, f, settings) for f in frames]
    prim = fits.Header()
    hdus = [None]
    infobits = 0
    det_results = {}
    rejected: list = []
    pair_diffs: dict = {}
    for d, det in enumerate(profile.detectors):
        sources, scales = [], []
        mb = _read_master(bias, det.name)[0] if bias else None
        md = _read_master(dark, det.name)[0] if dark else None
        mf = _read_master(flat, det.name)[0] if flat else None
        loaded = [(f,) + dets[d].load() for f, dets in zip(frames, inputs)]
        bad = screen_inputs(cs.imtype, loaded, det)
        for f, reason in bad.items():
            rejected.append((f, f"{det.name}: {reason}"))
        for f, img, mask in loaded:
            if f.file in bad:
                continue
            signal = img - mb if mb is not None else img
            unc = noise_model(signal, det.gain or 1.0, det.rdnoise or 0.0)
            if mb is not None:
                _same_shape(img, mb, f.file, bias)
                img = img - mb
            if md is not None and cs.imtype in ("flat", "arc"):
                _same_shape(img, md, f.file, dark)
                img = img - md * np.float32(f.exptime)
            if cs.imtype == "arc" and mf is not None:
                _same_shape(img, mf, f.file, flat)
                with np.errstate(divide="ignore", invalid="ignore"):
                    img = img / mf
                    unc = unc / np.abs(mf)
            if cs.imtype in ("dark", "arc") or (cs.imtype == "flat" and cs.key.get("subtype") != "sky"):
                if not f.exptime > 0:
                    raise MasterError(f"{f.file}: EXPTIME {f.exptime} s: cannot make a rate")
                scales.append(1.0 / f.exptime)
            elif cs.imtype == "flat":
                med = clipped_median(img[illuminated(img.shape)])
                if not med > 0:
                    raise MasterError(f"{f.file}: sky flat median {med:.1f} ADU is not positive")
                scales.append(1.0 / med)
            else:
                scales.append(1.0)
            sources.append(ArraySource(img, mask, unc=unc, name=f.file))
        if cs.imtype == "bias" and len(sources) >= 2:
            # the difference of two frames: their noise without the fixed pattern
            pair_diffs[det.name] = sources[0].data - sources[1].data
        if not sources:
            raise MasterError(f"{cs.name}: every input frame was screened out on {det.name}: "
                              + "; ".join(f"{f}: {r}" for f, r in bad.items()))
        # below SMALL_N frames the percentile sigma of 2-4 values says nothing (with 3 frames
        # the farthest is clipped half the time, which inflates the noise of the mean by ~1.7x
        # and its scatter-based UNC underestimates it 3x): plain mean, UNC from the frames'
        # noise model
        small = len(sources) < SMALL_N
        res = combine(sources, NO_CLIP if small else nsigma, mem_limit=mem, scales=scales,
                      unc_from="input" if small else "scatter")
        det_results[det.name] = res
        need = INFOBITS_MIN_SAMPLES[cs.imtype]
        if np.mean(res.cnt < need) >= 0.01:
            infobits |= 1 << d
    if cs.imtype == "flat":
        _normalise_flats(det_results, profile, c)
    for det in profile.detectors:
        res = det_results[det.name]
        h = fits.Header()
        h["BUNIT"] = BUNIT[cs.imtype]
        hdus.append(fits.ImageHDU(res.data.astype(np.float32), header=h, name=det.name))
        hdus.append(fits.ImageHDU(res.unc.astype(np.float32), name=f"{det.name}_UNC"))
        hdus.append(fits.ImageHDU(res.cnt.astype(np.int16), name=f"{det.name}_CNT"))
    n = len(frames)
    prim["IMTYPE"] = (IMTYPE[cs.imtype], "master calibration type")
    prim["INSTRUME"] = (profile.name, "reducer instrument profile")
    prim["NIGHT"] = (night.utdate, "observing night (UT date)")
    prim["NFRAMES"] = (n, "number of input frames")
    prim["MINMJD"] = (min(f.mjd for f in frames), "earliest input MJD (UTC)")
    prim["MAXMJD"] = (max(f.mjd for f in frames), "latest input MJD (UTC)")
    prim["INFOBITS"] = (infobits, f"bit i: 1% of det i px <{INFOBITS_MIN_SAMPLES[cs.imtype]} samples")
    prim["CLIPSIG"] = (nsigma if n >= SMALL_N else 0.0,
                       "clip half-width, robust sigmas (P84-P16)/2; 0: none")
    few = n < DEFAULT_MIN_FRAMES
    prim["FEWFRAME"] = (few, f"fewer than {DEFAULT_MIN_FRAMES} frames")
    prim["ESTIMATR"] = ("clipped mean" if n >= SMALL_N else (f"mean of {n}" if n > 1 else "single frame"),
                        "combine estimator")
    for k, v in cs.key.items():
        if v:
            prim[f"SET{k[:5].upper()}"] = (str(v)[:60], f"calibration set key {k}")
    if cs.imtype == "flat":
        prim["FLATNORM"] = (c["flat_normalise"], "flat normalisation method")
    add_provenance(prim, inputs=[(f.file, sha256_file(night.raw_dir / f.file)) for f in frames],
                   masters=masters_info, digest=night.digest("calib"), step=f"master {cs.imtype}")
    hdus[0] = fits.PrimaryHDU(header=prim)
    write_fits(fits.HDUList(hdus), out_path)
    return BuiltMaster(Path(out_path), cs.imtype, n, infobits, few, rejected, pair_diffs)


def screen_inputs(imtype: str, loaded, det) -> dict:
    """Input frames of one detector that must not go into the master: {file: reason}.

    Biases: a light leak or a level far from the other frames'; flats: saturated or too
    faint (see :mod:`reducer.verify`). Darks and arcs are not screened here.
    """
    from . import verify as V
    bad = {}
    if imtype == "bias" and len(loaded) >= 3:
        levels = [float(np.nanmedian(img)) for _, img, _ in loaded]
        expected = float(np.median(levels))
        rn = (det.rdnoise or 0.0) / (det.gain or 1.0) or 1.0
        # the detector's own fixed pattern is in every frame: judge each frame against the
        # median of the stack, so only what one frame has and the others lack counts
        reference = np.median(np.stack([img for _, img, _ in loaded]), axis=0)
        for (f, img, _), lv in zip(loaded, levels):
            r = V.screen_bias_frame(img, expected_level=expected, read_noise_adu=rn,
                                    reference=reference)
            if r:
                bad[f.file] = r
    elif imtype == "flat" and det.saturate:
        for f, img, _ in loaded:
            r = V.screen_flat_frame(img, saturate_adu=det.saturate)
            if r:
                bad[f.file] = r
    return bad


def _same_shape(img, master, file, mpath):
    if img.shape != master.shape:
        raise MasterError(f"{file}: trimmed shape {img.shape} differs from master {Path(mpath).name} "
                          f"{master.shape}")


def _normalise_flats(results: dict, profile, c: dict) -> None:
    method = c["flat_normalise"]
    if method == "smooth":
        regions = None
        if c.get("flat_regions"):
            from astropy.io import fits
            regions = fits.getdata(c["flat_regions"])
        for name, res in results.items():
            res.data, res.unc = smooth_normalise(res.data, res.unc, regions,
                                                 float(c.get("flat_smooth_sigma", FLAT_SMOOTH_SIGMA)),
                                                 float(c.get("flat_low_dn", FLAT_LOW_DN)))
        return
    gains = {d.name: (d.gain or 1.0) for d in profile.detectors}
    vals = np.concatenate([(res.data[illuminated(res.data.shape)] * gains[n]).ravel()
                           for n, res in results.items()])
    norm = clipped_median(vals)
    if not norm > 0:
        raise MasterError(f"flat level {norm} is not positive")
    for n, res in results.items():
        f = np.float32(gains[n] / norm)
        res.data = res.data * f
        res.unc = res.unc * f


def write_sidecar(path: Path, payload: dict) -> None:
    """The master's JSON sidecar (verification, inputs, choices), written atomically."""
    from .fitsio import atomic_write_text
    atomic_write_text(Path(path), json.dumps(payload, indent=2, sort_keys=True, default=str))
