"""Small synthetic nights for workflow tests: one 256 x 128 detector, a few frames.

The demo camera's profile has fixed sections for its 1024 x 544 frames; a small night uses
a copy of it (``demosmall``) that reads the sections from the headers the simulator writes
and keeps only CCD1, so a whole night (masters, the p f s z a t chain, stacks, light curves)
runs in about 15 s on 2 cores.
"""
from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path

from conftest import run_cli

SHAPE = (256, 160)          # rows, columns (128 data columns + 32 transition/overscan)
UTDATE = "20261120"


def small_profile(dest: Path, name: str = "demosmall") -> Path:
    """Write the small-frame demo profile into ``dest``; returns its path."""
    from reducer.resources import instruments_dir
    text = (instruments_dir() / "demo.toml").read_text()
    text = text.replace('name = "demo"', f'name = "{name}"')
    for key in ("biassec", "datasec", "trimsec"):
        text = re.sub(rf'{key} = "\[[^"]*\]"', f'{key} = {{ keyword = "{key.upper()}" }}', text)
    i, j = text.index('[[detectors]]\nname = "CCD2"'), text.index("[overscan]")
    text = text[:i] + text[j:]
    text = re.sub(r"offsets = .*\n", "", text)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}.toml"
    path.write_text(text)
    return path


def make_small_night(root: Path, targets, *, seed: int = 7, raw: Path | None = None,
                     night_toml: str = "", stars: int = 1500, **kw):
    """Simulate a small night under ``root`` and make its night directory.

    Parameters
    ----------
    root : Path
        Working folder: ``raw/``, ``profiles/``, ``reducer.toml`` and ``redux/`` go here.
    targets : list of reducer.testing.Target
    seed : int
    raw : Path, optional
        Where to simulate the raw frames (default ``root/raw/UTDATE``).
    night_toml : str
        Text appended to the night's ``night.toml``.
    stars : int
        ``stars_per_field`` of the simulator (enough for astrometry on small frames).
    **kw
        More :func:`reducer.testing.make_night` arguments.

    Returns
    -------
    (SimulatedNight, Path)
        The simulation and the night directory.
    """
    from reducer.testing import make_night
    root = Path(root).resolve()
    small_profile(root / "profiles")
    args = dict(filters=("r",), standard=False, shape=SHAPE, stars_per_field=stars,
                nbias=3, ndark=3, nflat=3)
    args.update(kw)
    sim = make_night(raw or root / "raw" / UTDATE, seed=seed, targets=targets, **args)
    cfg = root / "reducer.toml"
    cfg.write_text('instrument = "demosmall"\nredux = "redux"\nmasters_store = "masters"\n'
                   'profiles_dirs = ["profiles"]\n'
                   f'[catalog]\npath = "{sim.catalog_path}"\n')
    run_cli("--config", str(cfg), "night", UTDATE, "--raw", str(sim.raw_dir), cwd=root)
    nd = root / "redux" / UTDATE
    if night_toml:
        with open(nd / "night.toml", "a") as fh:
            fh.write("\n" + night_toml + "\n")
    return sim, nd


def tasks_of_last_run(nd: Path) -> dict:
    """{task: status} of the last run recorded in ``logs/tasks.jsonl``."""
    import json
    recs = [json.loads(line) for line in (nd / "logs" / "tasks.jsonl").read_text().splitlines()]
    last = recs[-1]["run"]
    return {r["task"]: r["status"] for r in recs if r["run"] == last}


def executed(out: str) -> set:
    """Task names doit printed as executed (``.  TASK``)."""
    return {ln[3:].strip() for ln in out.splitlines() if ln.startswith(".  ")}


def checksums(folder: Path) -> dict:
    """{relative path: sha256} of every file under ``folder`` (links not followed)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def data_hdus(path: Path) -> dict:
    """{EXTNAME: array} of the image HDUs of a FITS file (headers left out)."""
    import numpy as np
    from astropy.io import fits
    with fits.open(path) as h:
        return {(x.name or str(i)): np.array(x.data) for i, x in enumerate(h)
                if x.data is not None and x.is_image}


def doit(nd: Path, *args: str, env: dict | None = None, check: bool = True):
    """Run the real doit in a night directory (``env``: variables to set, or to remove with
    ``None``)."""
    import os
    import subprocess
    import sys
    e = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    r = subprocess.run([sys.executable, "-m", "doit", *args], cwd=nd, env=e,
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@contextmanager
def edited(path: Path, extra: str):
    """Append ``extra`` to a file for the block; then restore its content and time."""
    st = path.stat()
    old = path.read_bytes()
    path.write_text(old.decode() + "\n" + extra + "\n")
    try:
        yield
    finally:
        path.write_bytes(old)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
