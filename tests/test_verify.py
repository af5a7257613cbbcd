"""reducer.verify against synthetic frames of known truth (seeded, fast)."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from reducer import verify as V
from reducer.verify import (DEFAULTS, Check, Verification, compare_with_previous, defects_map,
                            gain_from_flat_pair, read_noise_from_bias_pair, screen_bias_frame,
                            screen_dark_frame, screen_flat_frame, verify_bias, verify_dark,
                            verify_flat)

SHAPE = (256, 256)
RN = 5.0        # ADU
GAIN = 1.5      # e-/ADU
NFRAMES = 20


def rng(seed=0):
    return np.random.default_rng(seed)


def bias_frames(r, n=NFRAMES, rn=RN, level=0.0, pattern=None):
    """n bias frames, ADU: level + fixed pattern + Gaussian read noise."""
    fixed = 0.0 if pattern is None else pattern
    return [level + fixed + rn * r.standard_normal(SHAPE) for _ in range(n)]


def master_of(frames):
    """Plain mean master with its uncertainty and count (like combine's outputs)."""
    st = np.stack(frames)
    n = st.shape[0]
    return st.mean(0), st.std(0, ddof=1) / math.sqrt(n), np.full(SHAPE, n, np.int16)


def by_name(v: Verification) -> dict[str, Check]:
    return {c.name: c for c in v.checks}


def readonly(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


# --------------------------------------------------------------------------- result types

def test_cards_and_dict():
    v = Verification("bias", [Check("NOISE", True, 5.02, "4<=x<=6.5 ADU", "fine"),
                              Check("MEAN", False, float("nan"), "|x|<=1.12 ADU", "no pixels"),
                              Check("CUSTOM_THING", True, 1.0, "x>=0", "")])
    assert not v.passed and v.failed == ["MEAN"]
    cards = v.to_header_cards()
    assert cards[0][0] == "VERIFY" and cards[0][1] == "FAIL" and "MEAN" in cards[0][2]
    kws = [c[0] for c in cards]
    assert kws == ["VERIFY", "VNOISE", "VMEAN", "VCUSTOMT"]
    assert all(len(k) <= 8 and val in ("PASS", "FAIL") and len(com) <= 47 for k, val, com in cards)
    assert "5.02" in cards[1][2] and "4<=x<=6.5" in cards[1][2]
    d = json.loads(json.dumps(v.to_dict(), allow_nan=False))
    assert d["passed"] is False and d["failed"] == ["MEAN"] and d["checks"][1]["value"] is None
    # the cards go into a FITS header without truncation
    fits = pytest.importorskip("astropy.io.fits")
    h = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kw, val, com in cards:
            h[kw] = (val, com)
        h.tostring()
    assert h["VERIFY"] == "FAIL" and h["VNOISE"] == "PASS"


def test_empty_verification_does_not_pass():
    v = Verification("bias")
    assert not v.passed and v.to_header_cards()[0][1] == "FAIL"


def test_duplicate_keyword_rejected():
    c = Check("NOISE", True, 1.0, "", "")
    with pytest.raises(ValueError, match="VNOISE"):
        Verification("bias", [c, c]).to_header_cards()


def test_unknown_threshold_rejected():
    m, u, n = master_of(bias_frames(rng()))
    with pytest.raises(ValueError, match="unknown threshold.*bias_noise_ratoi_max"):
        verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN, thresholds={"bias_noise_ratoi_max": 2})


# --------------------------------------------------------------------------- bias

@pytest.mark.parametrize("use_diff", [True, False])
def test_bias_known_read_noise_passes(use_diff):
    r = rng(1)
    frames = bias_frames(r)
    m, u, n = master_of(frames)
    diff = frames[0] - frames[1] if use_diff else None
    v = verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN, frames_diff=diff)
    c = by_name(v)
    assert v.passed, v.to_dict()
    assert c["NOISE"].value == pytest.approx(RN, rel=0.05)
    assert c["CR_NOISE"].value == pytest.approx(RN, rel=0.03)
    assert abs(c["MEAN"].value) < 0.1
    assert [k for k, *_ in v.to_header_cards()] == ["VERIFY", "VMEAN", "VNOISE", "VCRNOISE"]


@pytest.mark.parametrize("use_diff", [True, False])
def test_bias_twice_read_noise_fails_noise(use_diff):
    r = rng(2)
    frames = bias_frames(r, rn=2 * RN)
    m, u, n = master_of(frames)
    diff = frames[0] - frames[1] if use_diff else None
    v = verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN, frames_diff=diff)
    assert "NOISE" in v.failed
    assert by_name(v)["NOISE"].value == pytest.approx(2 * RN, rel=0.05)


def test_bias_master_noise_ignores_fixed_pattern():
    """Column pattern and a smooth gradient are real structure, not noise."""
    r = rng(3)
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    pattern = 3.0 * r.standard_normal(SHAPE[1])[None, :] + 0.02 * xx
    m, u, n = master_of(bias_frames(r, pattern=pattern))
    m = m - np.median(m)
    v = verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN)
    assert by_name(v)["NOISE"].passed and by_name(v)["CR_NOISE"].passed


def test_bias_cosmic_rays_rejected():
    r = rng(4)
    frames = bias_frames(r)
    diff = frames[0] - frames[1]
    idx = r.choice(diff.size, 300, replace=False)
    diff.flat[idx] += r.uniform(200, 5000, idx.size) * r.choice([-1, 1], idx.size)
    m, u, n = master_of(frames)
    v = verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN, frames_diff=diff)
    assert v.passed, v.to_dict()


def test_bias_non_gaussian_noise_fails_cr_noise():
    """Laplacian noise of the right rms: the clipped sigma disagrees with the MAD sigma."""
    r = rng(5)
    diff = r.laplace(0.0, RN, SHAPE)    # rms of diff/sqrt(2) = RN
    m, u, n = master_of(bias_frames(r))
    v = verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN, frames_diff=diff)
    assert "CR_NOISE" in v.failed


def test_bias_mean_overscan_mode():
    r = rng(6)
    m, u, n = master_of(bias_frames(r))
    assert by_name(verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN))["MEAN"].passed
    bad = verify_bias(m + 10.0, u, n, read_noise_adu=RN, gain=GAIN)
    assert bad.failed == ["MEAN"] and by_name(bad)["MEAN"].value == pytest.approx(10.0, abs=0.1)


def test_bias_mean_level_mode():
    r = rng(7)
    m, u, n = master_of(bias_frames(r, level=1000.0))
    ok = verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN, mean_mode="level", reference_level=1004.0)
    assert ok.passed
    bad = verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN, mean_mode="level", reference_level=1050.0)
    assert bad.failed == ["MEAN"]
    assert "VMEAN" not in [k for k, *_ in verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN,
                                                       mean_mode="none").to_header_cards()]
    with pytest.raises(ValueError, match="reference_level"):
        verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN, mean_mode="level")
    with pytest.raises(ValueError, match="mean_mode"):
        verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN, mean_mode="zero")


def test_bias_bad_arguments():
    m, u, n = master_of(bias_frames(rng(8), n=3))
    with pytest.raises(ValueError, match=r"master \(256, 256\).*unc \(128, 128\)"):
        verify_bias(m, u[:128, :128], n, read_noise_adu=RN, gain=GAIN)
    with pytest.raises(ValueError, match="read_noise_adu"):
        verify_bias(m, u, n, read_noise_adu=0.0, gain=GAIN)


# --------------------------------------------------------------------------- dark

def dark_rate(r, median=0.01, noise=0.005, nhot=0, hot_rate=5.0):
    rate = median + noise * r.standard_normal(SHAPE)
    unc = np.full(SHAPE, noise)
    idx = r.choice(rate.size, nhot, replace=False)
    rate.flat[idx] = hot_rate * (1 + r.random(nhot))
    return rate, unc, idx


def test_dark_clean_passes():
    rate, unc, _ = dark_rate(rng(10))
    v = verify_dark(rate, unc)
    assert v.passed and by_name(v)["HOT_FRACTION"].value == 0.0


def test_dark_high_rate_fails():
    rate, unc, _ = dark_rate(rng(11), median=3.0, noise=0.1)
    assert verify_dark(rate, unc).failed == ["RATE"]


@pytest.mark.parametrize("frac, passes", [(0.005, True), (0.03, False)])
def test_dark_hot_fraction(frac, passes):
    nhot = int(frac * SHAPE[0] * SHAPE[1])
    rate, unc, _ = dark_rate(rng(12), nhot=nhot)
    c = by_name(verify_dark(rate, unc))["HOT_FRACTION"]
    assert c.value == pytest.approx(frac, rel=0.01)
    assert c.passed is passes


@pytest.mark.parametrize("gain", [0.5, 4.0])
def test_dark_adu_rate_with_gain(gain):
    """0.4 e-/s passes in e-/s; the same current in ADU/s is converted with the gain."""
    rate_e, unc_e, _ = dark_rate(rng(13), median=0.4, noise=0.01)
    v = verify_dark(rate_e / gain, unc_e / gain, gain=gain)
    assert v.passed and by_name(v)["RATE"].value == pytest.approx(0.4, rel=0.01)
    # a tighter (cooled-CCD) limit from the profile
    assert verify_dark(rate_e / gain, unc_e / gain, gain=gain,
                       thresholds={"dark_rate_max": 0.05}).failed == ["RATE"]


# --------------------------------------------------------------------------- flat

def poisson_flat(r, counts, prnu=0.01):
    """Normalised master flat from `counts` e- per pixel: SNR = sqrt(counts)."""
    resp = 1 + prnu * r.standard_normal(SHAPE)
    e = r.poisson(counts * resp).astype(float)
    norm = np.median(e)
    return e / norm, np.sqrt(np.maximum(e, 1.0)) / norm


def test_flat_good_passes():
    f, u = poisson_flat(rng(20), 10000)   # SNR 100
    v = verify_flat(f, u)
    assert v.passed, v.to_dict()
    assert by_name(v)["FLAT_SNR"].value == pytest.approx(100, rel=0.02)


def test_flat_low_counts_fails_snr():
    f, u = poisson_flat(rng(21), 900)     # SNR 30
    v = verify_flat(f, u)
    assert v.failed == ["FLAT_SNR"]
    assert by_name(v)["FLAT_SNR"].value == pytest.approx(30, rel=0.03)
    assert verify_flat(f, u, thresholds={"flat_snr_min": 25}).passed


def test_flat_badly_normalised_fails_median():
    f, u = poisson_flat(rng(22), 10000)
    assert verify_flat(f * 1.05, u * 1.05).failed == ["FLAT_MEDIAN"]


@pytest.mark.parametrize("ndead, nhot, passes", [(300, 200, True), (1000, 500, False)])
def test_flat_dead_hot_fraction(ndead, nhot, passes):
    r = rng(23)
    f, u = poisson_flat(r, 10000)
    f = f.copy()
    idx = r.choice(f.size, ndead + nhot, replace=False)
    f.flat[idx[:ndead]] = 0.2
    f.flat[idx[ndead:]] = 2.0
    c = by_name(verify_flat(f, u))["DEAD_FRACTION"]
    assert c.value == pytest.approx((ndead + nhot) / f.size)
    assert c.passed is passes


def test_flat_illuminated_area():
    """A vignetted corner is outside the illuminated area and not counted as dead."""
    f, u = poisson_flat(rng(24), 10000)
    f, u = f.copy(), u.copy()
    f[:64, :64] = 0.01
    u[:64, :64] = 0.01
    assert "DEAD_FRACTION" in verify_flat(f, u).failed
    illum = np.ones(SHAPE, bool)
    illum[:64, :64] = False
    assert verify_flat(f, u, illuminated=illum).passed
    with pytest.raises(ValueError, match="illuminated area is empty"):
        verify_flat(f, u, illuminated=np.zeros(SHAPE, bool))


# --------------------------------------------------------------------------- previous master

def test_compare_honest_realisation_passes():
    r = rng(30)
    truth = 100 + 5 * r.standard_normal(SHAPE)       # common structure
    sig = 0.5
    a = truth + sig * r.standard_normal(SHAPE)
    b = truth + sig * r.standard_normal(SHAPE)
    ua = ub = np.full(SHAPE, sig)
    c = compare_with_previous(a, ua, b, ub)
    assert c.passed and c.name == "PREV_DIFF"
    assert c.value < 1e-3     # expected 2e-9 * N ~ 1e-4 pixels


def test_compare_level_shift_fails():
    r = rng(31)
    sig = 0.5
    truth = 100 + 5 * r.standard_normal(SHAPE)
    a = truth + sig * r.standard_normal(SHAPE)
    b = truth + sig * r.standard_normal(SHAPE) + 10 * sig * math.sqrt(2)   # 10 sigma shift
    u = np.full(SHAPE, sig)
    c = compare_with_previous(a, u, b, u)
    assert not c.passed and c.value > 0.99


def test_compare_nan_and_shapes():
    r = rng(32)
    a = r.standard_normal(SHAPE)
    u = np.ones(SHAPE)
    b = a.copy()
    a[:10] = np.nan
    b[:, :5] = np.inf
    u2 = u.copy()
    u2[5, 5] = np.nan
    c = compare_with_previous(a, u, b, u2)
    assert c.passed and c.value == 0.0
    assert f"{(256 - 10) * (256 - 5)} comparable" in c.detail
    nan = np.full(SHAPE, np.nan)
    assert not compare_with_previous(nan, u, b, u).passed
    with pytest.raises(ValueError, match=r"\(256, 256\).*\(128, 256\)"):
        compare_with_previous(a, u, b[:128], u[:128])


# --------------------------------------------------------------------------- screening

def test_screen_bias_stack_finds_the_leak():
    r = rng(40)
    frames = bias_frames(r, n=6, level=1000.0)
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    frames[2] = frames[2] + 30.0 * xx / SHAPE[1]             # gradient, 0 -> 30 ADU
    stack_level = float(np.median([np.median(f) for f in frames]))
    reasons = [screen_bias_frame(f, expected_level=stack_level, read_noise_adu=RN) for f in frames]
    assert [i for i, x in enumerate(reasons) if x] == [2]
    assert "light leak" in reasons[2] and "gradient" in reasons[2]


def test_screen_bias_level_excess_and_deficit():
    r = rng(41)
    f = bias_frames(r, n=1, level=1000.0)[0]
    assert screen_bias_frame(f, expected_level=1000.0, read_noise_adu=RN) is None
    up = screen_bias_frame(f + 40, expected_level=1000.0, read_noise_adu=RN)
    assert "light leak" in up and "above" in up
    down = screen_bias_frame(f - 40, expected_level=1000.0, read_noise_adu=RN)
    assert "below" in down and "light leak" not in down
    assert screen_bias_frame(np.full(SHAPE, np.nan), expected_level=1000.0,
                             read_noise_adu=RN) == "no finite pixels"


def test_screen_bias_fixed_gradient_needs_reference():
    """A gradient common to every frame is bias structure: pass a reference to ignore it."""
    r = rng(42)
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    frames = bias_frames(r, n=5, level=1000.0, pattern=25.0 * yy / SHAPE[0])
    ref = np.median(np.stack(frames), axis=0)
    lvl = float(np.median(ref))
    assert "light leak" in screen_bias_frame(frames[0], expected_level=lvl, read_noise_adu=RN)
    assert all(screen_bias_frame(f, expected_level=lvl, read_noise_adu=RN, reference=ref) is None
               for f in frames)


@pytest.mark.parametrize("level, satfrac, expect", [
    (20000.0, 0.0, None),
    (20000.0, 0.05, "saturated"),
    (60000.0, 0.0, "saturated"),
    (1300.0, 0.0, "too faint"),
])
def test_screen_flat(level, satfrac, expect):
    r = rng(43)
    f = level + math.sqrt(level) * r.standard_normal(SHAPE)
    idx = r.choice(f.size, int(satfrac * f.size), replace=False)
    f.flat[idx] = 65535.0
    reason = screen_flat_frame(f, saturate_adu=65535.0, bias_level=1000.0)
    if expect is None:
        assert reason is None
    else:
        assert reason.startswith(expect)


def test_screen_dark_leak():
    r = rng(44)
    texp, rate = 300.0, 0.02
    frames = [rate * texp + RN * r.standard_normal(SHAPE) for _ in range(5)]
    frames[3] = frames[3] + 0.5 * texp                       # +0.5 ADU/s everywhere
    stack = float(np.median([np.median(f) / texp for f in frames]))
    reasons = [screen_dark_frame(f, exptime=texp, stack_rate=stack, read_noise=RN) for f in frames]
    assert [i for i, x in enumerate(reasons) if x] == [3]
    assert "light leak" in reasons[3]
    # a gradient leak is found against a reference rate map
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    grad = frames[0] + 40.0 * (xx / SHAPE[1] - 0.5)          # median unchanged
    ref = np.full(SHAPE, rate)
    assert screen_dark_frame(frames[0], exptime=texp, stack_rate=stack, read_noise=RN,
                             reference=ref) is None
    assert "gradient" in screen_dark_frame(grad, exptime=texp, stack_rate=stack,
                                           read_noise=RN, reference=ref)


# --------------------------------------------------------------------------- detector health

def flat_pair(r, gain, signal_e=20000.0, rn_e=6.0, bias=1000.0, prnu=0.01, ratio=1.005):
    """Two flats and two biases, ADU: Poisson in e-, read noise, / gain, + bias, digitised."""
    resp = 1 + prnu * r.standard_normal(SHAPE)
    flats = [np.round((r.poisson(s * resp) + rn_e * r.standard_normal(SHAPE)) / gain + bias)
             for s in (signal_e, signal_e * ratio)]
    biases = [np.round(rn_e * r.standard_normal(SHAPE) / gain + bias) for _ in range(2)]
    return flats[0], flats[1], biases[0], biases[1]


@pytest.mark.parametrize("gain", [0.8, 1.5, 3.0])
@pytest.mark.parametrize("two_biases", [True, False])
def test_gain_from_flat_pair_recovers_truth(gain, two_biases):
    f1, f2, b1, b2 = flat_pair(rng(int(gain * 10)), gain)
    est = gain_from_flat_pair(f1, f2, b1, b2 if two_biases else None)
    assert 0 < est.uncertainty < 0.03 * gain
    assert abs(est.gain - gain) < 3 * est.uncertainty, est
    assert est.signal_adu == pytest.approx(20000 * 1.0025 / gain, rel=0.01)


def test_gain_uncertainty_is_realistic():
    r = rng(50)
    ests = [gain_from_flat_pair(*flat_pair(r, 1.5)) for _ in range(30)]
    scatter = np.std([e.gain for e in ests], ddof=1)
    reported = np.mean([e.uncertainty for e in ests])
    assert 0.6 < scatter / reported < 1.6


def test_gain_from_flat_pair_errors():
    f1, f2, b1, b2 = flat_pair(rng(51), 1.5)
    with pytest.raises(ValueError, match=r"f1 \(256, 256\).*b2 \(10, 10\)"):
        gain_from_flat_pair(f1, f2, b1, b2[:10, :10])
    with pytest.raises(ValueError, match="not positive"):
        gain_from_flat_pair(b1, b2, b1, b2)
    with pytest.raises(ValueError, match="pair of slices"):
        gain_from_flat_pair(f1, f2, b1, b2, region=(0, 10))


@pytest.mark.parametrize("gain", [0.8, 3.0])
def test_read_noise_from_bias_pair(gain):
    r = rng(60)
    rn_e = 7.0
    b1, b2 = (np.round(1000 + rn_e / gain * r.standard_normal(SHAPE)) for _ in range(2))
    rn = read_noise_from_bias_pair(b1, b2, gain)
    n = b1.size
    # quantisation adds 1/12 ADU^2 per frame: the measured noise includes it
    expect = math.sqrt(rn_e ** 2 + gain ** 2 / 12)
    assert abs(rn - expect) < 5 * expect / math.sqrt(2 * n)
    half = read_noise_from_bias_pair(b1, b2, gain, region=(slice(0, 128), slice(None)))
    assert abs(half - expect) < 5 * expect / math.sqrt(n)


def test_defects_map_exact():
    r = rng(70)
    rate, unc, hot_idx = dark_rate(r, nhot=40)
    flat, _ = poisson_flat(r, 10000)
    flat = flat.copy()
    idx = r.choice(flat.size, 90, replace=False)
    dead, weak, bright = idx[:30], idx[30:60], idx[60:]
    flat.flat[dead] = r.uniform(0.0, 0.45, dead.size)
    flat.flat[weak] = r.uniform(0.55, 0.75, weak.size)
    flat.flat[bright] = r.uniform(1.6, 3.0, bright.size)
    nan_pix = (7, 9)
    rate[nan_pix] = np.nan
    readonly(rate, flat)

    m = defects_map(rate, flat, dark_unc=unc)
    truth = np.zeros(SHAPE, np.uint8)
    truth.flat[hot_idx] |= 1
    truth.flat[dead] |= 2
    truth.flat[weak] |= 4
    truth.flat[bright] |= 16
    truth[nan_pix] = 8
    assert m.dtype == np.uint8
    np.testing.assert_array_equal(m, truth)

    # either input alone; a clean flat has no defects at the documented thresholds
    np.testing.assert_array_equal(defects_map(rate, None), np.where(truth == 8, 8, truth & 1))
    clean, _ = poisson_flat(r, 10000)
    assert not defects_map(None, clean).any()
    assert not defects_map(dark_rate(r)[0], None).any()


def test_defects_map_errors():
    with pytest.raises(ValueError, match="both are None"):
        defects_map(None, None)
    with pytest.raises(ValueError, match=r"dark_rate \(256, 256\).*flat_norm \(4, 4\)"):
        defects_map(np.zeros(SHAPE), np.ones((4, 4)))
    with pytest.raises(ValueError, match="weak_below"):
        defects_map(None, np.ones(SHAPE), weak_below=0.3)


# --------------------------------------------------------------------------- purity

def test_inputs_are_not_modified():
    r = rng(80)
    frames = bias_frames(r, n=4)
    m, u, n = master_of(frames)
    diff = frames[0] - frames[1]
    f1, f2, b1, b2 = flat_pair(r, 1.5)
    flat, funcs = poisson_flat(r, 10000)
    rate, runc, _ = dark_rate(r, nhot=10)
    arrays = (m, u, n, diff, f1, f2, b1, b2, flat, funcs, rate, runc)
    copies = [a.copy() for a in arrays]
    readonly(*arrays)
    verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN, frames_diff=diff)
    verify_bias(m, u, n, read_noise_adu=RN, gain=GAIN)
    verify_dark(rate, runc, gain=2.0)
    verify_flat(flat, funcs)
    compare_with_previous(m, u, m, u)
    screen_bias_frame(b1, expected_level=1000.0, read_noise_adu=RN, reference=b2)
    screen_flat_frame(f1, saturate_adu=65535.0)
    screen_dark_frame(diff, exptime=10.0, stack_rate=0.0, read_noise=RN, reference=rate)
    gain_from_flat_pair(f1, f2, b1, b2)
    gain_from_flat_pair(f1, f2, b1)
    read_noise_from_bias_pair(b1, b2, 1.5)
    defects_map(rate, flat, dark_unc=runc)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


def test_defaults_are_numbers():
    """The defaults fit a profile's [calib.verify] table (name -> float)."""
    assert all(isinstance(v, (int, float)) for v in DEFAULTS.values())
    assert set(V.CARD_KEYWORDS.values()) >= {"VNOISE", "VMEAN", "VCRNOISE", "VRATE", "VHOTFRAC",
                                            "VFLATMED", "VFLATSNR", "VDEADFRC", "VPREVDIF"}
