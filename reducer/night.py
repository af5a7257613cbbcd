"""A night directory: ``redux/UTDATE/`` with ``dodo.py``, ``night.toml`` and a ``raw`` link.

:func:`make_night_dir` creates one (never overwriting a user's file); :class:`Night` loads one
with every settings layer resolved (defaults < site ``reducer.toml`` < instrument profile <
``night.toml``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .config import (NIGHT_SCHEMA, SettingsError, SiteSettings, config_digest, load_site,
                     read_toml, resolve, stage_digest)
from .instruments import Profile, load_profile

NIGHT_TOML = "night.toml"
NIGHTLOG = "nightlog.ecsv"


class NightError(ValueError):
    """A night directory cannot be made or loaded."""


def _render(template: str, **values) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined
    from .resources import templates_dir
    env = Environment(loader=FileSystemLoader(str(templates_dir())), undefined=StrictUndefined,
                      keep_trailing_newline=True, autoescape=False)
    return env.get_template(template).render(**values)


@dataclass
class Created:
    """What :func:`make_night_dir` did."""

    path: Path
    made: list
    kept: list


def make_night_dir(site: SiteSettings, utdate: str, *, raw: Path | None = None,
                   instrument: str | None = None) -> Created:
    """Create (or complete) the night directory ``<redux>/<utdate>``.

    Parameters
    ----------
    site : SiteSettings
    utdate : str
        ``YYYYMMDD``.
    raw : Path, optional
        Raw folder (default: the site's ``raw`` pattern with ``{utdate}``).
    instrument : str, optional
        Profile name (default: the site's ``instrument``).

    Returns
    -------
    Created
        Files made and files kept as they were (a user's edits are never overwritten).

    Raises
    ------
    NightError
        Bad UT date, unknown instrument, or an existing ``raw`` link pointing elsewhere.
    """
    from datetime import datetime
    try:
        datetime.strptime(utdate, "%Y%m%d")
    except ValueError:
        raise NightError(f"night {utdate!r} is not a UT date YYYYMMDD") from None
    instrument = instrument or site.data.get("instrument") or ""
    if not instrument:
        raise NightError("no instrument: pass --instrument NAME or set 'instrument' in reducer.toml")
    profile = load_profile(instrument, site.profiles_dirs)
    raw_dir = Path(raw).expanduser().resolve() if raw else site.path("raw", utdate=utdate)
    if not raw_dir.is_dir():
        raise NightError(f"raw folder {raw_dir} does not exist")
    ndir = site.path("redux") / utdate
    ndir.mkdir(parents=True, exist_ok=True)
    made, kept = [], []
    link = ndir / "raw"
    if link.is_symlink() or link.exists():
        if link.resolve() != raw_dir:
            raise NightError(f"{link} already points to {link.resolve()}, not {raw_dir}; "
                             f"remove the link to change the night's raw folder")
        kept.append(link)
    else:
        os.symlink(raw_dir, link, target_is_directory=True)
        made.append(link)
    from .fitsio import atomic_write_text
    files = {
        "dodo.py": _render("dodo.py.j2", utdate=utdate, instrument=profile.name),
        NIGHT_TOML: _render("night.toml.j2", utdate=utdate, instrument=profile.name,
                            raw=str(raw_dir),
                            site_config=str(site.source) if site.source else "",
                            home=str(site.base)),
    }
    for name, text in files.items():
        p = ndir / name
        if p.exists():
            kept.append(p)
        else:
            atomic_write_text(p, text)
            made.append(p)
    return Created(ndir, made, kept)


class Night:
    """A loaded night directory with its settings resolved.

    Parameters
    ----------
    path : Path
        The night directory (or any file inside it, e.g. its ``dodo.py``).
    """

    def __init__(self, path):
        p = Path(path).resolve()
        self.dir = p.parent if p.is_file() else p
        nt = self.dir / NIGHT_TOML
        if not nt.is_file():
            raise NightError(f"{self.dir} is not a night directory (no {NIGHT_TOML}); "
                             f"make one with `reducer night UTDATE`")
        self.night_data = read_toml(nt, NIGHT_SCHEMA)
        meta = self.night_data["night"]
        self.utdate = meta["utdate"]
        cfg = meta.get("site_config") or None
        if cfg and not Path(cfg).is_file():
            raise SettingsError(f"{nt}: site_config {cfg} does not exist")
        home = meta.get("home") or None
        self.site = load_site(cfg) if cfg else load_site(None, home=home)
        self._instrument = meta.get("instrument") or self.site.data.get("instrument")
        if not self._instrument:
            raise NightError(f"{nt}: no instrument in [night] nor in the site settings")

    @cached_property
    def profile(self) -> Profile:
        return load_profile(self._instrument, self.site.profiles_dirs)

    @cached_property
    def settings(self) -> dict:
        """The resolved settings tree."""
        return resolve(self.site, self.profile, self.night_data)

    @property
    def raw_dir(self) -> Path:
        link = self.dir / "raw"
        if link.exists():
            return link
        raw = self.night_data["night"].get("raw")
        if raw:
            return Path(raw)
        raise NightError(f"{self.dir}: no raw link and no [night] raw path")

    @property
    def nightlog(self) -> Path:
        return self.dir / NIGHTLOG

    def digest(self, stage: str, *extra) -> str:
        """Digest of one stage's settings (a doit ``uptodate`` value)."""
        return stage_digest(self.settings, stage, *extra)

    @property
    def config_digest(self) -> str:
        return config_digest(self.settings)

    def layers(self) -> list[tuple[str, str]]:
        """The settings layers in force, lowest first: (layer, source)."""
        return [("defaults", "built in"),
                ("site", str(self.site.source) if self.site.source else "(no reducer.toml)"),
                ("instrument", str(self.profile.path)),
                ("night", str(self.dir / NIGHT_TOML))]
