"""Calibration sets: which raw frames make one master, and the ``[calib]`` settings that say so.

No pixels here (and no numpy): the task generators group the night log into sets every time
doit starts. The recipes that build a master from a set are in :mod:`reducer.masters`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: calibration types and their IMTYPE header value
IMTYPE = {"bias": "Bias", "dark": "Dark", "flat": "Flat", "arc": "Arclamp"}
DEFAULT_CLIP = {"bias": 2.1, "dark": 2.2, "flat": 2.3, "arc": 2.4}
DEFAULT_SET_KEYS = {
    "bias": ["binning", "shape", "readout"],
    "dark": ["binning", "shape", "readout"],
    "flat": ["binning", "shape", "readout", "filter", "subtype"],
    "arc": ["binning", "shape", "readout", "object"],
}
DEFAULT_MIN_FRAMES = 3


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
