"""Settings in layers, validated, with a digest per stage.

Layers, lowest first (a later one overrides an earlier one key by key):

1. built-in defaults (:data:`DEFAULTS`);
2. the site settings file ``reducer.toml`` (found by ``--config``, ``$REDUCER_CONFIG``,
   then ``$XDG_CONFIG_HOME/reducer/reducer.toml`` or ``~/.config/reducer/reducer.toml``);
3. the instrument profile's stage tables (``[calib]``, ``[overscan]``, ...);
4. the night's ``night.toml``.

Relative paths in a settings file are relative to that file's folder; with no settings file
at all, to the current directory, so ``reducer night --raw DIR --instrument NAME`` works
anywhere. Each stage's own table has a digest (:func:`stage_digest`): a task's ``uptodate``
uses it, so editing the flat settings never rebuilds the biases.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .schema import Either, ListOf, MapOf, SchemaError, Table, validate

#: stage tables: each may appear in reducer.toml, a profile (some) and night.toml
STAGES = ("inventory", "calib", "overscan", "combine", "verify", "prepare", "flatten", "sky",
          "cosmics", "astrometry", "photometry", "stack", "report")

_ANY = Either((str, int, float, bool, ListOf(Either((str, int, float, bool))),
               MapOf(Either((str, int, float, bool, ListOf(Either((str, int, float))))))),
              name="a string, number, true/false, array or table")

DEFAULTS: dict = {
    "raw": "raw/{utdate}",
    "redux": "redux",
    "masters_store": "masters",
    "registry": "",              # empty: sqlite file inside masters_store
    "instrument": "",
    "profiles_dirs": [],
    "catalog": {"path": "", "ra_column": "ra", "dec_column": "dec", "mag_columns": {},
                "gaia": False, "cache_dir": "", "self_reference": True},
    "mail": {"host": "", "port": 25, "from": "", "to": [], "starttls": False, "cafile": "",
             "timeout": 30.0},
    "doit": {"num_process": 2, "threads": 1, "lock_wait": 0.0, "min_free_mb": 500.0,
             "space_margin": 1.0, "progress_interval": 10.0},
    "inventory": {"settle_seconds": 30.0},
    "combine": {"mem_limit_mb": 256},
    "watch": {"poll_seconds": 10.0, "settle_seconds": 30.0, "idle_minutes": 0.0,
              "stop_at": "sunrise"},
}

_STAGE_TABLE = MapOf(_ANY)

#: [doit]: processes and threads (2 x 1 is the fastest on 2 cores: bench/night.py; more
#: threads per process only add OpenMP waiting); run lock wait [s] (reducer.runlock); free-space floor [MB]
#: and margin on the estimate (reducer.diskspace); progress line interval [s] when stderr is
#: not a terminal (reducer.progress)
_DOIT_TABLE = Table({"num_process": int, "threads": int, "lock_wait": float,
                     "min_free_mb": float, "space_margin": float, "progress_interval": float})

#: [watch] (reducer.watch): raw folder poll interval [s], how long a new file's size and
#: time must stay the same [s], stop after this long without new frames [min] (0: never),
#: stop time: "sunrise", "twilight" (Sun at -12 deg, morning), local "HH:MM", or "" (none)
_WATCH_TABLE = Table({"poll_seconds": float, "settle_seconds": float, "idle_minutes": float,
                      "stop_at": str})

SITE_SCHEMA = Table({
    "raw": str, "redux": str, "masters_store": str, "registry": str, "instrument": str,
    "profiles_dirs": ListOf(str),
    "catalog": Table({"path": str, "ra_column": str, "dec_column": str,
                      "mag_columns": MapOf(str), "gaia": bool, "cache_dir": str,
                      "self_reference": bool}),
    # user and password only from $REDUCER_SMTP_USER / $REDUCER_SMTP_PASSWORD (reducer.mail)
    "mail": Table({"host": str, "port": int, "from": str, "to": ListOf(str), "starttls": bool,
                   "cafile": str, "timeout": float}),
    "doit": _DOIT_TABLE,
    "watch": _WATCH_TABLE,
    **{s: _STAGE_TABLE for s in STAGES},
})

NIGHT_SCHEMA = Table({
    "night": Table({"utdate": str, "instrument": str, "raw": str, "site_config": str, "home": str},
                   required=("utdate",)),
    "drop": ListOf(str),
    "pin": MapOf(str),
    "doit": _DOIT_TABLE,
    "watch": _WATCH_TABLE,
    "targets": MapOf(Table({"ra": Either((float, str)), "dec": Either((float, str)),
                            "name": str})),
    "catalog": Table({"path": str, "ra_column": str, "dec_column": str,
                      "mag_columns": MapOf(str), "gaia": bool, "cache_dir": str,
                      "self_reference": bool}),
    **{s: _STAGE_TABLE for s in STAGES},
})


class SettingsError(ValueError):
    """A settings file is missing, unreadable or invalid."""


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_toml(path: Path, schema: Table) -> dict:
    """Read and validate a TOML file; problems raise :class:`SettingsError` naming the file."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        validate(data, schema, str(path))
    except SchemaError as exc:
        raise SettingsError(str(exc)) from None
    return data


def find_site_config(explicit: str | None = None) -> Path | None:
    """The site settings file in force, or ``None`` when there is none.

    Order: ``explicit`` (``--config``), ``$REDUCER_CONFIG``, the user config folder.
    An explicit or environment path that does not exist is an error.
    """
    for src, value in (("--config", explicit), ("$REDUCER_CONFIG", os.environ.get("REDUCER_CONFIG"))):
        if value:
            p = Path(value).expanduser()
            if not p.is_file():
                raise SettingsError(f"{p}: settings file named by {src} does not exist")
            return p.resolve()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    p = base / "reducer" / "reducer.toml"
    return p.resolve() if p.is_file() else None


@dataclass
class SiteSettings:
    """Resolved site settings; paths are absolute."""

    data: dict
    source: Path | None
    base: Path = field(default_factory=Path.cwd)

    def path(self, key: str, **fmt) -> Path:
        """A path-valued setting, ``{utdate}`` filled in, made absolute."""
        value = str(self.data[key]).format(**fmt) if fmt else str(self.data[key])
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base / p)

    @property
    def registry_url(self) -> str:
        """Calibration registry URL (a SQLite file in the masters store by default)."""
        url = self.data.get("registry") or ""
        if url:
            return url
        return f"sqlite:///{self.path('masters_store') / 'registry.sqlite'}"

    @property
    def profiles_dirs(self) -> list[Path]:
        out = []
        for d in self.data.get("profiles_dirs", []):
            p = Path(d).expanduser()
            out.append(p if p.is_absolute() else self.base / p)
        return out


def load_site(explicit: str | None = None, home: Path | None = None) -> SiteSettings:
    """Load the site settings (defaults when there is no file).

    With no settings file, relative default paths resolve against ``home`` (default: the
    current directory).
    """
    src = find_site_config(explicit)
    if src is None:
        return SiteSettings(copy.deepcopy(DEFAULTS), None, Path(home) if home else Path.cwd())
    data = read_toml(src, SITE_SCHEMA)
    return SiteSettings(_merge(DEFAULTS, data), src, src.parent)


def resolve(site: SiteSettings, profile, night: dict | None) -> dict:
    """Merge the layers into one settings tree (defaults < site < profile < night)."""
    tree = copy.deepcopy(site.data)
    prof_tables = {k: v for k, v in profile.raw.items() if k in STAGES or k in ("calib", "overscan", "photometry")}
    tree = _merge(tree, prof_tables)
    if night:
        tree = _merge(tree, {k: v for k, v in night.items() if k != "night"})
    return tree


def stage_digest(settings: dict, stage: str, *extra) -> str:
    """A short stable digest of one stage's settings (and any extra values).

    Used as a doit ``uptodate`` value: a change in any layer that reaches this stage changes
    the digest, and nothing else does.
    """
    payload = json.dumps([settings.get(stage, {}), *extra], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def config_digest(settings: dict) -> str:
    """Digest of the whole resolved settings tree (for provenance headers)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
