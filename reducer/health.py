"""Step 2d of a night: detector health and the defects map, from the calibration frames.

- **Read noise** from the difference of the first two biases of a set (per detector, e-);
- **gain** from each pair of flats of equal exposure time (photon transfer, with two biases),
  per detector (e-/ADU), with its statistical uncertainty;
- both compared with the profile's values (ratio; flagged outside 0.8-1.25);
- a **defects map** per detector (uint8 bits of :func:`reducer.verify.defects_map`: hot from the
  master dark, dead/weak/bright from the master flats) that the p step turns into BAD pixels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

RATIO_OK = (0.8, 1.25)


def _load(night, frame):
    from .masters import detector_inputs
    return [d.load()[0] for d in detector_inputs(night.profile, night.raw_dir, frame, night.settings)]


def detector_health(night, sets) -> dict:
    """Read noise and gain per detector from tonight's bias and flat pairs (JSON-able)."""
    from . import verify as V
    profile = night.profile
    out = {"read_noise": [], "gain": []}
    biases = next((cs for cs in sets if cs.imtype == "bias" and len(cs.frames) >= 2), None)
    if biases is None:
        out["note"] = "fewer than 2 biases tonight: no read noise or gain measured"
        return out
    b1, b2 = (_load(night, f) for f in sorted(biases.frames, key=lambda f: f.mjd)[:2])
    for i, det in enumerate(profile.detectors):
        g = det.gain or 1.0
        rn = V.read_noise_from_bias_pair(b1[i], b2[i], g)
        ratio = rn / det.rdnoise if det.rdnoise else float("nan")
        out["read_noise"].append({"detector": det.name, "measured_e": rn, "profile_e": det.rdnoise,
                                  "ratio": ratio, "ok": bool(RATIO_OK[0] <= ratio <= RATIO_OK[1]),
                                  "frames": [biases.frames[0].file, biases.frames[1].file]})
    for cs in sets:
        if cs.imtype != "flat" or len(cs.frames) < 2:
            continue
        fr = sorted(cs.frames, key=lambda f: f.exptime)
        pair = next(((a, b) for a, b in zip(fr, fr[1:])
                     if abs(a.exptime - b.exptime) <= 0.01 * max(a.exptime, 1e-3)), None)
        if pair is None:
            continue
        f1, f2 = (_load(night, f) for f in pair)
        for i, det in enumerate(profile.detectors):
            est = V.gain_from_flat_pair(f1[i], f2[i], b1[i], b2[i])
            ratio = est.gain / det.gain if det.gain else float("nan")
            out["gain"].append({"detector": det.name, "set": cs.name, "measured": est.gain,
                                "uncertainty": est.uncertainty, "profile": det.gain, "ratio": ratio,
                                "ok": bool(RATIO_OK[0] <= ratio <= RATIO_OK[1]),
                                "frames": [pair[0].file, pair[1].file]})
    return out


def defects(night, dark: Path | None, flats: list[Path]) -> dict:
    """Defects map per detector (uint8), from a master dark (ADU/s) and master flats."""
    from astropy.io import fits
    from . import verify as V
    maps = {}
    for det in night.profile.detectors:
        m = None
        if dark is not None:
            with fits.open(dark) as h:
                g = det.gain or 1.0
                m = V.defects_map(dark_rate=h[det.name].data * g, dark_unc=h[f"{det.name}_UNC"].data * g)
        for fp in flats:
            with fits.open(fp) as h:
                fm = V.defects_map(flat_norm=h[det.name].data)
            m = fm if m is None else (m | fm)
        if m is not None:
            maps[det.name] = m.astype(np.uint8)
    return maps
