"""The master sky in a real night (real doit runs): built once enough frames have arrived,
frozen after, and against truth it removes the simulator's fringes and dome-lamp
illumination error.

Night: the small demo camera (one 256 x 128 detector), filter i, two dithered targets of
three frames each; the simulator adds fringes of 5 % of the sky (``fringe``) and a dome
lamp 10 % brighter at one edge of the focal plane than the other (``dome_illumination``),
so flat-fielded frames carry a sky gradient of ~5 % across this detector.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.io import fits

from reducer.testing import Target
from smallnight import doit, executed, make_small_night

FRINGE = 0.05
SETTINGS = """[sky]
master = ["illumination", "fringe"]
master_frames = 4
master_min_frames = 3
"""


def _stem(name):
    return name.rsplit(".", 1)[0]


def _fringe_beta(sfp, pattern):
    """Amplitude of the true fringe pattern left in an sfp product, as a fraction of the
    injected one (1 = untouched, 0 = removed)."""
    with fits.open(sfp) as h:
        d, u, m = h["CCD1"].data, h["CCD1_UNC"].data, h["CCD1_MASK"].data
        sky = h["CCD1_SKY"].data
    blank = (m == 0) & (np.abs(d) < 4 * u)
    model = FRINGE * sky * pattern
    return float(np.sum(d[blank] * model[blank]) / np.sum(model[blank] ** 2))


def _sky_range(sfp):
    """(max - min) / median of the sky model the s step subtracted."""
    with fits.open(sfp) as h:
        s = h["CCD1_SKY"].data
    return float((s.max() - s.min()) / np.median(s))


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("mastersky")
    sim, nd = make_small_night(root, [Target("FIELD-A", nexp=3, exptime=120.0, dither=30.0),
                                      Target("FIELD-B", nexp=3, exptime=120.0, dither=30.0)],
                               seed=11, filters=("i",), night_toml=SETTINGS,
                               fringe={"i": FRINGE}, dome_illumination=0.1)
    sci = sorted((f for f in sim.truth["frames"] if f["type"] == "science"),
                 key=lambda f: f["date_obs"])
    files = [f["file"] for f in sci]
    later = root / "later"
    later.mkdir()
    for f in files[2:]:
        shutil.move(sim.raw_dir / f, later / f)       # keeps its time
    with fits.open(sim.truth_dir / "calib" / "fringe_i.fits") as h:
        pattern = h["CCD1"].data.astype(float)
    out = {"dir": nd, "raw": sim.raw_dir, "later": later, "files": files, "pattern": pattern,
           "targets": {f["file"]: f["object"] for f in sci}}
    # 1: two frames, fewer than master_min_frames: no master sky yet
    out["run1"] = doit(nd, "science")
    out["before"] = {f: (_fringe_beta(_sfp(out, f), pattern), _sky_range(_sfp(out, f)),
                         fits.getheader(_sfp(out, f)).get("MSKYWHY", "")) for f in files[:2]}
    # 2: frames 3 and 4 arrive: the master is made of the first 4 and freezes
    for f in files[2:4]:
        shutil.move(later / f, sim.raw_dir / f)
    out["run2"] = doit(nd, "science")
    # 3: frames 5 and 6 arrive: corrected with the frozen master, nothing earlier rebuilt
    for f in files[4:]:
        shutil.move(later / f, sim.raw_dir / f)
    out["run3"] = doit(nd, "science")
    return out


def _sfp(night, f):
    return night["dir"] / night["targets"][f] / f"sfp{_stem(f)}.fits"


def test_no_master_below_the_minimum_and_the_frames_say_why(night):
    assert not any(t.startswith("mastersky:") for t in executed(night["run1"].stdout))
    for f, (beta, rng, why) in night["before"].items():
        assert why == "no master sky in i yet: 2 of 3 science frames needed"
        # without a master the fringes and the lamp's gradient are all there
        assert beta > 0.6, beta      # (the 64-px sky meshes absorb a little of it)
        assert rng > 0.04, rng


def test_master_made_from_the_first_frames_then_frozen(night):
    files = night["files"]
    run2, run3 = executed(night["run2"].stdout), executed(night["run3"].stdout)
    assert "mastersky:i" in run2
    # the first two frames are sky-subtracted again, with the master
    assert {f"sky:{_stem(f)}" for f in files[:2]} <= run2
    path = night["dir"] / "mastersky" / "mastersky_i.fits"
    h = fits.getheader(path)
    assert h["MSKYOK"] is True and h["NFRAMES"] == 4
    assert [h[f"INPUT{i:03d}"] for i in range(1, 5)] == [f"fp{_stem(f)}.fits" for f in files[:4]]
    assert h["REDSTEP"] == "mastersky" and h["CFGDIGST"] and h["REDVER"]
    # frozen: later frames rebuild neither the master nor any earlier frame's sky (FIELD-B's
    # first frame, alone until now, gets its z-step companions: that redoes its z, a, t)
    assert not any(t.startswith("mastersky:") for t in run3)
    assert not any(t.startswith(("prepare:", "flatten:", "sky:")) and _stem(f) in t
                   for t in run3 for f in files[:4])
    assert not any(_stem(f) in t for t in run3 for f in files[:3])
    assert {f"sky:{_stem(f)}" for f in files[4:]} <= run3
    assert executed(doit(night["dir"], "science").stdout) == set()
    report = (night["dir"] / "report.txt").read_text()
    assert "Master skies\n  i: 4 frames, corrects illumination,fringe, " in report


def test_fringes_and_illumination_removed_against_truth(night):
    for f in night["files"]:
        sfp = _sfp(night, f)
        h = fits.getheader(sfp)
        assert h["MSKYFILE"] == "mastersky_i.fits" and "MSKYWHY" not in h
        assert abs(h["FRNGSCL"] - 1.0) < 5 * h["FRNGERR"] + 0.15, (h["FRNGSCL"], h["FRNGERR"])
        beta = _fringe_beta(sfp, night["pattern"])
        # 4 frames of ~1000 e- sky: the master's noise leaves ~10 % of the pattern
        assert abs(beta) < 0.2, (f, beta)
        # the lamp's 5 % gradient is gone from the sky: flat to well under 1 %
        assert _sky_range(sfp) < 0.01, (f, _sky_range(sfp))


def test_redo_of_a_target_keeps_the_master_and_the_other_target(night):
    nd = night["dir"]
    path = nd / "mastersky" / "mastersky_i.fits"
    t0 = path.stat().st_mtime_ns
    r = doit(nd, "redo:FIELD-A")
    assert path.stat().st_mtime_ns == t0, r.stdout      # same content: not rewritten
    assert "mastersky_i: unchanged" in r.stdout
    assert not any("FIELD-B" in t for t in executed(r.stdout))
    assert executed(doit(nd, "science").stdout) == set()


@pytest.mark.parametrize("extra,message", [
    ('[sky]\nmaster = ["superflat"]', "[sky] master: 'superflat' is not one of illumination, fringe"),
    ("[sky]\nmaster_frames = \"x\"", "[sky] master_frames: 'x' is not a number")])
def test_bad_master_sky_settings_are_one_line(tmp_path, extra, message):
    sim, nd = make_small_night(tmp_path, [Target("FIELD-A", nexp=1, exptime=60.0)], night_toml=extra)
    r = doit(nd, "list", check=False)
    assert r.returncode == 3
    out = r.stdout + r.stderr
    assert f"ERROR: {message}" in out and "Traceback" not in out
