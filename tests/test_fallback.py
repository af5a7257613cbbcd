"""Verification before use and fallback to other nights' certified masters."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from astropy.io import fits

from reducer.registry import Registry

from conftest import run_cli, run_doit


def _night(root, utdate, seed=11, **kw):
    """One camera (the seed fixes the detectors), a new night's noise (the UT date)."""
    from reducer.testing import make_night
    sim = make_night(root / "raw" / utdate, seed=seed, utdate=utdate, targets=[],
                     standard=False, filters=("r",), **kw)
    return sim


def _make(root, utdate, site):
    run_cli("--config", str(site), "night", utdate, cwd=root)
    return root / "redux" / utdate


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    cfg = root / "reducer.toml"
    cfg.write_text('instrument = "demo"\nraw = "raw/{utdate}"\nredux = "redux"\n'
                   'masters_store = "store"\n')
    # a good night, certified first
    _night(root, "20261118", seed=11)
    nd = _make(root, "20261118", cfg)
    out = run_doit(nd, "calib").stdout
    assert out.count("verification PASS") == 3, out
    return root, cfg


def test_light_leak_input_bias_is_screened(site, tmp_path):
    root, cfg = site
    sim = _night(root, "20261119", bad_bias="light_leak", nbias=5)
    nd = _make(root, "20261119", cfg)
    out = run_doit(nd, "calib").stdout
    planted = sim.truth["planted"][0]["file"]
    assert f"input {planted} rejected: CCD1: " in out and "light leak" in out
    side = json.loads((nd / "masters" / "master_bias_1x1_544x1024_normal.json").read_text())
    assert side["verification"]["passed"], side["verification"]["failed"]
    assert any(f == planted for f, _ in side["rejected"])


@pytest.mark.parametrize("utdate,plant", [("20261120", "light_leak"), ("20261121", "wrong_level")])
def test_bad_master_fails_and_fallback_serves(site, utdate, plant):
    """Every bias of a night is bad (a light leak, or +40 ADU on the data of all of them).
    Input screening judges frames against each other, so it lets a fault common to all of
    them through; the master then fails verification (the comparison with the previous
    certified master, and MEAN for the level), is not certified, and the night's dark and
    flat take the certified bias of an earlier night, saying so in their headers."""
    root, cfg = site
    sim = _night(root, utdate)
    for fr in sim.truth["frames"]:
        if fr["type"] != "bias":
            continue
        p = sim.raw_dir / fr["file"]
        with fits.open(p) as h:
            hdul = fits.HDUList([hh.copy() for hh in h])
        for det in ("CCD1", "CCD2"):
            d = hdul[det].data.astype(np.float64)
            if plant == "light_leak":
                d[:, :512] += 150.0 * np.linspace(0, 1, d.shape[0])[:, None]
            else:
                d[:, :512] += 40.0
            hdul[det].data = np.clip(d, 0, 65535).astype(np.uint16)
        hdul.writeto(p, overwrite=True)
    nd = _make(root, utdate, cfg)
    out = run_doit(nd, "calib").stdout
    assert "master bias_1x1_544x1024_normal: 5 frames, verification FAIL" in out
    line = next(l for l in out.splitlines() if l.startswith("master bias_"))
    assert "PREV_DIFF" in line and ("MEAN" in line or plant == "light_leak")
    with fits.open(nd / "masters" / "master_bias_1x1_544x1024_normal.fits") as h:
        assert h[0].header["VERIFY"] == "FAIL" and h[0].header["VPREVDIF"] == "FAIL"
    # the nearest certified bias of another night (20261118, or 20261119 when that night's
    # test ran first in this worker) serves, and says so
    m = re.search(r"bias (demo_(\d{8})_master_bias\S*) \(fallback from (\d{8}), ([\d.]+) d before\)", out)
    assert m and m.group(2) == m.group(3) and m.group(2) < utdate, out
    with fits.open(nd / "masters" / "master_dark_1x1_544x1024_normal.fits") as h:
        assert h[0].header["MBIASOR"].startswith(f"fallback from {m.group(2)}")
        assert h[0].header["MBIAS"] == m.group(1)
    with Registry(f"sqlite:///{root / 'store' / 'registry.sqlite'}") as reg:
        nights = {(r.imtype, r.night) for r in reg.list(instrument="demo")}
    assert ("bias", utdate) not in nights and ("dark", utdate) in nights
    # nothing to do on a second run
    assert ".  calib:" not in run_doit(nd, "calib").stdout


def test_no_usable_master_is_a_clear_reason(tmp_path):
    """No bias tonight, none certified, no overscan: the dark is not built, with a reason."""
    from reducer.testing import make_night
    prof = tmp_path / "noover.toml"
    from reducer.instruments import load_profile
    text = load_profile("demo").path.read_text().replace('biassec = "[515:544,1:1024]"\n', "")
    prof.write_text(text.replace('name = "demo"', 'name = "noover"'))
    sim = make_night(tmp_path / "raw", seed=5, nbias=0, targets=[], standard=False, filters=("r",))
    cfg = tmp_path / "reducer.toml"
    cfg.write_text(f'profiles_dirs = ["{tmp_path}"]\n')
    run_cli("--config", str(cfg), "night", "20261120", "--raw", str(sim.raw_dir), "--instrument", "noover",
            cwd=tmp_path)
    r = run_doit(tmp_path / "redux" / "20261120", "calib")      # the night goes on
    assert "master dark_1x1_544x1024_normal: not built: no master bias tonight nor by " \
           "fallback and no overscan: cannot build the dark" in r.stdout
