"""Master sky (illumination and fringes) against truth.

Synthetic frames (exact truth, seeded): a sky of S e- times an illumination error
``I(x, y)`` (what a dome flat with a lamp gradient leaves in flat-fielded frames) plus
fringes ``a S F(x, y)`` (six plane waves, rms ``a`` of the sky), dithered Gaussian stars
(also times ``I``), Poisson and read noise, in electrons; two detectors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from reducer.ops.mastersky import apply_master_sky, combine_master_sky, frame_sky

RN = 5.0
SHAPE = (192, 160)
DETS = ("CCD1", "CCD2")


def _truth_maps(seed, grad, fringe_amp):
    rng = np.random.default_rng(seed)
    illum, fringe = {}, {}
    for k, n in enumerate(DETS):
        yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]].astype(float)
        xf = xx + k * (SHAPE[1] + 8)
        u = xf / (2 * SHAPE[1] + 8) * 2 - 1
        illum[n] = 1.0 + grad * u + 0.3 * grad * ((yy / SHAPE[0]) * 2 - 1) ** 2
        fringe[n] = np.zeros(SHAPE)
    frng = np.random.default_rng(seed + 1000)
    for _ in range(6):
        lam, ang, ph = frng.uniform(15, 50), frng.uniform(0, math.pi), frng.uniform(0, 2 * math.pi)
        for k, n in enumerate(DETS):
            yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]].astype(float)
            xf = xx + k * (SHAPE[1] + 8)
            fringe[n] += np.cos(2 * math.pi * (xf * math.cos(ang) + yy * math.sin(ang)) / lam + ph)
    for n in DETS:
        fringe[n] *= fringe_amp / math.sqrt(3.0)
    return illum, fringe, rng


def _frame(rng, illum, fringe, sky, *, dither, nstars=40, fwhm=3.0, stars=True):
    dets = {}
    truth = {}
    sig = fwhm / 2.3548
    for k, n in enumerate(DETS):
        img = np.zeros(SHAPE)
        if stars:
            srng = np.random.default_rng(77 + k)       # the same field every frame...
            xs = srng.uniform(5, SHAPE[1] - 5, nstars) + dither[0]   # ...moved by the dither
            ys = srng.uniform(5, SHAPE[0] - 5, nstars) + dither[1]
            fl = 10 ** srng.uniform(3.5, 5.5, nstars)
            yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
            for x, y, f in zip(xs, ys, fl):
                img += f / (2 * math.pi * sig ** 2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sig ** 2))
        clean = (sky * (1.0 + fringe[n]) + img) * illum[n]
        noisy = rng.poisson(clean).astype(float) + rng.normal(0, RN, SHAPE)
        unc = np.sqrt(np.maximum(clean, 0) + RN ** 2)
        dets[n] = (noisy.astype(np.float32), unc.astype(np.float32), np.zeros(SHAPE, np.uint16))
        truth[n] = (sky * (1.0 + fringe[n]) + img, img)
    return dets, truth


def _night(seed, *, grad, fringe_amp, nframes, sky=800.0, dithered=True):
    illum, fringe, rng = _truth_maps(seed, grad, fringe_amp)
    frames = []
    for i in range(nframes):
        d = (rng.uniform(-25, 25), rng.uniform(-25, 25)) if dithered else (0.0, 0.0)
        frames.append(_frame(rng, illum, fringe, sky * rng.uniform(0.8, 1.25), dither=d))
    return illum, fringe, frames


@pytest.fixture(scope="module")
def night():
    return _night(3, grad=0.08, fringe_amp=0.04, nframes=9)


@pytest.fixture(scope="module")
def master(night):
    illum, fringe, frames = night
    return combine_master_sky([frame_sky(dets) for dets, _ in frames])


def test_illumination_recovered():
    # without fringes: a 64-px mesh median does not average out a 50-px fringe (that part
    # of the fringes goes into I and comes back in F = M / I - 1, tested below)
    illum, _, frames = _night(11, grad=0.08, fringe_amp=0.0, nframes=7)
    master = combine_master_sky([frame_sky(dets) for dets, _ in frames])
    # the master's illumination is relative (median 1): compare shapes
    norm = np.median(np.concatenate([illum[n].ravel() for n in DETS]))
    for n in DETS:
        err = master.illum[n] / (illum[n] / norm) - 1.0
        # a mesh median over ~64^2 px x 9 frames: noise ~1e-4; the model reproduces a
        # quadratic exactly, so 0.2 % bounds the error everywhere (edges included)
        assert np.abs(err).max() < 0.002, (n, np.abs(err).max())
        assert np.std(err) < 0.0007, (n, np.std(err))


def test_fringe_pattern_recovered(night, master):
    illum, fringe, _ = night
    norm = np.median(np.concatenate([illum[n].ravel() for n in DETS]))
    for n in DETS:
        inner = (slice(3, -3), slice(3, -3))
        # I (1 + F) is the master; compare the fringe part of it, relative to the true I
        full = master.illum[n] * (1.0 + master.fringe[n]) / (illum[n] / norm)
        f = (full / np.median(full) - 1.0)[inner]
        # F is the fringe pattern smoothed by fringe_sigma = 1 px (module docstring)
        t, u = gaussian_filter(fringe[n], 1.0, mode="reflect")[inner], master.fringe_unc[n][inner]
        scale = float(np.sum(f * t) / np.sum(t * t))
        assert abs(scale - 1.0) < 0.03, scale
        resid = f - scale * t
        # the residual is the master's noise: its stated uncertainty explains it
        pull = resid / u
        assert 0.8 < np.std(pull) < 1.25, np.std(pull)
        # 9 frames of ~800 e- sky: the pattern (rms 4 % of the sky) comes back to ~10 % of
        # its rms, which is the master's noise
        assert np.std(resid) < 0.15 * np.std(t)


@pytest.fixture(scope="module")
def plain_night():
    """No fringes: what a profile with illumination correction alone is for."""
    illum, fringe, frames = _night(13, grad=0.08, fringe_amp=0.0, nframes=7)
    return (illum, fringe, frames), combine_master_sky([frame_sky(d) for d, _ in frames])


@pytest.mark.parametrize("modes", [("illumination",), ("illumination", "fringe")])
def test_apply_flattens_the_sky_and_keeps_the_stars(night, master, plain_night, modes):
    if modes == ("illumination",):
        night, master = plain_night
    illum, fringe, frames = night
    rng = np.random.default_rng(99)
    dets, truth = _frame(rng, illum, fringe, 1000.0, dither=(7.0, -4.0))
    out = apply_master_sky(dets, master, modes)
    norm = np.median(np.concatenate([illum[n].ravel() for n in DETS]))
    for n in DETS:
        want, stars = truth[n]
        # after the correction the frame is (sky with fringes + stars) * median(I): the
        # large-scale error is gone
        ratio = out.data[n] / norm
        blank = stars < 1.0
        if "fringe" in modes:
            resid = ratio - (1000.0 + stars)
            # fringe pattern removed down to the noise: residual rms / pixel noise ~ 1
            pull = resid[blank] / (out.unc[n][blank] / norm)
            assert abs(np.mean(pull)) < 0.1 and np.std(pull) < 1.1, (np.mean(pull), np.std(pull))
        else:
            resid = ratio - want
            pull = resid[blank] / (out.unc[n][blank] / norm)
            assert abs(np.mean(pull)) < 0.1 and np.std(pull) < 1.1
        # a bright star's flux is right to its noise (the illumination error divided out)
        yy, xx = np.nonzero(stars > 0.2 * stars.max())
        tot = float(np.sum(ratio[yy, xx] - (want - stars)[yy, xx] - stars[yy, xx]))
        assert abs(tot) < 5 * math.sqrt(np.sum(out.unc[n][yy, xx] ** 2)) / norm
    if "fringe" in modes:
        assert abs(out.fringe_scale - 1.0) < 5 * out.fringe_scale_err + 0.1
    else:
        assert math.isnan(out.fringe_scale)


def test_no_fringes_fits_zero_scale():
    illum, fringe, frames = _night(5, grad=0.05, fringe_amp=0.0, nframes=6)
    m = combine_master_sky([frame_sky(d) for d, _ in frames])
    rng = np.random.default_rng(5)
    dets, _ = _frame(rng, illum, fringe, 900.0, dither=(3.0, 3.0))
    out = apply_master_sky(dets, m, ("fringe",))
    assert abs(out.fringe_scale) < 5 * out.fringe_scale_err + 0.05


def test_not_dithered_leaves_holes_and_says_so():
    _, _, frames = _night(7, grad=0.05, fringe_amp=0.02, nframes=5, dithered=False)
    m = combine_master_sky([frame_sky(d) for d, _ in frames])
    assert m.empty_fraction > 0.01
    for n in DETS:
        assert np.isfinite(m.fringe[n]).all() and np.isfinite(m.illum[n]).all()


def test_inputs_unchanged_and_errors(night):
    _, _, frames = night
    dets = frames[0][0]
    before = {n: [a.copy() for a in v] for n, v in dets.items()}
    fs = frame_sky(dets)
    m = combine_master_sky([fs, frame_sky(frames[1][0])])
    apply_master_sky(dets, m)
    for n in DETS:
        for a, b in zip(dets[n], before[n]):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="at least 2 frames"):
        combine_master_sky([fs])
    with pytest.raises(ValueError, match="not one of illumination, fringe"):
        apply_master_sky(dets, m, ("superflat",))
    with pytest.raises(ValueError, match="has no detector CCD3"):
        apply_master_sky({"CCD3": dets["CCD1"]}, m)
    with pytest.raises(ValueError, match="no sky to build a master sky"):
        frame_sky({"CCD1": (np.zeros(SHAPE, np.float32) - 5, np.ones(SHAPE, np.float32),
                            np.zeros(SHAPE, np.uint16))})


def _plan_night(tmp_path, **sky):
    from types import SimpleNamespace
    return SimpleNamespace(dir=tmp_path, settings={"sky": {"master": ["illumination"], **sky}})


def _frames(spec):
    from reducer.inventory import Frame
    return [Frame(file=f"f{i:02d}.fits", type=t, target=tg, filter=fl, mjd=60000.0 + i / 100,
                  binning=b, shape="1024x1024" if b == "1x1" else "512x512")
            for i, (t, tg, fl, b) in enumerate(spec)]


def test_plan_groups_by_filter_and_binning_and_freezes(tmp_path):
    from reducer.mastersky import plan
    spec = ([("science", "A", "r", "1x1")] * 4 + [("science", "B", "r", "2x2")] * 3
            + [("standard", "SA1", "r", "1x1")] + [("science", "A", "i", "1x1")] * 2
            + [("science", "B", "r", "1x1")] * 2)
    frames = _frames(spec)
    masters, use = plan(_plan_night(tmp_path, master_frames=5), frames, lambda f: tmp_path / f"fp{f.file}")
    r = tmp_path / "mastersky" / "mastersky_r.fits"
    r22 = tmp_path / "mastersky" / "mastersky_r_2x2_512x512.fits"
    assert set(masters) == {r, r22}
    # the first 5 unbinned r science frames, in time order (the standard is corrected, not an input)
    assert [f.file for f, _ in masters[r]] == ["f00.fits", "f01.fits", "f02.fits", "f03.fits", "f10.fits"]
    assert [f.file for f, _ in masters[r22]] == ["f04.fits", "f05.fits", "f06.fits"]
    assert use["f07.fits"] == (r, "") and use["f11.fits"] == (r, "") and use["f05.fits"] == (r22, "")
    assert use["f08.fits"] == (None, "no master sky in i yet: 2 of 3 science frames needed")
    # per target: A and B apart
    masters, _ = plan(_plan_night(tmp_path, master_per_target=True), frames, lambda f: tmp_path / f.file)
    assert tmp_path / "mastersky" / "mastersky_A_r.fits" in masters


@pytest.mark.parametrize("sky,match", [({"master": ["superflat"]}, "'superflat' is not one of illumination, fringe"),
                                       ({"master_min_frames": 1}, "needs 2 <= master_min_frames <= master_frames"),
                                       ({"master_frames": 2, "master_min_frames": 3}, "got 3 and 2")])
def test_plan_settings_errors(tmp_path, sky, match):
    from reducer.mastersky import MasterSkySettingsError, plan
    with pytest.raises(MasterSkySettingsError, match=match):
        plan(_plan_night(tmp_path, **sky), _frames([("science", "A", "r", "1x1")]), lambda f: None)
