"""Instrument profiles: declarative descriptions of a camera (``share/instruments/*.toml``).

A profile says, in the spirit of PypeIt's spectrograph descriptions, which header keyword
holds each canonical field, how frames are typed, which HDUs are detectors and where their
data, overscan and trim sections are, the default gain and read noise, the site, and the
first-guess WCS. Code only differs per instrument where a profile cannot say it.

Profiles are found by name in the folders listed in the site settings (``profiles_dirs``),
then among the shipped ones. A bad profile raises :class:`ProfileError` with one line per
problem, naming the file and the key.
"""
from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .schema import Either, ListOf, MapOf, OneOf, SchemaError, Table, validate

CANONICAL_TYPES = ("bias", "dark", "flat", "arc", "science", "standard")
IGNORED_TYPES = ("focus", "test", "pointing", "acquisition", "ignore")
CANONICAL_FIELDS = (
    "imagetyp", "filter", "exptime", "object", "date_obs", "time_obs", "mjd_obs",
    "ra", "dec", "xbin", "ybin", "ccdsum", "airmass", "gain", "rdnoise", "saturate",
    "ccdtemp", "readout", "program", "instrume",
)

_KEYSPEC = Either((str, Table({"key": str, "scale": float}, required=("key",))),
                  name="a keyword name or a table {key=..., scale=...}")
_SECTION = Either((str, Table({"keyword": str, "syntax": OneOf(("iraf", "xy"))},
                              required=("keyword",))),
                  name="an IRAF section '[x1:x2,y1:y2]' or a table {keyword=..., syntax=...}")

PROFILE_SCHEMA = Table({
    "instrument": Table({
        "name": str, "description": str, "kind": OneOf(("imaging", "spectrograph")),
        "steps": ListOf(OneOf(("p", "f", "s", "z", "a", "t"))),
        # header conditions a frame must meet to belong to this instrument
        "match": MapOf(ListOf(str)),
        "date_order": OneOf(("dmy", "mdy")),
        "ra_unit": OneOf(("hourangle", "deg")),
        "notes": str,
    }, required=("name",)),
    "site": Table({"name": str, "longitude": float, "latitude": float, "height": float,
                   "timezone": str}, required=("longitude", "latitude", "timezone")),
    "keywords": Table({k: Either((str, _KEYSPEC, ListOf(_KEYSPEC)),
                                 name="a keyword name, a {key, scale} table or an array of them")
                       for k in CANONICAL_FIELDS}),
    "types": ListOf(Table({
        "type": OneOf(CANONICAL_TYPES + IGNORED_TYPES),
        "subtype": OneOf(("dome", "sky")),
        "name": str,
        "values": ListOf(str),
        "objects": ListOf(str),
        "files": ListOf(str),
        "headers": MapOf(ListOf(str)),
        "exptime_min": float,
        "exptime_max": float,
    }, required=("type",))),
    "detectors": ListOf(Table({
        "name": str, "hdu": (str, int),
        "biassec": _SECTION, "datasec": _SECTION, "trimsec": _SECTION,
        "gain": float, "rdnoise": float, "saturate": float,
    }, required=("name", "hdu"))),
    "overscan": Table({"axis": OneOf(("columns", "rows")),
                       "method": OneOf(("median", "mean", "clipped_mean")),
                       "fit": str, "smooth_rows": int}),
    # OBJECT -> target name: a regular expression whose group "target" is the name
    # (CAHA writes the filter into OBJECT: "NCG2420 B" -> "NCG2420")
    "targets": Table({"object_pattern": str}),
    "wcs": Table({"pixel_scale": float, "rotation": float, "flip_x": bool,
                  "offsets": MapOf(ListOf(float))}),
    "calib": Table({
        "min_frames": MapOf(int),
        "clip": MapOf(float),
        "bias_exptime_max": float, "dark_exptime_min": float, "flat_exptime_max": float,
        "science_flat": OneOf(("dome", "sky", "auto")),
        "flat_normalise": OneOf(("scalar", "smooth")),
        "flat_smooth_sigma": float, "flat_low_dn": float, "flat_regions": str,
        "set_keys": MapOf(ListOf(str)),
        "max_age_days": MapOf(float),
        "arc_detectors": ListOf(str),
        "verify": MapOf(float),
    }),
    "photometry": Table({"bands": MapOf(str), "aperture_arcsec": float}),
    # the s step; master sky (reducer.mastersky) for cameras whose dome flats or fringes need it
    "sky": Table({"box": int, "filter_size": int,
                  "master": ListOf(OneOf(("illumination", "fringe"))), "master_filters": ListOf(str),
                  "master_per_target": bool, "master_frames": int, "master_min_frames": int,
                  "master_nsigma": float, "master_box": int, "fringe_sigma": float}),
    "limits": MapOf(float),
}, required=("instrument", "site", "keywords", "types", "detectors"))


class ProfileError(ValueError):
    """An instrument profile is missing, unreadable or does not follow the schema."""


class SectionError(ValueError):
    """A section string cannot be parsed or does not fit the image."""


@dataclass(frozen=True)
class KeySpec:
    """One header keyword for a canonical field; the value is multiplied by ``scale``."""

    key: str
    scale: float = 1.0


@dataclass(frozen=True)
class TypeRule:
    """One typing rule; all of its given conditions must hold."""

    index: int
    type: str
    subtype: str | None = None
    name: str = ""
    values: tuple = ()
    objects: tuple = ()
    files: tuple = ()
    headers: tuple = ()          # ((KEY, (glob, ...)), ...)
    exptime_min: float | None = None
    exptime_max: float | None = None

    def describe(self) -> str:
        """Short human description of the rule (for ``reducer explain``)."""
        parts = []
        if self.values:
            parts.append("type word in " + "/".join(self.values))
        if self.objects:
            parts.append("OBJECT like " + "/".join(self.objects))
        if self.files:
            parts.append("file name like " + "/".join(self.files))
        for key, pats in self.headers:
            parts.append(f"{key} like " + "/".join(pats))
        if self.exptime_min is not None:
            parts.append(f"EXPTIME >= {self.exptime_min:g} s")
        if self.exptime_max is not None:
            parts.append(f"EXPTIME <= {self.exptime_max:g} s")
        what = self.type + (f" ({self.subtype})" if self.subtype else "")
        label = f" '{self.name}'" if self.name else ""
        cond = ", ".join(parts) if parts else "always"
        return f"rule {self.index + 1}{label}: {what} when {cond}"


@dataclass(frozen=True)
class Detector:
    """One detector (image HDU) of the instrument."""

    name: str
    hdu: str | int
    biassec: object = None
    datasec: object = None
    trimsec: object = None
    gain: float | None = None
    rdnoise: float | None = None
    saturate: float | None = None


@dataclass(frozen=True)
class Site:
    """Observatory site: longitude east-positive (deg), latitude (deg), height (m), IANA zone."""

    longitude: float
    latitude: float
    height: float
    timezone: str
    name: str = ""

    def earth_location(self):
        """The site as an :class:`astropy.coordinates.EarthLocation` (no network)."""
        from astropy.coordinates import EarthLocation
        import astropy.units as u
        return EarthLocation.from_geodetic(self.longitude * u.deg, self.latitude * u.deg,
                                           self.height * u.m)


@dataclass(frozen=True)
class Profile:
    """A validated instrument profile."""

    name: str
    path: Path
    raw: dict
    site: Site
    keywords: dict            # canonical field -> tuple[KeySpec, ...]
    rules: tuple              # TypeRule, ...
    detectors: tuple          # Detector, ...
    kind: str = "imaging"
    steps: tuple = ("p", "f", "s", "z", "a", "t")
    match: tuple = ()         # ((KEY, (glob, ...)), ...)
    date_order: str = "dmy"
    ra_unit: str | None = None
    section: dict = field(default_factory=dict)   # other tables, as given

    def table(self, name: str) -> dict:
        """A top-level table of the profile (``{}`` when absent)."""
        return self.raw.get(name, {})


def _keyspecs(value) -> tuple:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(KeySpec(item.upper()))
        else:
            out.append(KeySpec(item["key"].upper(), float(item.get("scale", 1.0))))
    return tuple(out)


def _norm_word(s: str) -> str:
    return " ".join(str(s).split()).lower()


def parse_profile(data: dict, path: Path) -> Profile:
    """Validate parsed TOML ``data`` and build a :class:`Profile`.

    Raises
    ------
    ProfileError
        One line per problem, each naming ``path`` and the key.
    """
    try:
        validate(data, PROFILE_SCHEMA, str(path))
    except SchemaError as exc:
        raise ProfileError(str(exc)) from None
    inst = data["instrument"]
    s = data["site"]
    errors = []
    try:
        from zoneinfo import ZoneInfo
        ZoneInfo(s["timezone"])
    except (KeyError, ValueError, OSError):
        errors.append(f"{path}: [site] timezone {s['timezone']!r} is not a known IANA time zone "
                      "(e.g. 'America/Denver', 'Atlantic/Canary', 'UTC')")
    if not -180 <= s["longitude"] <= 360 or not -90 <= s["latitude"] <= 90:
        errors.append(f"{path}: [site] longitude/latitude out of range")
    names = [d["name"] for d in data["detectors"]]
    if not names:
        errors.append(f"{path}: 'detectors' is empty: at least one detector is needed")
    if len(set(names)) != len(names):
        errors.append(f"{path}: detector names repeat: {names}")
    dets = []
    for d in data["detectors"]:
        for key in ("biassec", "datasec", "trimsec"):
            sec = d.get(key)
            if isinstance(sec, str):
                try:
                    parse_section(sec)
                except SectionError as exc:
                    errors.append(f"{path}: detector {d['name']}: {key}: {exc}")
        dets.append(Detector(**d))
    rules = []
    for i, r in enumerate(data["types"]):
        if r.get("subtype") and r["type"] != "flat":
            errors.append(f"{path}: types[{i}]: subtype is only for flats")
        rules.append(TypeRule(
            index=i, type=r["type"], subtype=r.get("subtype"), name=r.get("name", ""),
            values=tuple(_norm_word(v) for v in r.get("values", [])),
            objects=tuple(r.get("objects", [])), files=tuple(r.get("files", [])),
            headers=tuple((k.upper(), tuple(v)) for k, v in r.get("headers", {}).items()),
            exptime_min=r.get("exptime_min"), exptime_max=r.get("exptime_max")))
    if errors:
        raise ProfileError("\n".join(errors))
    return Profile(
        name=inst["name"], path=Path(path), raw=data,
        site=Site(float(s["longitude"]), float(s["latitude"]), float(s.get("height", 0.0)),
                  s["timezone"], s.get("name", "")),
        keywords={k: _keyspecs(v) for k, v in data["keywords"].items()},
        rules=tuple(rules), detectors=tuple(dets),
        kind=inst.get("kind", "imaging"),
        steps=tuple(inst.get("steps", ("p", "f", "s", "z", "a", "t"))),
        match=tuple((k.upper(), tuple(v)) for k, v in inst.get("match", {}).items()),
        date_order=inst.get("date_order", "dmy"), ra_unit=inst.get("ra_unit"),
    )


def profile_paths(extra_dirs=()) -> dict[str, Path]:
    """Map profile name -> file, user folders first (they override the shipped ones)."""
    from .resources import instruments_dir
    found: dict[str, Path] = {}
    for d in [instruments_dir(), *[Path(x) for x in extra_dirs]]:
        if Path(d).is_dir():
            for p in sorted(Path(d).glob("*.toml")):
                found[p.stem] = p
    return found


def load_profile(name_or_path: str | Path, extra_dirs=()) -> Profile:
    """Load a profile by name (searched in ``extra_dirs`` then the shipped ones) or by path.

    Raises
    ------
    ProfileError
        When it is not found (the message lists the known names) or is invalid.
    """
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        path = p
    else:
        known = profile_paths(extra_dirs)
        if str(name_or_path) not in known:
            raise ProfileError(f"unknown instrument profile {str(name_or_path)!r}; "
                               f"known: {', '.join(sorted(known))}")
        path = known[str(name_or_path)]
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_profile(data, path)


# --------------------------------------------------------------------------- sections
_IRAF = re.compile(r"^\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]$")
_XY = re.compile(r"^\[\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*\]$")


def parse_section(text: str, syntax: str = "iraf") -> tuple[slice, slice]:
    """Parse a FITS section into numpy slices ``(rows, columns)``, 0-based, end-exclusive.

    Parameters
    ----------
    text : str
        ``'[x1:x2,y1:y2]'`` (IRAF, 1-based, inclusive; spaces allowed, e.g.
        ``'[   4:  13,   1: 520]'``), or with ``syntax='xy'`` ``'[x1,y1:x2,y2]'``.
    syntax : {'iraf', 'xy'}

    Returns
    -------
    (slice, slice)
        Row slice then column slice.
    """
    rx = _IRAF if syntax == "iraf" else _XY
    m = rx.match(str(text).strip())
    if not m:
        form = "[x1:x2,y1:y2]" if syntax == "iraf" else "[x1,y1:x2,y2]"
        raise SectionError(f"cannot parse section {text!r} (expected {form}, 1-based)")
    a, b, c, d = (int(v) for v in m.groups())
    x1, x2, y1, y2 = (a, b, c, d) if syntax == "iraf" else (a, c, b, d)
    if min(x1, x2, y1, y2) < 1:
        raise SectionError(f"section {text!r} has a 0 or negative index (sections are 1-based)")
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


def check_section(sl: tuple[slice, slice], shape: tuple[int, int], what: str) -> None:
    """Raise :class:`SectionError` when a section does not lie inside an image of ``shape``."""
    ny, nx = shape
    if sl[0].stop > ny or sl[1].stop > nx:
        raise SectionError(
            f"{what} [{sl[1].start + 1}:{sl[1].stop},{sl[0].start + 1}:{sl[0].stop}] lies outside "
            f"the {nx}x{ny} image")


def detector_sections(det: Detector, header, shape) -> dict:
    """Resolve a detector's biassec/datasec/trimsec to slices for one frame.

    Sections given as ``{keyword=...}`` are read from ``header``. Absent sections give
    ``None`` (trim defaults to datasec, then the whole image).
    """
    out = {}
    for key in ("biassec", "datasec", "trimsec"):
        spec = getattr(det, key)
        if spec is None:
            out[key] = None
            continue
        if isinstance(spec, dict):
            text = header.get(spec["keyword"])
            if text is None:
                raise SectionError(f"{key} keyword {spec['keyword']} is missing from the header")
            sl = parse_section(text, spec.get("syntax", "iraf"))
        else:
            sl = parse_section(spec)
        check_section(sl, shape, key)
        out[key] = sl
    if out["trimsec"] is None:
        out["trimsec"] = out["datasec"] or (slice(0, shape[0]), slice(0, shape[1]))
    return out


# --------------------------------------------------------------------------- typing
def _glob_any(value: str, patterns) -> bool:
    v = str(value).strip().lower()
    return any(fnmatch.fnmatchcase(v, p.lower()) for p in patterns)


def classify(profile: Profile, fields: dict, filename: str, header_get) -> tuple[str | None, str | None, TypeRule | None]:
    """Type a frame by the profile's rules.

    Parameters
    ----------
    profile : Profile
    fields : dict
        Canonical fields already read (``imagetyp``, ``object``, ``exptime`` ...).
    filename : str
        The file's base name.
    header_get : callable
        ``header_get(KEY) -> value or None``, for rules on other keywords.

    Returns
    -------
    (type, subtype, rule)
        ``(None, None, None)`` when no rule matches.
    """
    word = _norm_word(fields.get("imagetyp") or "")
    obj = fields.get("object") or ""
    exptime = fields.get("exptime")
    for rule in profile.rules:
        if rule.values and word not in rule.values:
            continue
        if rule.objects and not _glob_any(obj, rule.objects):
            continue
        if rule.files and not _glob_any(filename, rule.files):
            continue
        if rule.headers:
            ok = True
            for key, pats in rule.headers:
                v = header_get(key)
                if v is None or not _glob_any(v, pats):
                    ok = False
                    break
            if not ok:
                continue
        if rule.exptime_min is not None and (exptime is None or exptime < rule.exptime_min):
            continue
        if rule.exptime_max is not None and (exptime is None or exptime > rule.exptime_max):
            continue
        return rule.type, rule.subtype, rule
    return None, None, None


def instrument_mismatch(profile: Profile, header_get) -> str | None:
    """Reason why a frame does not belong to this instrument, or ``None`` when it does."""
    for key, pats in profile.match:
        v = header_get(key)
        if v is None or not _glob_any(v, pats):
            return (f"not a {profile.name} frame: {key}={v!r} does not match "
                    f"{'/'.join(pats)}")
    return None
