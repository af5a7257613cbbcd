"""Step 3 of a night: carry one science frame through p f s z a t.

Each ``run_*`` function is a doit action for one frame and one step: it reads the previous
step's product (or the raw frame), calls the pure algorithm in :mod:`reducer.ops`, and writes
the next product atomically with provenance. A frame that cannot go on prints one line
naming the file and the reason and the action reports failure, so doit (run with
``continue``) leaves out what depends on it and finishes the rest of the night.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .products import Detector, Product, read_product, write_product


class StepError(ValueError):
    """A frame cannot go through a step; the message is the one-line reason."""


def _frame(night, filename):
    from .inventory import read_nightlog
    for f in read_nightlog(night.nightlog):
        if f.file == filename:
            return f
    raise StepError(f"{filename} is not in nightlog.ecsv")


def _fail(filename: str, step: str, exc: Exception) -> bool:
    print(f"{step} {filename}: {exc}", file=sys.stderr)
    return False


def _masters(night, frame, runtime=True):
    """Bias, dark and flat choices for a frame (see :mod:`reducer.tasks.calib`)."""
    from .masters import calib_settings, frame_key
    from .tasks.calib import _load_sets, choose, choose_flat
    _, sets = _load_sets(night)
    keys = calib_settings(night.settings)["set_keys"]
    out = {}
    for imtype in ("bias", "dark"):
        ch = choose(night, sets, imtype, frame_key(frame, keys[imtype]), frame.mjd, runtime=runtime)
        if ch is not None:
            out[imtype] = ch
    ch = choose_flat(night, sets, frame, runtime=runtime)
    if ch is not None:
        out["flat"] = ch
    return out


def _defects(night, frame) -> dict:
    """The night's defects map for this frame's detector configuration ({} when none)."""
    from astropy.io import fits
    from .masters import calib_settings, frame_key
    from .tasks.calib import defects_key, defects_path
    keys = calib_settings(night.settings)["set_keys"]
    p = defects_path(night, defects_key(night, frame_key(frame, keys["bias"])))
    if not p.is_file():
        return {}
    with fits.open(p) as h:
        return {x.name: x.data.copy() for x in h[1:]}


def _read_master(path, det):
    from astropy.io import fits
    with fits.open(path, memmap=False) as h:
        return h[det].data.astype(np.float32), h[f"{det}_UNC"].data.astype(np.float32)


def _base_header(night, frame, step: str, inputs, masters=()):
    from astropy.io import fits
    from .fitsio import add_provenance, sha256_file
    h = fits.Header()
    h["OBJECT"] = (frame.object, "OBJECT of the raw frame")
    h["TARGET"] = (frame.target, "reducer target name")
    h["FILTER"] = (frame.filter, "filter")
    h["EXPTIME"] = (float(frame.exptime), "[s] exposure time")
    h["DATE-OBS"] = (frame.date_obs, "UTC start of exposure")
    h["MJD-OBS"] = (frame.mjd, "[d] MJD (UTC) at start")
    h["MJD-MID"] = (frame.mjd + frame.exptime / 2 / 86400.0, "[d] MJD (UTC) at mid-exposure")
    if np.isfinite(frame.airmass):
        h["AIRMASS"] = (float(frame.airmass), "airmass from the raw header")
    if np.isfinite(frame.ra):
        h["RA"] = (float(frame.ra), "[deg] header pointing")
        h["DEC"] = (float(frame.dec), "[deg] header pointing")
    h["NIGHT"] = (night.utdate, "observing night")
    h["RAWFILE"] = (frame.file[-68:], "raw frame")
    add_provenance(h, inputs=[(Path(p).name, sha256_file(p)) for p in inputs],
                   masters=masters, digest=night.digest(step), step=step)
    return h


# --------------------------------------------------------------------------- p
def run_prepare(night_dir: str, filename: str, out: str) -> bool:
    """doit action: raw -> p (overscan, bias, dark; electrons, uncertainty, mask)."""
    from .night import Night
    from .masters import detector_inputs
    from .ops.calibrate import prepare
    night = Night(night_dir)
    try:
        frame = _frame(night, filename)
        used = _masters(night, frame)
        dets = detector_inputs(night.profile, night.raw_dir, frame, night.settings)
        dmaps = _defects(night, frame)
        product = Product(_base_header(night, frame, "prepare", [night.raw_dir / filename],
                                       [c.header_entry() for k, c in used.items() if k != "flat"]))
        for det, rd in zip(night.profile.detectors, dets):
            raw_os, sat = rd.load()
            gain, rn = det.gain or 1.0, det.rdnoise or 0.0
            kw = {}
            if "bias" in used:
                kw["bias"], kw["bias_unc"] = _read_master(used["bias"].path, det.name)
            if "dark" in used:
                kw["dark_rate"], kw["dark_unc"] = _read_master(used["dark"].path, det.name)
            if det.name in dmaps and dmaps[det.name].shape == raw_os.shape:
                kw["defects"] = dmaps[det.name]
            data, unc, mask = prepare(raw_os, gain=gain, rdnoise_e=rn, exptime=frame.exptime,
                                      saturated=sat, **kw)
            from astropy.io import fits
            dh = fits.Header()
            dh["GAIN"] = (1.0, "e-/e-: data are in electrons")
            dh["GAINORIG"] = (gain, "[e-/ADU] gain applied")
            dh["RDNOISE"] = (rn, "[e-] read noise")
            if det.saturate:
                level = float(np.nanmedian(kw["bias"])) if "bias" in kw else 0.0
                dh["SATURATE"] = ((det.saturate - level) * gain, "[e-] saturation (approx.)")
            product.detectors[det.name] = Detector(data, unc, mask, dh)
        write_product(product, Path(out))
    except (StepError, ValueError, OSError) as exc:
        return _fail(filename, "prepare", exc)
    return {"digest": night.digest("prepare")}


# --------------------------------------------------------------------------- f
def run_flatten(night_dir: str, filename: str, src: str, out: str) -> bool:
    """doit action: p -> fp (divide by the master flat of the frame's filter)."""
    from .night import Night
    from .ops.calibrate import flatten
    night = Night(night_dir)
    try:
        frame = _frame(night, filename)
        used = _masters(night, frame)
        if "flat" not in used:
            raise StepError(f"no usable flat for filter {frame.filter!r} tonight nor by fallback")
        prod = read_product(Path(src))
        low = float(night.settings.get("flatten", {}).get("low", 0.5))
        hdr = prod.header.copy()
        from .fitsio import add_provenance
        add_provenance(hdr, masters=[used["flat"].header_entry()], digest=night.digest("flatten"),
                       step="flatten")
        out_p = Product(hdr)
        for name, d in prod.detectors.items():
            flat, flat_unc = _read_master(used["flat"].path, name)
            data, unc, mask = flatten(d.data, d.unc, d.mask, flat, flat_unc, low=low)
            out_p.detectors[name] = Detector(data, unc, mask, d.header)
        write_product(out_p, Path(out))
    except (StepError, ValueError, OSError) as exc:
        return _fail(filename, "flatten", exc)
    return {"digest": night.digest("flatten")}


def _transform(night_dir: str, filename: str, src: str, out: str, step: str, fn) -> dict | bool:
    """Read ``src``, apply ``fn(night, product) -> product`` and write ``out`` with provenance."""
    from .fitsio import add_provenance
    from .night import Night
    night = Night(night_dir)
    try:
        prod = read_product(Path(src))
        new = fn(night, prod)
        add_provenance(new.header, digest=night.digest(step), step=step)
        write_product(new, Path(out))
    except (StepError, ValueError, OSError) as exc:
        return _fail(filename, step, exc)
    return {"digest": night.digest(step)}


# --------------------------------------------------------------------------- s
def _sky(night, prod: Product) -> Product:
    from .ops.sky import estimate_sky, subtract_sky
    opts = night.settings.get("sky", {})
    out = Product(prod.header.copy())
    levels = []
    for name, d in prod.detectors.items():
        res = estimate_sky(d.data, d.mask, box=int(opts.get("box", 64)),
                           filter_size=int(opts.get("filter_size", 3)))
        data, unc = subtract_sky(d.data, d.unc, res)
        h = d.header.copy()
        h["SKYLEVEL"] = (round(float(res.level), 3), "[e-/px] median sky subtracted")
        h["SKYRMS"] = (round(float(res.rms_level), 3), "[e-] median sky noise per pixel")
        levels.append((res.level, res.rms_level))
        out.detectors[name] = Detector(data, unc, d.mask, h, sky=res.sky)
    out.header["SKYLEVEL"] = (round(float(np.median([l for l, _ in levels])), 3), "[e-/px] sky level")
    out.header["SKYRMS"] = (round(float(np.median([r for _, r in levels])), 3), "[e-] sky noise")
    return out


def run_sky(night_dir: str, filename: str, src: str, out: str):
    """doit action: fp -> sfp (sky model with sources masked, subtracted; level and rms recorded)."""
    return _transform(night_dir, filename, src, out, "sky", _sky)


# --------------------------------------------------------------------------- z
def _cosmics(night, prod: Product) -> Product:
    from .ops.cosmics import clean_cosmics
    opts = {k: v for k, v in night.settings.get("cosmics", {}).items()
            if k in ("sigclip", "sigfrac", "objlim", "niter", "cleantype", "psfmodel")}
    out = Product(prod.header.copy())
    total = 0
    for name, d in prod.detectors.items():
        rn = float(d.header.get("RDNOISE", 0.0))
        sat = float(d.header.get("SATURATE", 1e9))
        sky = d.sky if d.sky is not None else 0.0
        res = clean_cosmics(d.data, d.mask, sky_e=sky, rdnoise_e=rn, saturate_e=sat, **opts)
        h = d.header.copy()
        h["NCOSMIC"] = (res.ncosmic, "cosmic-ray events found and repaired")
        h["NCRPIX"] = (res.npix, "pixels flagged COSMIC")
        total += res.ncosmic
        out.detectors[name] = Detector(res.data, d.unc, res.flag(d.mask), h)
    out.header["NCOSMIC"] = (total, "cosmic-ray events, all detectors")
    return out


def run_cosmics(night_dir: str, filename: str, src: str, out: str):
    """doit action: sfp -> zsfp (astroscrappy in electrons with the s step's sky as background)."""
    return _transform(night_dir, filename, src, out, "cosmics", _cosmics)
