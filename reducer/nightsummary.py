"""What a night's reports need, collected from headers, sidecars and the night log.

Nothing here reads pixels: a frame's numbers come from the primary header of its last
product (read with a small standard-library FITS header reader, so collecting 500 frames
takes a fraction of a second and imports no astropy), a stack's from its JSON, a master's
from its sidecar JSON, and what was set aside from ``nightlog.ecsv``.

Keywords read from a frame's last product (written by :mod:`reducer.steps`):

========  ==========================================================
DATE-OBS  UTC start (the night log's value when the product has none)
FWHM      [arcsec] median stellar FWHM (t step)
SKYLEVEL  [e-/px] sky level subtracted (s step)
SKYRMS    [e-] sky noise per pixel (s step)
PHOTZP    [mag] zero point, ``m = -2.5 log10(e-/s) + PHOTZP`` (t step)
PHOTZPER  [mag] its uncertainty;  PHOTNSTR stars used
MAGLIM    [mag] 5-sigma limiting magnitude, when a step writes one
QUALFLAG  / QUALWHY: good for stacks, or why not (t step)
FAILED    / FAILSTEP / FAILWHY: the frame did not go through the chain
M<ROLE>   / M<ROLE>OR: masters used and their origin (``tonight``, ``pinned``,
          ``fallback from YYYYMMDD, A.A d before``)
========  ==========================================================

**5-sigma limiting magnitude** (when the product has no ``MAGLIM``): the magnitude of a
point source measured at 5 sigma in a circular aperture of radius ``r = 0.6731 FWHM``
(1.585 sigma of a Gaussian PSF: the radius that maximises the signal-to-noise ratio of a
background-limited source; it holds ``f = 1 - 2**(-4 * 0.6731**2) = 0.715`` of the flux),
with the sky noise per pixel ``SKYRMS`` (e-, read noise included) as the only noise::

    N     = pi r**2                                   [px]
    F_lim = 5 * SKYRMS * sqrt(N) / f                  [e-]
    m_lim = PHOTZP - 2.5 log10(F_lim / EXPTIME)       [mag]

A stack of frames weighted by inverse variance reaches
``m_stack = 1.25 log10(sum_i 10**(0.8 m_i))`` (``m + 1.25 log10 N`` for N equal frames).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

#: chain steps in order (one letter each; a product's prefix is the reversed letters applied)
_STEPS = "pfszat"
#: optimal aperture radius for a background-limited Gaussian source, in FWHM
APERTURE_FWHM = 0.6731
#: fraction of a Gaussian's flux inside that radius
APERTURE_FRACTION = 1.0 - 2.0 ** (-4.0 * APERTURE_FWHM ** 2)

SCIENCE_TYPES = ("science", "standard")


# --------------------------------------------------------------------------- FITS headers
class HeaderError(ValueError):
    """A product's primary header cannot be read; the message names the file."""


def _card_value(text: str):
    s = text.lstrip()
    if s.startswith("'"):
        out, i = [], 1
        while i < len(s):
            if s[i] == "'":
                if i + 1 < len(s) and s[i + 1] == "'":
                    out.append("'")
                    i += 2
                    continue
                break
            out.append(s[i])
            i += 1
        return "".join(out).rstrip()
    v = s.split("/", 1)[0].strip()
    if v == "T":
        return True
    if v == "F":
        return False
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v.replace("D", "E"))
    except ValueError:
        return v


def read_primary_header(path) -> dict:
    """Keyword values of a FITS file's primary header (standard library only).

    Parameters
    ----------
    path : path-like
        An uncompressed FITS file.

    Returns
    -------
    dict
        Keyword -> value (str, bool, int, float or None); COMMENT/HISTORY are left out and
        long strings continued with CONTINUE cards are joined.

    Raises
    ------
    HeaderError
        The file is unreadable, not FITS, or its header has no END card.
    """
    cards: dict = {}
    last = None
    try:
        with open(path, "rb") as fh:
            first = True
            while True:
                block = fh.read(2880)
                if len(block) < 2880:
                    raise HeaderError(f"{path}: FITS header ends before its END card")
                if first and not block.startswith(b"SIMPLE  ="):
                    raise HeaderError(f"{path}: not a FITS file")
                first = False
                for i in range(0, 2880, 80):
                    card = block[i:i + 80].decode("ascii", "replace")
                    key = card[:8].strip()
                    if key == "END":
                        return cards
                    if key == "CONTINUE" and last and isinstance(cards.get(last), str) \
                            and cards[last].endswith("&"):
                        more = _card_value(card[8:])
                        cards[last] = cards[last][:-1] + (more if isinstance(more, str) else "")
                        continue
                    if card[8:10] != "= ":
                        continue
                    cards[key] = _card_value(card[10:])
                    last = key
    except OSError as exc:
        raise HeaderError(f"{path}: cannot read: {exc.strerror}") from None


def _num(v) -> float:
    """A header value as a float (NaN for missing, text or booleans)."""
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- limits
def limiting_mag(zp: float, sky_rms_e: float, fwhm_arcsec: float, pixel_scale: float,
                 exptime: float, nsigma: float = 5.0) -> float:
    """Limiting magnitude of a point source (see the module docstring for the formula).

    Parameters
    ----------
    zp : float
        Zero point [mag] for fluxes in e-/s.
    sky_rms_e : float
        Sky noise per pixel [e-].
    fwhm_arcsec : float
        Stellar FWHM [arcsec].
    pixel_scale : float
        [arcsec/px].
    exptime : float
        Exposure time [s].
    nsigma : float
        Detection significance.

    Returns
    -------
    float
        [mag]; NaN when any input is missing or not positive.
    """
    vals = (zp, sky_rms_e, fwhm_arcsec, pixel_scale, exptime)
    if not all(_finite(v) for v in vals) or min(sky_rms_e, fwhm_arcsec, pixel_scale, exptime) <= 0:
        return math.nan
    r = APERTURE_FWHM * fwhm_arcsec / pixel_scale
    flux = nsigma * sky_rms_e * math.sqrt(math.pi) * r / APERTURE_FRACTION
    return zp - 2.5 * math.log10(flux / exptime)


def combined_limit(mags) -> float:
    """Limiting magnitude of an inverse-variance weighted stack of frames with limits ``mags``."""
    good = [m for m in mags if _finite(m)]
    if not good:
        return math.nan
    top = max(good)
    return top + 1.25 * math.log10(sum(10 ** (0.8 * (m - top)) for m in good))


# --------------------------------------------------------------------------- records
@dataclass
class FrameSummary:
    """One science or standard frame: night-log values and its last product's numbers."""

    file: str
    kind: str                 # 'science' | 'standard'
    object: str
    target: str
    filter: str
    date_obs: str
    mjd: float
    exptime: float
    airmass: float
    product: str = ""         # path of the last product, relative to the night directory
    status: str = "pending"   # 'ok' | 'rejected' | 'failed' | 'pending'
    fwhm: float = math.nan    # arcsec
    sky: float = math.nan     # e-/px
    sky_rms: float = math.nan  # e-/px
    zp: float = math.nan
    zp_err: float = math.nan
    relative: bool = False    # zp relative to the target's reference frame (no catalogue)
    nstars: int = 0
    lim5: float = math.nan
    why: str = ""             # QUALWHY, or "<step>: <FAILWHY>"
    masters: list = field(default_factory=list)   # [(role, file, origin text)]

    @property
    def ut(self) -> str:
        """``HH:MM:SS`` of the start (UTC)."""
        return self.date_obs[11:19] if len(self.date_obs) >= 19 else self.date_obs

    @property
    def sky_rate(self) -> float:
        """Sky level [e-/s/px]."""
        return self.sky / self.exptime if _finite(self.sky) and _finite(self.exptime) and self.exptime > 0 \
            else math.nan


@dataclass
class StackSummary:
    """A stack (target and filter) from its JSON."""

    name: str
    target: str
    filter: str
    nframes: int = 0
    exptime_total: float = 0.0
    mag: float = math.nan
    mag_err: float = math.nan
    calibrated: bool = False
    relative: bool = False    # magnitude relative to the target's reference frame
    reason: str = ""
    inputs: list = field(default_factory=list)
    left_out: list = field(default_factory=list)   # [(file, reason)]
    fits: str = ""            # relative path of the stack image, "" when none
    xy: tuple = ()            # zero-based pixel position of the target in the stack


@dataclass
class MasterSummary:
    """A master built (or attempted) tonight, from its sidecar."""

    name: str                 # calibration set
    imtype: str
    file: str                 # relative path of the master FITS ("" when not built)
    built: bool
    nframes: int
    night: str
    passed: bool
    failed: list
    checks: list
    reason: str = ""
    key: dict = field(default_factory=dict)
    masters_used: dict = field(default_factory=dict)


@dataclass
class MasterUse:
    """A master as used by the night's frames and masters."""

    role: str
    file: str
    origin: str               # 'tonight' | 'fallback' | 'pinned' | other text
    night: str = ""
    age_days: float = 0.0
    users: int = 0


@dataclass
class SetAside:
    """A raw frame the night log sets aside (inventory or night.toml ``drop``)."""

    file: str
    type: str
    object: str
    filter: str
    reason: str
    source: str               # 'inventory' | 'night.toml'


@dataclass
class LightCurve:
    name: str
    ecsv: str
    png: str
    npoints: int


@dataclass
class NightSummary:
    """Everything the reports show about one night."""

    night: str
    instrument: str
    dir: Path
    pixel_scale: float
    frames: list
    stacks: dict              # name -> StackSummary
    masters: list             # MasterSummary built tonight
    uses: list                # MasterUse
    set_aside: list
    ignored: dict             # type -> count of frames of ignored kinds
    lightcurves: list
    problems: list            # one-line notes (unreadable products ...)
    total_frames: int = 0
    final_step: str = "t"     # the profile's last chain step (stacks follow only 't')
    skies: list = field(default_factory=list)   # master skies: one-line texts

    def groups(self) -> list:
        """Frames by (target, filter), in order of first start time: [(key, [frames])]."""
        out: dict = {}
        for f in sorted(self.frames, key=lambda f: (f.mjd if _finite(f.mjd) else 1e9, f.file)):
            out.setdefault((f.target, f.filter), []).append(f)
        return list(out.items())


# --------------------------------------------------------------------------- collecting
def _valid_prefixes() -> set:
    """Every cumulative prefix a product can have (``p``, ``fp``, ``zp``, ``tazsfp`` ...)."""
    out = set()
    rest = _STEPS[1:]
    for mask in range(1 << len(rest)):
        pre = "p"
        for i, s in enumerate(rest):
            if mask & (1 << i):
                pre = s + pre
        out.add(pre)
    return out


_PREFIXES = _valid_prefixes()


def _stem(filename: str) -> str:
    from .products import raw_stem
    return raw_stem(filename)


def _names(folder: Path) -> set:
    """Names of the files in a folder (empty when it does not exist)."""
    try:
        return {e.name for e in os.scandir(folder)}
    except OSError:
        return set()


def last_product(names: set, stem: str) -> str | None:
    """The name of a frame's last product among ``names`` (the longest prefix present)."""
    best = None
    for pre in _PREFIXES:
        n = f"{pre}{stem}.fits"
        if n in names and (best is None or len(n) > len(best)):
            best = n
    return best


def _split_prefix(base: str) -> tuple[str, str]:
    """(product prefix, raw stem) of a product's name without ``.fits``; ("", base) when it
    has no prefix."""
    for n in range(min(6, len(base) - 1), 0, -1):
        if base[:n] in _PREFIXES:
            return base[:n], base[n:]
    return "", base


def _last_step(profile_steps) -> str:
    steps = [s for s in _STEPS if s in profile_steps] or ["p"]
    return steps[-1]


_FALLBACK = re.compile(r"fallback from (\d{8}), ([\d.]+) d (before|after)")


def _masters_of(h: dict) -> list:
    out = []
    for role in ("bias", "dark", "flat", "arc"):
        key = f"M{role[:6].upper()}"
        if isinstance(h.get(key), str):
            out.append((role, h[key], str(h.get(f"{key[:6]}OR", ""))))
    return out


def _use_from_text(role: str, file: str, origin: str, utdate: str) -> MasterUse:
    m = _FALLBACK.search(origin)
    if m:
        age = float(m.group(2)) * (1 if m.group(3) == "before" else -1)
        return MasterUse(role, file, "fallback", m.group(1), age)
    if origin == "tonight":
        return MasterUse(role, file, "tonight", utdate, 0.0)
    return MasterUse(role, file, origin or "unknown", "", 0.0)


def frame_summary(fr, product: Path | None, rel: str, pixel_scale: float, final_step: str) -> tuple:
    """A :class:`FrameSummary` of one night-log row and its last product (or ``None``).

    Returns (summary, problem text or "").
    """
    s = FrameSummary(fr.file, fr.type, fr.object, fr.target, fr.filter, fr.date_obs, fr.mjd,
                     fr.exptime, fr.airmass)
    if product is None:
        return s, ""
    try:
        h = read_primary_header(product)
    except HeaderError as exc:
        s.status = "failed"
        s.why = f"unreadable product: {exc}"
        return s, str(exc)
    s.product = rel
    s.masters = _masters_of(h)
    if h.get("FAILED"):
        s.status = "failed"
        s.why = f"{h.get('FAILSTEP', '?')}: {h.get('FAILWHY', '')}"
        return s, ""
    s.fwhm = _num(h.get("FWHM"))
    s.sky = _num(h.get("SKYLEVEL"))
    s.sky_rms = _num(h.get("SKYRMS"))
    if h.get("PHOTCAL", True) is not False or h.get("PHOTREL"):
        s.zp, s.zp_err = _num(h.get("PHOTZP")), _num(h.get("PHOTZPER"))
        s.relative = bool(h.get("PHOTREL"))
    s.nstars = int(_num(h.get("PHOTNSTR")) if _finite(_num(h.get("PHOTNSTR"))) else 0)
    if isinstance(h.get("AIRMASS"), (int, float)) and not _finite(s.airmass):
        s.airmass = float(h["AIRMASS"])
    lim = _num(h.get("MAGLIM"))
    s.lim5 = lim if _finite(lim) else limiting_mag(s.zp, s.sky_rms, s.fwhm, pixel_scale,
                                                    _num(h.get("EXPTIME", fr.exptime)))
    if h.get("QUALFLAG") is False:
        s.status = "rejected"
        s.why = str(h.get("QUALWHY", "quality limits"))
    elif Path(rel).name[0] != final_step:
        s.status = "pending"
        s.why = f"last product so far: {Path(rel).name}"
    else:
        s.status = "ok"
    return s, ""


def _stack_summaries(ndir: Path) -> dict:
    out = {}
    sdir = ndir / "stacks"
    if not sdir.is_dir():
        return out
    for p in sorted(sdir.glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            out[p.stem] = StackSummary(p.stem, "", "", reason=f"unreadable {p.name}")
            continue
        target, _, filt = p.stem.rpartition("_")
        st = StackSummary(p.stem, str(d.get("target") or target), str(d.get("filter") or filt),
                          int(d.get("nframes", 0)), float(d.get("exptime_total", 0.0)))
        if "mag" in d:
            # "calibrated": False with "relative": True: scaled to the target's reference
            # frame (no catalogue; reducer.fieldref)
            st.mag, st.calibrated = float(d["mag"]), bool(d.get("calibrated", True))
            st.relative = bool(d.get("relative", False))
        elif "mag_inst" in d:
            st.mag = float(d["mag_inst"])
        if "mag_err" in d:
            st.mag_err = float(d["mag_err"])
        st.reason = str(d.get("reason", ""))
        st.inputs = list(d.get("inputs", []))
        st.left_out = [tuple(x) for x in d.get("left_out", [])]
        if _finite(d.get("x")) and _finite(d.get("y")):
            st.xy = (float(d["x"]), float(d["y"]))
        if p.with_suffix(".fits").is_file():
            st.fits = str(p.with_suffix(".fits").relative_to(ndir))
        out[p.stem] = st
    return out


def _master_summaries(ndir: Path) -> list:
    out = []
    mdir = ndir / "masters"
    if not mdir.is_dir():
        return out
    for p in sorted(mdir.glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(d, dict) or "imtype" not in d:
            continue            # health.json and other sidecars
        ver = d.get("verification", {}) or {}
        fitsp = p.with_suffix(".fits")
        out.append(MasterSummary(
            name=str(d.get("set", p.stem)), imtype=str(d["imtype"]),
            file=str(fitsp.relative_to(ndir)) if fitsp.is_file() else "",
            built=bool(d.get("built", False)), nframes=int(d.get("nframes", len(d.get("inputs", [])))),
            night=str(d.get("night", "")), passed=bool(ver.get("passed", False)),
            failed=list(ver.get("failed", [])), checks=list(ver.get("checks", [])),
            reason=str(d.get("reason", "")), key=dict(d.get("key", {})),
            masters_used=dict(d.get("masters_used", {}))))
    return out


def _lightcurves(ndir: Path) -> list:
    out = []
    ldir = ndir / "lightcurves"
    if not ldir.is_dir():
        return out
    for p in sorted(ldir.glob("*.ecsv")):
        try:
            lines = [ln for ln in p.read_text().splitlines() if ln and not ln.startswith("#")]
        except OSError:
            continue
        png = p.with_suffix(".png")
        out.append(LightCurve(p.stem, str(p.relative_to(ndir)),
                              str(png.relative_to(ndir)) if png.is_file() else "",
                              max(len(lines) - 1, 0)))
    return out


def collect(night) -> NightSummary:
    """Collect a night's summary (headers, sidecars and night log only; no pixels).

    Parameters
    ----------
    night : reducer.night.Night

    Returns
    -------
    NightSummary
    """
    from .instruments import IGNORED_TYPES
    from .inventory import read_nightlog
    ndir = night.dir
    profile = night.profile
    scale = float(profile.table("wcs").get("pixel_scale", math.nan))
    final = _last_step(profile.steps)
    frames = read_nightlog(night.nightlog) if night.nightlog.is_file() else []
    drop = set(night.settings.get("drop", []))
    summaries, aside, ignored, problems = [], [], {}, []
    products: dict = {}
    for fr in frames:
        if fr.reason:
            src = "night.toml" if (fr.file in drop and fr.reason == "dropped in night.toml") else "inventory"
            aside.append(SetAside(fr.file, fr.type, fr.object, fr.filter, fr.reason, src))
            continue
        if fr.type in IGNORED_TYPES:
            ignored[fr.type] = ignored.get(fr.type, 0) + 1
            continue
        if fr.type not in SCIENCE_TYPES or not fr.usable:
            continue
        if fr.target not in products:
            products[fr.target] = _names(ndir / fr.target)
        hit = last_product(products[fr.target], _stem(fr.file))
        path = ndir / fr.target / hit if hit else None
        rel = f"{fr.target}/{hit}" if hit else ""
        s, problem = frame_summary(fr, path, rel, scale, final)
        if problem:
            problems.append(problem)
        summaries.append(s)
    masters = _master_summaries(ndir)
    uses = master_uses(summaries, masters, night.utdate)
    return NightSummary(night.utdate, profile.name, ndir, scale, summaries, _stack_summaries(ndir),
                        masters, uses, aside, ignored, _lightcurves(ndir), problems,
                        total_frames=len(frames), final_step=final, skies=_master_skies(ndir))


def _master_skies(ndir: Path) -> list:
    """One line per master sky of the night (``[sky] master``): frames, corrections, holes,
    or why it could not be made."""
    from astropy.io import fits
    from .mastersky import mastersky_name
    out = []
    for p in sorted((ndir / "mastersky").glob("mastersky_*.fits")):
        try:
            h = fits.getheader(p)
        except OSError as exc:
            out.append(f"{mastersky_name(p)}: unreadable ({exc})")
            continue
        if not h.get("MSKYOK"):
            out.append(f"{mastersky_name(p)}: NOT BUILT: {h.get('MSKYWHY', '')}")
            continue
        out.append(f"{mastersky_name(p)}: {h.get('NFRAMES')} frames, corrects {h.get('MSKYMODE', '')}, "
                   f"{100 * float(h.get('MSKYEMPT', 0.0)):.1f} % of pixels with no frame")
    return out


def master_uses(frames, masters, utdate: str) -> list:
    """The masters the night used (by its frames, and by tonight's masters), one entry per file."""
    uses: dict = {}
    for f in frames:
        for role, file, origin in f.masters:
            u = uses.get((role, file))
            if u is None:
                u = uses[(role, file)] = _use_from_text(role, file, origin, utdate)
            u.users += 1
    for m in masters:
        for role, ch in m.masters_used.items():
            file = Path(ch.get("path", "")).name
            u = uses.get((role, file))
            if u is None:
                u = uses[(role, file)] = MasterUse(role, file, str(ch.get("origin", "")),
                                                   str(ch.get("night", "")),
                                                   float(ch.get("age_days", 0.0)))
            u.users += 1
    order = {"bias": 0, "dark": 1, "flat": 2, "arc": 3}
    return sorted(uses.values(), key=lambda u: (order.get(u.role, 9), u.file))


# --------------------------------------------------------------------------- timing and disk
def task_timing(night_dir) -> dict | None:
    """Time spent per step from ``<night>/logs/tasks.jsonl`` (the progress reporter's log).

    Returns
    -------
    dict or None
        ``{"runs": n, "steps": [{"step", "tasks", "seconds", "failed"}], "total": s}`` over
        every recorded run (tasks up to date or ignored count as tasks, not as time); ``None``
        when there is no log.
    """
    p = Path(night_dir) / "logs" / "tasks.jsonl"
    if not p.is_file():
        return None
    steps: dict = {}
    runs = set()
    bad = 0
    with open(p) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(r, dict):
                bad += 1
                continue
            runs.add(r.get("run", ""))
            step = str(r.get("step") or str(r.get("task", "?")).split(":", 1)[0])
            e = steps.setdefault(step, {"step": step, "tasks": 0, "seconds": 0.0, "failed": 0})
            e["tasks"] += 1
            if r.get("status") in ("ok", "fail"):
                e["seconds"] += float(r.get("seconds") or 0.0)
            if r.get("status") == "fail":
                e["failed"] += 1
    rows = sorted(steps.values(), key=lambda e: -e["seconds"])
    return {"runs": len(runs), "steps": rows, "total": sum(e["seconds"] for e in rows),
            "bad_lines": bad}


def _tree_size(path: Path) -> tuple[int, int]:
    total, n = 0, 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
                n += 1
            except OSError:
                pass
    return total, n


def disk_usage(night_dir, targets) -> list:
    """Bytes used in the night directory: products by prefix, masters, stacks, the rest.

    Returns
    -------
    list of (what, nfiles, bytes)
    """
    ndir = Path(night_dir)
    by_prefix: dict = {}
    for t in sorted(set(targets)):
        try:
            entries = list(os.scandir(ndir / t))
        except OSError:
            continue
        for e in entries:
            if not e.name.endswith(".fits"):
                continue
            pre = _split_prefix(e.name[:-5])[0] or "other"
            n, b = by_prefix.get(pre, (0, 0))
            by_prefix[pre] = (n + 1, b + e.stat().st_size)
    order = {p: i for i, p in enumerate(["p", "fp", "sfp", "zsfp", "azsfp", "tazsfp"])}
    rows = [(f"products {p}*", n, b) for p, (n, b) in
            sorted(by_prefix.items(), key=lambda kv: (order.get(kv[0], 99), kv[0]))]
    for sub in ("masters", "stacks", "lightcurves", "finalreport", "logs"):
        if (ndir / sub).is_dir():
            b, n = _tree_size(ndir / sub)
            rows.append((sub, n, b))
    return rows
