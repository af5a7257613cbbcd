"""The s (sky) and z (cosmic-ray) algorithms against truth.

Two kinds of data, both seeded:

- *synthetic* 256 x 256 frames built here (exact truth): a sky (flat, a linear gradient
  or a vignetting-like curved one) + Moffat stars (pixel-integrated, peaks from 50 e- to
  95 % of saturation, a few saturated and flagged SATURATED) + cosmic rays drawn like the
  project simulator's (Gaussian spots of sigma 0.25-0.9 px and 300-8000 e-, straight
  tracks of 150-2500 e-/px) + Poisson and read noise; in electrons;
- one *simulator* night (:func:`reducer.testing.make_night`, small frames, a raised
  cosmic-ray rate), calibrated to electrons here from its truth (bias level + pattern +
  the frame's overscan drift, gain, dark, flat response; defects flagged BAD).

"Strong" cosmic-ray pixels are those whose deposit exceeds 5 sigma of the local noise,
sigma = sqrt(sky + star + rn^2) (what was collected, before the cosmic ray).  "Star pixels"
are the unmasked pixels within 2 FWHM of a star centre, minus the pixels within 1 px of any
cosmic-ray deposit (a flag there may be right).
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, label
from scipy.special import erf

from reducer.ops import bits
from reducer.ops.sky import SkyResult, estimate_sky, subtract_sky

RN = 5.0          # read noise [e-]
SAT = 90000.0     # saturation [e-]
SHAPE = (256, 256)


# --------------------------------------------------------------------------- synthetic frames
def _moffat(shape, xs, ys, fluxes, fwhm, beta=3.0, sub=5, rad=20):
    """Pixel-integrated Moffat stars [e-]; x, y zero-based pixel centres."""
    ny, nx = shape
    img = np.zeros(shape)
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    norm = (beta - 1.0) / (math.pi * alpha ** 2)
    s = (np.arange(sub) + 0.5) / sub - 0.5
    for x, y, f in zip(xs, ys, fluxes):
        ix, iy = int(round(x)), int(round(y))
        y0, y1, x0, x1 = max(iy - rad, 0), min(iy + rad + 1, ny), max(ix - rad, 0), min(ix + rad + 1, nx)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dx = xx[..., None, None] + s[None, None, None, :] - x
        dy = yy[..., None, None] + s[None, None, :, None] - y
        img[y0:y1, x0:x1] += f * norm * ((1.0 + (dx * dx + dy * dy) / alpha ** 2) ** -beta).mean(axis=(2, 3))
    return img


def _cosmic_rays(rng, shape, n, edge_hits=True):
    """Deposit [e-] of n events, the simulator's model; plus 3 spots on the edges/corner."""
    ny, nx = shape
    dep = np.zeros(shape)

    def spot(cx, cy, sig, etot):
        ii = np.arange(-3, 4)
        px, py = int(round(cx)) + ii, int(round(cy)) + ii
        fx = 0.5 * (erf((px + 0.5 - cx) / (sig * 2 ** 0.5)) - erf((px - 0.5 - cx) / (sig * 2 ** 0.5)))
        fy = 0.5 * (erf((py + 0.5 - cy) / (sig * 2 ** 0.5)) - erf((py - 0.5 - cy) / (sig * 2 ** 0.5)))
        ok = ((py >= 0) & (py < ny))[:, None] & ((px >= 0) & (px < nx))[None, :]
        PY, PX = np.broadcast_arrays(py[:, None], px[None, :])
        np.add.at(dep, (PY[ok], PX[ok]), (etot * fy[:, None] * fx[None, :])[ok])

    for _ in range(n):
        cx, cy = rng.uniform(-0.5, nx - 0.5), rng.uniform(-0.5, ny - 0.5)
        if rng.random() < 0.6:
            spot(cx, cy, rng.uniform(0.25, 0.9), math.exp(rng.uniform(math.log(300.0), math.log(8000.0))))
        else:
            length = min(1.5 + rng.exponential(6.0), 40.0)
            ang = rng.uniform(0.0, math.pi)
            dedx = math.exp(rng.uniform(math.log(150.0), math.log(2500.0)))
            npt = max(int(length / 0.2), 2)
            t = np.linspace(-0.5, 0.5, npt) * length
            x, y = cx + t * math.cos(ang), cy + t * math.sin(ang)
            w = np.full(npt, dedx * length / npt)
            x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
            fx, fy = x - x0, y - y0
            for ddx, ddy, ww in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                                 (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
                xx, yy = x0 + ddx, y0 + ddy
                ok = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
                np.add.at(dep, (yy[ok], xx[ok]), (w * ww)[ok])
    if edge_hits:  # sharp spots on the first/last row and column and in a corner
        spot(0.0, 0.0, 0.3, 3000.0)
        spot(nx - 1.0, ny / 2 + 0.3, 0.35, 2500.0)
        spot(nx / 3 + 0.2, ny - 1.0, 0.3, 2000.0)
    return dep


def scene(seed, *, sky="gradient", level=1000.0, nstars=40, fwhm=2.8, ncr=80, nsat=2,
          shape=SHAPE, field=None, offset=(0.0, 0.0), transparency=1.0):
    """A synthetic frame in e- with its truth (dict).

    With ``field`` (dict of star ``x``, ``y`` [pixel, reference frame] and ``flux`` [e-],
    :func:`star_field`) the stars are those, seen at ``offset`` (dx, dy) [pixel] (frame
    pixel = reference pixel + offset) through ``transparency``, instead of ``nstars``
    drawn here."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    u, v = xx / (nx - 1) - 0.5, yy / (ny - 1) - 0.5
    if sky == "flat":
        skymap = np.full(shape, level)
    elif sky == "gradient":  # 10 % across x, 5 % across y
        skymap = level * (1.0 + 0.10 * u + 0.05 * v)
    elif sky == "curved":  # vignetting-like, -8 % in the corners, off-centre
        skymap = level * (1.0 - 0.16 * ((u - 0.1) ** 2 + (v + 0.05) ** 2) + 0.03 * u)
    else:
        raise ValueError(sky)
    beta = 3.0
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    norm = (beta - 1.0) / (math.pi * alpha ** 2)
    if field is None:
        xs, ys = rng.uniform(6, nx - 7, nstars), rng.uniform(6, ny - 7, nstars)
        peak = np.exp(rng.uniform(np.log(50.0), np.log(0.95 * (SAT - 1.2 * level)), nstars))
        peak[:nsat] = 3.0 * SAT  # saturated stars
    else:
        xs, ys = field["x"] + offset[0], field["y"] + offset[1]
        on = (xs > -15) & (xs < nx + 14) & (ys > -15) & (ys < ny + 14)
        xs, ys = xs[on], ys[on]
        peak = field["flux"][on] * transparency * norm
    stars = _moffat(shape, xs, ys, peak / norm, fwhm, beta)
    expected = skymap + stars
    dep = _cosmic_rays(rng, shape, ncr) if ncr else np.zeros(shape)
    data = rng.poisson(expected).astype(float) + dep + rng.normal(0.0, RN, shape)
    mask = np.zeros(shape, np.uint16)
    sat = data >= SAT
    data[sat] = SAT
    mask[sat] |= bits.SATURATED
    near = np.zeros(shape, bool)
    for x, y in zip(xs, ys):
        near |= (xx - x) ** 2 + (yy - y) ** 2 <= (2.0 * fwhm) ** 2
    return dict(data=data.astype(np.float32), mask=mask, sky=skymap, stars=stars, dep=dep,
                var=expected + RN ** 2, xs=xs, ys=ys, peak=peak, fwhm=fwhm, near=near)


def star_field(seed, *, nstars=60, nsat=2, fwhm=2.8, level=1000.0, shape=SHAPE, margin=25.0):
    """Stars of a field seen by dithered frames: x, y [pixel, reference frame] over the
    frame plus ``margin``, and flux [e-] (peaks 50 e- to 95 % of saturation at ``fwhm``,
    ``nsat`` saturated)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    beta = 3.0
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    norm = (beta - 1.0) / (math.pi * alpha ** 2)
    xs = rng.uniform(6 - margin, nx - 7 + margin, nstars)
    ys = rng.uniform(6 - margin, ny - 7 + margin, nstars)
    peak = np.exp(rng.uniform(np.log(50.0), np.log(0.95 * (SAT - 1.2 * level)), nstars))
    peak[:nsat] = 3.0 * SAT
    return dict(x=xs, y=ys, flux=peak / norm)


def dithered_scenes(seed, fwhm, ncomp=3, *, dither=20.0):
    """A frame and ``ncomp`` companions of the same star field (:func:`star_field`):
    companions dithered by up to ``dither`` px (sub-pixel), seeing FWHM x (0.85-1.15),
    transparency x (0.9-1.1), their own noise and cosmic rays.  Each scene dict also
    holds ``offset`` (dx, dy) [pixel] (companion pixel = frame pixel + offset) and
    ``transparency``."""
    rng = np.random.default_rng(5000 + seed)
    field = star_field(seed + 7000, fwhm=fwhm)
    out = []
    for k in range(ncomp + 1):
        off = (0.0, 0.0) if k == 0 else tuple(rng.uniform(-dither, dither, 2))
        fw = fwhm if k == 0 else fwhm * rng.uniform(0.85, 1.15)
        tr = 1.0 if k == 0 else rng.uniform(0.9, 1.1)
        s = scene(100 * seed + k, sky="gradient", fwhm=fw, field=field, offset=off,
                  transparency=tr)
        s.update(offset=off, transparency=tr)
        out.append(s)
    return out


# --------------------------------------------------------------------------- sky
@pytest.mark.parametrize("kind,seed", [("flat", 1), ("gradient", 2), ("gradient", 3), ("curved", 4)])
@pytest.mark.parametrize("with_fwhm", [False, True])
def test_sky_against_truth(kind, seed, with_fwhm):
    s = scene(seed, sky=kind, ncr=0, nsat=0)
    before = s["data"].copy()
    res = estimate_sky(s["data"], s["mask"], fwhm_px=s["fwhm"] if with_fwhm else None)
    assert isinstance(res, SkyResult)
    assert res.sky.dtype == np.float32 and res.rms.dtype == np.float32
    assert res.sky.shape == res.rms.shape == res.source_mask.shape == SHAPE
    np.testing.assert_array_equal(s["data"], before)

    sigma = math.sqrt(float(np.median(s["sky"])) + RN ** 2)
    # level: median of mesh medians of N sky pixels -> sigma_level ~ (pi/2) sigma / sqrt(N)
    # (Npix_eff = N / (pi/2)^2); plus the median's Poisson bias (-1/6 e-)
    n_sky = int((~res.source_mask).sum())
    sig_level = (math.pi / 2) * sigma / math.sqrt(n_sky)
    err = res.level - float(np.median(s["sky"]))
    assert abs(err) < 5.0 * sig_level + 1.0 / 6.0, (err, sig_level)
    # rms within 5 % (MAD-based, so ~unbiased)
    assert abs(res.rms_level / sigma - 1.0) < 0.05, res.rms_level / sigma
    # the gradient / curvature is followed everywhere, edges included
    dev = res.sky - s["sky"]
    assert np.abs(dev).max() < 0.15 * sigma, np.abs(dev).max() / sigma
    assert abs(dev[:, :16].mean() - dev[:, -16:].mean()) < 0.05 * sigma
    # the sky model's own noise (neglected by subtract_sky) is tiny per pixel
    assert dev.std() < 0.03 * sigma
    # every star that is clearly there is in the source mask, and the mask stays modest
    # (with fwhm_px the threshold applies to the smoothed image in units of the unsmoothed
    # rms, photutils' convention: a star needs a higher peak)
    bright = s["peak"] > (10 if with_fwhm else 5) * sigma
    iy, ix = np.rint(s["ys"][bright]).astype(int), np.rint(s["xs"][bright]).astype(int)
    assert res.source_mask[iy, ix].all()
    assert res.source_mask.mean() < 0.35


def test_sky_ignores_masked_and_nonfinite_pixels():
    s = scene(5, sky="gradient", ncr=0, nsat=0)
    data = s["data"].copy()
    mask = s["mask"].copy()
    data[100:140, 30:60] = 5e4          # a "bad block" flagged BAD
    mask[100:140, 30:60] |= bits.BAD
    data[10, :] = np.nan                # a non-finite row, not flagged
    data[200, 200] = np.inf
    ref = estimate_sky(s["data"], s["mask"])
    res = estimate_sky(data, mask)
    assert np.isfinite(res.sky).all() and np.isfinite(res.rms).all()
    sigma = math.sqrt(1000.0 + RN ** 2)
    assert np.abs(res.sky - s["sky"]).max() < 0.2 * sigma
    assert abs(res.level - ref.level) < 0.5
    # a boolean mask works the same as the bitmask
    res_b = estimate_sky(data, mask != 0)
    np.testing.assert_allclose(res_b.sky, res.sky)


def test_sky_small_and_odd_shapes():
    rng = np.random.default_rng(7)
    img = (rng.poisson(500.0, (40, 300)) + rng.normal(0, RN, (40, 300))).astype(np.float32)
    res = estimate_sky(img, box=64)                      # box larger than the rows
    assert abs(res.level - 500.0) < 1.0
    assert abs(res.rms_level / math.sqrt(500 + RN ** 2) - 1) < 0.05
    img2 = (rng.poisson(300.0, (150, 170)) + rng.normal(0, RN, (150, 170))).astype(np.float32)
    res2 = estimate_sky(img2, box=64)                    # partial edge meshes
    assert np.abs(res2.sky - 300.0).max() < 3.0


def test_sky_errors():
    img = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="mask shape"):
        estimate_sky(img, np.zeros((64, 63), np.uint16))
    with pytest.raises(ValueError, match="2-D"):
        estimate_sky(np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="filter_size"):
        estimate_sky(img, filter_size=2)
    with pytest.raises(ValueError, match="usable"):
        estimate_sky(img, np.ones((64, 64), np.uint16))
    with pytest.raises(ValueError, match="sky shape"):
        subtract_sky(img, img, np.zeros((64, 65), np.float32))
    with pytest.raises(ValueError, match="unc shape"):
        subtract_sky(img, np.zeros((63, 64)), img)


def test_subtract_sky():
    s = scene(8, sky="curved", ncr=0, nsat=0)
    unc = np.sqrt(np.maximum(s["data"], 0) + RN ** 2).astype(np.float32)
    d0, u0 = s["data"].copy(), unc.copy()
    res = estimate_sky(s["data"], s["mask"])
    sub, unc2 = subtract_sky(s["data"], unc, res.sky)
    np.testing.assert_array_equal(s["data"], d0)
    np.testing.assert_array_equal(unc, u0)
    assert sub.dtype == np.float32 and unc2.dtype == np.float32
    np.testing.assert_allclose(sub, s["data"] - res.sky, atol=1e-3)
    np.testing.assert_array_equal(unc2, unc)          # passed through ...
    assert unc2 is not unc                            # ... as a copy
    sub2, _ = subtract_sky(s["data"], None, res)      # a SkyResult works as the sky
    np.testing.assert_array_equal(sub2, sub)
    # the sky-subtracted blank sky averages to zero
    blank = ~res.source_mask
    assert abs(float(np.median(sub[blank]))) < 1.0
    sub3, none = subtract_sky(s["data"], None, 1000.0)   # a scalar sky
    assert none is None and sub3[0, 0] == pytest.approx(s["data"][0, 0] - 1000.0)


# --------------------------------------------------------------------------- cosmics
@pytest.fixture(scope="module")
def cosmics():
    pytest.importorskip("astroscrappy")
    from reducer.ops import cosmics as mod
    return mod


def _touched(dep):
    return binary_dilation(dep > 0.5, np.ones((3, 3), bool))


def _score(s, res):
    sig = np.sqrt(s["var"])
    snr = s["dep"] / sig
    good = s["mask"] == 0
    strong = (snr > 5) & good
    star_px = s["near"] & good & ~_touched(s["dep"])
    out = {"strong": float(res.crmask[strong].mean()),
           "n_strong": int(strong.sum()),
           "fp_star": float(res.crmask[star_px].mean()),
           "n_star": int(star_px.sum()),
           "fp_other": int((res.crmask & ~s["near"] & ~_touched(s["dep"])).sum())}
    for lo in (10, 20):
        sel = (snr > lo) & good
        out[f"gt{lo}"] = float(res.crmask[sel].mean())
    return out


#: (seed, FWHM [px]) of the synthetic cosmic-ray frames: well sampled to undersampled
COSMIC_SCENES = [(11, 2.5), (12, 2.8), (13, 3.5), (14, 2.5), (15, 3.0), (16, 2.2), (17, 2.0),
                 (18, 2.0)]


@pytest.fixture(scope="module")
def cosmic_runs(cosmics):
    """clean_cosmics with its defaults on every synthetic frame: {seed: (scene, input, result)}."""
    runs = {}
    for seed, fwhm in COSMIC_SCENES:
        s = scene(seed, sky="gradient", fwhm=fwhm)
        sub = (s["data"] - s["sky"]).astype(np.float32)
        copies = (sub.copy(), s["mask"].copy(), s["sky"].copy())
        res = cosmics.clean_cosmics(sub, s["mask"], sky_e=s["sky"], rdnoise_e=RN, saturate_e=SAT)
        runs[seed] = (s, sub, res, copies)
    return runs


@pytest.mark.parametrize("seed", [sd for sd, _ in COSMIC_SCENES])
def test_cosmics_against_truth(cosmic_runs, seed):
    s, sub, res, (sub0, mask0, sky0) = cosmic_runs[seed]
    # inputs unchanged
    np.testing.assert_array_equal(sub, sub0)
    np.testing.assert_array_equal(s["mask"], mask0)
    np.testing.assert_array_equal(s["sky"], sky0)
    assert res.data.dtype == np.float32 and res.crmask.dtype == bool
    assert res.data.shape == res.crmask.shape == SHAPE

    sc = _score(s, res)
    # per frame (a few hundred strong pixels each): loose floors; the aggregate figures
    # are asserted in test_cosmics_aggregate
    assert sc["gt20"] >= 0.85 and sc["gt10"] >= 0.80 and sc["strong"] >= 0.70, sc
    assert sc["fp_star"] < 0.005, sc
    assert sc["fp_other"] < 1e-3 * sub.size, sc      # noise pixels flagged on blank sky
    assert not res.crmask[s["mask"] != 0].any()       # never a masked pixel

    # unflagged pixels are the input values, bit for bit
    np.testing.assert_array_equal(res.data[~res.crmask], sub[~res.crmask])
    # repaired values on blank sky: close to the truth (0 after sky subtraction); the
    # 5 x 5 mean carries +0.2 sigma from unflagged faint wings
    sig = np.sqrt(s["var"])
    rep = res.crmask & (s["dep"] > 5 * sig) & (s["stars"] < 0.5 * sig)
    err = (res.data[rep] - s["stars"][rep]) / sig[rep]
    assert rep.sum() > 100
    assert abs(err.mean()) < 0.35 and err.std() < 0.8, (err.mean(), err.std())
    assert np.percentile(np.abs(err), 99) < 4.0

    # the events found and the COSMIC bit
    assert res.ncosmic == label(res.crmask, structure=np.ones((3, 3)))[1]
    assert res.npix == int(res.crmask.sum())
    flagged = res.flag(s["mask"])
    assert flagged.dtype == np.uint16
    np.testing.assert_array_equal((flagged & bits.COSMIC) != 0, res.crmask)
    np.testing.assert_array_equal(flagged & ~np.uint16(bits.COSMIC), s["mask"])
    # the sharp spots put on the first/last row and column are found (reflection padding)
    for (y, x) in ((0, 0), (SHAPE[0] // 2, SHAPE[1] - 1), (SHAPE[0] - 1, SHAPE[1] // 3)):
        assert res.crmask[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any(), (y, x)


def _aggregate(cosmic_runs):
    num, den = {}, {}
    for s, _, res, _ in cosmic_runs.values():
        sig = np.sqrt(s["var"])
        snr = s["dep"] / sig
        good = s["mask"] == 0
        sets = {"strong": (snr > 5) & good, "gt10": (snr > 10) & good, "gt20": (snr > 20) & good,
                "star": s["near"] & good & ~_touched(s["dep"])}
        for k, sel in sets.items():
            num[k] = num.get(k, 0) + int(res.crmask[sel].sum())
            den[k] = den.get(k, 0) + int(sel.sum())
    return {k: num[k] / den[k] for k in num}, den


def test_cosmics_aggregate(cosmic_runs):
    """All synthetic frames together (~3900 strong pixels, ~24000 star pixels)."""
    f, n = _aggregate(cosmic_runs)
    assert n["strong"] > 3000 and n["star"] > 20000
    # measured (L.A.Cosmic + second pass; L.A.Cosmic alone: 85.1 / 92.7 / 95.8 %, 0.060 %)
    assert f["star"] < 0.001, f                 # < 0.1 % of the star pixels (measured 0.064 %)
    assert f["gt20"] >= 0.96, f                 # measured 97.3 %
    assert f["gt10"] >= 0.94, f                 # measured 95.2 %
    assert f["strong"] >= 0.90, f               # measured 91.3 %


def _companion_triple(s):
    """(sky-subtracted data, 1-sigma uncertainty, mask) of a scene, as the s step gives."""
    sub = (s["data"] - s["sky"]).astype(np.float32)
    unc = np.sqrt(np.maximum(s["data"], 0.0) + RN ** 2).astype(np.float32)
    return sub, unc, s["mask"]


@pytest.fixture(scope="module")
def dithered_runs(cosmics):
    """Every synthetic frame setting of COSMIC_SCENES as a dithered set (a frame + 3
    companions, :func:`dithered_scenes`), the frame cleaned alone and with its first 2
    and 3 companions: {seed: (scenes, triples, copies, {ncomp: result})}."""
    runs = {}
    for seed, fwhm in COSMIC_SCENES:
        sc = dithered_scenes(seed, fwhm, 3)
        tri = [_companion_triple(s) for s in sc]
        copies = [tuple(a.copy() for a in t) for t in tri]
        s = sc[0]
        res = {}
        for n in (0, 2, 3):
            res[n] = cosmics.clean_cosmics(tri[0][0], s["mask"], sky_e=s["sky"], rdnoise_e=RN,
                                           saturate_e=SAT, unc_e=tri[0][1],
                                           companions=tri[1:1 + n] if n else None)
        runs[seed] = (sc, tri, copies, res)
    return runs


def _aggregate_dithered(dithered_runs, n):
    runs = {seed: (sc[0], None, res[n], None) for seed, (sc, _, _, res) in dithered_runs.items()}
    f, den = _aggregate(runs)
    noise = sum(int((res[n].crmask & ~sc[0]["near"] & ~_touched(sc[0]["dep"])).sum())
                for sc, _, _, res in dithered_runs.values())
    return f, den, noise


@pytest.mark.parametrize("ncomp", [
    pytest.param(0, marks=pytest.mark.xfail(
        strict=True, reason="one frame alone: measured 91.3 % of the > 5 sigma cosmic-ray "
        "pixels: broad spots as wide as the PSF (FWHM 2.0-2.2 px frames) cannot be told from "
        "stars in one frame (see reducer/ops/cosmics.py)")),
    2, 3])
def test_cosmics_goal_95_percent_of_5_sigma_pixels(cosmic_runs, dithered_runs, ncomp):
    """Issue 4's goal: >= 95 % of the > 5 sigma cosmic-ray pixels, < 0.1 % of the star
    pixels.  One frame alone falls short; with 2 or 3 dithered companions (the comparison
    of reducer/ops/crcompare.py) it is reached.  Measured on the 8 dithered sets (frame
    alone / 2 / 3 companions): strong 88.3 / 97.7 / 98.4 %, > 10 sigma 94.0 / 98.9 /
    99.6 %, > 20 sigma 96.6 / 99.1 / 99.6 %, star pixels 0.81 / 0.035 / 0.032 % (the
    comparison clears single-frame flags on stars the companions show), noise pixels
    flagged 19 / 21 / 18 of 468 000."""
    if ncomp == 0:
        f, _ = _aggregate(cosmic_runs)
        assert f["strong"] >= 0.95
        return
    f, den, noise = _aggregate_dithered(dithered_runs, ncomp)
    assert den["strong"] > 3000 and den["star"] > 20000, den
    assert f["strong"] >= 0.95, f
    assert f["gt10"] >= 0.98 and f["gt20"] >= 0.98, f
    assert f["star"] < 0.001, f
    assert noise < 1e-4 * len(dithered_runs) * SHAPE[0] * SHAPE[1], noise
    # against the same frames alone: the comparison adds, and clears flags on stars
    f0, _, _ = _aggregate_dithered(dithered_runs, 0)
    assert f["strong"] > f0["strong"] + 0.05 and f["star"] < f0["star"], (f, f0)


@pytest.mark.parametrize("ncomp", [2, 3])
@pytest.mark.parametrize("seed", [sd for sd, _ in COSMIC_SCENES])
def test_cosmics_with_companions(dithered_runs, seed, ncomp):
    sc, tri, copies, res = dithered_runs[seed]
    r = res[ncomp]
    s = sc[0]
    for t, c in zip(tri, copies):                      # inputs (companions too) unchanged
        for a, b in zip(t, c):
            np.testing.assert_array_equal(a, b)
    # every companion registered (shift = its dither, to 0.1 px) and scaled (transparency)
    assert r.ncompanions == ncomp and len(r.companions) == ncomp
    for k, c in enumerate(r.companions, start=1):
        dx, dy = sc[k]["offset"]
        assert c.used and c.why == "" and c.index == k - 1
        assert c.shift == pytest.approx((dy, dx), abs=0.1), (c, sc[k]["offset"])
        assert c.scale == pytest.approx(sc[k]["transparency"], rel=0.03), c
        assert c.nstars >= 5 and c.resid_px < 0.35
    # the comparison's own pixels and the single-frame flags it cleared (on stars)
    assert r.npix_compare > 0
    assert r.npix_compare == int((r.crmask & ~res[0].crmask).sum())
    assert r.npix_cleared == int((res[0].crmask & ~r.crmask).sum())
    # never a masked pixel; unflagged pixels are the input, bit for bit; COSMIC bit
    assert not r.crmask[s["mask"] != 0].any()
    np.testing.assert_array_equal(r.data[~r.crmask], tri[0][0][~r.crmask])
    assert r.ncosmic == label(r.crmask, structure=np.ones((3, 3)))[1]
    np.testing.assert_array_equal((r.flag(s["mask"]) & bits.COSMIC) != 0, r.crmask)
    # repaired values on blank sky (the final mask's 5 x 5 mean)
    sig = np.sqrt(s["var"])
    rep = r.crmask & (s["dep"] > 5 * sig) & (s["stars"] < 0.5 * sig)
    err = (r.data[rep] - s["stars"][rep]) / sig[rep]
    assert rep.sum() > 100
    assert abs(err.mean()) < 0.35 and err.std() < 0.8, (err.mean(), err.std())
    # per frame: loose floors (the aggregate is test_cosmics_goal_95_percent_of_5_sigma_pixels)
    sc_ = _score(s, r)
    assert sc_["strong"] >= 0.90 and sc_["gt10"] >= 0.90 and sc_["fp_star"] < 0.005, sc_


def _spots_and_stars(seed, *, fwhm, star_snr, spot_sigma=None, spot_e=0.0, shape=(96, 96)):
    """A 1000 e- sky with a 4 x 4 grid of Moffat stars (beta 3, peak ``star_snr`` sigma)
    and, with ``spot_sigma``, a Gaussian spot of ``spot_e`` e- midway between every pair of
    grid rows (blank sky); sky-subtracted data [e-], the spots' deposit, the sky noise
    [e-] and the star light [e-]."""
    rng = np.random.default_rng(seed)
    sigma = math.sqrt(1000.0 + RN ** 2)
    beta = 3.0
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    norm = (beta - 1.0) / (math.pi * alpha ** 2)
    g = np.arange(12, shape[0], 24, dtype=float)
    xs, ys = (a.ravel() + rng.uniform(-0.5, 0.5, g.size ** 2) for a in np.meshgrid(g, g))
    stars = _moffat(shape, xs, ys, np.full(xs.size, star_snr * sigma / norm), fwhm, beta)
    dep = np.zeros(shape)
    if spot_sigma is not None:
        i = np.arange(shape[0])
        for x, y in zip(xs, ys + 12.0):
            if y < shape[0] - 3:
                x, y = x + rng.uniform(-0.5, 0.5), y + rng.uniform(-0.5, 0.5)
                fx = 0.5 * (erf((i + 0.5 - x) / (spot_sigma * 2 ** 0.5)) - erf((i - 0.5 - x) / (spot_sigma * 2 ** 0.5)))
                fy = 0.5 * (erf((i + 0.5 - y) / (spot_sigma * 2 ** 0.5)) - erf((i - 0.5 - y) / (spot_sigma * 2 ** 0.5)))
                dep += spot_e * fy[:, None] * fx[None, :]
    data = rng.poisson(1000.0 + stars) + dep + rng.normal(0.0, RN, shape)
    return (data - 1000.0).astype(np.float32), dep, sigma, stars


@pytest.mark.parametrize("given_fwhm", [True, False])
def test_cosmics_psf_test_finds_spots_narrower_than_the_psf(cosmics, given_fwhm):
    """Spots of sigma 0.75 px (FWHM 1.8 px, 1500 e-) among stars of FWHM 3 px: L.A.Cosmic's
    star protection leaves more than half of their > 5 sigma pixels (measured 66 of 155),
    the PSF test finds them (155 of 155); nothing on the stars or the noise."""
    kw = dict(sky_e=1000.0, rdnoise_e=RN, saturate_e=SAT)
    first = second = total = 0
    for seed in range(4):
        d, dep, sigma, _ = _spots_and_stars(seed, fwhm=3.0, star_snr=100.0, spot_sigma=0.75, spot_e=1500.0)
        strong = dep > 5 * sigma
        r1 = cosmics.clean_cosmics(d, None, psf_test=False, grow_sigma=0, **kw)
        r2 = cosmics.clean_cosmics(d, None, fwhm_px=3.0 if given_fwhm else None, **kw)
        assert r2.psf_fwhm == pytest.approx(3.0, rel=0.1)
        assert (r2.crmask >= r1.crmask).all()                     # the second pass only adds
        assert r2.npix_second == int((r2.crmask & ~r1.crmask).sum())
        assert not (r2.crmask & ~_touched(dep)).any()             # never on a star / noise
        first += int(r1.crmask[strong].sum())
        second += int(r2.crmask[strong].sum())
        total += int(strong.sum())
    assert total > 100
    assert first / total < 0.6 and second / total >= 0.95, (first, second, total)


@pytest.mark.parametrize("fwhm", [2.0, 2.5])
def test_cosmics_second_pass_leaves_stars_alone(cosmics, fwhm):
    """Stars of FWHM 2.0 / 2.5 px at S/N 50 (no cosmic rays), the FWHM given or not (their
    peak S/N, ~31 with their own noise, is about the estimate's limit: estimated or
    not run): the second pass flags no pixel with star light above 0.5 sigma, and
    at most a pure-noise peak per frame (measured: 3 single pixels of 4.3-4.6 sigma in 24
    runs)."""
    noise = 0
    for seed in range(6):
        d, _, sigma, stars = _spots_and_stars(100 + seed, fwhm=fwhm, star_snr=50.0)
        for fw in (fwhm, None):
            r = cosmics.clean_cosmics(d, None, sky_e=1000.0, rdnoise_e=RN, saturate_e=SAT, fwhm_px=fw)
            first = cosmics.clean_cosmics(d, None, sky_e=1000.0, rdnoise_e=RN, saturate_e=SAT,
                                          psf_test=False, grow_sigma=0)
            second = r.crmask & ~first.crmask
            assert not second[stars > 0.5 * sigma].any(), (seed, fw)
            noise += int(second.sum())
    assert noise <= 4, noise


def test_cosmics_psf_fwhm_not_estimated_without_stars(cosmics):
    """No bright star: no FWHM, the PSF test is not run (psf_fwhm NaN); growing still is."""
    rng = np.random.default_rng(3)
    d = (rng.poisson(1000.0, (80, 80)) + rng.normal(0.0, RN, (80, 80)) - 1000.0).astype(np.float32)
    d[40, 20:32] += 900.0                                          # a track
    r = cosmics.clean_cosmics(d, None, sky_e=1000.0, rdnoise_e=RN, saturate_e=SAT)
    assert math.isnan(r.psf_fwhm)
    assert r.crmask[40, 20:32].all()
    with pytest.raises(ValueError, match="psf_delta"):
        cosmics.clean_cosmics(d, None, sky_e=1000.0, rdnoise_e=RN, saturate_e=SAT, psf_delta=0)


def test_cosmics_inbkg_matters(cosmics, cosmic_runs):
    """The noise model needs the sky: without it the sky-subtracted blank sky is 'noisy'."""
    import astroscrappy

    small = (128, 128)
    s = scene(21, sky="gradient", ncr=0, nsat=0, nstars=10, shape=small)
    sub = (s["data"] - s["sky"]).astype(np.float32)
    sky32 = s["sky"].astype(np.float32)
    right = cosmics.clean_cosmics(sub, None, sky_e=s["sky"], rdnoise_e=RN, saturate_e=SAT)
    # sigma = sqrt(sky + rn^2) = 32 e-: a cosmic-ray-free frame has (almost) nothing flagged
    assert right.npix <= 3
    # the same data with the sky left out: the noise model is rn = 5 e- on blank sky and
    # a fifth of the frame is "cosmic rays" after one iteration already
    nosky = cosmics.clean_cosmics(sub, None, sky_e=0.0, rdnoise_e=RN, saturate_e=SAT, niter=1)
    assert nosky.npix > 0.2 * sub.size
    # astroscrappy given the sky-subtracted data *and* inbkg subtracts the sky twice
    twice, _ = astroscrappy.detect_cosmics(sub, inbkg=sky32, gain=1.0, readnoise=RN,
                                           satlevel=SAT, niter=1)
    assert twice.sum() > 0.2 * sub.size
    # clean_cosmics is astroscrappy's documented use: the sky in indat and in inbkg; on a
    # frame with cosmic rays it finds what that call finds (away from the edges, where it
    # pads the image, and from the saturated halos it does not search)
    from scipy.ndimage import distance_transform_edt
    s, sub, res2, _ = cosmic_runs[COSMIC_SCENES[0][0]]
    res = cosmics.clean_cosmics(sub, s["mask"], sky_e=s["sky"], rdnoise_e=RN, saturate_e=SAT,
                                psf_test=False, grow_sigma=0)       # L.A.Cosmic alone
    assert (res2.crmask >= res.crmask).all()                         # the second pass only adds
    direct, _ = astroscrappy.detect_cosmics((sub + s["sky"]).astype(np.float32),
                                            inmask=s["mask"] != 0, inbkg=s["sky"].astype(np.float32),
                                            gain=1.0, readnoise=RN, satlevel=SAT, sigfrac=0.1)
    compare = np.zeros(SHAPE, bool)
    compare[10:-10, 10:-10] = True
    compare &= distance_transform_edt(s["mask"] == 0) > 8
    assert res.crmask[compare].sum() > 200
    agree = (res.crmask[compare] == direct[compare]).mean()
    assert agree > 0.9999, agree


def test_cosmics_masked_nonfinite_and_hot_pixels(cosmics):
    shape = (160, 160)
    s = scene(31, sky="flat", nstars=8, ncr=30, nsat=0, shape=shape)
    data = (s["data"] - s["sky"]).astype(np.float32)
    mask = s["mask"].copy()
    hot = [(50, 60), (120, 17), (140, 101)]
    for y, x in hot:                       # hot pixels: sharp, flagged BAD
        data[y, x] = 3e4
        mask[y, x] |= bits.BAD
    data[80, 90] = np.nan                  # non-finite, not flagged
    data[81, 10] = -np.inf
    mask[5:9, 100:140] |= bits.OFFIMAGE    # off the footprint: garbage values
    data[5:9, 100:140] = 1e6
    d0 = data.copy()
    res = cosmics.clean_cosmics(data, mask, sky_e=1000.0, rdnoise_e=RN, saturate_e=SAT)
    np.testing.assert_array_equal(data, d0)                       # NaN-aware equality
    for y, x in hot:
        assert not res.crmask[y, x] and res.data[y, x] == 3e4
    assert np.isnan(res.data[80, 90]) and res.data[81, 10] == -np.inf
    assert not res.crmask[80, 90] and not res.crmask[81, 10]
    assert not res.crmask[5:9, 100:140].any()
    np.testing.assert_array_equal(res.data[5:9, 100:140], 1e6)
    # elsewhere the cosmic rays found are those found without the defects, and the
    # repaired values are finite
    ref = cosmics.clean_cosmics((s["data"] - s["sky"]).astype(np.float32), s["mask"], sky_e=1000.0,
                                rdnoise_e=RN, saturate_e=SAT)
    assert ref.npix > 50
    near_defects = binary_dilation(mask != s["mask"], np.ones((9, 9), bool))
    near_defects |= binary_dilation(~np.isfinite(data), np.ones((9, 9), bool))
    np.testing.assert_array_equal(res.crmask[~near_defects], ref.crmask[~near_defects])
    assert np.isfinite(res.data[res.crmask]).all()
    # with COSMIC itself in mask_bits nothing already flagged COSMIC is touched again
    m2 = mask.copy()
    m2[res.crmask] |= bits.COSMIC
    res2 = cosmics.clean_cosmics(data, m2, sky_e=1000.0, rdnoise_e=RN, saturate_e=SAT,
                                 mask_bits=bits.UNUSABLE | bits.COSMIC)
    assert not (res2.crmask & res.crmask).any()


def test_cosmics_errors(cosmics):
    img = np.zeros((32, 32), np.float32)
    kw = dict(sky_e=100.0, rdnoise_e=RN, saturate_e=SAT)
    with pytest.raises(ValueError, match="mask shape"):
        cosmics.clean_cosmics(img, np.zeros((32, 31), np.uint16), **kw)
    with pytest.raises(ValueError, match="sky_e shape"):
        cosmics.clean_cosmics(img, None, **dict(kw, sky_e=np.zeros((31, 32))))
    with pytest.raises(ValueError, match="2-D"):
        cosmics.clean_cosmics(np.zeros(32, np.float32), None, **kw)
    with pytest.raises(ValueError, match="cleantype"):
        cosmics.clean_cosmics(img, None, cleantype="fancy", **kw)
    with pytest.raises(ValueError, match="needs fwhm_px"):
        cosmics.clean_cosmics(img, None, fsmode="convolve", **kw)
    with pytest.raises(ValueError, match="psfmodel"):
        cosmics.clean_cosmics(img, None, fsmode="convolve", fwhm_px=2.5, psfmodel="airy", **kw)


def test_cosmics_convolve_mode_runs(cosmics, cosmic_runs):
    seed, fwhm = COSMIC_SCENES[2]
    s, sub, _, _ = cosmic_runs[seed]
    res = cosmics.clean_cosmics(sub, s["mask"], sky_e=s["sky"], rdnoise_e=RN, saturate_e=SAT,
                                fsmode="convolve", fwhm_px=fwhm)
    sc = _score(s, res)
    assert sc["gt20"] >= 0.85 and sc["fp_star"] < 0.002, sc


# --------------------------------------------------------------------------- simulator
@pytest.fixture(scope="module")
def sim_frames(tmp_path_factory):
    """Calibrated science frames (e-) of one small simulated night, with their truth."""
    from reducer.testing import Target, make_night

    root = tmp_path_factory.mktemp("skycr")
    sim = make_night(root / "raw", 11, targets=[Target("SKYCR", dec=20.0, exptime=300.0, nexp=1,
                                                       dither=0.0)],
                     filters=("r",), nbias=0, ndark=0, nflat=0, standard=False,
                     shape=(320, 352), stars_per_field=3000, cr_rate=3.0)
    return _calibrated(sim)


def _calibrated(sim):
    """Every science frame of a simulated night calibrated to e- from its truth: a list of
    dicts (one per frame and detector) with data, mask, truth and noise figures."""
    from astropy.io import fits

    out = []
    for fr in sim.frames("science"):
        with fits.open(sim.path(fr)) as hdul:
            raws = {det: hdul[det].data.astype(np.float64) for det in fr["detectors"]}
        for det, dtruth in fr["detectors"].items():
            T = sim.truth["detectors"][det]
            ny = raws[det].shape[0]
            nd = raws[det].shape[1] - 32
            raw = raws[det][:, :nd]
            o = dtruth["overscan"]
            y = np.arange(ny)
            drift = (o["offset"] + o["amplitude"] * np.sin(2 * np.pi * y / o["period"] + o["phase"])
                     + o["slope"] * (y / (ny - 1) - 0.5))
            bias = T["bias_level"] + sim.calib_image("bias_pattern", det) + drift[:, None]
            dark = sim.calib_image("dark_rate", det) * fr["exptime"]
            resp = sim.calib_image("flat_response", det, fr["filter"])
            data = (((raw - bias) * T["gain"] - dark) / resp).astype(np.float32)
            mask = np.zeros(raw.shape, np.uint16)
            mask[raw >= T["saturate"]] |= bits.SATURATED
            for key in ("hot_pixels", "dead_pixels"):
                mask[T[key]["y"], T[key]["x"]] |= bits.BAD
            if T["bad_column"]:
                bc = T["bad_column"]
                mask[bc["y1"]:bc["y2"], bc["x"]] |= bits.BAD
            with np.load(sim.truth_dir / dtruth["cosmic_rays"]["file"]) as z:
                dep = np.zeros(raw.shape)
                dep[z[f"y_{det}"], z[f"x_{det}"]] = z[f"e_{det}"]
            assert np.array_equal(sim.cr_mask(fr["file"], det)[:, :nd], dep >= 50.0)
            out.append(dict(fr=fr, det=det, data=data, mask=mask, resp=resp, dark=dark,
                            dep=dep, gain=T["gain"], rn=T["rdnoise"],
                            sat_e=(T["saturate"] - T["bias_level"]) * T["gain"] / resp.max()))
    return out


def test_simulator_sky_and_cosmics(sim_frames, cosmics):
    num = {"strong": 0, "gt10": 0, "gt20": 0, "star": 0}
    den = dict(num)
    for f in sim_frames:
        fr = f["fr"]
        sky_true = fr["sky_e"]                       # flat-fielded: a uniform sky
        res = estimate_sky(f["data"], f["mask"], fwhm_px=fr["fwhm_px"])
        var_true = (sky_true * f["resp"] + f["dark"] + f["rn"] ** 2) / f["resp"] ** 2
        sigma = math.sqrt(float(np.median(var_true)))
        n_sky = int((~res.source_mask & (f["mask"] == 0)).sum())
        tol = 5.0 * (math.pi / 2) * sigma / math.sqrt(n_sky) + 1.0 / 6.0
        assert abs(res.level - sky_true) < tol, (res.level - sky_true, tol)
        assert abs(res.rms_level / sigma - 1.0) < 0.05, res.rms_level / sigma
        assert np.abs(res.sky - sky_true).max() < 0.15 * sigma

        sub, _ = subtract_sky(f["data"], None, res.sky)
        cr = cosmics.clean_cosmics(sub, f["mask"], sky_e=res.sky, rdnoise_e=f["rn"],
                                   saturate_e=f["sat_e"])
        # truth: deposit against the noise of what was collected (raw e-)
        collected = (sky_true + _stars_e(fr, f)) * f["resp"] + f["dark"]
        snr = f["dep"] / np.sqrt(collected + f["rn"] ** 2)
        good = f["mask"] == 0
        # star pixels: within 2 FWHM of the truth stars, unmasked, away from deposits
        st = fr["detectors"][f["det"]]["stars"]
        yy, xx = np.mgrid[0:sub.shape[0], 0:sub.shape[1]]
        near = np.zeros(sub.shape, bool)
        r = 2.0 * fr["fwhm_px"]
        for x, y in zip(st["x"], st["y"]):
            y0, x0 = int(max(y - r - 1, 0)), int(max(x - r - 1, 0))
            win = (slice(y0, int(y + r + 2)), slice(x0, int(x + r + 2)))
            near[win] |= (xx[win] - x) ** 2 + (yy[win] - y) ** 2 <= r * r
        sets = {"strong": (snr > 5) & good, "gt10": (snr > 10) & good,
                "gt20": (snr > 20) & good, "star": near & good & ~_touched(f["dep"])}
        for k, sel in sets.items():
            num[k] += int(cr.crmask[sel].sum())
            den[k] += int(sel.sum())
        assert cr.crmask[sets["star"]].mean() < 0.002
    frac = {k: num[k] / den[k] for k in num}
    # measured (seed 11, L.A.Cosmic + second pass): star pixels 0.037 % of 24565 (L.A.Cosmic
    # alone 0.028 %); > 20 sigma 95 % of 37 (92 %), > 10 sigma 91 % of 377 (90 %), > 5 sigma
    # 75 % of 883 (71 %).  The sky is 9000 e-: most deposits are 5-10 sigma, where a spot's
    # shape is barely measurable in one frame (64 % found)
    assert den["star"] > 10000 and den["strong"] > 500, den
    assert frac["star"] < 0.001, frac
    assert frac["gt20"] >= 0.90, (frac, den)
    assert frac["gt10"] >= 0.88, (frac, den)
    assert frac["strong"] >= 0.72, (frac, den)


def _stars_e(fr, f):
    """Truth star light [e-, before the flat response] of one detector (Moffat, FWHM, beta)."""
    st = fr["detectors"][f["det"]]["stars"]
    return _moffat(f["data"].shape, st["x"], st["y"], st["flux"], fr["fwhm_px"], fr["beta"],
                   sub=3, rad=12)


# --------------------------------------------------------------------------- simulator, dithered
@pytest.fixture(scope="module")
def sim_dithered(tmp_path_factory):
    """Four dithered 300 s exposures (dither amplitude 30 px) of one field in r, calibrated
    to e- from truth, sky-subtracted (the s step), with their 1-sigma uncertainty."""
    from reducer.testing import Target, make_night

    root = tmp_path_factory.mktemp("skycr_dither")
    sim = make_night(root / "raw", 11, targets=[Target("SKYCR", dec=20.0, exptime=300.0, nexp=4,
                                                       dither=30.0)],
                     filters=("r",), nbias=0, ndark=0, nflat=0, standard=False,
                     shape=(320, 352), stars_per_field=3000, cr_rate=3.0)
    out = _calibrated(sim)
    for f in out:
        res = estimate_sky(f["data"], f["mask"], fwhm_px=f["fr"]["fwhm_px"])
        f["sub"], _ = subtract_sky(f["data"], None, res.sky)
        f["sky"] = res.sky
        f["unc"] = (np.sqrt(np.maximum(f["data"] * f["resp"] + f["dark"], 0.0) + f["rn"] ** 2)
                    / f["resp"]).astype(np.float32)
    return out


def _sim_sets(f):
    """Truth pixel sets of a calibrated simulator frame: strong (> 5 sigma), > 10 and
    > 20 sigma cosmic-ray pixels, star pixels, and blank-sky noise pixels."""
    fr = f["fr"]
    collected = (fr["sky_e"] + _stars_e(fr, f)) * f["resp"] + f["dark"]
    snr = f["dep"] / np.sqrt(collected + f["rn"] ** 2)
    good = f["mask"] == 0
    st = fr["detectors"][f["det"]]["stars"]
    shape = f["data"].shape
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    near = np.zeros(shape, bool)
    r = 2.0 * fr["fwhm_px"]
    for x, y in zip(st["x"], st["y"]):
        y0, x0 = int(max(y - r - 1, 0)), int(max(x - r - 1, 0))
        win = (slice(y0, int(y + r + 2)), slice(x0, int(x + r + 2)))
        near[win] |= (xx[win] - x) ** 2 + (yy[win] - y) ** 2 <= r * r
    return {"strong": (snr > 5) & good, "gt10": (snr > 10) & good, "gt20": (snr > 20) & good,
            "star": near & good & ~_touched(f["dep"]),
            "noise": ~near & good & ~_touched(f["dep"])}


@pytest.mark.parametrize("ncomp", [0, 2, 3])
def test_simulator_cosmics_with_companions(sim_dithered, cosmics, ncomp):
    """Each of the 4 exposures x 2 detectors against its first ``ncomp`` companions (the
    same detector in the other exposures; dithers up to 64 px between them).  Measured
    (seed 11; alone / 2 / 3 companions): > 5 sigma 80.7 / 95.5 / 96.4 % of 4762 pixels,
    > 10 sigma 91.3 / 98.6 / 98.8 % of 2171, > 20 sigma 95.2 / 99.8 / 99.8 % of 480,
    star pixels 0.054 / 0.044 / 0.003 % of 93280, noise pixels 32 / 35 / 30 of 650360."""
    num, den = {}, {}
    for i, f in enumerate(sim_dithered):
        others = [g for j, g in enumerate(sim_dithered) if g["det"] == f["det"] and j != i][:ncomp]
        r = cosmics.clean_cosmics(f["sub"], f["mask"], sky_e=f["sky"], rdnoise_e=f["rn"],
                                  saturate_e=f["sat_e"], unc_e=f["unc"],
                                  companions=[(g["sub"], g["unc"], g["mask"]) for g in others])
        assert r.ncompanions == ncomp, r.companions
        for c, g in zip(r.companions, others):       # shift: the truth stars' positions
            a = f["fr"]["detectors"][f["det"]]["stars"]
            b = g["fr"]["detectors"][g["det"]]["stars"]
            _, ia, ib = np.intersect1d(a["id"], b["id"], return_indices=True)
            dy = float(np.median(np.asarray(b["y"])[ib] - np.asarray(a["y"])[ia]))
            dx = float(np.median(np.asarray(b["x"])[ib] - np.asarray(a["x"])[ia]))
            assert c.shift == pytest.approx((dy, dx), abs=0.1), (c, dy, dx)
            assert c.resid_px < 0.3 and c.scale == pytest.approx(1.0, abs=0.06)
        assert not r.crmask[f["mask"] != 0].any()
        for k, sel in _sim_sets(f).items():
            num[k] = num.get(k, 0) + int(r.crmask[sel].sum())
            den[k] = den.get(k, 0) + int(sel.sum())
    frac = {k: num[k] / den[k] for k in num}
    assert den["strong"] > 4000 and den["star"] > 80000, den
    assert frac["star"] < 0.001, frac
    assert num["noise"] < 1e-4 * den["noise"], num
    if ncomp == 0:
        assert frac["strong"] >= 0.75, frac
    else:
        assert frac["strong"] >= 0.95, frac
        assert frac["gt10"] >= 0.98 and frac["gt20"] >= 0.98, frac


def test_cosmics_companions_refused_or_off(cosmics, dithered_runs):
    """A companion that cannot be registered (another field, a dither beyond the limit,
    another shape) is refused with its reason; with none used, or ``compare=False``, or
    no companions, the result is the single-frame one exactly."""
    from reducer.ops.crcompare import compare_companions

    sc, tri, _, res = dithered_runs[COSMIC_SCENES[0][0]]
    s = sc[0]
    alone = res[0]
    other = dithered_scenes(99, 2.8, 0)[0]             # another star field
    kw = dict(sky_e=s["sky"], rdnoise_e=RN, saturate_e=SAT, unc_e=tri[0][1])
    cases = {
        "field": [_companion_triple(other)],
        "shape": [tuple(a[:200] for a in tri[1])],
    }
    whys = {"field": "correlation peak|stars", "shape": "shape"}
    for name, comps in cases.items():
        r = cosmics.clean_cosmics(tri[0][0], s["mask"], companions=comps, **kw)
        assert r.ncompanions == 0 and not r.companions[0].used
        assert re.search(whys[name], r.companions[0].why), r.companions[0]
        np.testing.assert_array_equal(r.crmask, alone.crmask)
        np.testing.assert_array_equal(r.data, alone.data)
        assert r.npix_compare == 0 and r.npix_cleared == 0
    for comps, compare in ((tri[1:3], False), ([], True), (None, True)):
        r = cosmics.clean_cosmics(tri[0][0], s["mask"], companions=comps, compare=compare, **kw)
        np.testing.assert_array_equal(r.crmask, alone.crmask)
        np.testing.assert_array_equal(r.data, alone.data)
        assert r.companions == () and r.ncompanions == 0
    # a dither beyond max_shift is refused; pixels no companion covers are never flagged
    bad = s["mask"] != 0
    c = compare_companions(tri[0][0], tri[0][1], bad, tri[1:2], max_shift=2.0)
    assert not c.companions[0].used and c.nused == 0 and not c.crmask.any()
    c = compare_companions(tri[0][0], tri[0][1], bad, tri[1:3])
    assert c.nused == 2 and c.covered.mean() < 0.99 and c.covered.mean() > 0.7
    assert not (c.crmask & ~c.covered).any() and not (c.crmask & bad).any()
    assert np.isnan(c.model[~c.covered]).all()


def test_cosmics_companions_errors(cosmics):
    img = np.zeros((32, 32), np.float32)
    kw = dict(sky_e=100.0, rdnoise_e=RN, saturate_e=SAT)
    with pytest.raises(ValueError, match="triple"):
        cosmics.clean_cosmics(img, None, companions=[(img, img)], **kw)
    with pytest.raises(ValueError, match="compare_nsigma"):
        cosmics.clean_cosmics(img, None, compare_nsigma=0, **kw)
    with pytest.raises(ValueError, match="unc_e shape"):
        cosmics.clean_cosmics(img, None, unc_e=np.ones((31, 32)), **kw)


# --------------------------------------------------------------------------- variable stars
def _variable_set(factor, ncomp, *, seed=3, fwhm=2.8):
    """A dithered set (:func:`dithered_scenes` conditions) with one more star at (128.3,
    127.6) of S/N 200 (within 2 FWHM) in the companions, ``factor`` x brighter in the
    frame (which has no cosmic rays of its own); the other stars constant."""
    rng = np.random.default_rng(900 + seed)
    field = star_field(seed + 7100, fwhm=fwhm, nsat=0)
    npix = math.pi * (2 * fwhm) ** 2
    flux = 200.0 ** 2 / 2 * (1 + math.sqrt(1 + 4 * npix * (1000.0 + RN ** 2) / 200.0 ** 2))
    vx, vy = 128.3, 127.6
    out = []
    for k in range(ncomp + 1):
        fl = dict(x=np.r_[field["x"], vx], y=np.r_[field["y"], vy],
                  flux=np.r_[field["flux"], flux * (factor if k == 0 else 1.0)])
        off = (0.0, 0.0) if k == 0 else tuple(rng.uniform(-20, 20, 2))
        fw = fwhm if k == 0 else fwhm * rng.uniform(0.85, 1.15)
        tr = 1.0 if k == 0 else rng.uniform(0.9, 1.1)
        out.append(scene(300 * seed + k, fwhm=fw, field=fl, offset=off, transparency=tr,
                         ncr=0 if k == 0 else 80))
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    near = (xx - vx) ** 2 + (yy - vy) ** 2 <= (2 * fwhm) ** 2
    return out, near, (int(round(vy)), int(round(vx)))


@pytest.mark.parametrize("ncomp", [2, 3])
@pytest.mark.parametrize("factor", [0.5, 1.3, 2.0, 5.0])
def test_cosmics_companions_keep_a_variable_star(cosmics, factor, ncomp):
    """A star brighter (or fainter) in the frame than in its companions is not a cosmic
    ray: the comparison refits the model with a local flux scale near sources.  Without
    that refit, 83 (2x) and 97 (5x) of its pixels were flagged and repaired."""
    sc, near, (yc, xc) = _variable_set(factor, ncomp)
    tri = [_companion_triple(s) for s in sc]
    s = sc[0]
    kw = dict(sky_e=s["sky"], rdnoise_e=RN, saturate_e=SAT, unc_e=tri[0][1])
    r = cosmics.clean_cosmics(tri[0][0], s["mask"], companions=tri[1:], **kw)
    assert r.ncompanions == ncomp
    assert not s["mask"][near].any()
    assert not r.crmask[near].any(), int(r.crmask[near].sum())
    np.testing.assert_array_equal(r.data[near], tri[0][0][near])
    # the comparison still works elsewhere on the frame (companions' own events ignored,
    # the frame has none: only a few noise pixels at most)
    assert r.crmask.sum() < 20
    # a cosmic ray on the variable star's flank (2 px from the centre) is still flagged
    # when it exceeds the refitted model's noise: deposit = the star's light there (20-110
    # sigma of the local noise).  A 10 sigma deposit is not: sigma_d there is dominated by
    # scale_noise x the star (0.15 x 1300-13000 e-)
    y0, x0 = yc, xc + 2
    sig = float(np.sqrt(s["var"][y0, x0]))
    # (fainter in the frame: the deposit must also make up the missing star light, 3x)
    dep = max(float(s["stars"][y0, x0]) * (1.0 if factor >= 1 else 3.0), 10 * sig)
    d = tri[0][0].copy()
    d[y0, x0] += dep
    r2 = cosmics.clean_cosmics(d, s["mask"], companions=tri[1:], **kw)
    assert r2.crmask[y0, x0], (dep, sig)
    assert abs(r2.data[y0, x0] - tri[0][0][y0, x0]) < abs(d[y0, x0] - tri[0][0][y0, x0])
