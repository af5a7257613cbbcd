"""The night workflow through real doit runs: progress line and logs, the run lock, the
free-space check, ``doit redo:TARGET``, and ``doit info / forget / clean``."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime

import numpy as np
import pytest

from reducer.testing import Target

from smallnight import checksums, data_hdus, doit, executed, make_small_night, tasks_of_last_run, edited

SUMMARY = re.compile(r"^night 20261120: (\d+) tasks \((\d+) executed", re.M)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    sim, nd = make_small_night(root, [Target("FIELD-A", nexp=3, exptime=120.0),
                                      Target("FIELD-B", nexp=3, exptime=120.0)],
                               night_toml="[photometry]\nlightcurve_min_frames = 3")
    first = doit(nd, "science", env={"REDUCER_PROGRESS_INTERVAL": "0"})
    frames = {t: sorted(f["file"] for f in sim.truth["frames"]
                        if f["type"] == "science" and f["object"] == t)
              for t in ("FIELD-A", "FIELD-B")}
    return {"sim": sim, "dir": nd, "first": first, "frames": frames}


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


# --------------------------------------------------------------------------- progress, logs
def test_first_run_prints_tasks_progress_and_summary(night):
    out, err = night["first"].stdout, night["first"].stderr
    ran = executed(out)
    assert "inventory" in ran and "calib:bias_1x1_160x256_normal" in ran
    for t, files in night["frames"].items():
        for f in files:
            assert {f"prepare:{_stem(f)}", f"zeropoint:{_stem(f)}"} <= ran
        assert f"stack:{t}_r" in ran and f"lightcurve:{t}_r" in ran
    # task output is shown (once) when the task ends
    assert out.count("master bias_1x1_160x256_normal: 3 frames, verification PASS") == 1
    # the progress lines: the total grows while delayed tasks are made ('+' until final)
    prog = [(int(a), int(b), c) for a, b, c in
            re.findall(r"^progress \[(\d+)/(\d+)(\+?)\]", err, re.M)]
    assert len(prog) >= len(ran) - 1
    assert prog[0][2] == "+" and prog[-1][2] == ""
    assert prog[0][1] < prog[-1][1]
    assert all(b[0] >= a[0] for a, b in zip(prog, prog[1:]))
    m = SUMMARY.search(err)
    assert m and int(m.group(1)) == int(m.group(2)) == len(ran) == prog[-1][1]


def test_run_log_and_task_timings(night):
    nd = night["dir"]
    latest = nd / "logs" / "latest.log"
    assert latest.is_symlink()
    log = latest.resolve()
    assert re.fullmatch(r"doit-\d{8}T\d{6}\.\d{3}Z\.log", log.name)
    text = log.read_text()
    assert "`doit science`" in text.splitlines()[0]
    assert re.search(r"^\d\d:\d\d:\d\d ok   stack:FIELD-A_r \(\d+\.\d s\)$", text, re.M)
    assert "master flat_1x1_160x256_normal_r_dome: 3 frames" in text
    recs = [json.loads(ln) for ln in (nd / "logs" / "tasks.jsonl").read_text().splitlines()]
    first = [r for r in recs if r["run"] == recs[0]["run"]]
    assert {r["task"] for r in first} == executed(night["first"].stdout)
    for r in first:
        assert set(r) >= {"run", "task", "step", "status", "start", "seconds"}
        assert r["status"] == "ok" and r["seconds"] >= 0
        assert r["step"] == r["task"].split(":")[0]
        datetime.fromisoformat(r["start"])
    steps = {r["step"] for r in first}
    assert {"inventory", "calib", "prepare", "flatten", "sky", "cosmics", "astrometry",
            "zeropoint", "stack", "lightcurve", "science"} <= steps
    assert sum(r["seconds"] for r in first if r["step"] == "cosmics") > 0
    assert log.name == f"doit-{recs[0]['run']}.log"


def test_noop_run_executes_nothing_and_logs_no_timings(night):
    nd = night["dir"]
    nrec = len((nd / "logs" / "tasks.jsonl").read_text().splitlines())
    r = doit(nd, "science")
    assert executed(r.stdout) == set()
    assert "-- inventory" in r.stdout          # the inventory task shows itself (verbosity 2)
    assert "-- prepare:" not in r.stdout       # the others are counted
    assert re.search(r"\(0 executed, \d+ up to date\)", r.stderr)
    assert len((nd / "logs" / "tasks.jsonl").read_text().splitlines()) == nrec
    latest = (nd / "logs" / "latest.log").resolve()
    assert "up to date" in latest.read_text()
    v2 = doit(nd, "-v", "2", "science")
    for f in night["frames"]["FIELD-B"]:
        assert f"-- zeropoint:{_stem(f)}" in v2.stdout


def test_live_progress_line_on_a_terminal(night):
    """stderr a terminal: one line rewritten in place (\\r, erase), no plain lines."""
    import pty
    nd = night["dir"]
    doit(nd, "forget", "stack:FIELD-A_r")
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "doit", "science"], cwd=nd, stdout=subprocess.PIPE,
                         stderr=slave, text=True)
    os.close(slave)
    chunks = []

    def reader():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)
    th = threading.Thread(target=reader)
    th.start()
    out = p.communicate(timeout=120)[0]
    th.join(timeout=10)
    os.close(master)
    tty = b"".join(chunks).decode()
    assert p.returncode == 0
    assert ".  stack:FIELD-A_r" in out
    assert "\r\x1b[K[" in tty and re.search(r"\r\x1b\[K\[\d+/\d+\+?\] 0:00:\d\d", tty)
    assert "progress [" not in tty
    assert "night 20261120:" in tty


def test_failure_reported_in_full_and_the_night_goes_on(night):
    nd = night["dir"]
    f0 = _stem(night["frames"]["FIELD-A"][0])
    prod = nd / "FIELD-A" / f"tazsfp{f0}.fits"
    good = prod.read_bytes()
    prod.write_bytes(b"this is not a FITS file\n" * 200)
    t = time.time() + 5
    os.utime(prod, (t, t))
    try:
        r = doit(nd, "science", check=False)
        assert r.returncode == 2          # doit: an error while executing a task
        fail = re.search(r"^FAILED stack:FIELD-A_r: (.+)$", r.stdout, re.M)
        assert fail and "OSError" in fail.group(1)
        assert re.search(r"^FAILED science:FIELD-A: not run: a task it needs failed", r.stdout, re.M)
        # in full at the end: the task, the traceback
        assert "TaskError - taskid:stack:FIELD-A_r" in r.stdout
        assert "Traceback (most recent call last)" in r.stdout
        ran = executed(r.stdout)
        assert not any("FIELD-B" in t for t in ran)
        st = tasks_of_last_run(nd)
        assert st["stack:FIELD-A_r"] == "fail"
        rec = [json.loads(ln) for ln in (nd / "logs" / "tasks.jsonl").read_text().splitlines()][-60:]
        assert any(x["task"] == "stack:FIELD-A_r" and "OSError" in x.get("reason", "") for x in rec)
        assert any(x["task"] == "science:_report" and x["status"] == "fail"
                   and x["reason"].startswith("not run") for x in rec)
        assert re.search(r"\(2 executed, 2 failed, 1 not run \(a task they need failed\), "
                         r"\d+ up to date\)", r.stderr)
    finally:
        prod.write_bytes(good)
    r = doit(nd, "science")
    assert {"stack:FIELD-A_r", "lightcurve:FIELD-A_r"} <= executed(r.stdout)
    assert "FAILED" not in r.stdout


# --------------------------------------------------------------------------- info, forget, clean
def test_info_forget_rebuild_with_one_process(night):
    nd = night["dir"]
    f0 = _stem(night["frames"]["FIELD-A"][1])
    assert re.search(r"status\s*: up-to-date", doit(nd, "info", f"prepare:{f0}").stdout)
    doit(nd, "forget", f"prepare:{f0}")
    info = doit(nd, "info", f"prepare:{f0}", check=False)
    assert info.returncode == 1           # doit info: 1 when the task would run
    assert re.search(r"status\s*: run", info.stdout)
    r = doit(nd, "-n", "1", "science")
    chain = {f"{s}:{f0}" for s in ("prepare", "flatten", "sky", "cosmics", "astrometry", "zeropoint")}
    # the frame's new sfp is a z-step companion of FIELD-A's two other frames: their z, a
    # and t are redone too (doit compares times, and the product was written again)
    others = {f"{s}:{_stem(f)}" for f in night["frames"]["FIELD-A"] if _stem(f) != f0
              for s in ("cosmics", "astrometry", "zeropoint")}
    assert executed(r.stdout) - {"science:_report"} == chain | others | {"stack:FIELD-A_r",
                                                                        "lightcurve:FIELD-A_r"}


def test_clean_removes_products_and_science_rebuilds_them(night):
    nd = night["dir"]
    names = [nd / "stacks" / f"FIELD-B_r.{e}" for e in ("fits", "ecsv", "json")] + \
            [nd / "lightcurves" / "FIELD-B_r.json"]
    assert all(p.is_file() for p in names)
    doit(nd, "clean", "stack:FIELD-B_r", "lightcurve:FIELD-B_r")
    assert not any(p.exists() for p in names)
    assert (nd / "stacks" / "FIELD-A_r.json").is_file()
    r = doit(nd, "science")
    assert executed(r.stdout) - {"science:_report"} == {"stack:FIELD-B_r", "lightcurve:FIELD-B_r"}
    assert all(p.is_file() for p in names)


# --------------------------------------------------------------------------- free space
def test_estimate_of_what_the_night_still_needs(night):
    from reducer.diskspace import DiskFull, check_before_run, estimate_needed
    from reducer.night import Night
    nd = night["dir"]
    n = Night(nd)
    e = estimate_needed(n)
    assert (e.products, e.masters, e.stacks, e.bytes) == (0, 0, 0, 0)
    f0 = _stem(night["frames"]["FIELD-B"][0])
    last = nd / "FIELD-B" / f"tazsfp{f0}.fits"
    moved = last.with_name("x" + last.name)
    last.rename(moved)
    try:
        e = estimate_needed(n)
    finally:
        moved.rename(last)
    assert e.products == 1 and e.stacks == 0
    # one product of a raw 160 x 256 frame (the overscan counted too: an upper bound),
    # 10 bytes a pixel, 4 % for headers; the product itself is 256 x 128 px
    assert e.bytes == pytest.approx(160 * 256 * 10 * 1.04)
    assert e.bytes >= moved.stat().st_size if moved.exists() else last.stat().st_size
    assert check_before_run(n, free=1e15) is None
    with pytest.raises(DiskFull, match=r"only 1\.0 MB free in .*below the floor of 500\.0 MB"):
        check_before_run(n, free=1e6)
    log = nd / "nightlog.ecsv"
    st = log.stat()
    aside = nd / "nightlog.aside"
    log.rename(aside)
    try:
        e = estimate_needed(n)
    finally:
        aside.rename(log)
        os.utime(log, ns=(st.st_atime_ns, st.st_mtime_ns))
    raw = sum(p.stat().st_size for p in (nd / "raw").iterdir())
    assert e.from_raw and e.bytes > raw


def test_warns_when_the_disk_is_short_and_goes_on(night):
    nd = night["dir"]
    f0 = _stem(night["frames"]["FIELD-B"][1])
    (nd / "FIELD-B" / f"tazsfp{f0}.fits").unlink()
    with edited(nd / "night.toml", "[doit]\nspace_margin = 1e12"):
        r = doit(nd, "science")
    warn = [ln for ln in r.stderr.splitlines() if "disk space is short" in ln]
    assert len(warn) == 1
    assert re.search(r"the night still needs about .* \(1 frame products\)", warn[0])
    assert f"zeropoint:{f0}" in executed(r.stdout)


# --------------------------------------------------------------------------- redo
def test_redo_rebuilds_one_target_and_leaves_the_other(night):
    nd = night["dir"]
    assert re.search(r"^redo\s+.*doit redo:TARGET \(FIELD-A, FIELD-B\)", doit(nd, "list").stdout, re.M)
    a_files = sorted(p for p in (nd / "FIELD-A").glob("*") if p.is_file()) + \
        sorted((nd / "stacks").glob("FIELD-A_*")) + sorted((nd / "lightcurves").glob("FIELD-A_*"))
    assert len(a_files) >= 3 * 6 + 3
    before = {p: (p.stat().st_mtime_ns, data_hdus(p) if p.suffix == ".fits" else None)
              for p in a_files}
    b_dirs = [nd / "FIELD-B"]
    b_sums = {d: checksums(d) for d in b_dirs}
    b_other = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in
               list((nd / "stacks").glob("FIELD-B_*")) + list((nd / "lightcurves").glob("FIELD-B_*"))}
    b_times = {p: p.stat().st_mtime_ns for p in (nd / "FIELD-B").iterdir()}
    (nd / "FIELD-A" / ".pruned.json").write_text("{}")      # a prune manifest goes too
    r = doit(nd, "redo:FIELD-A")
    text = r.stdout + r.stderr
    assert "database is locked" not in text
    assert re.search(r"redo FIELD-A: removed \d+ files", r.stdout)
    assert not (nd / "FIELD-A" / ".pruned.json").exists()
    for p, (t, data) in before.items():
        assert p.is_file(), p
        assert p.stat().st_mtime_ns > t, p
        if data is not None:
            new = data_hdus(p)
            assert new.keys() == data.keys()
            for k in data:
                np.testing.assert_allclose(new[k], data[k], rtol=1e-6, atol=1e-6, equal_nan=True)
    for d, sums in b_sums.items():
        assert checksums(d) == sums
    assert {p: p.stat().st_mtime_ns for p in (nd / "FIELD-B").iterdir()} == b_times
    for p, (t, content) in b_other.items():
        assert p.stat().st_mtime_ns == t and p.read_bytes() == content
    # the nested runs logged themselves; latest.log is the outer run's
    assert "`doit redo:FIELD-A`" in (nd / "logs" / "latest.log").read_text().splitlines()[0]
    heads = [p.read_text().splitlines()[0] for p in (nd / "logs").glob("doit-*.log")]
    assert any("`doit science:FIELD-A`" in h for h in heads)
    assert any("`doit report`" in h for h in heads)
    # the nested run recorded the rebuild; the outer run its redo task
    recs = [json.loads(ln) for ln in (nd / "logs" / "tasks.jsonl").read_text().splitlines()]
    assert any(x["task"] == "redo:FIELD-A" and x["status"] == "ok" for x in recs[-3:])
    f0 = _stem(night["frames"]["FIELD-A"][0])
    assert any(x["task"] == f"prepare:{f0}" and x["status"] == "ok" for x in recs[-60:])
    # afterwards doit science finds everything up to date
    again = doit(nd, "science")
    assert executed(again.stdout) == set()
    assert re.search(r"\(0 executed, \d+ up to date\)", again.stderr)


def test_clean_everything(night):
    """`doit clean` (the default tasks and what they depend on) removes the products and the
    masters from the night directory; the raw frames are untouched and the next run would
    build everything again."""
    nd = night["dir"]
    raw = checksums(nd / "raw")
    doit(nd, "clean")
    assert not list((nd / "FIELD-A").glob("*.fits")) and not list((nd / "FIELD-B").glob("*.fits"))
    assert not list((nd / "stacks").glob("*")) and not list((nd / "lightcurves").glob("*"))
    assert not list((nd / "masters").glob("*.fits"))
    assert (nd / "nightlog.ecsv").is_file()      # `doit clean inventory` for that one
    assert checksums(nd / "raw") == raw
    info = doit(nd, "info", "stack:FIELD-A_r", check=False)
    assert info.returncode == 1 and "The following targets do not exist" in info.stdout
