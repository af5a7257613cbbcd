"""doit tasks: one master per calibration set (``doit calib``, ``doit calib:<set>``).

Which master a set (or later a science frame) uses is decided here, in this order:

1. a master pinned in ``night.toml`` (``[pin] bias = "/path"`` or by set name);
2. tonight's master of the matching set, when tonight has enough frames for it and it
   passes verification;
3. the certified master of the same type and set key nearest in time in the registry
   (before or after the night; earlier preferred at equal distance; ``[calib]
   earlier_only = true`` restricts to earlier ones), within the type's maximum age, never
   one marked bad.

The choice (file, night, age) goes into the product's header and the master's sidecar JSON.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from doit import create_after

#: maximum age (days) of a fallback master, per type
DEFAULT_MAX_AGE_DAYS = {"bias": 90.0, "dark": 365.0, "flat": 180.0, "arc": 30.0}
#: masters each type applies
NEEDS = {"bias": (), "dark": ("bias",), "flat": ("bias", "dark"), "arc": ("bias", "dark", "flat")}


@dataclass(frozen=True)
class MasterChoice:
    """A master chosen for some use."""

    imtype: str
    path: str
    origin: str          # 'tonight', 'fallback' or 'pinned'
    night: str
    age_days: float = 0.0

    def header_entry(self):
        """(role, file name, origin text) for :func:`reducer.fitsio.add_provenance`."""
        text = self.origin if self.origin != "fallback" else \
            f"fallback from {self.night}, {abs(self.age_days):.1f} d {'before' if self.age_days >= 0 else 'after'}"
        return (self.imtype, Path(self.path).name, text)


def masters_dir(night) -> Path:
    return night.dir / "masters"


def registry_set_key(key: dict) -> dict:
    """The calibration-set key as registered (empty values dropped)."""
    return {k: v for k, v in key.items() if v}


def max_age(settings: dict, imtype: str) -> float:
    return float({**DEFAULT_MAX_AGE_DAYS, **settings.get("calib", {}).get("max_age_days", {})}[imtype])


def fallback(night, imtype: str, key: dict, mjd: float, *, earlier_only: bool | None = None) -> MasterChoice | None:
    """The registry's nearest certified master of this set from another night, or ``None``."""
    from ..registry import Registry
    settings = night.settings
    with Registry(night.site.registry_url) as reg:
        hit = reg.nearest(night.profile.name, imtype, registry_set_key(key), mjd,
                          max_age_days=max_age(settings, imtype),
                          earlier_only=bool(settings.get("calib", {}).get("earlier_only", False))
                          if earlier_only is None else earlier_only,
                          exclude_night=night.utdate)
    if hit is None:
        return None
    return MasterChoice(imtype, str(hit.path), "fallback", hit.night, float(hit.age_days))


def choose(night, sets, imtype: str, key: dict, mjd: float, *, runtime: bool = False) -> MasterChoice | None:
    """Choose the master of ``imtype`` matching ``key`` (see the module docstring).

    With ``runtime=True`` tonight's master counts only once built and verified (PASS);
    at task-creation time its future target is returned so doit orders the tasks.
    """
    if not runtime:
        # task creation asks once per frame: the answer up to the fallback depends on the
        # set alone, and the fallback's candidates are fetched once per set
        memo = _task_memo(night, sets)
        mkey = ("choose", imtype, tuple(key.items()))
        hit = memo.get(mkey)
        if hit is None:
            hit = memo[mkey] = _choose_before_fallback(night, sets, imtype, key, runtime)
        if isinstance(hit, MasterChoice):
            return hit
        return _fallback_memo(night, memo, imtype, hit, mjd)
    hit = _choose_before_fallback(night, sets, imtype, key, runtime)
    if isinstance(hit, MasterChoice):
        return hit
    return fallback(night, imtype, hit, mjd)


def _choose_before_fallback(night, sets, imtype: str, key: dict, runtime: bool):
    """Steps 1 and 2 of :func:`choose`: a pinned or tonight's master (``MasterChoice``), else
    the set key to look up in the registry (``dict``)."""
    from ..calsets import buildable, matching_set
    pins = night.settings.get("pin", {})
    cs = matching_set(sets, imtype, key, night.settings)
    for k in ([cs.name] if cs else []) + [imtype]:
        if k in pins:
            return MasterChoice(imtype, str(Path(pins[k]).expanduser()), "pinned", "", 0.0)
    if cs is not None and buildable(cs, night.settings) is None:
        path = masters_dir(night) / cs.filename
        if not runtime or _verified(path):
            return MasterChoice(imtype, str(path), "tonight", night.utdate, 0.0)
    return cs.key if cs is not None else _project(key, night.settings, imtype)


def _task_memo(night, sets) -> dict:
    """Answers computed while the tasks of one doit run are made, for these ``sets``
    (a new night log gives new sets and an empty memo)."""
    m = night.__dict__.get("_task_memo")
    if m is None or m[0] is not sets:
        m = night.__dict__["_task_memo"] = (sets, {})
    return m[1]


def _fallback_memo(night, memo: dict, imtype: str, key: dict, mjd: float) -> MasterChoice | None:
    """:func:`fallback` at task creation: the registry is read once per type and set key
    (:meth:`reducer.registry.Registry.candidates`), the nearest master picked per frame."""
    from ..registry import pick_nearest
    settings = night.settings
    rkey = registry_set_key(key)
    ckey = ("candidates", imtype, tuple(sorted(rkey.items())))
    rows = memo.get(ckey)
    if rows is None:
        from ..registry import Registry
        with Registry(night.site.registry_url) as reg:
            rows = memo[ckey] = reg.candidates(night.profile.name, imtype, rkey,
                                               exclude_night=night.utdate)
    hit = pick_nearest(rows, mjd, max_age_days=max_age(settings, imtype),
                       earlier_only=bool(settings.get("calib", {}).get("earlier_only", False)))
    if hit is None:
        return None
    return MasterChoice(imtype, str(hit.path), "fallback", hit.night, float(hit.age_days))


def choose_flat(night, sets, frame, *, runtime: bool = False) -> MasterChoice | None:
    """The flat for a science frame: dome or sky per ``[calib] science_flat``.

    ``auto`` (the default) takes a dome flat where one exists (tonight or by fallback),
    else a sky flat.
    """
    from ..calsets import calib_settings, frame_key
    c = calib_settings(night.settings)
    policy = c["science_flat"]
    kinds = {"dome": ["dome"], "sky": ["sky"], "auto": ["dome", "sky"]}[policy]
    for kind in kinds:
        key = frame_key(frame, [k for k in c["set_keys"]["flat"] if k != "subtype"])
        key["subtype"] = kind
        key = {k: key.get(k, "") for k in c["set_keys"]["flat"]}
        ch = choose(night, sets, "flat", key, frame.mjd, runtime=runtime)
        if ch is not None:
            return ch
    return None


def _project(key: dict, settings: dict, imtype: str) -> dict:
    from ..calsets import calib_settings
    return {k: key.get(k, "") for k in calib_settings(settings)["set_keys"][imtype]}


def _verified(path: Path) -> bool:
    import json
    side = Path(path).with_suffix(".json")
    if not Path(path).is_file() or not side.is_file():
        return False
    return json.loads(side.read_text()).get("verification", {}).get("passed", False)


def night_mid_mjd(night) -> float:
    from ..nights import night_bounds
    from ..inventory import mjd_of
    a, b = night_bounds(night.utdate, night.profile.site)
    return 0.5 * (mjd_of(a) + mjd_of(b))


def _load_sets(night):
    from ..inventory import read_nightlog
    from ..calsets import calibration_sets
    if not night.nightlog.is_file():
        return [], []
    frames = read_nightlog(night.nightlog)
    return frames, calibration_sets(frames, night.settings)


class DigestUnchanged:
    """doit ``uptodate``: the stage's settings digest is the one the target was built with."""

    #: doit inspects an ``uptodate`` callable's signature for every task of every run; with
    #: it given here inspect.signature returns at once (3000 tasks: ~0.1 s saved per run)
    __signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                       for n in ("task", "values")])

    def __init__(self, digest: str):
        self.digest = digest

    def __call__(self, task, values):
        return values.get("digest") == self.digest


def run_master(night_dir: str, set_name: str) -> dict:
    """doit action: build, verify, certify one master; print one line."""
    from ..night import Night
    from ..masters import MasterError, build_master, write_sidecar
    night = Night(night_dir)
    _, sets = _load_sets(night)
    cs = next(s for s in sets if s.name == set_name)
    mjd = sum(f.mjd for f in cs.frames) / len(cs.frames)
    used = {}
    for need in NEEDS[cs.imtype]:
        ch = choose(night, sets, need, cs.key, mjd, runtime=True)
        if ch is not None:
            used[need] = ch
    missing = [n for n in NEEDS[cs.imtype] if n not in used]
    out = masters_dir(night) / cs.filename
    try:
        if "bias" in missing and not any(d.biassec for d in night.profile.detectors):
            raise MasterError(f"no master bias tonight nor by fallback and no overscan: "
                              f"cannot build the {cs.imtype}")
        built = build_master(cs, night=night, out_path=out,
                             **{k: Path(v.path) for k, v in used.items()},
                             masters_info=[c.header_entry() for c in used.values()])
    except MasterError as exc:
        # not built: say why in one line and in the sidecar; users of this set fall back
        if out.exists():
            out.unlink()
        write_sidecar(out.with_suffix(".json"), {
            "set": cs.name, "imtype": cs.imtype, "key": cs.key, "night": night.utdate,
            "built": False, "reason": str(exc), "inputs": [f.file for f in cs.frames],
            "verification": {"passed": False, "failed": ["NOT_BUILT"], "checks": []}})
        print(f"master {cs.name}: not built: {exc}")
        return {"digest": night.digest("calib")}
    ver = verify_built(night, cs, built, used)
    write_sidecar(out.with_suffix(".json"), {
        "set": cs.name, "imtype": cs.imtype, "key": cs.key, "night": night.utdate, "built": True,
        "inputs": [f.file for f in cs.frames], "excluded": cs.excluded,
        "rejected": built.rejected,
        "masters_used": {k: asdict(v) for k, v in used.items()},
        "nframes": built.nframes, "fewframes": built.fewframes, "infobits": built.infobits,
        "verification": ver,
    })
    status = "PASS" if ver["passed"] else "FAIL " + ",".join(ver["failed"])
    uses = "; ".join(f"{k} {Path(v.path).name} ({v.header_entry()[2]})" for k, v in used.items())
    print(f"master {cs.name}: {built.nframes} frames, verification {status}"
          f"{'; uses ' + uses if uses else ''}")
    if missing:
        print(f"  no usable master {', '.join(missing)} tonight nor by fallback: "
              f"{'overscan only' if missing == ['bias'] else 'not applied'}")
    for f, reason in built.rejected:
        print(f"  input {f} rejected: {reason}")
    if ver["passed"]:
        _certify(night, cs, out, built, ver)
    return {"digest": night.digest("calib")}


def _certify(night, cs, out: Path, built, ver) -> None:
    from ..registry import Registry
    from .. import __version__
    frames = cs.frames
    mjds = [f.mjd for f in frames]
    with Registry(night.site.registry_url) as reg:
        reg.certify(out, night.site.path("masters_store"), instrument=night.profile.name,
                    imtype=cs.imtype, set_key=registry_set_key(cs.key), night=night.utdate,
                    mjd_min=min(mjds), mjd_max=max(mjds), mjd_mid=sum(mjds) / len(mjds),
                    nframes=built.nframes, verification="PASS", details=ver,
                    reducer_version=__version__)


def verify_built(night, cs, built, used) -> dict:
    """Verify a freshly built master, per detector, and write the result into its header.

    Tests (thresholds: :data:`reducer.verify.DEFAULTS`, overridden by ``[calib] verify``):
    bias MEAN/NOISE/CR_NOISE (MEAN against zero when the detector has an overscan, else
    against the previous certified master's level), dark RATE/HOT_FRACTION, flat
    median/SNR/dead-and-hot fraction, and for every type the comparison with the previous
    certified master of the same set (fail when > 5 % of pixels differ by >= 6 sigma).
    Returns a JSON-able summary; the file is rewritten atomically with VERIFY/V* cards.
    """
    import numpy as np
    from astropy.io import fits
    from .. import verify as V
    from ..fitsio import write_fits
    # a master bias after overscan subtraction keeps the detector's real data-minus-overscan
    # offset (a few ADU): the MEAN test catches gross errors (10 ADU by default); changes
    # from night to night are caught by the comparison with the previous master
    thresholds = {"bias_mean_min_adu": 10.0, **night.settings.get("calib", {}).get("verify", {})}
    prev = fallback(night, cs.imtype, cs.key, night_mid_mjd(night), earlier_only=True)
    prev_h = fits.open(prev.path) if prev else None
    checks, per_det = [], {}
    try:
        with fits.open(built.path) as h:
            hdul = fits.HDUList([hdu.copy() for hdu in h])
        for det in night.profile.detectors:
            data, unc, cnt = (hdul[det.name].data, hdul[f"{det.name}_UNC"].data,
                              hdul[f"{det.name}_CNT"].data)
            gain = det.gain or 1.0
            if cs.imtype == "bias":
                if det.biassec is not None:
                    mode, ref = "overscan", None
                elif prev_h is not None:
                    mode, ref = "level", float(np.nanmedian(prev_h[det.name].data))
                else:
                    mode, ref = "none", None
                ver = V.verify_bias(data, unc, cnt, read_noise_adu=(det.rdnoise or 0) / gain or 1.0,
                                    gain=gain, frames_diff=built.pair_diffs.get(det.name),
                                    mean_mode=mode, reference_level=ref, thresholds=thresholds)
            elif cs.imtype == "dark":
                ver = V.verify_dark(data, unc, gain=gain, thresholds=thresholds)
            elif cs.imtype == "flat":
                ver = V.verify_flat(data, unc, thresholds=thresholds)
            else:
                ver = V.Verification(cs.imtype, [V.Check("FINITE", bool(np.isfinite(data).mean() > 0.99),
                                                        float(np.isfinite(data).mean()), "> 0.99", "")])
            dchecks = list(ver.checks)
            if prev_h is not None and det.name in prev_h and prev_h[det.name].data.shape == data.shape:
                # per-pixel UNC from a few frames has few degrees of freedom (heavy tails):
                # compare with one robust noise level per detector and master instead
                u_now = np.full(data.shape, np.nanmedian(unc), np.float32)
                u_prev = np.full(data.shape, np.nanmedian(prev_h[f"{det.name}_UNC"].data), np.float32)
                dchecks.append(V.compare_with_previous(data, u_now, prev_h[det.name].data, u_prev))
            dver = V.Verification(cs.imtype, dchecks)
            per_det[det.name] = dver
            checks += [{**c.to_dict(), "name": f"{det.name}:{c.name}"} for c in dchecks]
        prim = hdul[0].header
        for name, dver in per_det.items():
            for key, val, comment in dver.to_header_cards():
                # one card per test: FAIL on any detector wins
                if key not in prim or val == "FAIL":
                    prim[key] = (val, comment)
        if prev:
            prim["VPREVMST"] = (Path(prev.path).name[-68:], "previous master compared")
        write_fits(hdul, built.path)
    finally:
        if prev_h is not None:
            prev_h.close()
    failed = [c["name"] for c in checks if not c["passed"]]
    return {"passed": not failed, "failed": failed, "checks": checks,
            "previous": asdict(prev) if prev else None}


def make_task_generator(night):
    @create_after(executed="inventory")
    def task_calib():
        """Master calibrations: one per calibration set, verified and certified."""
        from ..calsets import buildable
        frames, sets = _load_sets(night)
        digest = night.digest("calib")
        mjd = night_mid_mjd(night)
        for cs in sets:
            if buildable(cs, night.settings) is not None:
                continue
            yield master_task(night, sets, cs, digest, mjd)
        yield from health_tasks(night, frames, sets, digest, mjd)
    return task_calib


# --------------------------------------------------------------------------- health, defects
def defects_key(night, frame_or_set_key: dict) -> dict:
    """The key a defects map is made for: the bias set's key fields."""
    from ..calsets import calib_settings
    keys = calib_settings(night.settings)["set_keys"]["bias"]
    return {k: str(frame_or_set_key.get(k, "")) for k in keys}


def defects_path(night, key: dict) -> Path:
    from ..inventory import safe_name
    vals = [safe_name(v) for v in key.values() if v]
    return masters_dir(night) / f"defects_{'_'.join(vals)}.fits"


def _defects_inputs(night, sets, key: dict, mjd: float, runtime: bool):
    """(dark choice or None, [tonight's flat sets of this key])."""
    from ..calsets import buildable
    dark = choose(night, sets, "dark", key, mjd, runtime=runtime)
    memo = {} if runtime else _task_memo(night, sets)
    mkey = ("defect flats", tuple(key.items()))
    flats = memo.get(mkey)
    if flats is None:
        flats = memo[mkey] = [cs for cs in sets if cs.imtype == "flat"
                              and buildable(cs, night.settings) is None
                              and all(cs.key.get(k) == v for k, v in key.items() if k in cs.key)]
    if runtime:
        flats = [cs for cs in flats if _verified(masters_dir(night) / cs.filename)]
    return dark, list(flats)


def health_tasks(night, frames, sets, digest: str, mjd: float):
    """``calib:health`` (read noise and gain vs the profile) and ``calib:defects_<key>``."""
    if any(cs.imtype == "bias" and len(cs.frames) >= 2 for cs in sets):
        deps = [str(night.raw_dir / f.file) for cs in sets if cs.imtype in ("bias", "flat")
                for f in cs.frames]
        yield {"name": "health", "actions": [(run_health, [str(night.dir)])], "file_dep": deps,
               "targets": [str(masters_dir(night) / "health.json")],
               "uptodate": [DigestUnchanged(digest)], "clean": True,
               "doc": "read noise and gain from bias and flat pairs, against the profile"}
    keys = {}
    for f in frames:
        if f.usable:
            k = defects_key(night, {"binning": f.binning, "shape": f.shape, "readout": f.readout,
                                    "filter": f.filter})
            keys[tuple(k.items())] = k
    for k in keys.values():
        dark, flats = _defects_inputs(night, sets, k, mjd, runtime=False)
        if dark is None and not flats:
            continue
        out = defects_path(night, k)
        deps = ([dependency(dark)] if dark else []) + \
            [str((masters_dir(night) / cs.filename).with_suffix(".json")) for cs in flats]
        yield {"name": out.stem, "actions": [(run_defects, [str(night.dir), k])], "file_dep": deps,
               "targets": [str(out)], "uptodate": [DigestUnchanged(digest)], "clean": True,
               "doc": "defects map (hot, dead, weak pixels) from the master dark and flats"}


def run_health(night_dir: str) -> dict:
    """doit action: measure read noise and gain; write masters/health.json; print a table."""
    from ..night import Night
    from ..health import detector_health
    from ..masters import write_sidecar
    night = Night(night_dir)
    _, sets = _load_sets(night)
    res = detector_health(night, sets)
    write_sidecar(masters_dir(night) / "health.json", res)
    for r in res["read_noise"]:
        print(f"health {r['detector']}: read noise {r['measured_e']:.2f} e- "
              f"(profile {r['profile_e']} e-, ratio {r['ratio']:.2f}{'' if r['ok'] else ' OUT OF RANGE'})")
    for r in res["gain"]:
        print(f"health {r['detector']} {r['set']}: gain {r['measured']:.3f} +- {r['uncertainty']:.3f} e-/ADU "
              f"(profile {r['profile']}, ratio {r['ratio']:.2f}{'' if r['ok'] else ' OUT OF RANGE'})")
    if res.get("note"):
        print(f"health: {res['note']}")
    return {"digest": night.digest("calib")}


def run_defects(night_dir: str, key: dict) -> dict:
    """doit action: the defects map of one detector configuration."""
    import numpy as np
    from astropy.io import fits
    from ..fitsio import add_provenance, write_fits
    from ..health import defects
    from ..night import Night
    night = Night(night_dir)
    _, sets = _load_sets(night)
    dark, flats = _defects_inputs(night, sets, key, night_mid_mjd(night), runtime=True)
    flat_paths = [masters_dir(night) / cs.filename for cs in flats]
    maps = defects(night, Path(dark.path) if dark else None, flat_paths)
    prim = fits.Header()
    prim["IMTYPE"] = ("Defects", "bits: 1 hot 2 dead 4 weak 8 nan 16 bright")
    add_provenance(prim, inputs=[(p.name, "") for p in flat_paths],
                   masters=[dark.header_entry()] if dark else [], digest=night.digest("calib"),
                   step="defects")
    hdus = [fits.PrimaryHDU(header=prim)]
    for name, m in maps.items():
        h = fits.Header()
        h["NDEFECT"] = (int(np.count_nonzero(m)), "pixels flagged")
        hdus.append(fits.ImageHDU(m, header=h, name=name))
    out = defects_path(night, key)
    write_fits(fits.HDUList(hdus), out)
    print(f"defects {out.name}: " + ", ".join(f"{n} {int(np.count_nonzero(m))} px" for n, m in maps.items()))
    return {"digest": night.digest("calib")}


@lru_cache(maxsize=1024)
def dependency(ch: MasterChoice) -> str:
    """The file a task depends on for a master choice: tonight's sidecar (always written,
    built or not), or the fallback/pinned master file itself."""
    return str(Path(ch.path).with_suffix(".json")) if ch.origin == "tonight" else ch.path


def master_task(night, sets, cs, digest: str, mjd: float) -> dict:
    """The doit task dict of one calibration set."""
    deps = [str(night.raw_dir / f.file) for f in cs.frames]
    for need in NEEDS[cs.imtype]:
        ch = choose(night, sets, need, cs.key, mjd)
        if ch is not None:
            deps.append(dependency(ch))
    out = masters_dir(night) / cs.filename
    return {
                "name": cs.name,
                "actions": [(run_master, [str(night.dir), cs.name])],
                "file_dep": deps,
                "targets": [str(out.with_suffix(".json"))],
                "uptodate": [DigestUnchanged(digest)],
                "clean": [(remove_master, [str(out)])],
                "doc": f"master {cs.imtype} from {len(cs.frames)} frames",
            }


def remove_master(path: str) -> None:
    """doit clean action: remove a master and its sidecar from the night directory."""
    for p in (Path(path), Path(path).with_suffix(".json")):
        if p.exists():
            p.unlink()
