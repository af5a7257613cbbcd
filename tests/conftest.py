"""Shared fixtures: the real data sets, a doit runner, fresh settings."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.is_dir():  # a clone elsewhere: look next to the working directory too
    DATA = Path.cwd().parent / "shared" / "data"


def real_set(name: str) -> Path:
    """Path of a real data set, skipping the test when ../shared/data is absent."""
    p = DATA / name
    if not p.is_dir():
        pytest.skip(f"real data set {name} not found in {DATA}")
    return p


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch, tmp_path_factory):
    """No user's reducer.toml leaks into a test."""
    monkeypatch.delenv("REDUCER_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))


def run_doit(night_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real doit in a night directory."""
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "doit", *args], cwd=night_dir, env=env,
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `reducer` command."""
    r = subprocess.run([sys.executable, "-m", "reducer.cli", *args], cwd=cwd,
                       capture_output=True, text=True, env=dict(os.environ))
    if check and r.returncode != 0:
        raise AssertionError(f"reducer {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def demo_frame(path, imagetyp="object", date="2026-11-20T05:00:00", exptime=60.0, obj="M 81"):
    """A minimal raw frame of the demo camera (two 1024x544 detectors, zeros)."""
    import numpy as np
    from astropy.io import fits
    prim = fits.PrimaryHDU()
    h = prim.header
    h["IMAGETYP"] = imagetyp
    h["EXPTIME"] = exptime
    h["DATE-OBS"] = date
    h["OBJECT"] = obj
    h["FILTER"] = "r"
    hdus = [prim] + [fits.ImageHDU(np.zeros((1024, 544), dtype=np.uint16), name=n) for n in ("CCD1", "CCD2")]
    fits.HDUList(hdus).writeto(path)
    return path
