"""Where the shipped ``templates/`` and ``share/`` folders are.

In a source checkout (or an editable install) they sit at the top of the repository,
next to the ``reducer/`` package; in a wheel they are shipped inside the package as
``reducer/templates`` and ``reducer/share``.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

_PKG = Path(__file__).resolve().parent


@cache
def _find(name: str) -> Path:
    for cand in (_PKG / name, _PKG.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"reducer's {name}/ folder was not found next to {_PKG} (broken installation?)"
    )


def templates_dir() -> Path:
    """Folder of the night templates (``dodo.py``, reports)."""
    return _find("templates")


def share_dir() -> Path:
    """Folder of shipped data: instrument profiles, default settings, masks."""
    return _find("share")


def instruments_dir() -> Path:
    """Folder of the shipped instrument profiles (``*.toml``)."""
    return share_dir() / "instruments"
