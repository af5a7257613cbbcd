"""The master sky of a night: which frames make it, its file, and its use by the s step.

Optional, per profile or night (``[sky] master``): a filter's dithered science frames,
flat-fielded (the products the s step reads), combined with their sources masked into a
normalised master sky that corrects the flat's illumination error and the fringes
(:mod:`reducer.ops.mastersky` has the algorithm).  One master per filter, or per target and
filter with ``master_per_target = true``, in ``<night>/mastersky/``.

Freezing (a whole-night product must not make every new frame rebuild every earlier one):
the inputs are the group's first ``master_frames`` usable science frames in time order.
Until that many have arrived, each new frame rebuilds the master and the s step of the
frames already done (it gets better as the night goes on); from then on the master is
frozen, later frames are corrected with it and rebuild nothing.  Below
``master_min_frames`` there is no master: those frames are sky-subtracted without it and
say why in their header (``MSKYWHY``); they are redone once the master exists.  A master
rebuilt with byte-identical content (e.g. after ``doit redo`` of a target that fed it) is not
rewritten, so nothing downstream of it rebuilds.

Settings (``[sky]``): ``master`` (list of "illumination", "fringe"; empty = off),
``master_filters`` (empty = every filter), ``master_per_target``, ``master_frames`` (7),
``master_min_frames`` (3), ``master_nsigma`` (3.0), ``master_box`` [px] (the illumination
mesh, default the sky's ``box``), ``fringe_sigma`` [px] (1.0).
"""
from __future__ import annotations

from pathlib import Path

MODES = ("illumination", "fringe")
#: extensions of a master-sky file per detector (after the normalised sky itself)
_SUFFIXES = ("_UNC", "_CNT", "_ILLUM", "_FRINGE", "_FRUNC")


from .config import SettingsError


class MasterSkySettingsError(SettingsError):
    """The ``[sky]`` master-sky settings are invalid."""


def master_settings(night) -> dict:
    """The ``[sky]`` master-sky settings with their defaults, checked.

    Raises
    ------
    MasterSkySettingsError
        A mode that is not "illumination" or "fringe", or counts that make no sense.
    """
    opts = night.settings.get("sky", {})
    modes = opts.get("master", [])
    if isinstance(modes, str):
        modes = [modes] if modes else []
    for m in modes:
        if m not in MODES:
            raise MasterSkySettingsError(f"[sky] master: {m!r} is not one of {', '.join(MODES)}")
    filters = opts.get("master_filters", [])

    def number(key, default, kind):
        value = opts.get(key, default)
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise MasterSkySettingsError(f"[sky] {key}: {value!r} is not a number") from None
    out = {
        "modes": [m for m in MODES if m in modes],
        "filters": [filters] if isinstance(filters, str) else list(filters),
        "per_target": bool(opts.get("master_per_target", False)),
        "frames": number("master_frames", 7, int),
        "min_frames": number("master_min_frames", 3, int),
        "nsigma": number("master_nsigma", 3.0, float),
        "box": number("master_box", opts.get("box", 64), int),
        "fringe_sigma": number("fringe_sigma", 1.0, float),
    }
    if out["min_frames"] < 2 or out["frames"] < out["min_frames"]:
        raise MasterSkySettingsError(
            f"[sky] needs 2 <= master_min_frames <= master_frames, got {out['min_frames']} and "
            f"{out['frames']}")
    return out


def mastersky_path(night_dir, filt: str, target: str | None = None, layout: str = "") -> Path:
    """``<night>/mastersky/mastersky_<filter>.fits`` (``..._<TARGET>_<filter>.fits`` per target;
    ``layout``, e.g. ``2x2_1024x1024``, appended for frames other than unbinned full frames)."""
    from .inventory import safe_name
    name = f"{target}_{safe_name(filt)}" if target else safe_name(filt)
    if layout:
        name += f"_{safe_name(layout)}"
    return Path(night_dir) / "mastersky" / f"mastersky_{name}.fits"


def mastersky_name(path) -> str:
    """The name of a master sky (``i``, ``FIELD-A_i`` ...): its task name, report label."""
    return Path(path).stem[len("mastersky_"):]


def plan(night, frames, product_of) -> tuple[dict, dict]:
    """Which master sky each frame's s step uses, and the masters to build.

    Parameters
    ----------
    night : Night
    frames : list of inventory frames
        The usable science and standard frames of the night.
    product_of : callable
        ``frame -> Path or None``: the product the frame's s step reads (None when the
        frame has no s step).

    Returns
    -------
    masters : dict
        master path -> list of (frame, input product path), the frozen inputs.
    use : dict
        raw file name -> (master path or None, reason when None).
    """
    cfg = master_settings(night)
    if not cfg["modes"]:
        return {}, {}
    groups: dict = {}
    for f in frames:
        if cfg["filters"] and f.filter not in cfg["filters"]:
            continue
        src = product_of(f)
        if src is None:
            continue
        # frames of another binning or window cannot be combined with these
        key = (f.filter, f.target if cfg["per_target"] else None, f.binning, f.shape)
        groups.setdefault(key, []).append((f, src))
    layouts: dict = {}
    for filt, target, binning, shape in groups:
        layouts.setdefault((filt, target), []).append((binning, shape))
    masters, use = {}, {}
    for (filt, target, binning, shape), members in sorted(
            groups.items(), key=lambda kv: tuple(v or "" for v in kv[0])):
        # standards (short, sparse, often not dithered) are corrected, never inputs
        sci = sorted((m for m in members if m[0].type == "science"), key=lambda m: (m[0].mjd, m[0].file))
        chosen = sci[:cfg["frames"]]
        label = f"{filt}" + (f" of {target}" if target else "") + (
            f" ({binning})" if binning not in ("", "1x1") else "")
        if len(chosen) < cfg["min_frames"]:
            why = (f"no master sky in {label} yet: {len(chosen)} of {cfg['min_frames']} "
                   "science frames needed")
            for f, _ in members:
                use[f.file] = (None, why)
            continue
        # the usual layout keeps the plain name; others (binned, windowed) say theirs
        plain = binning in ("", "1x1") and len({sh for b, sh in layouts[(filt, target)]
                                                 if b in ("", "1x1")}) <= 1
        path = mastersky_path(night.dir, filt, target, "" if plain else f"{binning}_{shape}")
        masters[path] = chosen
        for f, _ in members:
            use[f.file] = (path, "")
    return masters, use


def run_mastersky(night_dir: str, inputs: list, out: str) -> dict:
    """doit action: build one master sky from the flat-fielded products ``inputs``.

    The file is always written (its task's target): when it cannot be made it holds
    ``MSKYOK = F`` and ``MSKYWHY``, and the s step goes on without it.  Content equal to the
    file already there is not rewritten (nothing downstream rebuilds).
    """
    import io
    import numpy as np
    from astropy.io import fits
    from .fitsio import add_provenance, atomic_write_bytes, sha256_file
    from .night import Night
    from .ops.mastersky import combine_master_sky, frame_sky
    from .products import read_product
    from .stepconfig import step_digest
    night = Night(night_dir)
    cfg = master_settings(night)
    name = Path(out).stem
    frames, used, left = [], [], []
    mjds = []
    for p in inputs:
        prod = read_product(Path(p))
        h = prod.header
        if h.get("FAILED"):
            left.append(f"{Path(p).name}: failed at {h.get('FAILSTEP')}")
            continue
        try:
            frames.append(frame_sky({n: (d.data, d.unc, d.mask) for n, d in prod.detectors.items()},
                                    box=int(night.settings.get("sky", {}).get("box", 64))))
        except ValueError as exc:
            left.append(f"{Path(p).name}: {exc}")
            continue
        used.append(p)
        if h.get("MJD-MID") is not None:
            mjds.append(float(h["MJD-MID"]))
    for why in left:
        print(f"{name}: leaves out {why}")
    prim = fits.Header()
    prim["MSKYMODE"] = (",".join(cfg["modes"]), "what the s step corrects with it")
    prim["NFRAMES"] = (len(used), "frames combined")
    ok = len(used) >= 2
    hdus = [fits.PrimaryHDU(header=prim)]
    if ok:
        try:
            m = combine_master_sky(frames, nsigma=cfg["nsigma"], box=cfg["box"],
                                   fringe_sigma=cfg["fringe_sigma"])
        except ValueError as exc:
            ok, why = False, str(exc)
    else:
        why = f"{len(used)} usable frame(s), 2 needed"
    prim["MSKYOK"] = (ok, "master sky usable")
    if ok:
        if mjds:
            prim["MINMJD"] = (min(mjds), "first input MJD-MID")
            prim["MAXMJD"] = (max(mjds), "last input MJD-MID")
        prim["MSKYEMPT"] = (round(m.empty_fraction, 5), "fraction of pixels with no frame")
        prim["MSKYLVLS"] = (" ".join(f"{v:.1f}" for v in m.levels), "[e-] input sky levels")
        prim["NSIGMA"] = (cfg["nsigma"], "clipping half-width")
        prim["FRNGSIG"] = (cfg["fringe_sigma"], "[px] fringe map smoothing")
        if m.empty_fraction > 0.01:
            print(f"{name}: {100 * m.empty_fraction:.1f} % of the pixels had a source in every "
                  "frame (not dithered?): filled from their surroundings")
        for n in m.sky:
            for ext, arr, unit in (("", m.sky[n], ""), ("_UNC", m.unc[n], ""), ("_CNT", m.cnt[n], ""),
                                   ("_ILLUM", m.illum[n], ""), ("_FRINGE", m.fringe[n], ""),
                                   ("_FRUNC", m.fringe_unc[n], "")):
                hdus.append(fits.ImageHDU(np.asarray(arr), name=f"{n}{ext}"))
    else:
        prim["MSKYWHY"] = (why[:60], "why there is no master sky")
        print(f"{name}: no master sky: {why}")
    add_provenance(prim, inputs=[(Path(p).name, sha256_file(Path(p))) for p in used],
                   digest=step_digest(night, "sky"), step="mastersky")
    hdus[0] = fits.PrimaryHDU(header=prim)
    new = fits.HDUList(hdus)
    target = Path(out)
    if target.is_file() and _same_master(target, new):
        print(f"{name}: unchanged ({len(used)} frames)")
    else:
        buf = io.BytesIO()
        new.writeto(buf, checksum=True)
        atomic_write_bytes(target, buf.getvalue())
        if ok:
            print(f"{name}: {len(used)} frames, {cfg['modes']}")
    return {"digest": step_digest(night, "sky")}


def _same_master(path: Path, new) -> bool:
    """Whether the file holds the same master: the same pixels and header values, apart
    from the checksum cards (their comments carry the time of writing) and the inputs'
    checksums (inputs rebuilt with the same pixels have other checksum times)."""
    import numpy as np
    from astropy.io import fits
    skip = ("CHECKSUM", "DATASUM")
    with fits.open(path, memmap=False) as old:
        if len(old) != len(new):
            return False
        for a, b in zip(old, new):
            ka = [k for k in a.header if k not in skip and not k.startswith("INSUM")]
            kb = [k for k in b.header if k not in skip and not k.startswith("INSUM")]
            if ka != kb or any(a.header[k] != b.header[k] for k in ka):
                return False
            if (a.data is None) != (b.data is None):
                return False
            if a.data is not None and not np.array_equal(a.data, b.data, equal_nan=True):
                return False
    return True


def load_master_sky(path):
    """The :class:`~reducer.ops.mastersky.MasterSky` in a master-sky file, or (None, why)."""
    from astropy.io import fits
    from .ops.mastersky import MasterSky
    with fits.open(path, memmap=False) as h:
        prim = h[0].header
        if not prim.get("MSKYOK"):
            return None, f"{Path(path).name}: {prim.get('MSKYWHY', 'not usable')}"
        names = [x.name for x in h[1:] if not x.name.endswith(_SUFFIXES)]
        get = {n: {ext: h[f"{n}{ext}"].data for ext in ("",) + _SUFFIXES}
               for n in names}
        levels = tuple(float(v) for v in str(prim.get("MSKYLVLS", "")).split())
        return MasterSky(sky={n: g[""] for n, g in get.items()}, unc={n: g["_UNC"] for n, g in get.items()},
                         cnt={n: g["_CNT"] for n, g in get.items()},
                         illum={n: g["_ILLUM"] for n, g in get.items()},
                         fringe={n: g["_FRINGE"] for n, g in get.items()},
                         fringe_unc={n: g["_FRUNC"] for n, g in get.items()},
                         levels=levels, empty_fraction=float(prim.get("MSKYEMPT", 0.0))), ""
