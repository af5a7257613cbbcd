"""``reducer watch``: the raw folder watcher, the stop time, and real watch sessions
(a subprocess fed frames over time; SIGTERM / Ctrl-C in the middle of a doit run)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reducer.testing import Target
from reducer.watch import RawWatcher, WatchError, stop_time, watch_settings

from smallnight import SHAPE, UTDATE, doit, executed, small_profile

WATCH = {"poll_seconds": 0.5, "settle_seconds": 2.5, "idle_minutes": 0.25, "stop_at": ""}


# --------------------------------------------------------------------------- settings, stop time
@pytest.mark.parametrize("watch, match", [
    ({"poll_seconds": 0}, r"^\[watch\] poll_seconds must be > 0, not 0$"),
    ({"settle_seconds": -1}, r"^\[watch\] settle_seconds must be >= 0, not -1$"),
    ({"idle_minutes": -5.0}, r"^\[watch\] idle_minutes must be >= 0, not -5$"),
    ({"stop_at": "7am"}, r"^\[watch\] stop_at is '7am'; allowed: 'sunrise', 'twilight', a local "
                         r"time 'HH:MM', or '' \(no stop time\)$"),
    ({"stop_at": "25:00"}, r"stop_at is '25:00'"),
])
def test_bad_watch_settings(watch, match):
    with pytest.raises(WatchError, match=match):
        watch_settings({"watch": watch})


def test_watch_settings_defaults_and_schema(tmp_path):
    from reducer.config import NIGHT_SCHEMA, SettingsError, read_toml
    assert watch_settings({}) == watch_settings({"watch": {}})
    assert watch_settings({}).stop_at == "sunrise"
    p = tmp_path / "night.toml"
    p.write_text('[night]\nutdate = "20261120"\n[watch]\npoll_second = 5\n')
    with pytest.raises(SettingsError, match=r"\[watch\] unknown key 'poll_second' \(did you mean "
                                            r"'poll_seconds'\?"):
        read_toml(p, NIGHT_SCHEMA)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A small simulated night (not in a night directory yet) and its profile."""
    from reducer.testing import make_night
    root = tmp_path_factory.mktemp("watchsim")
    small_profile(root / "profiles")
    s = make_night(root / "sim" / UTDATE, seed=11, filters=("r",), standard=False, shape=SHAPE,
                   stars_per_field=1500, nbias=3, ndark=3, nflat=3,
                   targets=[Target("FIELD-A", nexp=3, exptime=120.0),
                            Target("FIELD-B", nexp=2, exptime=120.0)])
    return {"root": root, "sim": s}


@pytest.mark.parametrize("stop_at, truth_key, tol_s", [
    ("sunrise", "sunrise", 90.0),
    ("twilight", "morning_twilight_12", 90.0),
])
def test_stop_time_from_the_sun(sim, stop_at, truth_key, tol_s):
    from reducer.instruments import load_profile
    site = load_profile("demo").site
    got = stop_time(UTDATE, site, stop_at)
    want = datetime.fromisoformat(sim["sim"].truth["night"][truth_key]).replace(tzinfo=timezone.utc)
    assert abs((got - want).total_seconds()) < tol_s


@pytest.mark.parametrize("stop_at, want", [
    ("06:30", "2026-11-20T13:30:00+00:00"),      # the morning: MST = UTC-7
    ("18:00", "2026-11-20T01:00:00+00:00"),      # the evening before
    ("12:00", "2026-11-20T19:00:00+00:00"),      # the night's end (local noon)
    ("", None),
])
def test_stop_time_local_clock(stop_at, want):
    from reducer.instruments import load_profile
    got = stop_time(UTDATE, load_profile("demo").site, stop_at)
    assert (got.isoformat() if got else None) == want


# --------------------------------------------------------------------------- the watcher
def test_raw_watcher_waits_for_files_to_settle(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    w = RawWatcher(raw, settle_seconds=1.0)
    w.poll()
    assert w.pending() == []
    (raw / "README").write_text("not a frame")
    (raw / "a.fits.part").write_bytes(b"x" * 100)              # still being copied
    (raw / ".hidden.fits").write_bytes(b"x" * 100)
    f = raw / "a.fits"
    f.write_bytes(b"SIMPLE  =                    T" + b" " * 2850)
    w.poll()
    assert w.pending() == ["a.fits"] and not w.settled("a.fits")
    time.sleep(0.6)
    with open(f, "ab") as fh:                                    # the second half arrives
        fh.write(b" " * 2880)
    w.poll()
    assert not w.settled("a.fits")                               # changed: the wait starts again
    time.sleep(0.6)
    w.poll()
    assert not w.settled("a.fits")
    time.sleep(0.5)
    w.poll()
    assert w.settled("a.fits")
    assert w.take() == ["a.fits"] and w.pending() == []
    # an old file (copied with its time kept) settles on its second sighting
    g = raw / "b.fits"
    shutil.copy(f, g)
    old = time.time() - 3600
    os.utime(g, (old, old))
    w.poll()
    assert w.pending() == ["b.fits"] and not w.settled("b.fits")
    w.poll()
    assert w.settled("b.fits")
    # a file changed after it was handed to doit is pending again; a removed one is forgotten
    w.take()
    f.write_bytes(f.read_bytes() + b" " * 2880)
    g.unlink()
    w.poll()
    assert w.pending() == ["a.fits"]


# --------------------------------------------------------------------------- real sessions
class Session:
    """``reducer watch`` as a subprocess; its output lines with the time each arrived."""

    def __init__(self, root: Path, raw: Path, watch: dict, catalog: Path):
        cfg = root / "reducer.toml"
        table = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in watch.items())
        cfg.write_text('instrument = "demosmall"\nredux = "redux"\nmasters_store = "masters"\n'
                       f'profiles_dirs = ["profiles"]\n[catalog]\npath = "{catalog}"\n'
                       f"[watch]\n{table}")
        self.nd = root / "redux" / UTDATE
        env = {k: v for k, v in os.environ.items() if k != "REDUCER_RUNLOCK_HELD"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reducer.cli", "--config", str(cfg), "watch", UTDATE,
             "--raw", str(raw)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env)
        self.lines: list = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def text(self, since: int = 0) -> str:
        return "\n".join(line for _, line in self.lines[since:])

    def wait_for(self, pattern: str, since: int = 0, timeout: float = 240.0) -> int:
        """Index of the first line from ``since`` on matching ``pattern`` (waits for it)."""
        rx = re.compile(pattern)
        end = time.time() + timeout
        while time.time() < end:
            for i in range(since, len(self.lines)):
                if rx.search(self.lines[i][1]):
                    return i
            if self.proc.poll() is not None and not self._t.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _frames(sim, *types, target=None):
    return sorted(f["file"] for f in sim.truth["frames"]
                  if f["type"] in types and (target is None or f["object"] == target))


def _copy(sim, names, raw: Path):
    for n in names:
        shutil.copy(sim.raw_dir / n, raw / n)


DONE = r"^watch 20261120: doit science done in \d+ s$"


@pytest.fixture
def session(sim, tmp_path):
    root = tmp_path
    shutil.copytree(sim["root"] / "profiles", root / "profiles")
    raw = root / "raw" / UTDATE
    raw.mkdir(parents=True)
    made = []

    def start(watch=WATCH, frames=()):
        _copy(sim["sim"], frames, raw)
        s = Session(root, raw, watch, sim["sim"].catalog_path)
        made.append(s)
        return s
    yield {"start": start, "raw": raw, "sim": sim["sim"], "root": root}
    for s in made:
        s.stop()


def test_watch_reduces_frames_as_they_arrive_and_stops_when_idle(session):
    sim, raw = session["sim"], session["raw"]
    s = session["start"]()
    nd = s.nd
    i = s.wait_for(r"^watch 20261120: watching .* every 0.5 s \(files settle 2.5 s\); stops "
                   r"after 0.25 min without new frames$")
    assert "night 20261120: made dodo.py in" in s.text() and (nd / "night.toml").is_file()
    assert os.readlink(nd / "raw") == str(raw)
    # two biases: fewer than the profile's minimum, no master yet
    bias = _frames(sim, "bias")
    _copy(sim, bias[:2], raw)
    a = s.wait_for(r"^watch 20261120: 2 new or changed frame\(s\) \(" + re.escape(bias[0]), i)
    b = s.wait_for(DONE, a)
    run = s.text(a)
    assert "inventory 20261120: 2 frames (2 bias)" in run and "master bias" not in run
    assert not list((nd / "masters").glob("master_bias*.fits"))
    # the rest of the calibrations: masters built
    calib = bias[2:] + _frames(sim, "dark", "flat")
    _copy(sim, calib, raw)
    a = s.wait_for(rf"^watch 20261120: {len(calib)} new or changed frame\(s\)", b)
    b = s.wait_for(DONE, a)
    assert re.search(r"^master bias_\S+: 3 frames, verification PASS", s.text(a), re.M)
    for kind in ("bias", "dark", "flat"):
        assert list((nd / "masters").glob(f"master_{kind}*.fits")), kind
    # FIELD-A; its last frame is written in two halves with a pause shorter than the settle
    # time: no doit run may start between the halves
    fa = _frames(sim, "science", target="FIELD-A")
    _copy(sim, fa[:2], raw)
    data = (sim.raw_dir / fa[2]).read_bytes()
    with open(raw / fa[2], "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        time.sleep(1.5)
        fh.write(data[len(data) // 2:])
    t_whole = time.time()
    a = s.wait_for(r"^watch 20261120: 3 new or changed frame\(s\)", b)
    assert s.lines[a][0] > t_whole
    assert all(n in s.lines[a][1] for n in fa)
    b = s.wait_for(DONE, a)
    assert "not yet complete" not in s.text(a) and "set aside" not in s.text(a)
    # FIELD-B, then nothing more: the session ends by itself
    fb = _frames(sim, "science", target="FIELD-B")
    _copy(sim, fb, raw)
    t_last = time.time()
    a = s.wait_for(r"^watch 20261120: 2 new or changed frame\(s\)", b)
    b = s.wait_for(DONE, a)
    e = s.wait_for(r"^watch 20261120: no new frames for 0.25 min: last frames and the final report$", b)
    assert s.lines[e][0] - t_last >= 15.0
    assert s.proc.wait(timeout=180) == 0
    s._t.join(10)
    tail = s.text(e)
    if "doit finalreport" in tail:
        assert (nd / "finalreport.html").is_file()
        assert re.search(r"^watch 20261120: done after 5 doit run\(s\)$", tail, re.M)
    else:
        assert "this night has no finalreport task" in tail
    # one announcement per batch, each frame announced once
    ann = [line for _, line in s.lines if "new or changed frame(s)" in line]
    assert len(ann) == 4
    assert sum(fa[2] in line for line in ann) == 1
    for f in fa + fb:
        stem = f.rsplit(".", 1)[0]
        assert (nd / "FIELD-A" / f"tazsfp{stem}.fits").is_file() or \
            (nd / "FIELD-B" / f"tazsfp{stem}.fits").is_file()
    assert (nd / "stacks" / "FIELD-A_r.json").is_file() and (nd / "stacks" / "FIELD-B_r.json").is_file()
    assert executed(doit(nd, "science").stdout) == set()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_stops_cleanly_and_doit_finishes_the_night(session, sig):
    from astropy.io import fits
    from reducer import runlock
    sim = session["sim"]
    s = session["start"](dict(WATCH, idle_minutes=0.0), frames=sorted(f["file"] for f in sim.truth["frames"]))
    nd = s.nd
    s.wait_for(r"new or changed frame\(s\).*: doit science$")
    # wait for the chain to be under way
    end = time.time() + 240
    while not list((nd / "FIELD-A").glob("p*.fits")) and time.time() < end:
        time.sleep(0.1)
    assert list((nd / "FIELD-A").glob("p*.fits")), s.text()
    s.proc.send_signal(sig)
    assert s.proc.wait(timeout=120) == 0
    s._t.join(10)
    name = signal.Signals(sig).name
    assert s.lines[-1][1] == (f"watch 20261120: stopped by {name}: doit science interrupted, "
                              f"products so far kept; the next `doit science` finishes the night")
    assert not runlock.is_locked(nd)
    # no half-written file: no temporary left, every FITS whole (checksums verified)
    assert not [p for p in nd.rglob("*.tmp*")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for p in nd.rglob("*.fits"):
            if p.is_file() and "raw" not in p.relative_to(nd).parts:
                with fits.open(p, checksum=True) as h:
                    h.verify("exception")
    # the interrupted night is finished by the next run, which leaves nothing to do
    out = doit(nd, "science").stdout
    assert "inventory" not in executed(out)
    for f in _frames(sim, "science"):
        stem = f.rsplit(".", 1)[0]
        assert any((nd / t / f"tazsfp{stem}.fits").is_file() for t in ("FIELD-A", "FIELD-B"))
    assert executed(doit(nd, "science").stdout) == set()


def test_ctrl_c_while_waiting_for_frames(session):
    s = session["start"](dict(WATCH, idle_minutes=0.0))
    s.wait_for(r"^watch 20261120: watching ")
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(timeout=30) == 0
    s._t.join(10)
    assert s.lines[-1][1] == "watch 20261120: stopped by SIGINT: no doit run was going on"


def test_a_busy_night_waits_for_the_other_run(session):
    from reducer import runlock
    sim = session["sim"]
    bias = _frames(sim, "bias")
    s = session["start"](dict(WATCH, idle_minutes=0.0))
    s.wait_for(r"^watch 20261120: watching ")
    with runlock.hold(s.nd, "doit science (observer)"):
        _copy(sim, bias, session["raw"])
        i = s.wait_for(r"^watch 20261120: night 20261120 is busy: pid \d+ .* runs `doit science "
                       r"\(observer\)`.*; trying again every 0.5 s$")
        time.sleep(2.0)                      # a few polls: said once, nothing run
        assert "doit science done" not in s.text(i)
        assert sum("is busy" in line for _, line in s.lines) == 1
    a = s.wait_for(r"^watch 20261120: 3 new or changed frame\(s\)", i)
    s.wait_for(DONE, a)
    assert "inventory 20261120: 3 frames (3 bias)" in s.text(a)


def test_fallback_masters_serve_until_tonights_arrive(session, sim):
    """Science frames before tonight's flats: the registry's flat of the night before serves;
    once tonight's flats are in, the frames are flattened again with tonight's master."""
    from astropy.io import fits
    from reducer.testing import make_night
    from conftest import run_cli
    root, raw, tonight = session["root"], session["raw"], session["sim"]
    # the night before (same seed: the same camera, so the same pixel response; another seed
    # makes tonight's flat fail its comparison with the previous one): its masters certified
    prev = make_night(root / "prev" / "20261119", seed=11, utdate="20261119", filters=("r",),
                      standard=False, shape=SHAPE, stars_per_field=200, nbias=3, ndark=3,
                      nflat=3, targets=[Target("FIELD-A", nexp=1, exptime=60.0)])
    s = session["start"](dict(WATCH, idle_minutes=0.0))
    s.wait_for(r"^watch 20261120: watching ")
    cfg = root / "reducer.toml"
    run_cli("--config", str(cfg), "night", "20261119", "--raw", str(prev.raw_dir), cwd=root)
    doit(root / "redux" / "20261119", "calib")
    # tonight: biases, darks and FIELD-A's frames, no flat yet
    fa = _frames(tonight, "science", target="FIELD-A")
    first = _frames(tonight, "bias", "dark") + fa
    _copy(tonight, first, raw)
    a = s.wait_for(rf"^watch 20261120: {len(first)} new or changed frame\(s\)")
    b = s.wait_for(DONE, a)
    nd = s.nd
    for f in fa:
        h = fits.getheader(nd / "FIELD-A" / f"fp{f.rsplit('.', 1)[0]}.fits")
        assert h["MFLATOR"].startswith("fallback from 20261119"), h["MFLATOR"]
        assert h["MBIASOR"] == "tonight"
    # tonight's flats: tonight's master flat, and the frames flattened again with it
    flats = _frames(tonight, "flat")
    _copy(tonight, flats, raw)
    a = s.wait_for(rf"^watch 20261120: {len(flats)} new or changed frame\(s\)", b)
    s.wait_for(DONE, a)
    assert re.search(r"^master flat_\S+: 3 frames, verification PASS", s.text(a), re.M), s.text()
    for f in fa:
        stem = f.rsplit(".", 1)[0]
        assert fits.getheader(nd / "FIELD-A" / f"fp{stem}.fits")["MFLATOR"] == "tonight"
        assert fits.getheader(nd / "FIELD-A" / f"tazsfp{stem}.fits")["MFLATOR"] == "tonight"
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=60) == 0


def test_a_night_already_over_is_finished_and_reported(tmp_path):
    """Started after the night's stop time: what is in raw/ is reduced once, then the final
    report, and the session ends."""
    from reducer.testing import make_night
    small_profile(tmp_path / "profiles")
    old = make_night(tmp_path / "raw" / "20200115", seed=2, utdate="20200115", filters=("r",),
                     standard=False, shape=SHAPE, stars_per_field=200, nbias=3, ndark=0,
                     nflat=0, targets=[Target("FIELD-A", nexp=1, exptime=60.0)])
    bias = sorted(f["file"] for f in old.truth["frames"] if f["type"] == "bias")
    for f in old.truth["frames"]:
        if f["type"] != "bias":
            (old.raw_dir / f["file"]).unlink()
    cfg = tmp_path / "reducer.toml"
    cfg.write_text('instrument = "demosmall"\nredux = "redux"\nmasters_store = "masters"\n'
                   'profiles_dirs = ["profiles"]\n[watch]\npoll_seconds = 0.5\n'
                   'settle_seconds = 1.0\nstop_at = "06:30"\n')
    env = {k: v for k, v in os.environ.items() if k != "REDUCER_RUNLOCK_HELD"}
    r = subprocess.run([sys.executable, "-m", "reducer.cli", "--config", str(cfg), "watch",
                        "20200115", "--raw", str(old.raw_dir)], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"^watch 20200115: watching .*; stops at 06:30 2020-01-15 06:30 MST$", out, re.M)
    assert re.search(r"^watch 20200115: night over \(06:30 13:30 UTC\): last frames and the final "
                     r"report$", out, re.M), out
    assert re.search(r"^watch 20200115: 3 new or changed frame\(s\) \(" + re.escape(bias[0]), out, re.M)
    assert "master bias_1x1_160x256_normal: 3 frames, verification PASS" in out
    if "doit finalreport" in out:
        assert (tmp_path / "redux" / "20200115" / "finalreport.txt").is_file()
    assert out.splitlines()[-1] in ("watch 20200115: done after 2 doit run(s)",
                                    "watch 20200115: this night has no finalreport task (reducer "
                                    "without the end-of-night report): skipped")
