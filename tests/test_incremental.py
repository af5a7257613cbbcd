"""Incremental nights through real doit runs: new frames build only themselves and what
they feed; a stage's settings in night.toml rebuild that stage and what follows; a target's
coordinates rebuild only that target's stacks and light curves; a dropped frame rebuilds
only what it fed."""
from __future__ import annotations

import re
import shutil

import pytest

from reducer.testing import Target

from smallnight import doit, executed, make_small_night

CHAIN = ("prepare", "flatten", "sky", "cosmics", "astrometry", "zeropoint")


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """Two targets of three frames; the last frame of FIELD-B arrives later."""
    root = tmp_path_factory.mktemp("incremental")
    sim, nd = make_small_night(root, [Target("FIELD-A", nexp=3, exptime=120.0),
                                      Target("FIELD-B", nexp=3, exptime=120.0)],
                               seed=5, night_toml="[photometry]\nlightcurve_min_frames = 3")
    frames = {t: sorted(f["file"] for f in sim.truth["frames"]
                        if f["type"] == "science" and f["object"] == t)
              for t in ("FIELD-A", "FIELD-B")}
    late = frames["FIELD-B"][-1]
    later = root / "later"
    later.mkdir()
    shutil.move(sim.raw_dir / late, later / late)     # keeps its time
    first = doit(nd, "science")
    return {"dir": nd, "raw": sim.raw_dir, "frames": frames, "late": late, "later": later,
            "first": first}


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _chain(stem: str, steps=CHAIN) -> set:
    return {f"{s}:{stem}" for s in steps}


def test_new_frames_build_only_themselves_and_what_they_feed(night):
    nd, late = night["dir"], night["late"]
    first = executed(night["first"].stdout)
    assert not any(_stem(late) in t for t in first)
    assert "lightcurve:FIELD-B_r" not in first          # 2 frames: below the minimum of 3
    shutil.move(night["later"] / late, night["raw"] / late)
    r = doit(nd, "science")
    # FIELD-B's first two frames had one companion each in the z step (each other): with
    # the third they get two, and are compared again (frozen from now on)
    again = set().union(*(_chain(_stem(f), CHAIN[CHAIN.index("cosmics"):])
                          for f in night["frames"]["FIELD-B"][:2]))
    assert executed(r.stdout) == {"inventory", *_chain(_stem(late)), *again, "stack:FIELD-B_r",
                                  "lightcurve:FIELD-B_r", "science:_report"}
    assert "inventory 20261120: 15 frames" in r.stdout
    assert executed(doit(nd, "science").stdout) == set()


def test_a_stage_setting_rebuilds_that_stage_and_what_follows(night):
    nd = night["dir"]
    toml = nd / "night.toml"
    toml.write_text(toml.read_text() + "\n[sky]\nbox = 32\n")
    r = doit(nd, "science")
    stems = [_stem(f) for fs in night["frames"].values() for f in fs]
    after_sky = CHAIN[CHAIN.index("sky"):]
    want = set().union(*(_chain(s, after_sky) for s in stems))
    want |= {"stack:FIELD-A_r", "stack:FIELD-B_r", "lightcurve:FIELD-A_r", "lightcurve:FIELD-B_r",
             "science:_report"}
    assert executed(r.stdout) == want
    # nothing earlier: no inventory, no masters, no p or f
    assert not any(t.startswith(("inventory", "calib", "prepare", "flatten")) for t in executed(r.stdout))
    assert executed(doit(nd, "science").stdout) == set()


def test_one_targets_coordinates_rebuild_only_its_stack_and_light_curve(night):
    """[targets."FIELD-B"] in night.toml (the observer's coordinates of the target): its
    target photometry changes, nothing of FIELD-A; the frames have a header pointing, so
    their astrometry does not depend on it."""
    nd = night["dir"]
    toml = nd / "night.toml"
    toml.write_text(toml.read_text() + '\n[targets."FIELD-B"]\nra = 150.1\ndec = 2.2\n')
    r = doit(nd, "science")
    assert executed(r.stdout) == {"stack:FIELD-B_r", "lightcurve:FIELD-B_r", "science:_report"}
    assert executed(doit(nd, "science").stdout) == set()


def test_dropping_a_frame_rebuilds_only_what_it_fed(night):
    nd = night["dir"]
    drop = night["frames"]["FIELD-A"][0]
    toml = nd / "night.toml"
    text = toml.read_text()
    assert text.count("drop = []") == 1
    toml.write_text(text.replace("drop = []", f'drop = ["{drop}"]'))
    r = doit(nd, "science")
    # FIELD-A keeps 2 frames: its stack again; its light curve task goes (below 3 frames);
    # the two frames the z step compared with the dropped one are compared again
    again = set().union(*(_chain(_stem(f), CHAIN[CHAIN.index("cosmics"):])
                          for f in night["frames"]["FIELD-A"][1:]))
    assert executed(r.stdout) == {"inventory", *again, "stack:FIELD-A_r", "science:_report"}
    assert re.search(rf"set aside {re.escape(drop)}: dropped in night.toml", r.stdout)
    assert re.search(r"stack FIELD-A_r: 2 frames", r.stdout)
    from reducer.inventory import read_nightlog
    row = next(f for f in read_nightlog(nd / "nightlog.ecsv") if f.file == drop)
    assert not row.usable and row.reason == "dropped in night.toml"
    assert executed(doit(nd, "science").stdout) == set()
