"""``reducer prune`` on a small synthetic night, with real doit runs.

The tests run in file order on one night (each says the state it starts from):
FIELD-A reduced, FIELD-B not yet -> prune leaves FIELD-B alone -> ``doit science`` rebuilds
nothing of FIELD-A -> a sky setting change rebuilds the pruned final products (the same
pixels again once the setting is restored) -> ``doit redo:FIELD-A`` rebuilds every prefix.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from reducer.testing import Target

from conftest import run_cli
from smallnight import doit, executed, make_small_night

INTERMEDIATE = ("p", "fp", "sfp", "zsfp", "azsfp")
FINAL = "tazsfp"
CHAIN_STEPS = ("prepare", "flatten", "sky", "cosmics", "astrometry", "zeropoint")


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    sim, nd = make_small_night(root, [Target("FIELD-A", nexp=3, exptime=120.0),
                                      Target("FIELD-B", nexp=2, exptime=120.0)])
    doit(nd, "science:FIELD-A")
    stems = {t: sorted(f["file"].rsplit(".", 1)[0] for f in sim.truth["frames"]
                       if f["type"] == "science" and f["object"] == t)
             for t in ("FIELD-A", "FIELD-B")}
    snap = root / "before-prune"
    snap.mkdir()
    for s in stems["FIELD-A"]:
        shutil.copy2(nd / "FIELD-A" / f"{FINAL}{s}.fits", snap)
    return {"root": root, "dir": nd, "stems": stems, "snap": snap}


def prune(nd: Path, *args: str, check: bool = True):
    return run_cli("prune", "--night", str(nd), *args, check=check)


def chain_tasks_run(out: str, stems) -> set:
    """The chain, stack and light-curve tasks of these frames that a doit run executed."""
    ran = executed(out)
    mine = {f"{step}:{s}" for s in stems for step in CHAIN_STEPS}
    return {t for t in ran if t in mine or t.startswith(("stack:", "lightcurve:", "calib", "inventory"))}


def intermediates(nd: Path, target: str, stems) -> list:
    return [nd / target / f"{pre}{s}.fits" for s in stems for pre in INTERMEDIATE]


def test_pending_target_left_alone_and_dry_run(night):
    nd, stems = night["dir"], night["stems"]
    inter_a = intermediates(nd, "FIELD-A", stems["FIELD-A"])
    assert all(p.is_file() for p in inter_a)
    mb = sum(p.stat().st_size for p in inter_a) / 1e6
    r = prune(nd, "--dry-run")
    assert f"FIELD-A: 3 frame(s) pruned, would free {mb:.1f} MB" in r.stdout
    assert re.search(r"^FIELD-B: not finished, \d+ task\(s\) pending: prepare:demo_\d+_\d+ "
                     r"\(not built\).*; left alone$", r.stdout, re.M), r.stdout
    assert "(dry run: nothing removed)" in r.stdout
    assert all(p.is_file() for p in inter_a)
    assert not (nd / "FIELD-A" / ".pruned.json").exists()
    # asked for by name, a target with work pending is refused (status 1), nothing removed
    r = prune(nd, "FIELD-B", check=False)
    assert r.returncode == 1 and "FIELD-B: not finished" in r.stdout
    assert "FIELD-A" not in r.stdout
    r = prune(nd, "NO-SUCH", check=False)
    assert r.returncode == 2
    assert re.search(r"^reducer: no target NO-SUCH in .* \(targets: FIELD-A, FIELD-B\)$", r.stderr)


def test_prune_frees_space_and_doit_rebuilds_nothing(night):
    nd, stems = night["dir"], night["stems"]
    inter_a = intermediates(nd, "FIELD-A", stems["FIELD-A"])
    mb = sum(p.stat().st_size for p in inter_a) / 1e6
    r = prune(nd)
    assert f"FIELD-A: 3 frame(s) pruned, freed {mb:.1f} MB" in r.stdout
    assert "FIELD-B: not finished" in r.stdout
    assert f"freed {mb:.1f} MB in total" in r.stdout
    left = sorted(p.name for p in (nd / "FIELD-A").iterdir())
    assert left == [".pruned.json"] + [f"{FINAL}{s}.fits" for s in stems["FIELD-A"]]
    man = json.loads((nd / "FIELD-A" / ".pruned.json").read_text())["frames"]
    assert sorted(man) == stems["FIELD-A"]
    e = man[stems["FIELD-A"][0]]
    assert e["steps"] == list(CHAIN_STEPS) and e["final"] == f"{FINAL}{stems['FIELD-A'][0]}.fits"
    assert e["removed"] == [f"{pre}{stems['FIELD-A'][0]}.fits" for pre in INTERMEDIATE]
    assert any(d.endswith(f"raw/{stems['FIELD-A'][0]}.fits") for d in e["depends_on"])
    assert any("master_bias" in d for d in e["depends_on"])
    # FIELD-B is reduced now; nothing of the pruned FIELD-A runs again
    every = stems["FIELD-A"] + stems["FIELD-B"]
    out = doit(nd, "science").stdout
    assert chain_tasks_run(out, every) == {"stack:FIELD-B_r"} | {
        f"{step}:{s}" for s in stems["FIELD-B"] for step in CHAIN_STEPS}
    assert not intermediates(nd, "FIELD-A", stems["FIELD-A"])[0].exists()
    # what a finished night runs every time (the reports), to compare with after pruning
    out = doit(nd, "science").stdout
    baseline = executed(out)
    assert not chain_tasks_run(out, every)
    r = prune(nd, "FIELD-B")
    assert re.search(r"^FIELD-B: 2 frame\(s\) pruned, freed [1-9][\d.]* MB$", r.stdout, re.M)
    assert "FIELD-A" not in r.stdout
    res = doit(nd, "science")
    assert executed(res.stdout) == baseline == set(), res.stdout
    assert re.search(r"^night 20261120: \d+ tasks \(0 executed, \d+ up to date\)", res.stderr, re.M)
    # and once more: pruning again is harmless
    r = prune(nd)
    assert r.stdout.splitlines() == [
        "FIELD-A: nothing to prune (already pruned); freed 0.0 MB",
        "FIELD-B: nothing to prune (already pruned); freed 0.0 MB",
        "freed 0.0 MB in total"]
    assert executed(doit(nd, "science").stdout) == baseline


def _edit_toml(nd: Path, old: str, new: str) -> None:
    p = nd / "night.toml"
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new, 1))


def test_setting_change_rebuilds_pruned_finals_in_a_scratch_folder(night):
    nd, stems, snap = night["dir"], night["stems"], night["snap"]
    finals = [nd / "FIELD-A" / f"{FINAL}{s}.fits" for s in stems["FIELD-A"]]
    before = {p: p.stat().st_mtime_ns for p in finals}
    _edit_toml(nd, "drop = []", "drop = []\n[sky]\nbox = 32")
    try:
        out = doit(nd, "science").stdout
        ran = chain_tasks_run(out, stems["FIELD-A"] + stems["FIELD-B"])
        # one task per pruned frame stands for its chain; stacks follow
        assert ran == {f"zeropoint:{s}" for s in stems["FIELD-A"] + stems["FIELD-B"]} | {
            "stack:FIELD-A_r", "stack:FIELD-B_r"}
        for s in stems["FIELD-A"]:
            assert (f"{s}.fits: pruned chain rebuilt in a scratch folder (6 steps), "
                    f"kept {FINAL}{s}.fits") in out
        for p in finals:
            assert p.stat().st_mtime_ns > before[p]
            with fits.open(p, checksum=True) as h:
                assert h[0].header["REDSTEP"] == "zeropoint" and not h[0].header.get("FAILED")
                old = fits.getdata(snap / p.name, "CCD1")
                assert not np.allclose(h["CCD1"].data, old, rtol=1e-6, atol=1e-3)
        # still pruned: no intermediate, no scratch folder left
        assert sorted(x.name for x in (nd / "FIELD-A").iterdir()) == \
            [".pruned.json"] + sorted(p.name for p in finals)
        assert not chain_tasks_run(doit(nd, "science").stdout, stems["FIELD-A"])
    finally:
        _edit_toml(nd, "drop = []\n[sky]\nbox = 32", "drop = []")
    out = doit(nd, "science").stdout
    assert {f"zeropoint:{s}" for s in stems["FIELD-A"]} <= executed(out)
    # the settings as before pruning give the products as before pruning
    for p in finals:
        with fits.open(p) as h, fits.open(snap / p.name) as o:
            for name in ("CCD1", "CCD1_UNC"):
                np.testing.assert_allclose(h[name].data, o[name].data, rtol=1e-5, atol=1e-3)
            np.testing.assert_array_equal(h["CCD1_MASK"].data, o["CCD1_MASK"].data)
            for key in ("PHOTZP", "FWHM", "ASTNMAT"):
                assert h[0].header[key] == pytest.approx(o[0].header[key], abs=1e-3)
            assert h[0].header["QUALFLAG"] == o[0].header["QUALFLAG"]


def test_redo_of_a_pruned_target_rebuilds_every_product(night):
    nd, stems = night["dir"], night["stems"]
    if not re.search(r"^redo\s", doit(nd, "list").stdout, re.M):
        pytest.skip("this reducer has no redo task")
    r = doit(nd, "redo:FIELD-A")
    assert r.returncode == 0
    assert not (nd / "FIELD-A" / ".pruned.json").exists()
    for p in intermediates(nd, "FIELD-A", stems["FIELD-A"]):
        assert p.is_file()
    assert (nd / "FIELD-A" / f"{FINAL}{stems['FIELD-A'][0]}.fits").is_file()
    out = doit(nd, "science").stdout
    assert not chain_tasks_run(out, stems["FIELD-A"] + stems["FIELD-B"])
    # FIELD-B stays pruned
    assert (nd / "FIELD-B" / ".pruned.json").is_file()
    assert not intermediates(nd, "FIELD-B", stems["FIELD-B"])[0].exists()
    # and the rebuilt target can be pruned again
    r = prune(nd, "FIELD-A")
    assert "FIELD-A: 3 frame(s) pruned, freed" in r.stdout


def test_prune_refuses_while_a_run_holds_the_night(night):
    import subprocess
    import sys
    from reducer import runlock
    nd = night["dir"]
    with runlock.hold(nd, "doit science (test)"):
        # not a run started by the holder: no REDUCER_RUNLOCK_HELD
        env = {k: v for k, v in os.environ.items() if k != runlock.ENV_HELD}
        r = subprocess.run([sys.executable, "-m", "reducer.cli", "prune", "--night", str(nd)],
                           capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert re.search(r"^reducer: night 20261120 is busy: pid \d+ .* runs `doit science \(test\)`",
                     r.stderr), r.stderr
    assert os.environ.get(runlock.ENV_HELD) is None


def test_prune_of_a_night_never_built(tmp_path):
    sim, nd = make_small_night(tmp_path, [Target("FIELD-A", nexp=1, exptime=60.0)])
    r = prune(nd, check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == f"reducer: {nd}: no doit state (.doit.db): nothing has been built yet"


def test_frames_other_tasks_read_keep_their_chain(tmp_path):
    """Without a catalogue each target's reference frame feeds the field reference from an
    intermediate product: that frame's chain stays, and so do the chains of its z-step
    companions (its cosmics task reads their sfp); the others are pruned."""
    sim, nd = make_small_night(tmp_path, [Target("FIELD-C", nexp=5, exptime=120.0)], seed=5)
    cfg = tmp_path / "reducer.toml"
    cfg.write_text(re.sub(r"\[catalog\]\npath = .*\n", "", cfg.read_text()))
    doit(nd, "science")
    ref = json.loads((nd / "FIELD-C" / "fieldref.json").read_text())["frame"]
    r = prune(nd)
    assert re.search(r"^FIELD-C: 2 frame\(s\) pruned, freed [\d.]+ MB; kept the chain of ", r.stdout, re.M), r.stdout
    kept = dict(re.findall(r"kept the chain of (\S+) \(read by ([^)]*)\)", r.stdout))
    files = sorted(f["file"] for f in sim.truth["frames"] if f["type"] == "science")
    assert files[0] == ref and "fieldref:FIELD-C" in kept[ref]
    # the reference frame's companions (the two after it) are read by its cosmics task
    ref_stem = ref.rsplit(".", 1)[0]
    assert set(kept) == set(files[:3])
    assert all(f"cosmics:{ref_stem}" in kept[f] for f in files[1:3])
    for f in files[:3]:
        stem = f.rsplit(".", 1)[0]
        assert all((nd / "FIELD-C" / f"{pre}{stem}.fits").is_file() for pre in INTERMEDIATE)
    others = [f.rsplit(".", 1)[0] for f in files[3:]]
    assert not any((nd / "FIELD-C" / f"{pre}{s}.fits").exists() for s in others for pre in INTERMEDIATE)
    res = doit(nd, "science")
    assert executed(res.stdout) == set(), res.stdout
