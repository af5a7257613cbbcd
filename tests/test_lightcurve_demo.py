"""A transit through the whole chain: the dip comes back in the light curve (truth checks)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table

from conftest import run_cli, run_doit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def transit(tmp_path_factory):
    from reducer.testing import Series, Target, Transit, make_night
    root = tmp_path_factory.mktemp("transit")
    tr = Transit(depth=0.03, duration=2400.0, ingress=400.0, mag_r=16.5, t0_offset=0.0)
    sim = make_night(root / "raw" / "20261120", seed=21, filters=("r",), standard=False,
                     targets=[Target("TRANSIT-B", filters=("r",), nexp=0,
                                     series=Series("r", nexp=24, exptime=60.0, cadence=240.0),
                                     variable=tr)],
                     stars_per_field=250)
    cfg = root / "reducer.toml"
    cfg.write_text('instrument = "demo"\nraw = "raw/{utdate}"\nredux = "redux"\n'
                   'masters_store = "masters"\n[catalog]\npath = "raw/refcat.ecsv"\n')
    run_cli("--config", str(cfg), "night", "20261120", cwd=root)
    nd = root / "redux" / "20261120"
    var = sim.truth["variable"]
    nt = nd / "night.toml"
    nt.write_text(nt.read_text() + f'\n[targets."TRANSIT-B"]\nra = {var["ra"]}\ndec = {var["dec"]}\n')
    out = run_doit(nd, "science").stdout
    return {"sim": sim, "dir": nd, "out": out, "var": var}


def test_dip_recovered(transit):
    """Depth within 10 % of the injected 3 %; time of minimum within two exposures."""
    lc = Table.read(transit["dir"] / "lightcurves" / "TRANSIT-B_r.ecsv")
    assert len(lc) >= 20 and "dmag" in lc.colnames
    var = transit["var"]
    frames = {f["file"]: f for f in transit["sim"].truth["frames"]}
    fac = np.array([frames[f]["variable_factor"] for f in lc["file"]], float)
    inside = fac < 1 - 0.9 * var["depth"]             # the flat bottom of the trapezoid
    outside = fac > 0.9999
    assert inside.sum() >= 3 and outside.sum() >= 5
    flux = 10 ** (-0.4 * np.asarray(lc["dmag"]))
    depth = 1 - np.median(flux[inside]) / np.median(flux[outside])
    assert abs(depth / var["depth"] - 1) < 0.10, depth
    # time of minimum: the centre of the frames below half depth, vs the truth t0
    half = flux < np.median(flux[outside]) * (1 - var["depth"] / 2)
    tmin = np.mean(np.asarray(lc["mjd_utc_mid"])[half])
    cadence = np.median(np.diff(np.asarray(lc["mjd_utc_mid"])))
    assert abs(tmin - var["t0_mjd"]) < 2 * cadence
    # times are BJD_TDB: within 0.01 d of the UTC MJD + 2400000.5 (barycentric correction)
    assert np.all(np.abs(np.asarray(lc["bjd_tdb"]) - (np.asarray(lc["mjd_utc_mid"]) + 2400000.5)) < 0.01)
    assert (transit["dir"] / "lightcurves" / "TRANSIT-B_r.png").stat().st_size > 5000


def test_stack_target_and_catalogue(transit):
    """The target's stack magnitude is its injected (time-averaged) magnitude; the stack
    catalogue's bright isolated stars match the injected magnitudes (median offset <= 0.01)."""
    nd, sim = transit["dir"], transit["sim"]
    tgt = json.loads((nd / "stacks" / "TRANSIT-B_r.json").read_text())
    frames = [f for f in sim.truth["frames"] if f["object"] == "TRANSIT-B"]
    mean_fac = np.mean([f["variable_factor"] for f in frames])
    expect = transit["var"]["mags"]["r"] - 2.5 * np.log10(mean_fac)
    assert abs(tgt["mag"] - expect) < 0.01 + 3 * tgt["mag_err"], (tgt, expect)
    from astropy.coordinates import SkyCoord
    import astropy.units as u
    cat = Table.read(sim.catalog_path)
    st = Table.read(nd / "stacks" / "TRANSIT-B_r.ecsv")
    c1 = SkyCoord(st["ra"], st["dec"], unit="deg")
    c2 = SkyCoord(cat["ra"], cat["dec"], unit="deg")
    i, d, _ = c1.match_to_catalog_sky(c2)
    _, d2, _ = c2.match_to_catalog_sky(c2, nthneighbor=2)
    ok = (d < 1 * u.arcsec) & (st["flags"] == 0) & (st["mag_err"] < 0.02) & (cat["mag_r"][i] > 15) \
        & (d2.arcsec[i] > 12)
    dm = np.asarray(st["mag"][ok] - cat["mag_r"][i][ok])
    assert ok.sum() > 20
    assert abs(np.median(dm)) <= 0.01
