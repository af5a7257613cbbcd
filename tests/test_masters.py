"""Masters on a seeded synthetic night, against a direct numpy implementation and the truth."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from reducer.instruments import load_profile, parse_section
from reducer.ops.overscan import subtract_overscan

from conftest import run_cli, run_doit

PROFILE = load_profile("demo")
DETS = [d.name for d in PROFILE.detectors]


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A simulated night (5 biases, 3 darks, 3 dome flats in g and r) reduced by `doit calib`."""
    from reducer.testing import make_night
    root = tmp_path_factory.mktemp("night")
    sim = make_night(root / "raw" / "20261120", seed=3, targets=[], standard=False,
                     include_arcs=True)
    run_cli("night", "20261120", "--raw", str(sim.raw_dir), "--instrument", "demo", cwd=root)
    nd = root / "redux" / "20261120"
    r = run_doit(nd, "calib")
    return {"root": root, "dir": nd, "sim": sim, "out": r.stdout}


def ref_clipped_mean(stack, k, scales=None):
    """The KPF estimator written out plainly in numpy (float64)."""
    x = np.asarray(stack, np.float64)
    if scales is not None:
        x = x * np.asarray(scales, np.float64)[:, None, None]
    med = np.median(x, axis=0)
    p16, p84 = np.percentile(x, [16, 84], axis=0)
    s = (p84 - p16) / 2
    keep = np.abs(x - med) <= k * s
    cnt = keep.sum(0)
    mean = np.where(keep, x, 0).sum(0) / cnt
    return mean, cnt


def _raw_stack(sim, frames, det):
    out = []
    for f in frames:
        with fits.open(Path(sim.raw_dir) / f) as h:
            raw = h[det].data.astype(np.float64)
        secs = {k: parse_section(h_) for k, h_ in
                (("biassec", "[515:544,1:1024]"), ("trimsec", "[1:512,1:1024]"))}
        img, _ = subtract_overscan(raw, secs["biassec"], secs["trimsec"], axis="columns",
                                   method="median", fit="smooth", smooth_rows=15)
        out.append(img.astype(np.float64))
    return np.array(out)


def _files(sim, typ, **kw):
    return [fr["file"] for fr in sim.truth["frames"] if fr["type"] == typ
            and all(fr.get(k) == v for k, v in kw.items())]


def _master(nd, name):
    p = nd / "masters" / f"master_{name}.fits"
    assert p.is_file(), f"{p.name} missing; have {sorted(x.name for x in (nd / 'masters').iterdir())}"
    return fits.open(p)


def test_bias_equals_numpy_recipe(night):
    sim, nd = night["sim"], night["dir"]
    files = _files(sim, "bias")
    with _master(nd, "bias_1x1_544x1024_normal") as h:
        assert h[0].header["IMTYPE"] == "Bias" and h[0].header["NFRAMES"] == len(files)
        assert h[0].header["CLIPSIG"] == 2.1
        for det in DETS:
            ref, cnt = ref_clipped_mean(_raw_stack(sim, files, det), 2.1)
            got, unc = h[det].data, h[f"{det}_UNC"].data
            tol = 1e-5 * np.maximum(np.abs(ref), unc)
            assert np.all(np.abs(got - ref) <= tol + 1e-6)
            assert np.array_equal(h[f"{det}_CNT"].data, cnt)


def test_bias_level_matches_truth(night):
    """Overscan-subtracted master bias = the fixed pattern P (+ its data-minus-overscan offset)."""
    sim, nd = night["sim"], night["dir"]
    truth = sim.truth
    n = len(_files(sim, "bias"))
    with _master(nd, "bias_1x1_544x1024_normal") as h:
        for det in DETS:
            d = truth["detectors"][det]
            pattern = fits.getdata(Path(sim.truth_dir) / d["bias_pattern"], extname=det) \
                if "bias_pattern" in d else None
            got = h[det].data
            rn_adu = d["rdnoise"] / d["gain"]
            resid = got - pattern
            # per-pixel noise of a mean of n biases (+ the overscan model's own noise)
            assert abs(np.median(resid)) < 5 * rn_adu / np.sqrt(n) / np.sqrt(got.size) * 50
            assert np.std(resid) < 1.3 * rn_adu / np.sqrt(n) * 1.1


def test_infobits_with_few_frames(night):
    """5 biases: every pixel has < 10 samples, so both detectors' bits are set."""
    with _master(night["dir"], "bias_1x1_544x1024_normal") as h:
        assert h[0].header["INFOBITS"] == 0b11
        assert h[0].header["FEWFRAME"] is False


def test_dark_rate_and_hot_pixels(night):
    sim, nd = night["sim"], night["dir"]
    with _master(nd, "dark_1x1_544x1024_normal") as h:
        hdr = h[0].header
        assert hdr["IMTYPE"] == "Dark" and "MBIAS" in hdr and hdr["MBIASOR"] == "tonight"
        for det in DETS:
            d = sim.truth["detectors"][det]
            hot = d["hot_pixels"]
            rate = h[det].data * d["gain"]                 # e-/s
            x, y, r = (np.asarray(hot[k]) for k in ("x", "y", "rate"))
            got = rate[y, x]
            t = max(fr["exptime"] for fr in sim.truth["frames"] if fr["type"] == "dark")
            nd_ = len(_files(sim, "dark"))
            sig = np.sqrt(r * t + 2 * d["rdnoise"] ** 2) / t / np.sqrt(nd_)
            ok = np.abs(got - r) < 5 * sig + 0.05 * r
            assert ok.mean() > 0.95


@pytest.mark.parametrize("filt", ["g", "r"])
def test_flat_matches_truth_response(night, filt):
    sim, nd = night["sim"], night["dir"]
    with _master(nd, f"flat_1x1_544x1024_normal_{filt}_dome") as h:
        assert h[0].header["IMTYPE"] == "Flat" and h[0].header["MBIASOR"] == "tonight"
        resp = Path(sim.truth_dir) / sim.truth["filters"][filt]["flat_response"]
        ratios = []
        for det in DETS:
            true = fits.getdata(resp, extname=det)
            got, unc = h[det].data, h[f"{det}_UNC"].data
            good = np.isfinite(got) & (true > 0.3) & (unc > 0)
            ratio = np.median(got[good] / true[good])
            ratios.append(ratio)
            resid = got[good] / ratio - true[good]
            # the scatter about the true response is what the uncertainty plane says on
            # average (per-pixel UNC from 3 frames has 2 degrees of freedom: compare the
            # mean variance, which is unbiased, not per-pixel pulls)
            pred = np.sqrt(np.mean(unc[good].astype(float) ** 2))
            assert 0.8 < np.std(resid) / pred < 1.25
        # one normalisation for both detectors: their relative sensitivity is kept (truth is
        # normalised to median 1 over all pixels, reducer to the clipped median of the
        # central area, hence a common factor near 1)
        assert abs(ratios[0] / ratios[1] - 1) < 2e-3
        assert abs(ratios[0] - 1) < 0.03


def test_arc_per_object(night):
    arcs = [fr for fr in night["sim"].truth["frames"] if fr["type"] == "arc"]
    if not arcs:
        pytest.skip("simulator wrote no arcs")
    names = [p.name for p in (night["dir"] / "masters").glob("master_arc_*.fits")]
    assert names, night["out"]
    with fits.open(night["dir"] / "masters" / names[0]) as h:
        # 3 arcs: fewer than SMALL_N frames, so the plain mean (CLIPSIG 0)
        assert h[0].header["IMTYPE"] == "Arclamp" and h[0].header["CLIPSIG"] == 0.0
        assert h[0].header["ESTIMATR"] == "mean of 3"


def test_provenance_and_sidecar(night):
    nd = night["dir"]
    with _master(nd, "flat_1x1_544x1024_normal_r_dome") as h:
        hdr = h[0].header
        assert hdr["REDVER"] and hdr["CFGDIGST"] and hdr["INPUT001"].startswith("demo_")
        assert len(hdr["INSUM001"]) == 64
        assert hdr["MINMJD"] <= hdr["MAXMJD"]
    side = json.loads((nd / "masters" / "master_flat_1x1_544x1024_normal_r_dome.json").read_text())
    assert side["verification"]["passed"] is True
    assert side["masters_used"]["bias"]["origin"] == "tonight"


def test_second_run_does_nothing_and_settings_change_rebuilds(night):
    nd = night["dir"]
    r = run_doit(nd, "calib")
    assert ".  calib:" not in r.stdout
    nt = nd / "night.toml"
    text = nt.read_text()
    try:
        nt.write_text(text.replace("[pin]", "[calib]\nclip = { bias = 2.5 }\n\n[pin]"))
        r = run_doit(nd, "calib")
        assert ".  calib:bias_1x1_544x1024_normal" in r.stdout
        with _master(nd, "bias_1x1_544x1024_normal") as h:
            assert h[0].header["CLIPSIG"] == 2.5
    finally:
        nt.write_text(text)
        run_doit(nd, "calib")


def test_outlier_frame_is_rejected(tmp_path, night):
    """A cosmic-ray-like patch of +5000 ADU in one bias leaves the master unchanged (clipped)."""
    sim = night["sim"]
    raw = tmp_path / "raw"
    raw.mkdir()
    files = _files(sim, "bias")
    for f in files:
        shutil.copy(Path(sim.raw_dir) / f, raw / f)
    with fits.open(raw / files[0], mode="update") as h:
        d = h["CCD1"].data.astype(np.int32)
        d[100:110, 100:110] += 5000
        h["CCD1"].data = d.astype(np.uint16)
    run_cli("night", "20261120", "--raw", str(raw), "--instrument", "demo", cwd=tmp_path)
    nd = tmp_path / "redux" / "20261120"
    run_doit(nd, "calib")
    with _master(nd, "bias_1x1_544x1024_normal") as h, _master(night["dir"], "bias_1x1_544x1024_normal") as h0:
        patch = h["CCD1"].data[100:110, 100:110]
        cnt = h["CCD1_CNT"].data[100:110, 100:110]
        assert np.all(cnt == len(files) - 1)
        rn = 6.0 / 1.5
        assert np.all(np.abs(patch - np.median(h0["CCD1"].data[90:120, 90:120])) < 6 * rn)


def test_detector_health_against_truth(night):
    """Gain from flat pairs and read noise from a bias pair recover the simulated values."""
    h = json.loads((night["dir"] / "masters" / "health.json").read_text())
    truth = night["sim"].truth["detectors"]
    assert {r["detector"] for r in h["read_noise"]} == set(DETS)
    for r in h["read_noise"]:
        rn = truth[r["detector"]]["rdnoise"]
        # sigma of a std from ~5e5 pixels is ~0.1 %; allow quantisation and pattern leftovers
        assert abs(r["measured_e"] / rn - 1) < 0.03 and r["ok"]
    assert len(h["gain"]) == 2 * len(DETS)       # one pair per flat set (g, r) and detector
    for r in h["gain"]:
        g = truth[r["detector"]]["gain"]
        assert abs(r["measured"] - g) < 3 * r["uncertainty"] + 0.005, r


def test_defects_map_finds_hot_and_dead_pixels(night):
    """Hot pixels (truth rate > 1 e-/s) and dead pixels of the truth are in the defects map."""
    truth = night["sim"].truth["detectors"]
    p = night["dir"] / "masters" / "defects_1x1_544x1024_normal.fits"
    with fits.open(p) as h:
        for det in DETS:
            m = h[det].data
            hot = truth[det]["hot_pixels"]
            x, y, r = (np.asarray(hot[k]) for k in ("x", "y", "rate"))
            strong = r > 1.0
            assert np.mean(m[y[strong], x[strong]] & 1 > 0) > 0.95
            dead = truth[det]["dead_pixels"]
            dx, dy, resp = (np.asarray(dead[k]) for k in ("x", "y", "response"))
            assert np.all(m[dy[resp < 0.5], dx[resp < 0.5]] & 2)
            # few false alarms: flagged pixels are mostly real defects
            nreal = strong.sum() + (resp < 0.8).sum() + 1024      # + a weak column at most
            assert np.count_nonzero(m) < 1.5 * nreal
