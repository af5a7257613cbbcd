"""Step 1 of a night: scan ``raw/``, type every frame by the profile, write ``nightlog.ecsv``.

Headers only are read (fast). Every frame of the night gets one row; a frame that cannot be
used is kept in the log with ``type = 'unusable'`` (or its ignored kind) and a one-line
``reason``. Frames still being written are left out until a later run. Frames of other
nights in the same raw folder are not this night's and are not listed. Nothing is written
into the raw folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .headers import (FrameError, FrameIncomplete, RawHeaders, _card_value, parse_angle,
                      parse_datetime, parse_number, read_headers)
from .instruments import IGNORED_TYPES, Profile, classify, instrument_mismatch
from .nights import night_of

#: columns of nightlog.ecsv, in order
COLUMNS = ("file", "type", "subtype", "object", "target", "filter", "exptime", "date_obs",
           "mjd", "night", "airmass", "binning", "readout", "shape", "ndet", "ra", "dec", "rule", "reason")

RAW_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".fits.gz", ".fit.gz", ".fts.gz",
                ".fits.z", ".fts.z", ".fit.z", ".fits.bz2", ".fit.bz2")


def is_candidate(path: Path) -> bool:
    """True for a file the inventory looks at.

    Any non-hidden regular file whose name ends like a FITS file (``.fits``, ``.fit``,
    ``.fts``, compressed ``.gz``/``.fz``/``.Z``/``.bz2`` forms) or whose first bytes are a FITS
    header. Other files (``README``, logs) are not frames and are not listed.
    """
    if not path.is_file() or path.name.startswith("."):
        return False
    if path.name.lower().endswith(RAW_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(9) == b"SIMPLE  ="
    except OSError:
        return False


def safe_name(text: str) -> str:
    """A target name safe for file names and doit task names.

    Keeps ASCII letters, digits, ``+``, ``-`` and ``_`` (accented letters lose their accents),
    maps the rest (``.``, ``/``, spaces, quotes, ``<>`` ...) to ``_``, collapses repeats, strips
    ``_`` at both ends and never is empty. ``'M 81'`` -> ``'M_81'``; ``'../etc'`` -> ``'etc'``.
    """
    import unicodedata
    t = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    out = []
    for ch in t.strip():
        out.append(ch if (ch.isalnum() or ch in "+-_") else "_")
    s = "".join(out)
    while "__" in s:
        s = s.replace("__", "_")
    s = s.strip("_.")
    return s or "unnamed"


#: names a target must not take: folders and files of the night directory
RESERVED_NAMES = frozenset({"raw", "masters", "stacks", "lightcurves", "logs", "finalreport",
                            "unnamed_frames", "dodo_py", "night_toml", "nightlog_ecsv",
                            "report_txt", "finalreport_txt", "finalreport_html"})
MAX_TARGET_LEN = 64


def target_name(obj: str) -> str:
    """The target name of an OBJECT value: its folder under the night directory and its doit
    task name (``science:<name>``).

    :func:`safe_name`, and besides: a name left empty by dropping non-ASCII characters gets a
    short digest of the OBJECT (so two such targets stay apart), a name of one of the night
    directory's own folders (``raw``, ``masters``, ``stacks`` ...; any case) gets
    ``_target`` appended, and a name longer than 64 characters is cut with a digest.
    ``'../../etc/passwd'`` -> ``'etc_passwd'``; ``'天体'`` -> ``'object_b696d980'``;
    ``'raw'`` -> ``'raw_target'``.
    """
    import hashlib
    obj = str(obj).strip()
    if not obj:
        return "unnamed"
    digest = hashlib.sha1(obj.encode("utf-8")).hexdigest()[:8]
    name = safe_name(obj)
    if name == "unnamed" and obj.lower() != "unnamed":
        return f"object_{digest}"
    if len(name) > MAX_TARGET_LEN:
        name = f"{name[:MAX_TARGET_LEN - 9]}_{digest}"
    if name.lower() in RESERVED_NAMES:
        name = f"{name}_target"
    return name


def normalise_object(obj: str) -> str:
    """OBJECT normalised for grouping: case-folded, whitespace removed (``'M 81'`` = ``'m81'``)."""
    return "".join(str(obj).split()).lower()


@dataclass
class Frame:
    """One row of the night log."""

    file: str
    type: str = "unusable"
    subtype: str = ""
    object: str = ""
    target: str = ""
    filter: str = ""
    exptime: float = float("nan")
    date_obs: str = ""
    mjd: float = float("nan")
    night: str = ""
    airmass: float = float("nan")
    binning: str = ""
    readout: str = ""
    shape: str = ""
    ndet: int = 0
    ra: float = float("nan")
    dec: float = float("nan")
    rule: str = ""
    reason: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.type not in ("unusable", *IGNORED_TYPES) and not self.reason

    def row(self) -> dict:
        return {c: getattr(self, c) for c in COLUMNS}


def header_getter(raw: RawHeaders, profile: Profile):
    """``get(KEY)``: a keyword's value from the primary header, then the first detector HDU."""
    order = [0]
    try:
        first = raw.hdu_index(profile.detectors[0].hdu)
        if first != 0:
            order.append(first)
    except FrameError:
        order += [i for i in raw.image_hdus() if i != 0][:1]

    def get(key: str):
        for i in order:
            h = raw.headers[i]
            if key in h:
                v = _card_value(h, key)
                if v is None or (isinstance(v, str) and not v.strip()):
                    continue
                return v.strip() if isinstance(v, str) else v
        return None
    return get


def read_field(profile: Profile, get, name: str):
    """Value of a canonical field: the first of its keywords present, times its scale.

    Returns ``(value, keyword)``; ``(None, None)`` when none is present.
    """
    for spec in profile.keywords.get(name, ()):
        v = get(spec.key)
        if v is None:
            continue
        if spec.scale != 1.0:
            v = parse_number(v, spec.key) * spec.scale
        return v, spec.key
    return None, None


def inspect_frame(path: Path, profile: Profile, rel: str | None = None) -> Frame:
    """Read one raw frame's headers and type it.

    Never raises for bad input except :class:`FrameIncomplete` (still arriving): every other
    problem is returned as a :class:`Frame` with ``type='unusable'`` and a ``reason``.
    """
    fr = Frame(file=rel or Path(path).name)
    try:
        raw = read_headers(Path(path))
    except FrameIncomplete:
        raise
    except FrameError as exc:
        fr.reason = str(exc)
        return fr
    get = header_getter(raw, profile)
    try:
        _fill(fr, raw, profile, get, Path(path).name)
    except FrameError as exc:
        fr.type = "unusable"
        fr.reason = str(exc)
    return fr


def _fill(fr: Frame, raw: RawHeaders, profile: Profile, get, filename: str) -> None:
    mismatch = instrument_mismatch(profile, get)
    if mismatch:
        raise FrameError(mismatch)
    # detectors
    shapes = []
    for det in profile.detectors:
        i = raw.hdu_index(det.hdu)
        if raw.shapes[i] is None:
            raise FrameError(f"HDU {det.hdu!r} (detector {det.name}) holds no image")
        shapes.append(raw.shapes[i])
    fr.ndet = len(shapes)
    ny, nx = shapes[0]
    fr.shape = f"{nx}x{ny}"
    # canonical fields
    fields = {}
    for name in ("imagetyp", "object", "filter"):
        v, _ = read_field(profile, get, name)
        fields[name] = "" if v is None else " ".join(str(v).split())
    v, key = read_field(profile, get, "exptime")
    fields["exptime"] = parse_number(v, key or "EXPTIME") if v is not None else None
    fr.object, fr.filter = fields["object"], fields["filter"]
    # time
    dv, dkey = read_field(profile, get, "date_obs")
    tv, _ = read_field(profile, get, "time_obs")
    mv, mkey = read_field(profile, get, "mjd_obs")
    if dv is None and mv is not None:
        from astropy.time import Time
        from .fitsio import astropy_offline
        astropy_offline()
        t = Time(parse_number(mv, mkey), format="mjd", scale="utc").to_datetime(timezone_utc())
    else:
        t = parse_datetime(dv, tv, profile.date_order)
    fr.date_obs = t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    fr.mjd = mjd_of(t)
    fr.night = night_of(t, profile.site)
    # binning
    xb, _ = read_field(profile, get, "xbin")
    yb, _ = read_field(profile, get, "ybin")
    cs, _ = read_field(profile, get, "ccdsum")
    if cs is not None and (xb is None or yb is None):
        parts = str(cs).split()
        if len(parts) == 2:
            xb, yb = parts
    fr.binning = f"{int(parse_number(xb, 'XBIN') or 1)}x{int(parse_number(yb, 'YBIN') or 1)}"
    ro, _ = read_field(profile, get, "readout")
    fr.readout = "" if ro is None else " ".join(str(ro).split())
    am, akey = read_field(profile, get, "airmass")
    if am is not None:
        try:
            fr.airmass = parse_number(am, akey)
        except FrameError:
            pass  # airmass is informative only; a bad one is left blank
    ra, _ = read_field(profile, get, "ra")
    dec, _ = read_field(profile, get, "dec")
    try:
        fr.ra = parse_angle(ra, "ra", profile.ra_unit) if ra is not None else float("nan")
        fr.dec = parse_angle(dec, "dec") if dec is not None else float("nan")
    except FrameError:
        fr.ra = fr.dec = float("nan")  # pointing is optional at this stage
    # type
    typ, sub, rule = classify(profile, fields, filename, get)
    if rule is None:
        raise FrameError(
            f"no type rule matched (type word {fields['imagetyp']!r}, OBJECT {fields['object']!r}, "
            f"EXPTIME {fields['exptime']})")
    fr.type, fr.subtype, fr.rule = typ, sub or "", rule.describe()
    if fields["exptime"] is None:
        fr.reason = "no exposure time (EXPTIME missing or empty)"
        return
    fr.exptime = fields["exptime"]
    if typ in IGNORED_TYPES:
        fr.reason = f"ignored: a {typ} frame"
    if typ in ("science", "standard"):
        fr.target = target_name(object_target(profile, fr.object))


def object_target(profile, obj: str) -> str:
    """The target part of an OBJECT value by the profile's ``[targets] object_pattern``
    (a regular expression with a group named ``target``); the whole value otherwise."""
    import re
    pat = profile.table("targets").get("object_pattern") if hasattr(profile, "table") else None
    if pat:
        m = re.fullmatch(pat, obj.strip())
        if m and m.groupdict().get("target"):
            return m.group("target")
    return obj


def timezone_utc():
    from datetime import timezone
    return timezone.utc


def mjd_of(t: datetime) -> float:
    """MJD (UTC) of an aware datetime, to about a millisecond."""
    epoch = datetime(1858, 11, 17, tzinfo=timezone_utc())
    return (t - epoch).total_seconds() / 86400.0


# --------------------------------------------------------------------------- the scan
@dataclass
class ScanResult:
    frames: list            # Frame of this night (or all, when utdate is None)
    incomplete: list        # file names still arriving
    other_nights: dict      # night -> count of frames of other nights
    signature: str          # digest of the raw folder state seen


def _list_raw(raw_dir: Path) -> list[Path]:
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw folder {raw_dir} does not exist")
    return sorted((p for p in raw_dir.iterdir() if is_candidate(p)), key=lambda p: p.name)


def raw_signature(raw_dir: Path, extra: str = "") -> str:
    """Digest of the raw folder's state: names, sizes and modification times."""
    import hashlib
    h = hashlib.sha256(extra.encode())
    for p in _list_raw(raw_dir):
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def scan_key(cache_key: str, drop) -> str:
    """What besides the raw folder decides a scan's result: settings and dropped frames."""
    return cache_key + "|" + ",".join(sorted(drop))


def scan(raw_dir: Path, profile: Profile, utdate: str | None = None,
         cache_path: Path | None = None, drop=(), cache_key: str = "") -> ScanResult:
    """Inspect every candidate file of ``raw_dir``.

    Parameters
    ----------
    raw_dir : Path
        The raw folder (read only).
    profile : Profile
    utdate : str, optional
        Keep only this night's frames (frames with no usable date are kept, set aside).
    cache_path : Path, optional
        JSON cache of per-file results keyed by (size, mtime); makes a rescan of an unchanged
        folder nearly free. Written atomically; never inside ``raw_dir``.
    drop : iterable of str
        File names the observer dropped in ``night.toml``: kept in the log with a reason.
    cache_key : str
        Invalidates the cache when the profile or inventory settings change.
    """
    raw_dir = Path(raw_dir)
    cache = {}
    if cache_path and Path(cache_path).is_file():
        try:
            loaded = json.loads(Path(cache_path).read_text())
            if loaded.get("key") == cache_key:
                cache = loaded.get("files", {})
        except (OSError, json.JSONDecodeError):
            cache = {}
    new_cache = {}
    frames, incomplete, others = [], [], {}
    drop = set(drop)
    for p in _list_raw(raw_dir):
        st = p.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        hit = cache.get(p.name)
        if hit and hit["stamp"] == stamp:
            row = hit["row"]
            fr = Frame(**row)
        else:
            try:
                fr = inspect_frame(p, profile, p.name)
            except FrameIncomplete:
                incomplete.append(p.name)
                continue
            row = fr.row()
        new_cache[p.name] = {"stamp": stamp, "row": row}
        if utdate and fr.night and fr.night != utdate:
            others[fr.night] = others.get(fr.night, 0) + 1
            continue
        if p.name in drop and not fr.reason:
            fr.reason = "dropped in night.toml"
        frames.append(fr)
    if cache_path:
        from .fitsio import atomic_write_text
        atomic_write_text(Path(cache_path), json.dumps({"key": cache_key, "files": new_cache}))
    sig = raw_signature(raw_dir, scan_key(cache_key, drop))
    return ScanResult(frames, incomplete, others, sig)


def nightlog_table(frames):
    """The night log as an :class:`astropy.table.Table` (one row per frame)."""
    from astropy.table import Table
    import numpy as np
    rows = [f.row() for f in frames]
    t = Table(rows=[[r[c] for c in COLUMNS] for r in rows], names=COLUMNS) if rows else Table(
        names=COLUMNS, dtype=[str, str, str, str, str, str, float, str, float, str, float, str,
                              str, str, int, float, float, str, str])
    for c in ("exptime", "mjd", "airmass", "ra", "dec"):
        t[c] = np.asarray(t[c], dtype=float)
    t["exptime"].unit = "s"
    t["ra"].unit = "deg"
    t["dec"].unit = "deg"
    t.meta["comments"] = ["reducer night log: one row per raw frame of the night",
                          "type 'unusable' or an ignored kind: set aside; reason says why"]
    return t


def write_nightlog(frames, path: Path) -> bool:
    """Write ``nightlog.ecsv`` atomically, only when its content changes.

    Returns True when the file was (re)written, so downstream tasks do not rebuild for an
    unchanged inventory.
    """
    import io
    from .fitsio import atomic_write_text
    buf = io.StringIO()
    nightlog_table(frames).write(buf, format="ascii.ecsv")
    text = buf.getvalue()
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return False
    atomic_write_text(path, text)
    return True


#: read_nightlog's last answer per file: (identity of the file, rows)
_NIGHTLOGS: dict = {}


def read_nightlog(path: Path) -> list[Frame]:
    """Read ``nightlog.ecsv`` back into :class:`Frame` rows.

    ECSV is a space-delimited CSV under a ``#`` YAML header; it is parsed here with the
    standard library (no astropy import), so making a night's tasks stays fast. The rows
    are kept while the file stays the same (inode, size, times: :func:`write_nightlog`
    replaces it atomically), since several task generators ask in one doit run; the
    :class:`Frame` objects are then shared, so callers must not modify them.
    """
    import os
    st = os.stat(path)
    ident = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    hit = _NIGHTLOGS.get(str(path))
    if hit is not None and hit[0] == ident:
        return list(hit[1])
    rows = _parse_nightlog(path)
    _NIGHTLOGS[str(path)] = (ident, tuple(rows))
    return rows


def _parse_nightlog(path: Path) -> list[Frame]:
    import csv
    floats = {"exptime", "mjd", "airmass", "ra", "dec"}
    with open(path, newline="") as fh:
        rows = csv.reader((line for line in fh if not line.startswith("#")), delimiter=" ",
                          quotechar='"')
        header = next(rows, None)
        if header is None:
            return []
        out = []
        for row in rows:
            d = dict(zip(header, row))
            rec = {}
            for c in COLUMNS:
                v = d.get(c, "")
                if c in floats:
                    rec[c] = float(v) if v not in ("", "nan") else float("nan")
                elif c == "ndet":
                    rec[c] = int(v or 0)
                else:
                    rec[c] = v
            out.append(Frame(**rec))
    return out


def explain(path: Path, profile: Profile) -> str:
    """Text saying how a frame is typed: the keyword values read and the rule that matched."""
    path = Path(path)
    lines = [f"{path.name} with profile {profile.name!r} ({profile.path})"]
    try:
        raw = read_headers(path)
    except FrameError as exc:
        return "\n".join(lines + [f"  set aside: {exc}"])
    get = header_getter(raw, profile)
    lines.append("  HDUs: " + ", ".join(f"{i}:{n or '?'}{'' if s is None else f' {s[1]}x{s[0]}'}"
                                         for i, (n, s) in enumerate(zip(raw.names, raw.shapes))))
    for name in ("imagetyp", "object", "filter", "exptime", "date_obs", "time_obs", "xbin", "ybin"):
        specs = profile.keywords.get(name, ())
        v, key = read_field(profile, get, name)
        tried = "/".join(s.key for s in specs) or "(no keyword in profile)"
        lines.append(f"  {name:9s} = {v!r}  (from {key or 'none of ' + tried})")
    if raw.bad_cards:
        for k, img in raw.bad_cards.items():
            lines.append(f"  note: card {k} is not valid FITS: {img.strip()!r}")
    fr = inspect_frame(path, profile)
    if fr.rule:
        lines.append(f"  typed {fr.type}{' (' + fr.subtype + ')' if fr.subtype else ''} by {fr.rule}")
    else:
        lines.append("  no type rule applied")
    if fr.reason:
        lines.append(f"  set aside: {fr.reason}")
    if fr.night:
        lines.append(f"  night {fr.night} (DATE-OBS {fr.date_obs} UTC)")
    return "\n".join(lines)
