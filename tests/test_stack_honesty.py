"""Stacks against the simulator's truth: are their uncertainties honest?

A series of dithered 60 s frames of a sparse field (250 stars) whose seeing and Moffat
beta drift through the night, through the whole chain and the stack.  Checked:

- blank sky: (data - 0) / STACK_UNC per pixel has std ~ 1 / sqrt(NOISECOR), the
  correlated-noise factor of the resampling written in the stack header; times
  sqrt(NOISECOR) it is within 20 % of 1, and sums over 16 x 16 px blocks (which need no
  correction) are within 20 % of their predicted errors;
- bright isolated unsaturated stars: median offset from the injected magnitudes
  <= 0.01 mag and within 3 sigma of the stack's zero-point error; their scatter about
  that offset <= 1.2 x their per-star errors (noise and the documented 0.1 % floor,
  ``reducer.stack.STAR_FLOOR``);
- the frames' zero points carry their aperture correction's error (APCORR, APCORERR) and
  the aperture correction is measured on enough stars (before, one detector with 1-2
  stars fell back to no correction and the zero point was 1-3 % off).
"""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from conftest import run_cli, run_doit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    from reducer.testing import Series, Target, make_night
    root = tmp_path_factory.mktemp("honest")
    sim = make_night(root / "raw" / "20261120", seed=21, filters=("r",), standard=False,
                     targets=[Target("FIELD-H", filters=("r",), nexp=0,
                                     series=Series("r", nexp=12, exptime=60.0, cadence=240.0))],
                     stars_per_field=250)
    cfg = root / "reducer.toml"
    cfg.write_text('instrument = "demo"\nraw = "raw/{utdate}"\nredux = "redux"\n'
                   f'masters_store = "masters"\n[catalog]\npath = "{sim.catalog_path}"\n')
    run_cli("--config", str(cfg), "night", "20261120", cwd=root)
    nd = root / "redux" / "20261120"
    run_doit(nd, "science")
    with fits.open(nd / "stacks" / "FIELD-H_r.fits") as h:
        stack = {k: h[k].data.astype(float) for k in ("STACK", "STACK_UNC", "EXPMAP")}
        stack["mask"] = h["STACK_MASK"].data
        stack["header"] = h[0].header
        stack["hdr"] = h["STACK"].header
    return {"sim": sim, "dir": nd, "stack": stack,
            "cat": Table.read(nd / "stacks" / "FIELD-H_r.ecsv")}


def _blank(night):
    """Stack pixels covered by every frame, unmasked, far from every catalogue star."""
    from astropy.wcs import WCS
    st = night["stack"]
    cat = Table.read(night["sim"].catalog_path)
    ny, nx = st["STACK"].shape
    ok = (st["mask"] == 0) & np.isfinite(st["STACK"]) & (st["STACK_UNC"] > 0) \
        & (st["EXPMAP"] >= 0.999 * st["EXPMAP"].max())
    x, y = WCS(st["hdr"]).world_to_pixel_values(np.asarray(cat["ra"]), np.asarray(cat["dec"]))
    for xi, yi, m in zip(x, y, np.asarray(cat["mag_r"])):
        r = 8 + 3 * max(0.0, 22.0 - m)                  # wider around brighter stars
        x0, x1 = int(max(0, xi - r)), int(min(nx, xi + r + 1))
        y0, y1 = int(max(0, yi - r)), int(min(ny, yi + r + 1))
        if x0 < x1 and y0 < y1:
            ok[y0:y1, x0:x1] = False
    return ok


def test_blank_sky_pulls_with_the_noise_correlation_factor(night):
    st = night["stack"]
    ok = _blank(night)
    assert ok.sum() > 100_000
    R = st["header"]["NOISECOR"]
    assert 1.5 < R < 4.0                                 # bilinear interpolation: 1..4
    pull = st["STACK"][ok] / st["STACK_UNC"][ok]
    assert abs(np.mean(pull)) < 0.05
    # per pixel, STACK_UNC (right for aperture sums) overestimates by sqrt(NOISECOR) ...
    assert np.std(pull) < 0.8
    assert abs(np.std(pull) * np.sqrt(R) - 1) < 0.20, (np.std(pull), R)
    # ... while sums over areas larger than the kernel need no correction
    b = 16
    ny, nx = (s // b * b for s in ok.shape)

    def blocks(a):
        return a[:ny, :nx].reshape(ny // b, b, nx // b, b)

    full = blocks(ok).all(axis=(1, 3))
    s = blocks(np.where(ok, st["STACK"], 0)).sum(axis=(1, 3))[full]
    v = blocks(np.where(ok, st["STACK_UNC"] ** 2, 0)).sum(axis=(1, 3))[full]
    assert full.sum() > 200
    assert abs(np.std(s / np.sqrt(v)) - 1) < 0.20, np.std(s / np.sqrt(v))


def _bright_stars(night):
    """Stack catalogue rows of bright isolated stars never saturated, with the truth."""
    from astropy.coordinates import SkyCoord
    import astropy.units as u
    sim, st = night["sim"], night["cat"]
    cat = Table.read(sim.catalog_path)
    sat = {i for fr in sim.truth["frames"] if fr["type"] == "science"
           for d in fr["detectors"].values()
           for i, s in zip(d["stars"]["id"], d["stars"]["saturated"]) if s}
    c_cat = SkyCoord(cat["ra"], cat["dec"], unit="deg")
    _, nn, _ = c_cat.match_to_catalog_sky(c_cat, nthneighbor=2)
    i, d, _ = SkyCoord(st["ra"], st["dec"], unit="deg").match_to_catalog_sky(c_cat)
    unsat = np.array([cid not in sat for cid in np.asarray(cat["id"])[i]])
    ok = (d < 1 * u.arcsec) & (np.asarray(st["flags"]) == 0) & (nn.arcsec[i] > 12) & unsat \
        & (np.asarray(st["mag_err_star"]) < 0.01)
    dm = np.asarray(st["mag"])[ok] - np.asarray(cat["mag_r"])[i][ok]
    return dm, np.asarray(st["mag_err_star"])[ok], np.asarray(st["mag_err"])[ok]


def test_bright_star_magnitudes_and_their_scatter(night):
    dm, err_star, err = _bright_stars(night)
    assert dm.size >= 15
    off = float(np.median(dm))
    zp_err = night["cat"].meta["zp_err"]
    assert abs(off) <= 0.01, off
    assert abs(off) <= 3 * zp_err + 0.002, (off, zp_err)    # 0.002: the median's own noise
    # mag_err = statistical error (+) the calibration error common to all stars
    assert np.allclose(err, np.hypot(err_star, zp_err))
    pull = (dm - off) / err_star
    assert np.std(pull) <= 1.2, (np.std(pull), np.round(pull, 2))


def test_frame_zero_points_carry_the_aperture_correction(night):
    nd = night["dir"]
    heads = [fits.getheader(p) for p in sorted((nd / "FIELD-H").glob("tazsfp*.fits"))]
    assert len(heads) == 12
    for h in heads:
        assert 1.005 < h["APCORR"] < 1.08                    # a 2-FWHM aperture misses 1-5 %
        assert int(h.comments["APCORR"].split(",")[1].split()[0]) >= 5   # stars measured
        rel = 1.0857 * h["APCORERR"] / h["APCORR"]
        assert h["PHOTZPER"] == pytest.approx(np.hypot(h["PHOTZPFE"], rel), abs=1.5e-4)
