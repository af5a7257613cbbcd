"""Robustness of a night through real doit runs: ``kill -9`` in the middle of ``doit
science`` then a rerun gives the uninterrupted night; two runs at once never overlap."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from reducer import runlock
from reducer.testing import Target

from smallnight import UTDATE, data_hdus, doit, executed, make_small_night


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same seeded night twice: one run uninterrupted, one killed with SIGKILL."""
    root = tmp_path_factory.mktemp("kill9")
    targets = [Target("FIELD-A", nexp=3, exptime=120.0), Target("FIELD-B", nexp=3, exptime=120.0)]
    toml = "[photometry]\nlightcurve_min_frames = 3"
    _, ref = make_small_night(root / "ref", targets, seed=11, night_toml=toml)
    _, nd = make_small_night(root / "kill", targets, seed=11, night_toml=toml)
    doit(ref, "science")
    return {"ref": ref, "dir": nd}


def _visible_products(nd: Path) -> list[Path]:
    return [p for p in nd.rglob("*") if p.is_file() and not p.name.startswith(".")
            and not str(p.relative_to(nd)).startswith(("raw/", "logs/"))]


def test_kill_9_in_the_middle_leaves_only_whole_files(pair):
    nd = pair["dir"]
    p = subprocess.Popen([sys.executable, "-m", "doit", "science"], cwd=nd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.monotonic()
    while len(list(nd.glob("FIELD-*/sfp*.fits"))) < 2 and time.monotonic() - t0 < 240:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not runlock.is_locked(nd)
    assert not (nd / "stacks" / "FIELD-B_r.json").exists()
    # what is visible is whole: no temporary names, every FITS file complete and checksummed
    for f in _visible_products(nd):
        assert ".tmp" not in f.name
        if f.suffix == ".fits":
            with fits.open(f, checksum=True) as h:
                h.verify("exception")
    pair["killed"] = True


def test_second_run_refused_then_waits_for_the_first(pair):
    """The rerun after the kill is the first run; a second one refuses at once, a third waits
    for it (REDUCER_LOCK_WAIT) and then finds nothing to do."""
    assert pair.get("killed")
    nd = pair["dir"]
    free = {runlock.ENV_HELD: None}
    first = subprocess.Popen([sys.executable, "-m", "doit", "science"], cwd=nd,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not runlock.is_locked(nd) and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    second = doit(nd, "science", env=free, check=False)
    assert second.returncode == 3
    assert re.search(rf"^ERROR: night {UTDATE} is busy: pid {first.pid} on host '[^']+' runs "
                     r"`doit science` since .* UTC \(\d+ s ago\); not starting", second.stderr, re.M)
    third = doit(nd, "science", env={**free, runlock.ENV_WAIT: "600"}, check=False)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out + err
    assert third.returncode == 0, third.stdout + third.stderr
    assert re.search(rf"night {UTDATE} is busy: pid {first.pid} .*waiting up to 6\d\d s", third.stderr)
    assert executed(third.stdout) == set()
    # the runs did not overlap: the third started when the first had finished
    recs = [json.loads(ln) for ln in (nd / "logs" / "tasks.jsonl").read_text().splitlines()]
    logs = sorted((nd / "logs").glob("doit-*.log"))
    assert len(logs) >= 3
    first_log = next(lg for lg in logs if f"(pid {first.pid} " in lg.read_text())
    last_line = first_log.read_text().splitlines()[-1]
    assert last_line.split()[1:3] == ["night", f"{UTDATE}:"]
    assert recs                                      # the first run recorded its tasks
    assert not any(p.name.startswith(".") and ".tmp" in p.name for p in nd.rglob("*")), \
        "temporary files of the killed run were not cleaned"


def test_results_identical_to_an_uninterrupted_run(pair):
    nd, ref = pair["dir"], pair["ref"]
    fits_ref = sorted(p.relative_to(ref) for p in ref.rglob("*.fits")
                      if not str(p.relative_to(ref)).startswith("raw/"))
    fits_new = sorted(p.relative_to(nd) for p in nd.rglob("*.fits")
                      if not str(p.relative_to(nd)).startswith("raw/"))
    assert fits_new == fits_ref
    assert any(str(p).startswith("stacks/") for p in fits_ref)
    for rel in fits_ref:
        a, b = data_hdus(ref / rel), data_hdus(nd / rel)
        assert a.keys() == b.keys(), rel
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{rel} {k}")
    from astropy.table import Table
    for rel in sorted(p.relative_to(ref) for p in (ref / "lightcurves").glob("*.ecsv")):
        ta, tb = Table.read(ref / rel), Table.read(nd / rel)
        assert ta.colnames == tb.colnames
        for c in ta.colnames:
            if ta[c].dtype.kind in "fiu":
                np.testing.assert_array_equal(np.asarray(ta[c]), np.asarray(tb[c]))
    assert executed(doit(nd, "science").stdout) == set()
