"""Calibration registry: a database of master calibration frames.

One table, ``masters``, holds one row per master calibration frame, identified by
``(instrument, imtype, set_key, night)``.  The registry

* records the masters a night's reduction made (:meth:`Registry.register`),
* certifies them: copies the file into a permanent *masters store* under a stable
  name, verifies the copy's SHA-256 and marks the row certified with a validity
  range (:meth:`Registry.certify`; the idea comes from PFS's certified calibrations
  and KPF's masters database),
* withdraws them (:meth:`Registry.decertify`, :meth:`Registry.mark_bad`), and
* finds, for a night that lacks its own calibrations, the certified master of the
  same calibration set nearest in time (:meth:`Registry.nearest`; SEDM's fallback to
  earlier nights).

Backends
--------
The same code runs on SQLite (the default: a file, e.g.
``sqlite:////data/reducer/registry.sqlite``, or simply a filesystem path) and on
PostgreSQL (``postgresql+psycopg2://user:password@host:5432/db``).  The only
dialect-specific code sets SQLite's pragmas on every new connection: write-ahead
logging (readers never block the writer), a busy timeout of
:data:`SQLITE_BUSY_TIMEOUT_MS` (writers queue instead of failing with "database is
locked") and ``synchronous=NORMAL``.  The table is created on first use.

Calibration-set keys
--------------------
A master belongs to a calibration set described by a few header values (binning,
filter, detector shape, read-out mode...).  The registry stores them as one
canonical string built by :func:`set_key_string`::

    >>> set_key_string({"shape": (1024, 1024), "filter": "r", "binning": "1x1"})
    'binning=1x1;filter=r;shape=1024x1024'

Every method taking a ``set_key`` accepts either such a mapping or a string (which is
re-canonicalised, so ``"filter=r;binning=1x1"`` and ``"binning=1x1;filter=r"`` are the
same set).  Masters of different set keys are never substituted for one another.

Times
-----
Times are Modified Julian Dates (UTC).  A night is named by its UTDATE,
``'YYYYMMDD'``.  When a master's mid-time is not known it defaults to the middle of
its UT date (:func:`night_mjd` + 0.5).
"""
from __future__ import annotations

from .fitsio import sha256_file  # noqa: E402  (one checksum function for the package)
import builtins
import contextlib
import datetime as _dt
import hashlib
import math
import numbers
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError

__all__ = [
    "IMTYPES",
    "VERIFICATIONS",
    "DEFAULT_MAX_AGE_DAYS",
    "SQLITE_BUSY_TIMEOUT_MS",
    "RegistryError",
    "InvalidValue",
    "MasterNotFound",
    "MasterFileMissing",
    "ChecksumMismatch",
    "MasterRecord",
    "NearestMaster",
    "Registry",
    "pick_nearest",
    "set_key_string",
    "parse_set_key",
    "compact_set_key",
    "master_filename",
    "night_mjd",
    "sha256_file",
    "to_url",
    "metadata",
    "masters",
]

#: Calibration types the registry knows.
IMTYPES: tuple[str, ...] = ("bias", "dark", "flat", "arc")

#: Allowed values of the ``verification`` column.
VERIFICATIONS: tuple[str, ...] = ("PASS", "FAIL", "UNVERIFIED")

#: Default largest ``|mjd - master mjd_mid|``, in days, accepted by
#: :meth:`Registry.nearest` for each calibration type: bias frames drift slowly
#: (90 d), dark current is stable for long (365 d), flats change with dust and
#: filter ageing (180 d), arc lamps / wavelength solutions drift fastest (30 d).
DEFAULT_MAX_AGE_DAYS: Mapping[str, float] = MappingProxyType(
    {"bias": 90.0, "dark": 365.0, "flat": 180.0, "arc": 30.0}
)

#: How long an SQLite connection waits for another writer before giving up (ms).
SQLITE_BUSY_TIMEOUT_MS = 30_000

# Two candidate masters whose distances in time to the target differ by less than
# this (days, ~0.09 s) are at "equal distance": the earlier one is preferred.
_TIE_EPS_DAYS = 1e-6
# Attempts of the update-or-insert transaction when a concurrent writer inserts the
# same key first (each lost race costs one retry).
_UPSERT_ATTEMPTS = 20
_SCHEMA_ATTEMPTS = 10
_CHUNK = 1 << 20
_MJD_EPOCH = _dt.date(1858, 11, 17)

_KEY_RE = re.compile(r"^[a-z0-9_.\-]+$")
_NIGHT_RE = re.compile(r"^\d{8}$")
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9.+\-]+")


# --------------------------------------------------------------------------- errors
class RegistryError(Exception):
    """Base class of the calibration registry's errors."""


class InvalidValue(RegistryError, ValueError):
    """An argument (type, night, set key, verification, ...) is not acceptable."""


class MasterNotFound(RegistryError, LookupError):
    """No master with the given id exists in the registry.

    Parameters
    ----------
    master_id : int
        The id that was looked up.
    where : str, optional
        Description of the registry (its URL with the password hidden).
    """

    def __init__(self, master_id: int, where: str | None = None):
        self.master_id = master_id
        msg = f"no master with id {master_id}"
        if where:
            msg += f" in registry {where}"
        super().__init__(msg)


class MasterFileMissing(RegistryError, FileNotFoundError):
    """The file of a master (to certify or to verify) does not exist."""


class ChecksumMismatch(RegistryError):
    """A file's SHA-256 differs from the expected one.

    Parameters
    ----------
    path : str or Path
        The file whose content was checked.
    expected, actual : str
        The expected and the computed hexadecimal SHA-256.
    """

    def __init__(self, path: str | os.PathLike, expected: str, actual: str):
        self.path = os.fspath(path)
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"checksum mismatch for {self.path}: expected sha256 {expected}, got {actual}"
        )


# ------------------------------------------------------------------- set keys, names
def _scalar_str(key: str, value: Any) -> str:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:  # numpy scalars -> Python scalars
            value = value.item()
        except (TypeError, ValueError):
            pass
    if value is None:
        raise InvalidValue(f"set key {key!r} has no value (None)")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        f = float(value)
        return str(int(f)) if f.is_integer() else repr(f)
    if isinstance(value, (tuple, list)):
        if not value:
            raise InvalidValue(f"set key {key!r} has an empty sequence as value")
        return "x".join(_scalar_str(key, v) for v in value)
    if isinstance(value, bytes):
        value = value.decode()
    return str(value).strip()


def set_key_string(keys: Mapping[str, Any]) -> str:
    """Canonical string of a calibration set's keys.

    Parameters
    ----------
    keys : mapping
        Key name -> value.  Names are stripped and lower-cased and must consist of
        ``a-z 0-9 _ . -``.  Values are rendered as text: integers and integral floats
        without a decimal point (``30.0`` -> ``30``), other floats with ``repr``,
        booleans as ``true``/``false``, sequences joined with ``x`` (``(1024, 1024)``
        -> ``1024x1024``), anything else with ``str`` and stripped.

    Returns
    -------
    str
        ``name=value`` pairs sorted by name and joined with ``;``, e.g.
        ``binning=1x1;filter=r;shape=1024x1024``; ``''`` for no keys.  Equal
        mappings always give the same string.

    Raises
    ------
    InvalidValue
        A name is empty or has other characters, two names are equal after
        lower-casing, a value is None, or a value contains ``;`` or ``=``.
    """
    out: dict[str, str] = {}
    for raw_name, raw_value in keys.items():
        name = str(raw_name).strip().lower()
        if not _KEY_RE.match(name):
            raise InvalidValue(
                f"set key name {raw_name!r} is not made of letters, digits, '_', '.', '-'"
            )
        if name in out:
            raise InvalidValue(f"set key name {name!r} is given twice")
        value = _scalar_str(name, raw_value)
        if ";" in value or "=" in value:
            raise InvalidValue(f"set key {name!r} value {value!r} contains ';' or '='")
        out[name] = value
    return ";".join(f"{k}={out[k]}" for k in sorted(out))


def parse_set_key(text: str) -> dict[str, str]:
    """Inverse of :func:`set_key_string`: ``'a=1;b=r'`` -> ``{'a': '1', 'b': 'r'}``.

    Parameters
    ----------
    text : str
        A set-key string (pairs may be in any order; blanks around them are ignored).

    Returns
    -------
    dict of str to str

    Raises
    ------
    InvalidValue
        A pair has no ``=``.
    """
    out: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise InvalidValue(f"set key {text!r}: {part.strip()!r} is not NAME=VALUE")
        out[name.strip()] = value.strip()
    return out


def _canonical_set_key(set_key: str | Mapping[str, Any]) -> str:
    if isinstance(set_key, Mapping):
        return set_key_string(set_key)
    if isinstance(set_key, str):
        return set_key_string(parse_set_key(set_key))
    raise InvalidValue(f"set key must be a mapping or a string, not {type(set_key).__name__}")


def _safe(text: str) -> str:
    return _UNSAFE_RE.sub("-", text).strip("-") or "none"


def compact_set_key(set_key: str | Mapping[str, Any]) -> str:
    """Filesystem-safe compact form of a set key, used in master file names.

    The values, in the canonical (sorted by key name) order, each with every run of
    characters other than ``A-Z a-z 0-9 . + -`` replaced by ``-`` (and ``none`` for a
    value left empty), joined with ``_``.  Key names are left out to keep the names
    short: ``binning=1x1;filter=r;shape=1024x1024`` -> ``1x1_r_1024x1024``.

    Parameters
    ----------
    set_key : str or mapping

    Returns
    -------
    str
        ``''`` for an empty set key.
    """
    keys = parse_set_key(_canonical_set_key(set_key))
    return "_".join(_safe(v) for _, v in sorted(keys.items()))


def master_filename(
    instrument: str, night: str, imtype: str, set_key: str | Mapping[str, Any]
) -> str:
    """Stable (KPF-style) file name of a master in the permanent masters store.

    Parameters
    ----------
    instrument : str
    night : str
        UTDATE, ``'YYYYMMDD'``.
    imtype : str
        One of :data:`IMTYPES`.
    set_key : str or mapping

    Returns
    -------
    str
        ``<instrument>_<UTDATE>_master_<imtype>[_<key>].fits`` where ``<key>`` is
        :func:`compact_set_key` (left out, with its ``_``, for an empty set key), e.g.
        ``demo_20240315_master_flat_1x1_r_1024x1024.fits``.
    """
    night = _check_night(night)
    imtype = _check_imtype(imtype)
    key = compact_set_key(set_key)
    name = f"{_safe(str(instrument))}_{night}_master_{imtype}"
    return f"{name}_{key}.fits" if key else f"{name}.fits"


# ------------------------------------------------------------------------- helpers
def night_mjd(night: str) -> float:
    """MJD at 00:00 UTC of a UTDATE ``'YYYYMMDD'``.

    Parameters
    ----------
    night : str

    Returns
    -------
    float
    """
    night = _check_night(night)
    day = _dt.date(int(night[:4]), int(night[4:6]), int(night[6:]))
    return float((day - _MJD_EPOCH).days)


def to_url(url: str | URL | os.PathLike) -> URL:
    """SQLAlchemy URL of a registry given as a URL or as a path to an SQLite file.

    Parameters
    ----------
    url : str, URL or path-like
        ``dialect+driver://...`` or a filesystem path (no ``://``), which becomes
        ``sqlite:///<absolute path>``.

    Returns
    -------
    sqlalchemy.engine.URL
    """
    if isinstance(url, URL):
        return url
    text = os.fspath(url) if isinstance(url, os.PathLike) else str(url)
    if "://" not in text:
        return URL.create("sqlite", database=os.path.abspath(os.path.expanduser(text)))
    return make_url(text)


def _check_night(night: Any) -> str:
    text = str(night).strip()
    if not _NIGHT_RE.match(text):
        raise InvalidValue(f"night {night!r} is not a UTDATE 'YYYYMMDD'")
    try:
        _dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise InvalidValue(f"night {night!r} is not a valid date") from None
    return text


def _check_imtype(imtype: Any) -> str:
    text = str(imtype).strip().lower()
    if text not in IMTYPES:
        raise InvalidValue(f"calibration type {imtype!r} is not one of {', '.join(IMTYPES)}")
    return text


def _check_instrument(instrument: Any) -> str:
    text = str(instrument).strip()
    if not text or len(text) > 64:
        raise InvalidValue(f"instrument name {instrument!r} must have 1 to 64 characters")
    return text


def _check_verification(verification: Any) -> str:
    text = str(verification).strip().upper()
    if text not in VERIFICATIONS:
        raise InvalidValue(
            f"verification {verification!r} is not one of {', '.join(VERIFICATIONS)}"
        )
    return text


def _opt_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InvalidValue(f"{name} {value!r} is not a number") from None
    if not math.isfinite(f):
        raise InvalidValue(f"{name} {value!r} is not finite")
    return f


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _as_utc(value: _dt.datetime | None) -> _dt.datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite keeps no time zone: the registry stores UTC
        return value.replace(tzinfo=_dt.timezone.utc)
    return value.astimezone(_dt.timezone.utc)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_copy(src: Path, dest: Path) -> str:
    """Copy ``src`` to ``dest`` atomically and return the verified SHA-256.

    The bytes go to a hidden temporary file in ``dest``'s directory, which is
    fsync'ed, re-read and checked against the SHA-256 of what was read from ``src``,
    made read-only and renamed over ``dest`` with :func:`os.replace`; the directory
    is fsync'ed last.  On any failure the temporary file is removed.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        h = hashlib.sha256()
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        expected = h.hexdigest()
        actual = sha256_file(tmp)
        if actual != expected:
            raise ChecksumMismatch(f"{tmp} (copy of {src})", expected, actual)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)
    return expected


def _header_info(path: Path) -> dict[str, Any]:
    """Times and frame count of a master read from its FITS header, when present.

    Keywords looked for in the primary header, then in the first extension:
    ``MJD-MIN``, ``MJD-MAX``, ``MJD-MID`` (else the mean of min and max, else
    ``MJD-OBS``, else ``DATE-OBS``) and ``NCOMBINE``.  Unreadable files give ``{}``.
    """
    try:
        from astropy.io import fits

        with fits.open(path, lazy_load_hdus=True) as hdul:
            headers = [hdul[0].header]
            if len(hdul) > 1:
                headers.append(hdul[1].header)
    except Exception:  # not FITS, truncated...: the caller falls back to defaults
        return {}

    def first(key: str) -> Any:
        for hdr in headers:
            value = hdr.get(key)
            if value not in (None, ""):
                return value
        return None

    out: dict[str, Any] = {}
    for key, name in (("MJD-MIN", "mjd_min"), ("MJD-MAX", "mjd_max"), ("MJD-MID", "mjd_mid")):
        with contextlib.suppress(InvalidValue):
            if (value := _opt_float(key, first(key))) is not None:
                out[name] = value
    if "mjd_mid" not in out:
        if "mjd_min" in out and "mjd_max" in out:
            out["mjd_mid"] = 0.5 * (out["mjd_min"] + out["mjd_max"])
        else:
            with contextlib.suppress(InvalidValue):
                out["mjd_mid"] = _opt_float("MJD-OBS", first("MJD-OBS"))
            if out.get("mjd_mid") is None and (date_obs := first("DATE-OBS")):
                with contextlib.suppress(Exception):
                    from astropy.time import Time

                    out["mjd_mid"] = float(Time(str(date_obs), scale="utc").mjd)
            if out.get("mjd_mid") is None:
                out.pop("mjd_mid", None)
    ncombine = first("NCOMBINE")
    if isinstance(ncombine, numbers.Integral) and not isinstance(ncombine, bool):
        out["nframes"] = int(ncombine)
    return out


# -------------------------------------------------------------------------- schema
metadata = sa.MetaData()

#: The table of masters (SQLAlchemy Core).
masters = sa.Table(
    "masters",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("instrument", sa.String(64), nullable=False),
    sa.Column("imtype", sa.String(16), nullable=False),
    sa.Column("set_key", sa.String(512), nullable=False),
    sa.Column("night", sa.String(8), nullable=False),
    sa.Column("mjd_min", sa.Double),
    sa.Column("mjd_max", sa.Double),
    sa.Column("mjd_mid", sa.Double),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("checksum", sa.String(64)),
    sa.Column("nframes", sa.Integer),
    sa.Column("verification", sa.String(16), nullable=False),
    sa.Column("details", sa.JSON(none_as_null=True)),
    sa.Column("certified", sa.Boolean, nullable=False),
    sa.Column("valid_from_mjd", sa.Double),
    sa.Column("valid_to_mjd", sa.Double),
    sa.Column("bad", sa.Boolean, nullable=False),
    sa.Column("bad_reason", sa.Text),
    sa.Column("reducer_version", sa.String(64)),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("instrument", "imtype", "set_key", "night", name="uq_masters_key"),
    sa.CheckConstraint(
        "verification IN ('PASS', 'FAIL', 'UNVERIFIED')", name="ck_masters_verification"
    ),
    sa.Index("ix_masters_lookup", "instrument", "imtype", "set_key", "mjd_mid"),
)


def _sqlite_on_connect(dbapi_connection: Any, _connection_record: Any) -> None:
    """Set the pragmas of a new SQLite connection (engine ``connect`` event)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_MS)}")
        # WAL is persistent in the file: only the first connection switches it.  The
        # switch needs an exclusive lock and SQLite reports "database is locked" at
        # once (without the busy handler) when other connections are opening the
        # same fresh file, so retry until the busy timeout.
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000.0
        delay = 0.005
        while True:
            try:
                mode = str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower()
                if mode != "wal":  # ("memory" stays "memory" for in-memory databases)
                    cursor.execute("PRAGMA journal_mode = WAL").fetchone()
                break
            except dbapi_connection.OperationalError as exc:
                text = str(exc).lower()
                if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 0.1)
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


# ---------------------------------------------------------------------- dataclasses
@dataclass(frozen=True)
class MasterRecord:
    """One row of the registry.

    Attributes
    ----------
    id : int
    instrument, imtype, set_key, night : str
        The unique key; ``night`` is the UTDATE ``'YYYYMMDD'``.
    mjd_min, mjd_max, mjd_mid : float or None
        First, last and middle time of the frames combined (MJD, UTC).
    path : Path
        Absolute path of the file (in the permanent store once certified).
    checksum : str or None
        SHA-256 (hex) of the file.
    nframes : int or None
        Number of frames combined.
    verification : str
        ``'PASS'``, ``'FAIL'`` or ``'UNVERIFIED'``.
    details : object
        JSON-compatible details of the verification.
    certified : bool
    valid_from_mjd, valid_to_mjd : float or None
        Certified validity range (None: open on that side).
    bad : bool
    bad_reason : str or None
    reducer_version : str or None
    created, updated : datetime
        UTC times of the first and of the latest registration or change.
    """

    id: int
    instrument: str
    imtype: str
    set_key: str
    night: str
    mjd_min: float | None
    mjd_max: float | None
    mjd_mid: float | None
    path: Path
    checksum: str | None
    nframes: int | None
    verification: str
    details: Any
    certified: bool
    valid_from_mjd: float | None
    valid_to_mjd: float | None
    bad: bool
    bad_reason: str | None
    reducer_version: str | None
    created: _dt.datetime
    updated: _dt.datetime

    @property
    def set_keys(self) -> dict[str, str]:
        """The set key as a dict (see :func:`parse_set_key`)."""
        return parse_set_key(self.set_key)

    @classmethod
    def _from_row(cls, row: Any) -> MasterRecord:
        m = dict(row._mapping)
        m["path"] = Path(m["path"])
        m["certified"] = bool(m["certified"])
        m["bad"] = bool(m["bad"])
        m["created"] = _as_utc(m["created"])
        m["updated"] = _as_utc(m["updated"])
        return cls(**m)


@dataclass(frozen=True)
class NearestMaster:
    """Result of :meth:`Registry.nearest`.

    Attributes
    ----------
    path : Path
        Absolute path of the certified master.
    night : str
        UTDATE of the master.
    age_days : float
        Signed age of the master relative to the requested time, ``mjd - mjd_mid``:
        positive when the master was taken *before* the requested time, negative
        when after.
    id : int
        Registry id of the master.
    checksum : str or None
        SHA-256 (hex) of the file as registered.
    """

    path: Path
    night: str
    age_days: float
    id: int
    checksum: str | None


def pick_nearest(rows, mjd: float, *, max_age_days: float,
                 earlier_only: bool = False) -> NearestMaster | None:
    """The master among ``rows`` (:meth:`Registry.candidates`) nearest in time to ``mjd``.

    A row qualifies when its validity range contains ``mjd`` (an empty bound is open) and
    ``|mjd - mjd_mid| <= max_age_days`` (with ``earlier_only``, ``mjd_mid <= mjd``); the
    smallest distance wins, at equal distance (within 1e-6 d) the earlier master, then
    the lower id. ``None`` when no row qualifies. Times in MJD [d].
    """
    target = _opt_float("mjd", mjd)
    if target is None:
        raise InvalidValue("nearest() needs the time (mjd) of the data to calibrate")
    max_age = _opt_float("max_age_days", max_age_days)
    if max_age is None or max_age < 0:
        raise InvalidValue(f"max_age_days {max_age_days!r} must be a non-negative number")
    lo, hi = target - max_age, (target if earlier_only else target + max_age)
    ok = [r for r in rows
          if r.mjd_mid is not None and lo <= r.mjd_mid <= hi
          and (r.valid_from_mjd is None or r.valid_from_mjd <= target)
          and (r.valid_to_mjd is None or r.valid_to_mjd >= target)]
    if not ok:
        return None
    best = min(abs(target - r.mjd_mid) for r in ok)
    tied = [r for r in ok if abs(target - r.mjd_mid) <= best + _TIE_EPS_DAYS]
    row = min(tied, key=lambda r: (r.mjd_mid, r.id))
    return NearestMaster(
        path=Path(row.path), night=row.night, age_days=target - row.mjd_mid,
        id=int(row.id), checksum=row.checksum,
    )


# ------------------------------------------------------------------------ registry
class Registry:
    """A calibration registry in an SQLite file or a PostgreSQL database.

    Parameters
    ----------
    url : str, sqlalchemy URL or path-like
        ``sqlite:////abs/path/registry.sqlite``,
        ``postgresql+psycopg2://user:password@host:port/db`` or a plain filesystem
        path of an SQLite file.  The folder of an SQLite file is created if needed.
    create : bool, optional
        Create the table (and its indexes) when it does not exist (default True).
        Safe when several processes open a fresh registry at once.
    **engine_kw
        Extra arguments of :func:`sqlalchemy.create_engine`.

    Notes
    -----
    Use it as a context manager, or call :meth:`close`, to release the connections.
    Every method runs in its own transaction; several processes can use the same
    registry at once.
    """

    def __init__(self, url: str | URL | os.PathLike, *, create: bool = True, **engine_kw: Any):
        self.url = to_url(url)
        if self.url.get_backend_name() == "sqlite":
            db = self.url.database
            if db and db != ":memory:" and not db.startswith("file:"):
                Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine_kw.setdefault("pool_pre_ping", True)
        try:
            self.engine: Engine = sa.create_engine(self.url, **engine_kw)
        except ModuleNotFoundError as exc:
            hint = (" (pip install 'nightreducer[postgres]')"
                    if self.url.get_backend_name() == "postgresql" else "")
            raise RegistryError(
                f"the database driver of {self.where} is not installed: {exc}{hint}"
            ) from exc
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_on_connect)
        if create:
            self._ensure_schema()

    # -- plumbing
    @property
    def where(self) -> str:
        """The registry's URL with the password hidden (for messages)."""
        return self.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"Registry({self.where!r})"

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close all pooled connections."""
        self.engine.dispose()

    def _ensure_schema(self) -> None:
        # Processes opening a fresh registry together race to CREATE TABLE; the
        # losers get "already exists" (SQLite) or a unique violation in the catalog
        # (PostgreSQL) and simply check again.
        last: Exception | None = None
        for attempt in range(_SCHEMA_ATTEMPTS):
            try:
                metadata.create_all(self.engine, checkfirst=True)
                return
            except DBAPIError as exc:
                last = exc
                if not (isinstance(exc, IntegrityError) or "already exists" in str(exc.orig)):
                    break  # not a lost race: connection refused, permission denied...
                time.sleep(0.02 * (attempt + 1))
        raise RegistryError(f"cannot open the registry {self.where}: {last}") from last

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            yield conn

    def _key_where(self, instrument: str, imtype: str, set_key: str, night: str) -> list[Any]:
        c = masters.c
        return [c.instrument == instrument, c.imtype == imtype, c.set_key == set_key,
                c.night == night]

    def _upsert(self, key: dict[str, Any], values: dict[str, Any]) -> int:
        """Update the row of ``key`` or insert it; return its id.

        The UPDATE comes first so that on SQLite the transaction takes the write lock
        with its first statement (waiting on the busy timeout, never failing on a
        stale read snapshot).  When two writers insert the same new key at once, the
        loser's INSERT fails on the unique constraint; its transaction is rolled back
        and retried, and the retry updates the winner's row.
        """
        where = self._key_where(**key)
        last: IntegrityError | None = None
        for attempt in range(_UPSERT_ATTEMPTS):
            now = _utcnow()
            try:
                with self.engine.begin() as conn:
                    res = conn.execute(sa.update(masters).where(*where).values(**values, updated=now))
                    if res.rowcount == 0:
                        conn.execute(
                            sa.insert(masters).values(
                                **key, **values, bad=False, bad_reason=None,
                                created=now, updated=now,
                            )
                        )
                    return int(conn.execute(sa.select(masters.c.id).where(*where)).scalar_one())
            except IntegrityError as exc:
                last = exc
                time.sleep(0.005 * (attempt + 1))
        desc = "/".join(str(key[k]) for k in ("instrument", "imtype", "night")) + f" [{key['set_key']}]"
        raise RegistryError(
            f"could not register master {desc} in {self.where} after {_UPSERT_ATTEMPTS} "
            f"attempts: {last}"
        ) from last

    def _update_one(self, master_id: int, **values: Any) -> MasterRecord:
        with self.engine.begin() as conn:
            res = conn.execute(
                sa.update(masters).where(masters.c.id == int(master_id))
                .values(**values, updated=_utcnow())
            )
            if res.rowcount == 0:
                raise MasterNotFound(master_id, self.where)
            row = conn.execute(sa.select(masters).where(masters.c.id == int(master_id))).one()
        return MasterRecord._from_row(row)

    # -- writing
    def register(
        self,
        instrument: str,
        imtype: str,
        set_key: str | Mapping[str, Any],
        night: str,
        path: str | os.PathLike,
        *,
        mjd_min: float | None = None,
        mjd_max: float | None = None,
        mjd_mid: float | None = None,
        checksum: str | None = None,
        nframes: int | None = None,
        verification: str = "UNVERIFIED",
        details: Any = None,
        certified: bool = False,
        valid_from_mjd: float | None = None,
        valid_to_mjd: float | None = None,
        reducer_version: str | None = None,
    ) -> int:
        """Record a master; re-registering the same key updates its row.

        Parameters
        ----------
        instrument : str
        imtype : str
            One of :data:`IMTYPES` (case-insensitive).
        set_key : str or mapping
            Calibration-set keys (see :func:`set_key_string`).
        night : str
            UTDATE ``'YYYYMMDD'``.
        path : str or path-like
            The master's file; stored as an absolute path.
        mjd_min, mjd_max : float, optional
            First and last time of the combined frames (MJD).
        mjd_mid : float, optional
            Time used by :meth:`nearest`.  Default: the mean of ``mjd_min`` and
            ``mjd_max`` when both are given, else the middle of the UT date
            (:func:`night_mjd` + 0.5).
        checksum : str, optional
            SHA-256 (hex) of the file.  Default: computed when the file exists,
            else left empty.
        nframes : int, optional
            Number of frames combined.
        verification : {'UNVERIFIED', 'PASS', 'FAIL'}, optional
        details : JSON-compatible, optional
            Details of the verification (stored as JSON).
        certified : bool, optional
            Default False.  Prefer :meth:`certify`, which also copies the file into
            the permanent store.
        valid_from_mjd, valid_to_mjd : float, optional
            Validity range of a certified master; None is open on that side.
        reducer_version : str, optional
            Default: this package's version.

        Returns
        -------
        int
            The row id (the same id when the key was already registered).

        Raises
        ------
        InvalidValue
            An argument is not acceptable.
        RegistryError
            The row could not be written.

        Notes
        -----
        The upsert is idempotent and safe under concurrency on SQLite and
        PostgreSQL.  An update replaces every field with the values given here
        (defaults included: registering again without ``certified=True``
        withdraws a certification, since the registered file may have changed);
        it keeps ``id``, ``created`` and the ``bad`` mark with its reason, which
        only :meth:`mark_bad` / :meth:`unmark_bad` change.
        """
        key = {
            "instrument": _check_instrument(instrument),
            "imtype": _check_imtype(imtype),
            "set_key": _canonical_set_key(set_key),
            "night": _check_night(night),
        }
        if len(key["set_key"]) > 512:
            raise InvalidValue(f"set key {key['set_key']!r} is longer than 512 characters")
        mjd_min = _opt_float("mjd_min", mjd_min)
        mjd_max = _opt_float("mjd_max", mjd_max)
        mjd_mid = _opt_float("mjd_mid", mjd_mid)
        if mjd_min is not None and mjd_max is not None and mjd_min > mjd_max:
            raise InvalidValue(f"mjd_min {mjd_min} is after mjd_max {mjd_max}")
        if mjd_mid is None:
            if mjd_min is not None and mjd_max is not None:
                mjd_mid = 0.5 * (mjd_min + mjd_max)
            else:
                mjd_mid = night_mjd(key["night"]) + 0.5
        valid_from_mjd = _opt_float("valid_from_mjd", valid_from_mjd)
        valid_to_mjd = _opt_float("valid_to_mjd", valid_to_mjd)
        if valid_from_mjd is not None and valid_to_mjd is not None and valid_from_mjd > valid_to_mjd:
            raise InvalidValue(
                f"validity range is empty: valid_from_mjd {valid_from_mjd} > "
                f"valid_to_mjd {valid_to_mjd}"
            )
        abspath = os.path.abspath(os.fspath(path))
        if checksum is None and os.path.isfile(abspath):
            checksum = sha256_file(abspath)
        if checksum is not None:
            checksum = str(checksum).strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", checksum):
                raise InvalidValue(f"checksum {checksum!r} of {abspath} is not a sha256 hex digest")
        if nframes is not None:
            if isinstance(nframes, bool) or not isinstance(nframes, numbers.Integral) or nframes < 0:
                raise InvalidValue(f"nframes {nframes!r} is not a non-negative integer")
            nframes = int(nframes)
        if reducer_version is None:
            from . import __version__ as reducer_version
        values = {
            "mjd_min": mjd_min,
            "mjd_max": mjd_max,
            "mjd_mid": mjd_mid,
            "path": abspath,
            "checksum": checksum,
            "nframes": nframes,
            "verification": _check_verification(verification),
            "details": details,
            "certified": bool(certified),
            "valid_from_mjd": valid_from_mjd,
            "valid_to_mjd": valid_to_mjd,
            "reducer_version": str(reducer_version)[:64],
        }
        return self._upsert(key, values)

    def certify(
        self,
        src_path: str | os.PathLike,
        store_dir: str | os.PathLike,
        *,
        instrument: str,
        imtype: str,
        set_key: str | Mapping[str, Any],
        night: str,
        mjd_min: float | None = None,
        mjd_max: float | None = None,
        mjd_mid: float | None = None,
        nframes: int | None = None,
        verification: str | None = None,
        details: Any = None,
        valid_from_mjd: float | None = None,
        valid_to_mjd: float | None = None,
        reducer_version: str | None = None,
        force: bool = False,
    ) -> MasterRecord:
        """Copy a master into the permanent store and register it as certified.

        The file is copied to ``store_dir/`` :func:`master_filename` atomically (a
        hidden temporary file in ``store_dir``, fsync, checksum of the copy verified
        against the source bytes, read-only mode, :func:`os.replace`); the source is
        left untouched.  Certifying the same key again replaces the stored file and
        updates the row (same id).

        Parameters
        ----------
        src_path : str or path-like
            The master to certify (it may already be the file in the store).
        store_dir : str or path-like
            Folder of the permanent masters store (created if needed).
        instrument, imtype, set_key, night
            The master's key, as in :meth:`register`.
        mjd_min, mjd_max, mjd_mid, nframes, verification, details, reducer_version : optional
            Each one not given is taken from the row already registered for this key,
            else (times and ``nframes``) from the FITS header (``MJD-MIN``,
            ``MJD-MAX``, ``MJD-MID``, ``MJD-OBS``, ``DATE-OBS``, ``NCOMBINE``), else
            the defaults of :meth:`register`.
        valid_from_mjd, valid_to_mjd : float, optional
            Validity range for :meth:`nearest`.  Default: open on both sides, so only
            the type's maximum age (:data:`DEFAULT_MAX_AGE_DAYS`) limits the master's
            use; give them to restrict it (e.g. between two instrument interventions).
        force : bool, optional
            Certify even a master whose verification is ``'FAIL'``.

        Returns
        -------
        MasterRecord
            The registered row (``path`` in the store, ``certified`` True).

        Raises
        ------
        MasterFileMissing
            ``src_path`` is not a file.
        RegistryError
            The verification is ``'FAIL'`` (without ``force``), or the store file
            name is already used by a master of another key.
        ChecksumMismatch
            The copy differs from the source.

        Notes
        -----
        A master marked bad stays bad (and is never returned by :meth:`nearest`)
        until :meth:`unmark_bad`.
        """
        src = Path(os.path.abspath(os.fspath(src_path)))
        if not src.is_file():
            raise MasterFileMissing(f"master to certify {src} does not exist or is not a file")
        instrument = _check_instrument(instrument)
        imtype = _check_imtype(imtype)
        set_key = _canonical_set_key(set_key)
        night = _check_night(night)
        store = Path(os.path.abspath(os.fspath(store_dir)))
        store.mkdir(parents=True, exist_ok=True)
        dest = store / master_filename(instrument, night, imtype, set_key)

        existing = self.find(instrument, imtype, set_key, night)
        with self._read() as conn:
            clash = conn.execute(
                sa.select(masters.c.id, masters.c.set_key).where(masters.c.path == str(dest))
            ).first()
        if clash is not None and (existing is None or clash.id != existing.id):
            raise RegistryError(
                f"store file {dest} already belongs to master id {clash.id} "
                f"(set key {clash.set_key!r}), not to set key {set_key!r}"
            )

        given = {"mjd_min": mjd_min, "mjd_max": mjd_max, "mjd_mid": mjd_mid,
                 "nframes": nframes, "verification": verification, "details": details,
                 "reducer_version": reducer_version}
        merged = dict(given)
        header: dict[str, Any] | None = None
        for name, value in given.items():
            if value is not None:
                continue
            if existing is not None and getattr(existing, name) is not None:
                merged[name] = getattr(existing, name)
            elif name in ("mjd_min", "mjd_max", "mjd_mid", "nframes"):
                if header is None:
                    header = _header_info(src)
                merged[name] = header.get(name)
        if merged["verification"] is None:
            merged["verification"] = "UNVERIFIED"
        merged["verification"] = _check_verification(merged["verification"])
        if merged["verification"] == "FAIL" and not force:
            raise RegistryError(
                f"refusing to certify {src}: its verification is FAIL"
                + (f" (master id {existing.id})" if existing else "")
                + "; use force=True to certify it anyway"
            )

        if dest.exists() and os.path.samefile(src, dest):
            checksum = sha256_file(dest)
        else:
            checksum = _atomic_copy(src, dest)
        master_id = self.register(
            instrument, imtype, set_key, night, dest,
            checksum=checksum, certified=True,
            valid_from_mjd=valid_from_mjd, valid_to_mjd=valid_to_mjd,
            **merged,
        )
        return self.get(master_id)

    def decertify(self, master_id: int) -> MasterRecord:
        """Withdraw a master's certification (the row and the file are kept).

        Parameters
        ----------
        master_id : int

        Returns
        -------
        MasterRecord
            The updated row.

        Raises
        ------
        MasterNotFound
        """
        return self._update_one(master_id, certified=False)

    def mark_bad(self, master_id: int, reason: str) -> MasterRecord:
        """Mark a master bad: :meth:`nearest` never returns it again.

        Parameters
        ----------
        master_id : int
        reason : str
            Why (required, shown by ``reducer calib list``).

        Returns
        -------
        MasterRecord

        Raises
        ------
        InvalidValue
            The reason is empty.
        MasterNotFound
        """
        if not reason or not str(reason).strip():
            raise InvalidValue(f"marking master id {master_id} bad needs a reason")
        return self._update_one(master_id, bad=True, bad_reason=str(reason).strip())

    def unmark_bad(self, master_id: int) -> MasterRecord:
        """Clear a master's bad mark and reason.

        Parameters
        ----------
        master_id : int

        Returns
        -------
        MasterRecord

        Raises
        ------
        MasterNotFound
        """
        return self._update_one(master_id, bad=False, bad_reason=None)

    # -- reading
    def get(self, master_id: int) -> MasterRecord:
        """The row of a master.

        Parameters
        ----------
        master_id : int

        Returns
        -------
        MasterRecord

        Raises
        ------
        MasterNotFound
        """
        with self._read() as conn:
            row = conn.execute(sa.select(masters).where(masters.c.id == int(master_id))).first()
        if row is None:
            raise MasterNotFound(master_id, self.where)
        return MasterRecord._from_row(row)

    def find(
        self, instrument: str, imtype: str, set_key: str | Mapping[str, Any], night: str
    ) -> MasterRecord | None:
        """The row of a key, or None.

        Parameters
        ----------
        instrument, imtype, set_key, night
            As in :meth:`register`.

        Returns
        -------
        MasterRecord or None
        """
        where = self._key_where(
            _check_instrument(instrument), _check_imtype(imtype),
            _canonical_set_key(set_key), _check_night(night),
        )
        with self._read() as conn:
            row = conn.execute(sa.select(masters).where(*where)).first()
        return None if row is None else MasterRecord._from_row(row)

    def list(
        self,
        instrument: str | None = None,
        imtype: str | None = None,
        night: str | None = None,
        *,
        set_key: str | Mapping[str, Any] | None = None,
        certified: bool | None = None,
        bad: bool | None = None,
    ) -> builtins.list[MasterRecord]:
        """Rows matching all the given filters.

        Parameters
        ----------
        instrument, imtype, night : str, optional
        set_key : str or mapping, optional
        certified, bad : bool, optional
            Keep only (un)certified, or (not) bad, masters.

        Returns
        -------
        list of MasterRecord
            Sorted by instrument, type, set key, night.
        """
        c = masters.c
        q = sa.select(masters)
        if instrument is not None:
            q = q.where(c.instrument == _check_instrument(instrument))
        if imtype is not None:
            q = q.where(c.imtype == _check_imtype(imtype))
        if night is not None:
            q = q.where(c.night == _check_night(night))
        if set_key is not None:
            q = q.where(c.set_key == _canonical_set_key(set_key))
        if certified is not None:
            q = q.where(c.certified == (sa.true() if certified else sa.false()))
        if bad is not None:
            q = q.where(c.bad == (sa.true() if bad else sa.false()))
        q = q.order_by(c.instrument, c.imtype, c.set_key, c.night, c.id)
        with self._read() as conn:
            return [MasterRecord._from_row(r) for r in conn.execute(q)]

    def nearest(
        self,
        instrument: str,
        imtype: str,
        set_key: str | Mapping[str, Any],
        mjd: float,
        *,
        max_age_days: float | None = None,
        earlier_only: bool = False,
        exclude_night: str | None = None,
    ) -> NearestMaster | None:
        """The usable certified master of a calibration set nearest in time.

        Candidates are the masters of exactly this instrument, type and set key that
        are certified, not bad, whose validity range contains ``mjd`` (an empty
        bound is open) and whose ``mjd_mid`` is within ``max_age_days`` of ``mjd``
        (inclusive).  The one with the smallest ``|mjd - mjd_mid|`` wins; at equal
        distance (within 1e-6 d) the earlier master wins.

        Parameters
        ----------
        instrument, imtype, set_key
            As in :meth:`register`.
        mjd : float
            Time of the data to calibrate (MJD).
        max_age_days : float, optional
            Largest ``|mjd - mjd_mid|``.  Default:
            ``DEFAULT_MAX_AGE_DAYS[imtype]`` (bias 90, dark 365, flat 180, arc 30).
        earlier_only : bool, optional
            Only masters with ``mjd_mid <= mjd``.
        exclude_night : str, optional
            Leave out this night's master (to fall back to other nights).

        Returns
        -------
        NearestMaster or None
            None when no master qualifies.  ``age_days`` is ``mjd - mjd_mid``
            (positive for a master taken before ``mjd``).
        """
        instrument = _check_instrument(instrument)
        imtype = _check_imtype(imtype)
        key = _canonical_set_key(set_key)
        target = _opt_float("mjd", mjd)
        if target is None:
            raise InvalidValue("nearest() needs the time (mjd) of the data to calibrate")
        if max_age_days is None:
            max_age_days = DEFAULT_MAX_AGE_DAYS[imtype]
        max_age = _opt_float("max_age_days", max_age_days)
        if max_age is None or max_age < 0:
            raise InvalidValue(f"max_age_days {max_age_days!r} must be a non-negative number")
        rows = self.candidates(instrument, imtype, key, exclude_night=exclude_night)
        return pick_nearest(rows, target, max_age_days=max_age, earlier_only=earlier_only)

    def candidates(
        self,
        instrument: str,
        imtype: str,
        set_key: str | Mapping[str, Any],
        *,
        exclude_night: str | None = None,
    ) -> tuple:
        """Every certified, not bad master of a calibration set with a time (``mjd_mid``).

        What :meth:`nearest` chooses from; :func:`pick_nearest` makes the choice for a
        time. Reading them once and choosing for many frames is one query instead of one
        per frame (task creation of a night that falls back on other nights' masters).

        Returns
        -------
        tuple of rows
            Each with ``id``, ``path``, ``night``, ``mjd_mid``, ``valid_from_mjd``,
            ``valid_to_mjd`` and ``checksum``.
        """
        instrument = _check_instrument(instrument)
        imtype = _check_imtype(imtype)
        key = _canonical_set_key(set_key)
        c = masters.c
        q = sa.select(c.id, c.path, c.night, c.mjd_mid, c.valid_from_mjd, c.valid_to_mjd,
                      c.checksum).where(
            c.instrument == instrument,
            c.imtype == imtype,
            c.set_key == key,
            c.certified == sa.true(),
            c.bad == sa.false(),
            c.mjd_mid.is_not(None),
        )
        if exclude_night is not None:
            q = q.where(c.night != _check_night(exclude_night))
        with self._read() as conn:
            return tuple(conn.execute(q).all())

    def verify(self, master_id: int) -> MasterRecord:
        """Check that a master's file exists and still has its registered checksum.

        Parameters
        ----------
        master_id : int

        Returns
        -------
        MasterRecord

        Raises
        ------
        MasterNotFound
        MasterFileMissing
            The file is gone.
        ChecksumMismatch
            The file's SHA-256 differs from the registered one.
        """
        rec = self.get(master_id)
        if not rec.path.is_file():
            raise MasterFileMissing(f"file {rec.path} of master id {rec.id} does not exist")
        if rec.checksum is not None:
            actual = sha256_file(rec.path)
            if actual != rec.checksum:
                raise ChecksumMismatch(rec.path, rec.checksum, actual)
        return rec
