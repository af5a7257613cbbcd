"""The run lock of a night directory (and the free-space floor) through real doit runs, on a
night with no frames (so each run takes a second)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from reducer import runlock

from conftest import run_cli
from smallnight import UTDATE, doit, edited


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A night directory whose raw folder holds no frame: doit science runs in a second."""
    root = tmp_path_factory.mktemp("runlock")
    (root / "raw" / UTDATE).mkdir(parents=True)
    cfg = root / "reducer.toml"
    cfg.write_text('instrument = "demo"\nredux = "redux"\nmasters_store = "masters"\n')
    run_cli("--config", str(cfg), "night", UTDATE, "--raw", str(root / "raw" / UTDATE), cwd=root)
    nd = root / "redux" / UTDATE
    doit(nd, "science")
    return {"dir": nd}


@pytest.mark.parametrize("argv, cmd", [
    (["/usr/bin/doit"], "run"),
    (["/usr/bin/doit", "science"], "run"),
    (["/usr/bin/doit", "-n", "2", "science"], "run"),
    (["x/site-packages/doit/__main__.py", "list", "--all"], "list"),
    (["/usr/bin/doit", "-f", "dodo.py", "info", "inventory"], "info"),
    (["/usr/bin/doit", "--file=dodo.py", "forget"], "forget"),
    (["/usr/bin/doit", "-d", ".", "clean"], "clean"),
    (["/usr/bin/doit", "x=1", "reset-dep"], "reset-dep"),
    (["/usr/bin/doit", "redo:M_81"], "run"),
    (["/usr/bin/pytest", "-q"], None),
])
def test_doit_command_of_a_command_line(argv, cmd):
    assert runlock.doit_command(argv) == cmd


def test_second_run_refused_with_the_holder_named(night):
    nd = night["dir"]
    log = nd / "nightlog.ecsv"
    alone = {runlock.ENV_HELD: None}   # not started by the holder (hold() exports the variable)
    with runlock.hold(nd, "pytest holder"):
        assert os.environ[runlock.ENV_HELD] == str(os.getpid())
        r = doit(nd, "science", env=alone, check=False)
        assert r.returncode == 3
        line = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR")]
        assert len(line) == 1
        assert re.fullmatch(
            rf"ERROR: night 20261120 is busy: pid {os.getpid()} on host '[^']+' runs `pytest holder` "
            r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+ s ago\); not starting \(wait for it to "
            r"finish, or set \[doit\] lock_wait = SECONDS in night.toml to wait\)", line[0])
        # read-only commands are not locked out
        assert "science" in doit(nd, "list", env=alone).stdout
        assert "status" in doit(nd, "info", "inventory", env=alone).stdout
        # commands that alter tasks are
        for args in (("forget", "inventory"), ("clean", "inventory"), ("ignore", "inventory")):
            assert doit(nd, *args, env=alone, check=False).returncode == 3
        assert log.is_file()
        # a run started by the holder is let in; one naming another pid is not
        assert doit(nd, "science", env={runlock.ENV_HELD: str(os.getpid())}).returncode == 0
        assert doit(nd, "science", env={runlock.ENV_HELD: "1"}, check=False).returncode == 3
    assert not runlock.is_locked(nd) and runlock.ENV_HELD not in os.environ
    assert doit(nd, "science").returncode == 0


def test_second_run_waits_for_the_first(night):
    nd = night["dir"]
    assert runlock.acquire(nd, "pytest holder") == "acquired"
    timer = threading.Timer(2.0, runlock.release, args=(nd,))
    timer.start()
    t0 = time.monotonic()
    try:
        r = doit(nd, "science", env={runlock.ENV_WAIT: "60", runlock.ENV_HELD: None})
    finally:
        timer.join()
    assert time.monotonic() - t0 >= 1.9
    assert re.search(r"night 20261120 is busy: pid \d+ on host .* runs `pytest holder` .*; "
                     r"waiting up to 60 s for it to finish", r.stderr)


def test_lock_wait_setting_then_refusal(night):
    nd = night["dir"]
    with edited(nd / "night.toml", "[doit]\nlock_wait = 1.0"), runlock.hold(nd, "pytest holder"):
        t0 = time.monotonic()
        r = doit(nd, "science", env={runlock.ENV_HELD: None}, check=False)
        assert time.monotonic() - t0 >= 1.0
    assert r.returncode == 3
    assert re.search(r"ERROR: night 20261120 still busy after 1 s: pid \d+ .*`pytest holder`", r.stderr)


def test_lock_of_a_killed_run_does_not_block(night):
    nd = night["dir"]
    code = ("import sys, time; from reducer import runlock; runlock.acquire(sys.argv[1], 'victim'); "
            "print('locked', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(nd)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    assert runlock.is_locked(nd) and runlock.read_holder(nd).command == "victim"
    assert doit(nd, "science", check=False).returncode == 3
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not runlock.is_locked(nd)
    assert doit(nd, "science").returncode == 0



def test_refuses_below_the_free_space_floor(night):
    nd = night["dir"]
    with edited(nd / "night.toml", "[doit]\nmin_free_mb = 1e9"):
        r = doit(nd, "science", check=False)
        assert r.returncode == 3
        assert re.search(r"^ERROR: night 20261120: only .* free in .*, below the floor of 1000\.0 "
                         r"TB \(\[doit\] min_free_mb\); not starting", r.stderr, re.M)
        assert doit(nd, "list").returncode == 0
