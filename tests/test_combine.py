"""Tests of the sigma-clipped combine engine and of the FITS strip sources.

Truth comes from injected signals (seeded), from hand-computed small stacks,
from scipy (truncated-normal variance) and from a straightforward float64 numpy
implementation of the estimator (``reference_clipped_mean`` in
``bench/combine.py``, kept separate from the engine).
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from reducer.fitsio_strips import (
    ArraySource,
    CompressedFitsSource,
    FitsStripSource,
    open_strip_source,
)
from reducer.ops import combine as C
from reducer.ops.combine import (
    KPF_NSIGMA,
    clip_variance_factor,
    clipped_mean,
    combine,
    plan_strips,
)

ROOT = Path(__file__).resolve().parents[1]


def _load_reference():
    spec = importlib.util.spec_from_file_location("_bench_combine", ROOT / "bench" / "combine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.reference_clipped_mean


reference_clipped_mean = _load_reference()


def assert_matches_reference(out, ref, rtol=1e-5):
    """|delta| <= rtol * max(|ref|, UNC_ref) per pixel, for the value and the UNC;
    UNC also within rtol of itself; CNT and NaN positions identical."""
    m, u, c = (np.asarray(a) for a in out)
    rm, ru, rc = ref
    assert m.dtype == np.float32 and u.dtype == np.float32
    assert np.issubdtype(c.dtype, np.integer)
    np.testing.assert_array_equal(c, rc)
    np.testing.assert_array_equal(np.isnan(m), np.isnan(rm))
    np.testing.assert_array_equal(np.isnan(u), np.isnan(ru))
    ok = ~np.isnan(rm)
    scale = np.maximum(np.abs(rm), np.nan_to_num(ru))[ok]
    assert np.all(np.abs(m[ok] - rm[ok]) <= rtol * scale + 1e-30)
    oku = ~np.isnan(ru)
    scale_u = np.maximum(np.abs(rm), ru)[oku]
    assert np.all(np.abs(u[oku] - ru[oku]) <= rtol * scale_u + 1e-30)
    assert np.all(np.abs(u[oku] - ru[oku]) <= rtol * ru[oku] + 1e-6 * scale_u)


def gaussian_stack(rng, n, shape=(32, 40), mu=1000.0, sigma=5.0, outlier_frac=0.0,
                   dtype=np.float32):
    cube = rng.normal(mu, sigma, (n,) + shape)
    if outlier_frac:
        hit = rng.random(cube.shape) < outlier_frac
        cube[hit] += rng.choice([-1, 1], hit.sum()) * rng.uniform(20, 200, hit.sum()) * sigma
    return cube.astype(dtype)


# --------------------------------------------------------------------------- reference
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 20, 33])
@pytest.mark.parametrize("nsigma", [0.7, 2.0, 2.1, 3.0])
def test_matches_numpy_reference(n, nsigma):
    rng = np.random.default_rng(100 + n)
    cube = gaussian_stack(rng, n, outlier_frac=0.03)
    assert_matches_reference(clipped_mean(cube, nsigma), reference_clipped_mean(cube, nsigma))


@pytest.mark.parametrize("n", [1, 2, 3, 6, 20])
@pytest.mark.parametrize("opts", ["masks", "nan", "scales", "weights", "all", "input-unc"])
def test_matches_reference_with_options(n, opts):
    rng = np.random.default_rng(7 * n + len(opts))
    cube = gaussian_stack(rng, n, shape=(24, 30), outlier_frac=0.02)
    kw = {}
    if opts in ("masks", "all", "input-unc"):
        kw["masks"] = rng.random(cube.shape) < 0.25
    if opts in ("nan", "all", "input-unc"):
        cube[rng.random(cube.shape) < 0.05] = np.nan
        cube[rng.random(cube.shape) < 0.01] = np.inf
        cube[rng.random(cube.shape) < 0.01] = -np.inf
    if opts in ("scales", "all", "input-unc"):
        kw["scales"] = rng.uniform(0.5, 2.0, n)
    if opts in ("weights", "all", "input-unc"):
        kw["weights"] = rng.uniform(0.2, 3.0, n)
    if opts in ("all", "input-unc"):
        kw["uncs"] = rng.uniform(3, 7, cube.shape).astype(np.float32)
    if opts == "input-unc":
        kw["unc_from"] = "input"
    assert_matches_reference(clipped_mean(cube, 2.1, **kw), reference_clipped_mean(cube, 2.1, **kw))


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.float64])
def test_integer_and_float64_input(dtype):
    # integer data make the rejection bound fall exactly on data values often
    rng = np.random.default_rng(3)
    cube = np.round(gaussian_stack(rng, 20, mu=1000, sigma=3, outlier_frac=0.02,
                                   dtype=np.float64)).astype(dtype)
    for nsigma in (2.0, 2.1, 2.5):
        assert_matches_reference(clipped_mean(cube, nsigma), reference_clipped_mean(cube, nsigma))


def test_large_stack_uses_sort_fallback(monkeypatch):
    rng = np.random.default_rng(4)
    cube = gaussian_stack(rng, 13, shape=(10, 12), outlier_frac=0.05)
    masks = rng.random(cube.shape) < 0.1
    monkeypatch.setattr(C, "NETWORK_MAX_N", 8)
    assert_matches_reference(clipped_mean(cube, 2.1), reference_clipped_mean(cube, 2.1))
    assert_matches_reference(clipped_mean(cube, 2.1, masks=masks),
                             reference_clipped_mean(cube, 2.1, masks=masks))


def test_exact_bound_values_are_kept():
    # n = 26: P16 = v[4] and P84 = v[21] exactly (gamma 0), median = (v[12] + v[13]) / 2.
    # With v[4] = 96, v[21] = 104 -> s = 4; nsigma = 2.5 -> bound 10 about m = 100:
    # 90 and 110 are kept (at the bound), 89.99999 and 110.00001 are rejected.
    base = [96.0] * 5 + [100.0] * 16 + [104.0] * 5
    vals_in = base[:]
    vals_in[0], vals_in[-1] = 90.0, 110.0
    vals_out = base[:]
    vals_out[0], vals_out[-1] = np.nextafter(np.float32(90), 0), np.nextafter(np.float32(110), 200)
    cube = np.array([vals_in, vals_out], np.float32).T.reshape(26, 1, 2)
    m, u, c = clipped_mean(cube, 2.5)
    assert c.tolist() == [[26, 24]]
    assert m[0, 0] == pytest.approx(np.mean(vals_in), rel=1e-7)
    assert m[0, 1] == pytest.approx(np.mean(base[1:-1]), rel=1e-7)
    assert_matches_reference((m, u, c), reference_clipped_mean(cube, 2.5))


# --------------------------------------------------------------------------- truth
def test_hand_computed_stack():
    # 0..18 and one outlier: median 9.5, P16 = 3.04, P84 = 15.96, s = 6.46,
    # bound(2.1) = 13.566 -> only 100 is rejected; mean of 0..18 = 9,
    # var = 31.667, UNC = sqrt(var / f(2.1) / 19)
    vals = np.array(list(range(19)) + [100], np.float32)
    order = np.random.default_rng(0).permutation(20)
    cube = vals[order].reshape(20, 1, 1)
    m, u, c = clipped_mean(cube, 2.1)
    assert c[0, 0] == 19
    assert m[0, 0] == pytest.approx(9.0, abs=1e-5)
    var = np.var(np.arange(19.0), ddof=1)
    assert u[0, 0] == pytest.approx(math.sqrt(var / clip_variance_factor(2.1) / 19), rel=1e-6)


@pytest.mark.parametrize("n", [10, 20, 40])
def test_gaussian_truth_outliers_rejected(n):
    rng = np.random.default_rng(11 + n)
    mu, sigma, shape = 500.0, 4.0, (64, 64)
    clean = rng.normal(mu, sigma, (n,) + shape).astype(np.float32)
    cube = clean.copy()
    # one strong outlier (50 to 500 sigma, either sign: cosmic ray or dead
    # pixel) in a random frame of every pixel
    which = rng.integers(0, n, shape)
    yy, xx = np.indices(shape)
    sign = rng.choice([-1, 1], shape)
    cube[which, yy, xx] += (sign * rng.uniform(50, 500, shape) * sigma).astype(np.float32)
    m, u, c = clipped_mean(cube, KPF_NSIGMA["bias"])
    # every outlier is rejected: the count is at most n - 1, and including even
    # the smallest outlier (50 sigma) would shift that pixel's mean by more than
    # (50 - 5) sigma / n, far more than any deviation seen
    assert c.max() <= n - 1
    assert np.max(np.abs(m - mu)) < (50 - 5) * sigma / n
    # mean within noise: per pixel 6 sigma/sqrt(N) (x1.15 for the clipped-mean
    # efficiency), and the average over 4096 pixels within 5 standard errors
    se = sigma / math.sqrt(n - 1)
    assert np.max(np.abs(m - mu)) < 6 * 1.15 * se
    assert abs(np.mean(m) - mu) < 5 * 1.15 * se / math.sqrt(m.size)
    # kept fraction of Gaussian values close to P(|z| <= k s/sigma); s from 16-84
    # percentiles of N values is biased low for small N, so allow 0.90-0.98
    assert 0.90 < c.mean() / (n - 1) < 0.98


def test_unc_is_standard_error_without_clipping():
    # nsigma huge: no value is ever rejected, f -> 1: UNC must be the standard error
    rng = np.random.default_rng(21)
    n, sigma, shape = 12, 3.0, (128, 128)
    cube = rng.normal(100.0, sigma, (n,) + shape).astype(np.float32)
    m, u, c = clipped_mean(cube, 1e6)
    assert np.all(c == n)
    # mean of UNC^2 is sigma^2/n within its noise (sd of s^2/sigma^2 is sqrt(2/(n-1)))
    ratio = np.mean(u.astype(float) ** 2) * n / sigma**2
    assert abs(ratio - 1) < 5 * math.sqrt(2 / (n - 1)) / math.sqrt(m.size)
    # and it matches the actual scatter of the result around the truth
    emp = np.std(m - 100.0)
    assert abs(np.sqrt(np.mean(u.astype(float) ** 2)) / emp - 1) < 5 / math.sqrt(2 * m.size)


def test_clip_correction_makes_variance_unbiased_for_large_n():
    # The truncated-Gaussian factor removes the clipping bias of the survivors'
    # variance: mean(UNC^2 CNT) -> sigma^2 as N grows (the robust sigma from the
    # 16-84 percentiles converges).  Measured: 0.93 (N=20), 0.98 (N=200).
    rng = np.random.default_rng(22)
    sigma = 3.0
    ratios = {}
    for n, shape in ((20, (128, 128)), (200, (48, 48))):
        cube = rng.normal(100.0, sigma, (n,) + shape).astype(np.float32)
        m, u, c = clipped_mean(cube, 2.1)
        ratios[n] = np.mean(u.astype(float) ** 2 * c) / sigma**2
        # the same quantity without the correction is biased by f(2.1) = 0.81
        raw = ratios[n] * clip_variance_factor(2.1)
        assert raw < 0.83
    noise = 5 * math.sqrt(2 / 19) / 128
    assert 0.90 - noise < ratios[20] < 0.96 + noise
    assert 0.96 < ratios[200] < 1.01
    assert abs(ratios[200] - 1) < abs(ratios[20] - 1)


def test_unc_vs_true_scatter_of_clipped_mean():
    # Documented property of the KPF UNC: it is the standard error sigma/sqrt(CNT),
    # while the clipped mean itself scatters more; asymptotically the ratio is
    # (P - 2 k phi(k)) / (P sqrt(f(k))), P = 2 Phi(k) - 1: 0.899 for k = 2.1.
    from scipy.stats import norm

    k = 2.1
    P = 2 * norm.cdf(k) - 1
    expected = (P - 2 * k * norm.pdf(k)) / (P * math.sqrt(clip_variance_factor(k)))
    assert expected == pytest.approx(0.899, abs=2e-3)
    rng = np.random.default_rng(23)
    cube = rng.normal(100.0, 3.0, (40, 128, 128)).astype(np.float32)
    m, u, c = clipped_mean(cube, k)
    ratio = np.sqrt(np.mean(u.astype(float) ** 2)) / np.std(m - 100.0)
    noise = 5 / math.sqrt(2 * m.size)  # relative sd of the empirical scatter
    assert expected - 0.03 - noise < ratio < expected + noise


def test_clip_variance_factor_vs_scipy():
    from scipy.stats import truncnorm

    for k in (0.5, 1.0, 2.1, 2.2, 2.3, 2.4, 5.0):
        assert clip_variance_factor(k) == pytest.approx(truncnorm(-k, k).var(), rel=1e-12)
    assert clip_variance_factor(2.1) == pytest.approx(0.808424, abs=1e-6)


# --------------------------------------------------------------------------- edge cases
def test_n1_value_itself_and_propagated_unc():
    rng = np.random.default_rng(5)
    frame = rng.normal(10, 1, (1, 6, 7)).astype(np.float32)
    m, u, c = clipped_mean(frame, 2.1)
    np.testing.assert_array_equal(m, frame[0])
    assert np.all(np.isnan(u)) and np.all(c == 1)
    sig = np.full(frame.shape, 0.5, np.float32)
    m, u, c = clipped_mean(frame, 2.1, scales=[2.0], uncs=sig)
    np.testing.assert_array_equal(m, frame[0] * np.float32(2))
    np.testing.assert_allclose(u, 1.0, rtol=1e-7)


def test_n2_plain_mean_and_unc_choices():
    a = np.array([[1.0, 5.0]], np.float32)
    b = np.array([[3.0, 105.0]], np.float32)  # no clipping with two values, even far apart
    cube = np.stack([a, b])
    m, u, c = clipped_mean(cube, 0.5)
    np.testing.assert_allclose(m, [[2.0, 55.0]])
    # ddof=1 scatter of two values / sqrt(2) = |a - b| / 2, no clip correction
    np.testing.assert_allclose(u, [[1.0, 50.0]], rtol=1e-7)
    assert np.all(c == 2)
    sig = np.stack([np.full((1, 2), 3.0), np.full((1, 2), 4.0)]).astype(np.float32)
    m, u, c = clipped_mean(cube, 2.1, uncs=sig, unc_from="input")
    np.testing.assert_allclose(u, 2.5, rtol=1e-7)  # sqrt(9 + 16) / 2
    # weighted: mean (1*1 + 3*3)/4 = 2.5
    m, u, c = clipped_mean(cube, 2.1, weights=[1, 3])
    assert m[0, 0] == pytest.approx(2.5)


def test_all_masked_pixel_and_zero_spread():
    cube = np.full((5, 2, 3), 7.0, np.float32)
    masks = np.zeros(cube.shape, bool)
    masks[:, 0, 0] = True          # every frame masked
    cube[3, 1, 2] = 9.0            # s == 0 (4 equal values): only values == m kept
    cube[:, 0, 1] = np.nan         # every frame non-finite
    m, u, c = clipped_mean(cube, 2.1, masks=masks)
    assert np.isnan(m[0, 0]) and np.isnan(u[0, 0]) and c[0, 0] == 0
    assert np.isnan(m[0, 1]) and np.isnan(u[0, 1]) and c[0, 1] == 0
    assert m[1, 2] == 7.0 and c[1, 2] == 4 and u[1, 2] == 0.0
    assert m[1, 0] == 7.0 and c[1, 0] == 5 and u[1, 0] == 0.0


def test_masks_are_honoured():
    rng = np.random.default_rng(6)
    cube = gaussian_stack(rng, 9, shape=(20, 20))
    cube[4] += 1e4  # a whole bad frame ...
    masks = np.zeros(cube.shape, bool)
    masks[4] = True  # ... masked: same as not having it
    out = clipped_mean(cube, 2.1, masks=masks)
    ref = clipped_mean(np.delete(cube, 4, axis=0), 2.1)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a, b)


def test_scales_recover_common_signal():
    rng = np.random.default_rng(8)
    truth = rng.uniform(100, 200, (16, 16))
    gains = rng.uniform(0.5, 2.0, 15)
    frames = truth[None] * gains[:, None, None] + rng.normal(0, 0.1, (15, 16, 16))
    m, u, c = clipped_mean(frames.astype(np.float32), 3.0, scales=1 / gains)
    assert np.max(np.abs(m - truth)) < 6 * 0.1 * 2 / math.sqrt(14)


def test_weights():
    rng = np.random.default_rng(9)
    cube = gaussian_stack(rng, 6, shape=(64, 64), mu=10.0, sigma=1.0)
    # integer weights without clipping == unweighted mean of repeated frames
    w = [1, 2, 3, 1, 2, 1]
    m, u, c = clipped_mean(cube, 1e6, weights=w)
    rep = np.repeat(cube, w, axis=0)
    np.testing.assert_allclose(m, rep.astype(np.float64).mean(0), rtol=1e-6)
    # equal weights are the unweighted estimator, bit for bit
    a = clipped_mean(cube, 2.1, weights=[2.5] * 6)
    b = clipped_mean(cube, 2.1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # reliability weights, frames with equal noise: UNC^2 ~ sigma^2 sum w^2 / (sum w)^2
    big = rng.normal(0, 1.0, (8, 128, 128)).astype(np.float32)
    w = np.array([1, 1, 2, 2, 3, 3, 4, 4], float)
    m, u, c = clipped_mean(big, 1e6, weights=w)
    expect = (w**2).sum() / w.sum() ** 2
    tol = 5 * math.sqrt(2 / 7) / 128
    assert np.mean(u.astype(float) ** 2) / expect == pytest.approx(1, abs=tol)
    assert np.std(m) ** 2 / expect == pytest.approx(1, abs=5 * math.sqrt(2) / 128)


def test_inputs_never_modified():
    rng = np.random.default_rng(10)
    cube = gaussian_stack(rng, 7, outlier_frac=0.05)
    cube[0, 0, 0] = np.nan
    masks = rng.random(cube.shape) < 0.2
    uncs = np.ones(cube.shape, np.float32)
    keep = (cube.copy(), masks.copy(), uncs.copy())
    clipped_mean(cube, 2.1, masks=masks, scales=np.linspace(1, 2, 7), uncs=uncs)
    clipped_mean(cube, 2.1)
    np.testing.assert_array_equal(cube, keep[0])
    np.testing.assert_array_equal(masks, keep[1])
    np.testing.assert_array_equal(uncs, keep[2])


@pytest.mark.parametrize("mask_frac", [0.0, 0.004, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunking_and_threads_do_not_change_results(mask_frac, weighted):
    # pixels with bad values are redone by the general path, on the whole chunk
    # or on a compacted copy depending on how many there are: never visible
    rng = np.random.default_rng(12)
    cube = gaussian_stack(rng, 11, shape=(20, 31), outlier_frac=0.02)
    cube[2, 3, 4] = np.nan
    masks = rng.random(cube.shape) < mask_frac
    kw = {"masks": masks, "weights": np.arange(1.0, 12.0) if weighted else None}
    base = clipped_mean(cube, 2.1, **kw)
    assert_matches_reference(base, reference_clipped_mean(cube, 2.1, **kw))
    for chunk, threads in ((1, 1), (97, 1), (300, 2), (10**6, 2)):
        out = clipped_mean(cube, 2.1, chunk_pixels=chunk, threads=threads, **kw)
        for a, b in zip(out, base):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- networks
@pytest.mark.parametrize("n", list(range(1, 25)) + [33, 40, 64, 96])
def test_networks_sort_select_partition(n):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 5, (n, 2000)).astype(np.float32)  # many ties
    y = np.sort(x, axis=0)
    rows = [r.copy() for r in x]
    for i, j in C._batcher_pairs(n):
        rows[i], rows[j] = np.minimum(rows[i], rows[j]), np.maximum(rows[i], rows[j])
    np.testing.assert_array_equal(np.array(rows), y)
    exact = tuple(sorted(C._ranks_for(n)))
    rows = [r.copy() for r in x]
    for i, j in C._network(n, exact):  # pruned: only the needed ranks are exact
        rows[i], rows[j] = np.minimum(rows[i], rows[j]), np.maximum(rows[i], rows[j])
    for r in exact:
        np.testing.assert_array_equal(rows[r], y[r])
    rows = [r.copy() for r in x]
    for i, j in C._partition_network(n, exact):  # + the runs between them as sets
        rows[i], rows[j] = np.minimum(rows[i], rows[j]), np.maximum(rows[i], rows[j])
    got = np.array(rows)
    for r in exact:
        np.testing.assert_array_equal(got[r], y[r])
    edges = [-1] + list(exact) + [n]
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi - lo > 1:
            np.testing.assert_array_equal(np.sort(got[lo + 1:hi], axis=0), y[lo + 1:hi])


# --------------------------------------------------------------------------- driver
def _array_sources(cube, masks=None, uncs=None):
    return [ArraySource(cube[i], None if masks is None else masks[i],
                        None if uncs is None else uncs[i], name=f"frame{i}")
            for i in range(cube.shape[0])]


@pytest.mark.parametrize("masked", [False, True])
def test_driver_identical_for_any_mem_limit(masked):
    rng = np.random.default_rng(13)
    cube = gaussian_stack(rng, 9, shape=(57, 33), outlier_frac=0.02)
    masks = (rng.random(cube.shape) < 0.1) if masked else None
    keep = cube.copy()
    srcs = _array_sources(cube, masks)
    one = combine(srcs, 2.1, mem_limit=64 * 2**20)
    assert one.plan.nstrips == 1
    tiny_limit = 57 * 33 * 10 + 9 * 33 * 5 * 3 + C.workspace_bytes(9, 1024) + 2000
    many = combine(srcs, 2.1, mem_limit=tiny_limit, chunk_pixels=1024)
    assert many.plan.nstrips > 10
    assert many.plan.total_bytes <= tiny_limit
    thr = combine(srcs, 2.1, mem_limit=64 * 2**20, threads=2, max_strip_bytes=9 * 33 * 5 * 4)
    assert thr.plan.threads == 2 and thr.plan.nstrips > 2
    ref = clipped_mean(cube, 2.1, masks=masks)
    for res in (one, many, thr):
        for a, b in zip((res.data, res.unc, res.cnt), ref):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cube, keep)
    assert one.nframes == 9 and one.nsigma == 2.1 and one.cnt.dtype == np.int16


def test_driver_uncertainties_and_plain_read_sources():
    rng = np.random.default_rng(14)
    cube = gaussian_stack(rng, 2, shape=(10, 12))
    uncs = rng.uniform(1, 2, cube.shape).astype(np.float32)

    class Plain:  # minimal protocol: shape + read, returns float64 and a mask tuple
        def __init__(self, a, u):
            self.shape, self.a, self.u = a.shape, a.astype(np.float64), u

        def read(self, y0, y1):
            return self.a[y0:y1], np.zeros((y1 - y0, self.shape[1]), bool)

        def read_unc(self, y0, y1):
            return self.u[y0:y1]

    res = combine([Plain(cube[i], uncs[i]) for i in range(2)], 2.1, unc_from="input",
                  mem_limit=2**20)
    exp = clipped_mean(cube, 2.1, uncs=uncs, unc_from="input")
    for a, b in zip((res.data, res.unc, res.cnt), exp):
        np.testing.assert_array_equal(a, b)


def test_driver_memory_is_bounded():
    # tracemalloc sees numpy's allocations: the measured peak of the whole combine
    # (sources included) stays below mem_limit, for N = 10 and N = 40
    rng = np.random.default_rng(15)
    frame = rng.normal(0, 1, (200, 160)).astype(np.float32)
    limit = 200 * 160 * 10 + 2_600_000
    for n in (10, 40):
        srcs = [ArraySource(frame) for _ in range(n)]
        tracemalloc.start()
        try:
            res = combine(srcs, 2.1, mem_limit=limit, chunk_pixels=4096)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert res.plan.total_bytes <= limit
        assert peak <= limit, (n, peak, limit, res.plan)


# --------------------------------------------------------------------------- errors
def test_errors():
    a = ArraySource(np.zeros((4, 5), np.float32), name="good")
    b = ArraySource(np.zeros((4, 6), np.float32), name="bad.fits")
    msg = r"source 2 \(bad\.fits\) has shape \(4, 6\), expected \(4, 5\)"
    with pytest.raises(ValueError, match=msg):
        combine([a, a, b], 2.1)
    with pytest.raises(ValueError, match="at least one source"):
        combine([], 2.1)
    for bad in (0, -1, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="nsigma must be a finite number > 0"):
            combine([a], bad)
        with pytest.raises(ValueError, match="nsigma must be a finite number > 0"):
            clipped_mean(np.zeros((2, 2, 2)), bad)
    with pytest.raises(ValueError, match="mem_limit=.* too small"):
        combine([a, a], 2.1, mem_limit=1000)
    with pytest.raises(ValueError, match="scales must have one value per frame"):
        clipped_mean(np.zeros((3, 2, 2)), 2.1, scales=[1, 2])
    with pytest.raises(ValueError, match="weights must be > 0"):
        clipped_mean(np.zeros((2, 2, 2)), 2.1, weights=[1, 0])
    with pytest.raises(ValueError, match="masks must have the shape"):
        clipped_mean(np.zeros((2, 2, 2)), 2.1, masks=np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="needs per-frame uncertainties"):
        clipped_mean(np.zeros((2, 2, 2)), 2.1, unc_from="input")
    with pytest.raises(ValueError, match="needs read_unc"):
        combine([a, a], 2.1, unc_from="input")
    with pytest.raises(ValueError, match="unc_from must be"):
        clipped_mean(np.zeros((2, 2, 2)), 2.1, unc_from="model")
    with pytest.raises(ValueError, match=r"cube must have shape \(N, ny, nx\)"):
        clipped_mean(np.zeros(3), 2.1)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        combine([a], 2.1, threads=0)
    with pytest.raises(ValueError, match="row range 3:9 is not inside 0:4"):
        a.read(3, 9)


def test_plan_strips_reports_budget():
    p = plan_strips((4096, 2048), 20, 160 * 2**20, has_mask=False)
    assert p.total_bytes <= 160 * 2**20
    assert p.output_bytes == 4096 * 2048 * 10
    p40 = plan_strips((4096, 2048), 40, 160 * 2**20, has_mask=False)
    assert p40.total_bytes <= 160 * 2**20 and p40.strip_rows < p.strip_rows


# --------------------------------------------------------------------------- FITS sources
def _write(path, data, **hdr):
    from astropy.io import fits

    h = fits.PrimaryHDU(data)
    for k, v in hdr.items():
        h.header[k] = v
    h.writeto(path, overwrite=True)
    return path


def _expected(path, hdu=0):
    from astropy.io import fits

    with fits.open(path) as hl:
        return np.asarray(hl[hdu].data, np.float32)


ROW_RANGES = [(0, 1), (0, 37), (5, 6), (17, 41), (40, 41), (0, 41)]


@pytest.mark.parametrize("method", ["mmap", "read", "section"])
@pytest.mark.parametrize("kind", ["f32", "f64", "i16-bzero", "i16-bscale", "i32", "u8", "blank"])
def test_fits_source_rows(tmp_path, method, kind):
    rng = np.random.default_rng(16)
    shape = (41, 23)
    hdr = {}
    if kind == "f32":
        data = rng.normal(0, 100, shape).astype(np.float32)
    elif kind == "f64":
        data = rng.normal(0, 100, shape)
    elif kind == "i16-bzero":  # uint16 stored as int16 + BZERO 32768 (raw CCD frames)
        data = rng.integers(0, 65535, shape).astype(np.uint16)
    elif kind == "i16-bscale":
        data = rng.integers(-3000, 3000, shape).astype(np.int16)
        hdr = {"BSCALE": 0.5, "BZERO": 100.0}
    elif kind == "i32":
        data = rng.integers(-2**30, 2**30, shape).astype(np.int32)
    elif kind == "u8":
        data = rng.integers(0, 255, shape).astype(np.uint8)
    else:
        data = rng.integers(-100, 100, shape).astype(np.int16)
        data[3, 4] = -32768
        hdr = {"BLANK": -32768}
    if kind == "i16-bscale":
        from astropy.io import fits

        h = fits.PrimaryHDU(data)
        h.header["BSCALE"] = 0.5
        h.header["BZERO"] = 100.0
        h.writeto(tmp_path / "f.fits")  # raw ints, scaled on read
        p = tmp_path / "f.fits"
    else:
        p = _write(tmp_path / "f.fits", data, **hdr)
    exp = _expected(p)
    if kind == "i16-bzero":
        from astropy.io import fits

        assert fits.getheader(p)["BZERO"] == 32768 and fits.getheader(p)["BITPIX"] == 16
    with FitsStripSource(p, method=method) as src:
        assert src.shape == shape and src.thread_safe
        for y0, y1 in ROW_RANGES:
            got = src.read(y0, y1)
            np.testing.assert_array_equal(got, exp[y0:y1])
            out = np.empty((y1 - y0, shape[1]), np.float32)
            assert src.read_into(y0, y1, out) is None
            np.testing.assert_array_equal(out, exp[y0:y1])
        assert isinstance(src.transient_bytes(10), int)
    if kind == "blank":
        assert np.isnan(exp[3, 4])


def test_fits_source_extensions_and_unc(tmp_path):
    from astropy.io import fits

    rng = np.random.default_rng(17)
    sci = rng.normal(5, 1, (30, 20)).astype(np.float32)
    unc = rng.uniform(1, 2, (30, 20)).astype(np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(sci, name="SCI"),
                  fits.ImageHDU(unc, name="UNC")]).writeto(tmp_path / "m.fits")
    src = FitsStripSource(tmp_path / "m.fits", "SCI", unc_hdu="UNC")
    assert src.hdu == 1 and src.has_unc
    np.testing.assert_array_equal(src.read(4, 9), sci[4:9])
    np.testing.assert_array_equal(src.read_unc(4, 9), unc[4:9])
    default = FitsStripSource(tmp_path / "m.fits")  # first 2-D image HDU
    assert default.hdu == 1 and not default.has_unc
    with pytest.raises(ValueError, match="no HDU 'NOPE'"):
        FitsStripSource(tmp_path / "m.fits", "NOPE")


@pytest.mark.parametrize("kind", ["gzip", "bz2", "tile-int", "tile-float", "tile-in-gzip"])
def test_compressed_sources(tmp_path, kind):
    from astropy.io import fits

    rng = np.random.default_rng(18)
    shape = (45, 31)
    if kind in ("tile-int", "tile-in-gzip"):
        data = rng.integers(0, 60000, shape).astype(np.uint16)  # stored int16 + BZERO
        hdu = fits.CompImageHDU(data, compression_type="RICE_1", tile_shape=(4, 31))
    elif kind == "tile-float":
        data = rng.normal(0, 10, shape).astype(np.float32)
        hdu = fits.CompImageHDU(data, compression_type="GZIP_2", quantize_level=0.0)
    else:
        data = rng.integers(0, 60000, shape).astype(np.uint16)
        hdu = None
    if hdu is not None:
        p = tmp_path / "c.fits.fz"
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(p)
        if kind == "tile-in-gzip":
            with open(p, "rb") as f, gzip.open(tmp_path / "c.fits.fz.gz", "wb") as g:
                shutil.copyfileobj(f, g)
            p = tmp_path / "c.fits.fz.gz"
    else:
        plain = _write(tmp_path / "p.fits", data)
        p = tmp_path / ("p.fits.gz" if kind == "gzip" else "p.fits.bz2")
        import bz2

        opener = gzip.open if kind == "gzip" else bz2.open
        with open(plain, "rb") as f, opener(p, "wb") as g:
            shutil.copyfileobj(f, g)
    exp = data.astype(np.float32)
    src = open_strip_source(p, tmpdir=tmp_path)
    assert isinstance(src, CompressedFitsSource)
    assert src.shape == shape
    with pytest.raises(ValueError, match="compressed"):
        FitsStripSource(p)
    for y0, y1 in ROW_RANGES[:-1] + [(0, 45), (44, 45)]:
        np.testing.assert_array_equal(src.read(y0, y1), exp[y0:y1])
    temps = list(tmp_path.glob("reducer-strip-*"))
    assert temps  # decompressed copy on disk ...
    src.close()
    assert not list(tmp_path.glob("reducer-strip-*"))  # ... removed by close()


def test_combine_from_fits_files_matches_in_memory(tmp_path):
    from astropy.io import fits

    rng = np.random.default_rng(19)
    cube = np.round(gaussian_stack(rng, 7, shape=(37, 29), outlier_frac=0.03,
                                   dtype=np.float64)).astype(np.uint16)
    paths = []
    for i, fr in enumerate(cube):
        p = _write(tmp_path / f"r{i}.fits", fr)
        if i % 3 == 1:  # some gzip-compressed, some tile-compressed
            with open(p, "rb") as f, gzip.open(str(p) + ".gz", "wb") as g:
                shutil.copyfileobj(f, g)
            p = Path(str(p) + ".gz")
        elif i % 3 == 2:
            p = tmp_path / f"r{i}.fits.fz"
            fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(fr)]).writeto(p)
        paths.append(p)
    srcs = [open_strip_source(p, tmpdir=tmp_path) for p in paths]
    res = combine(srcs, 2.1, mem_limit=37 * 29 * 10 + 7 * 29 * 4 * 3 + C.workspace_bytes(7, 1024)
                  + 3 * 8 * 37 * 29 + 2**21 + 4 * 9 * 29, chunk_pixels=1024)
    assert res.plan.nstrips > 1
    exp = clipped_mean(cube, 2.1)
    for a, b in zip((res.data, res.unc, res.cnt), exp):
        np.testing.assert_array_equal(a, b)
    assert_matches_reference(exp, reference_clipped_mean(cube, 2.1))
    for s in srcs:
        s.close()


# --------------------------------------------------------------------------- thresholds
def _next32(x, direction):
    with np.errstate(over="ignore"):
        return np.nextafter(np.asarray(x, np.float32), np.float32(direction))


def test_thresholds_are_exact_float64_decisions():
    # lo/hi must satisfy: for every float32 x, lo <= x <= hi <=> fl64(|x - m|) <= bound.
    # Check at the thresholds and their float32 neighbours, for random and nasty cases.
    rng = np.random.default_rng(24)
    m = [rng.normal(1000, 5, 300), rng.normal(0, 1e-3, 100), rng.normal(0, 1e30, 50),
         np.round(rng.normal(1000, 5, 200)) / 2,
         np.array([0.0, -7e-46, 7e-46, 1e-45, 3.0e38, -3.0e38, 1000.5, 0.0])]
    b = [np.abs(rng.normal(10, 3, 300)), np.abs(rng.normal(0, 1e-3, 100)),
         np.abs(rng.normal(0, 1e29, 50)), np.round(np.abs(rng.normal(20, 5, 200))) / 4,
         np.array([0.0, 0.0, 1e-46, 0.0, 1e38, 1e38, 0.0, 1e-50])]
    m = np.concatenate(m)
    bound = np.concatenate(b)
    # m is a (mean of two) float32 value(s) in the engine
    m32 = m.astype(np.float32).astype(np.float64)
    nb = m.size
    kern = C._Kernel(3, 2.1, nb, None, None, False, "scatter")
    kern.v["m"][:nb] = m32
    kern.v["bound"][:nb] = bound
    with np.errstate(over="ignore"):
        kern._thresholds(nb)
    lo = kern.f["lo"][:nb].copy()
    hi = kern.f["hi"][:nb].copy()

    def keep(x):
        x = np.asarray(x, np.float32).astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            return np.abs(x - m32) <= bound

    for thr, inside, outside in ((lo, lo, _next32(lo, -np.inf)), (hi, hi, _next32(hi, np.inf))):
        nonempty = lo <= hi
        assert np.all(keep(inside)[nonempty])
        assert not np.any(keep(outside))
    # an empty interval means nothing at all is kept near m
    empty = lo > hi
    for x in (lo, hi, m32.astype(np.float32)):
        assert not np.any(keep(x)[empty])
