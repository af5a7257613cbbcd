"""``doit -n 2`` (the default: 2 processes x 1 thread) makes the night ``-n 1`` makes, and a
no-op ``doit science`` imports no pixel library (making the tasks must stay cheap: the speed
itself is measured by bench/night.py, not here)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from conftest import run_cli
from smallnight import UTDATE, data_hdus, doit, executed, make_small_night

HEAVY = ("numpy", "astropy", "scipy", "sqlalchemy", "matplotlib", "photutils", "astroscrappy")


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """The same raw night reduced twice: ``-n 1`` and the default (``-n 2``)."""
    from reducer.testing import Target
    root = tmp_path_factory.mktemp("parallel")
    targets = [Target("FIELD-A", filters=("r",), nexp=3, exptime=60.0),
               Target("FIELD-B", filters=("r",), nexp=2, exptime=60.0)]
    sim, one = make_small_night(root / "one", targets)
    # a second site (own masters store and registry) on the same raw frames
    two_root = root / "two"
    two_root.mkdir()
    cfg = two_root / "reducer.toml"
    cfg.write_text((root / "one" / "reducer.toml").read_text().replace(
        'profiles_dirs = ["profiles"]', f'profiles_dirs = ["{root / "one" / "profiles"}"]'))
    run_cli("--config", str(cfg), "night", UTDATE, "--raw", str(sim.raw_dir), cwd=two_root)
    two = two_root / "redux" / UTDATE
    r1 = doit(one, "-n", "1", "science", env={"OMP_NUM_THREADS": None})
    r2 = doit(two, "science", env={"OMP_NUM_THREADS": None})
    return {"one": one, "two": two, "out1": r1.stdout + r1.stderr, "out2": r2.stdout + r2.stderr}


def test_default_is_two_processes_one_thread(nights):
    from reducer.night import Night
    from reducer.tasks import doit_config
    night = Night(nights["two"])
    assert doit_config(night)["num_process"] == 2
    assert night.settings["doit"]["threads"] == 1


def _products(nd):
    skip = re.compile(r"^(logs|\.)")
    return sorted(str(p.relative_to(nd)) for p in nd.rglob("*.fits")
                  if not skip.match(str(p.relative_to(nd))) and p.parent.name != "raw")


def test_two_processes_make_the_same_products(nights):
    one, two = nights["one"], nights["two"]
    files = _products(one)
    assert files == _products(two)
    assert any(f.startswith("FIELD-A/tazsfp") for f in files)
    assert any(f.startswith("stacks/FIELD-B") for f in files)
    for f in files:
        a, b = data_hdus(one / f), data_hdus(two / f)
        assert a.keys() == b.keys(), f
        for name in a:
            assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), (f, name)


@pytest.mark.parametrize("target", ["FIELD-A", "FIELD-B"])
def test_two_processes_same_target_magnitudes(nights, target):
    import json
    m1 = json.loads((nights["one"] / "stacks" / f"{target}_r.json").read_text())
    m2 = json.loads((nights["two"] / "stacks" / f"{target}_r.json").read_text())
    for key in ("mag", "mag_err", "mag_inst"):
        if key in m1 or key in m2:
            assert math.isclose(m1[key], m2[key], rel_tol=0, abs_tol=1e-9), key


@pytest.mark.parametrize("which", ["one", "two"])
def test_noop_science_imports_no_pixel_library(nights, which):
    """Making every task and checking them (tonight's masters: no registry query) without
    numpy, astropy, SQLAlchemy ...: ``python -X importtime`` lists every module imported."""
    r = doit(nights[which], "science", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert executed(r.stdout) == set(), r.stdout
    imported = {m.group(1).split(".")[0] for m in
                re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", r.stderr, re.M)}
    assert "doit" in imported and "reducer" in imported     # the listing is there
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
