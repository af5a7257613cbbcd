"""What the science steps take from a night's settings, without pixels (and without numpy).

The task generators ask these questions for every task each time doit starts, so they live
apart from :mod:`reducer.steps` (which imports numpy): each step's settings digest (a doit
``uptodate`` value and the products' provenance) and whether frames are registered to their
target's own field reference.
"""
from __future__ import annotations

from pathlib import Path


def step_digest(night, step: str) -> str:
    """Digest of what a step's result depends on among the settings: its own table, and the
    reference catalogue and quality limits for the a and t steps.

    ``[targets]`` (a target's coordinates) is not in it: it concerns one target, whose tasks
    have :func:`target_settings` as an uptodate of their own, so giving one target's
    coordinates rebuilds that target's tasks only."""
    if step in ("astrometry", "zeropoint"):
        return night.digest(step, night.settings.get("catalog", {}), night.settings.get("limits", {}),
                            night.settings.get("photometry", {}), catalog_stamp(night))
    if step in ("stack", "photometry"):
        return night.digest(step, night.settings.get("catalog", {}), catalog_stamp(night))
    return night.digest(step)


def target_settings(night, names) -> dict:
    """The ``[targets]`` entries (coordinates given in night.toml) of some OBJECT values or
    target names: what one target's astrometry, stacks and light curves depend on there."""
    tg = night.settings.get("targets", {})
    return {n: tg[n] for n in sorted(set(names)) if n in tg}


def catalog_stamp(night) -> str:
    """Size and modification time of the reference catalogue file: editing the catalogue
    rebuilds the steps that use it."""
    path = night.settings.get("catalog", {}).get("path")
    if not path:
        return ""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = night.site.base / p
    try:
        st = p.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def self_reference(night) -> bool:
    """True when frames are registered to the target's own reference frame: no catalogue file,
    no Gaia, and ``[catalog] self_reference`` not false (see :mod:`reducer.fieldref`)."""
    c = night.settings.get("catalog", {})
    return not c.get("path") and not c.get("gaia") and bool(c.get("self_reference", True))
