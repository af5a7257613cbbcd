"""The z step's companion frames in a real night (real doit runs): which exposures each
frame is compared with, frozen once enough have arrived, and pruning with them.

Night: the small demo camera, one target of four dithered r exposures arriving one by one
(two, then a third, then a fourth). With ``[cosmics] companions = 2`` (the default) frame
``i`` is compared with the two before it, the first two with the first three but
themselves; the accuracy of the comparison against truth is in tests/test_chain.py and
tests/test_sky_cosmics.py.
"""
from __future__ import annotations

import shutil

import pytest
from astropy.io import fits

from reducer.testing import Target
from smallnight import doit, executed, make_small_night


def _stem(name):
    return name.rsplit(".", 1)[0]


def _companions(nd, f):
    h = fits.getheader(nd / "FIELD-A" / f"zsfp{_stem(f)}.fits")
    return [h[k] for k in sorted(k for k in h if k.startswith("CRCMP"))]


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("companions")
    sim, nd = make_small_night(root, [Target("FIELD-A", nexp=4, exptime=120.0, dither=25.0)], seed=9)
    files = sorted((f["file"] for f in sim.truth["frames"] if f["type"] == "science"))
    later = root / "later"
    later.mkdir()
    for f in files[2:]:
        shutil.move(sim.raw_dir / f, later / f)
    out = {"dir": nd, "files": files}
    out["run1"] = doit(nd, "science")
    out["comp1"] = {f: _companions(nd, f) for f in files[:2]}
    shutil.move(later / files[2], sim.raw_dir / files[2])
    out["run2"] = doit(nd, "science")
    out["comp2"] = {f: _companions(nd, f) for f in files[:3]}
    shutil.move(later / files[3], sim.raw_dir / files[3])
    out["run3"] = doit(nd, "science")
    out["comp3"] = {f: _companions(nd, f) for f in files}
    return out


def test_companions_until_frozen(night):
    a, b, c, d = night["files"]
    sfp = {f: f"sfp{_stem(f)}.fits" for f in night["files"]}
    assert night["comp1"] == {a: [sfp[b]], b: [sfp[a]]}
    # the third frame: the first two are compared again, now with two companions each
    assert night["comp2"] == {a: [sfp[b], sfp[c]], b: [sfp[a], sfp[c]], c: [sfp[a], sfp[b]]}
    assert {f"cosmics:{_stem(a)}", f"cosmics:{_stem(b)}"} <= executed(night["run2"].stdout)
    # the fourth: compared with the two before it; nothing earlier is redone
    assert night["comp3"][d] == [sfp[b], sfp[c]]
    run3 = executed(night["run3"].stdout)
    assert not any(_stem(f) in t for t in run3 for f in (a, b, c)), run3
    assert f"cosmics:{_stem(d)}" in run3
    # every header card fits (astropy warns in the log when it must cut a comment)
    assert "VerifyWarning" not in night["run3"].stdout + night["run3"].stderr
    for f in night["files"]:
        h = fits.getheader(night["dir"] / "FIELD-A" / f"zsfp{_stem(f)}.fits", "CCD1")
        assert h["NCRCMP"] == 2 and h["NCRPIXC"] >= 0
    assert executed(doit(night["dir"], "science").stdout) == set()


def test_prune_takes_the_companions_with_it(night):
    """The frames read each other's sfp, all within the target: every chain is pruned, and
    the next run finds everything up to date."""
    import subprocess
    import sys
    nd = night["dir"]
    r = subprocess.run([sys.executable, "-m", "reducer.cli", "prune", "--night", str(nd)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    left = sorted(p.name for p in (nd / "FIELD-A").glob("*.fits"))
    assert left == sorted(f"tazsfp{_stem(f)}.fits" for f in night["files"]), left
    assert executed(doit(nd, "science").stdout) == set()
