"""Memory-bounded master building: streaming equals the in-memory recipe, the peak memory
stays under the bound and does not grow with the number of frames, compressed inputs,
the bounded pre-pass (screening, sky-flat median, flat normalisation) and its approximations."""
from __future__ import annotations

import bz2
import gc
import gzip
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits

from reducer import masters as M
from reducer.fitsio_strips import ArraySource
from reducer.instruments import load_profile
from reducer.ops.combine import combine

from conftest import run_cli, run_doit


# --------------------------------------------------------------------------- the in-memory recipe
def in_memory_master(cs, night, bias=None, dark=None, flat=None):
    """The recipe of the module docstring done the obvious way: every frame loaded whole
    (``RawDetector.load``), masters read whole, ``ArraySource`` + ``combine``. This is what
    ``build_master`` did before it streamed; returns ({det: (data, unc, cnt)}, rejected,
    pair_diffs)."""
    c = M.calib_settings(night.settings)
    nsigma = float(c["clip"][cs.imtype])
    frames = sorted(cs.frames, key=lambda f: f.mjd)
    inputs = [M.detector_inputs(night.profile, night.raw_dir, f, night.settings) for f in frames]

    def read(path, det):
        if path is None:
            return None
        with fits.open(path) as h:
            return h[det].data.astype(np.float32)

    results, rejected, pair_diffs = {}, [], {}
    for d, det in enumerate(night.profile.detectors):
        mb, md, mf = read(bias, det.name), read(dark, det.name), read(flat, det.name)
        loaded = [(f,) + dets[d].load() for f, dets in zip(frames, inputs)]
        bad = M.screen_inputs(cs.imtype, loaded, det)
        rejected += [(f, f"{det.name}: {r}") for f, r in bad.items()]
        sources, scales = [], []
        for f, img, mask in loaded:
            if f.file in bad:
                continue
            signal = img - mb if mb is not None else img
            unc = M.noise_model(signal, det.gain or 1.0, det.rdnoise or 0.0)
            if mb is not None:
                img = img - mb
            if md is not None and cs.imtype in ("flat", "arc"):
                img = img - md * np.float32(f.exptime)
            if cs.imtype == "arc" and mf is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    img = img / mf
                    unc = unc / np.abs(mf)
            if cs.imtype in ("dark", "arc") or (cs.imtype == "flat" and cs.key.get("subtype") != "sky"):
                scales.append(1.0 / f.exptime)
            elif cs.imtype == "flat":
                scales.append(1.0 / M.clipped_median(img[M.illuminated(img.shape)]))
            else:
                scales.append(1.0)
            sources.append(ArraySource(img, mask, unc=unc, name=f.file))
        if cs.imtype == "bias" and len(sources) >= 2:
            pair_diffs[det.name] = sources[0].data - sources[1].data
        small = len(sources) < M.SMALL_N
        results[det.name] = combine(sources, M.NO_CLIP if small else nsigma, scales=scales,
                                    unc_from="input" if small else "scatter", mem_limit=2**31)
    if cs.imtype == "flat":
        if c["flat_normalise"] == "smooth":
            for res in results.values():
                res.data, res.unc = M.smooth_normalise(res.data, res.unc, None)
        else:
            gains = {d.name: d.gain or 1.0 for d in night.profile.detectors}
            vals = np.concatenate([(r.data[M.illuminated(r.data.shape)] * gains[n]).ravel()
                                   for n, r in results.items()])
            norm = M.clipped_median(vals)
            for n, r in results.items():
                r.data = r.data * np.float32(gains[n] / norm)
                r.unc = r.unc * np.float32(gains[n] / norm)
    return {n: (r.data, r.unc, r.cnt) for n, r in results.items()}, rejected, pair_diffs


def same_to_rounding(got, ref, what):
    """float32 results equal to rounding (in practice they are bit-identical)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, what
    assert np.array_equal(np.isnan(got), np.isnan(ref)), what
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=3e-7, atol=0, err_msg=what)


# --------------------------------------------------------------------------- a synthetic night
@pytest.fixture(scope="module")
def snight(tmp_path_factory):
    """A simulated demo night with biases, darks, dome and sky flats and arcs (a night
    directory with its night log, no masters built)."""
    from reducer.inventory import read_nightlog
    from reducer.night import Night
    from reducer.testing import make_night
    root = tmp_path_factory.mktemp("mem_night")
    sim = make_night(root / "raw" / "20261120", seed=7, targets=[], standard=False,
                     filters=("r",), flat_kind="both", include_arcs=True, cosmic_rays=True)
    run_cli("night", "20261120", "--raw", str(sim.raw_dir), "--instrument", "demo", cwd=root)
    nd = root / "redux" / "20261120"
    run_doit(nd, "inventory")
    night = Night(nd)
    sets = M.calibration_sets(read_nightlog(night.nightlog), night.settings)
    return SimpleNamespace(root=root, night=night, sets=sets, sim=sim)


def _set(sets, imtype, **key):
    return next(s for s in sets if s.imtype == imtype and all(s.key.get(k) == v for k, v in key.items()))


def test_streaming_equals_in_memory_recipe(snight, tmp_path):
    """Every master type, built by streaming, equals the in-memory recipe to float32
    rounding (data, UNC, CNT), with the same rejected inputs and the same bias pair difference."""
    night, sets = snight.night, snight.sets
    out = {}
    order = [("bias", {}, {}), ("dark", {}, {"bias": "bias"}),
             ("flat", {"subtype": "dome"}, {"bias": "bias", "dark": "dark"}),
             ("flat", {"subtype": "sky"}, {"bias": "bias", "dark": "dark"}),
             ("arc", {}, {"bias": "bias", "dark": "dark", "flat": "flat"})]
    for imtype, key, uses in order:
        cs = _set(sets, imtype, **key)
        masters = {role: out[name] for role, name in uses.items()}
        path = tmp_path / cs.filename
        built = M.build_master(cs, night=night, out_path=path, **masters)
        ref, rejected, diffs = in_memory_master(cs, night, **masters)
        assert built.rejected == rejected
        with fits.open(path) as h:
            for det, (data, unc, cnt) in ref.items():
                same_to_rounding(h[det].data, data, f"{cs.name} {det}")
                same_to_rounding(h[f"{det}_UNC"].data, unc, f"{cs.name} {det}_UNC")
                assert np.array_equal(h[f"{det}_CNT"].data, cnt)
        assert set(built.pair_diffs) == set(diffs)
        for det, dd in diffs.items():
            assert np.array_equal(built.pair_diffs[det], dd)
        if imtype != "flat" or key.get("subtype") == "dome":
            out[imtype] = path


def test_calibrated_source_rows_and_transient_bytes(snight, tmp_path):
    """Rows of a CalibratedSource (an arc: bias, dark and flat applied) equal the whole-frame
    computation, and its declared transient_bytes covers what a read really allocates."""
    night, sets = snight.night, snight.sets
    paths = {}
    for imtype, key, uses in [("bias", {}, {}), ("dark", {}, {"bias": "bias"}),
                              ("flat", {"subtype": "dome"}, {"bias": "bias", "dark": "dark"})]:
        cs = _set(sets, imtype, **key)
        paths[imtype] = tmp_path / cs.filename
        M.build_master(cs, night=night, out_path=paths[imtype],
                       **{r: paths[n] for r, n in uses.items()})
    cs = _set(sets, "arc")
    f = cs.frames[0]
    det = night.profile.detectors[1]
    rd = M.detector_inputs(night.profile, night.raw_dir, f, night.settings)[1]
    img, mask = rd.load()
    with fits.open(paths["bias"]) as hb, fits.open(paths["dark"]) as hd, fits.open(paths["flat"]) as hf:
        mb, md, mf = (h[det.name].data.astype(np.float32) for h in (hb, hd, hf))
    unc = M.noise_model(img - mb, det.gain, det.rdnoise)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = (img - mb - md * np.float32(f.exptime)) / mf
        unc = unc / np.abs(mf)
    rows = [M._MasterRows(paths[k], det.name) for k in ("bias", "dark", "flat")]
    src = M.CalibratedSource(rd, name=f.file, exptime=f.exptime, gain=det.gain,
                             rdnoise=det.rdnoise, bias=rows[0], dark=rows[1], flat=rows[2])
    try:
        src.prepare()
        for y0, y1 in [(0, 7), (100, 357), (1000, 1024)]:
            out = np.empty((y1 - y0, src.shape[1]), np.float32)
            gc.collect()
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                got_mask = src.read_into(y0, y1, out)
                got_unc = src.read_unc(y0, y1)
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            assert peak <= src.transient_bytes(y1 - y0), (peak, src.transient_bytes(y1 - y0))
            assert np.array_equal(out, ref[y0:y1], equal_nan=True)
            assert np.array_equal(got_unc, unc[y0:y1], equal_nan=True)
            assert np.array_equal(got_mask, mask[y0:y1])
    finally:
        src.close()
        for r in rows:
            r.close()


# --------------------------------------------------------------------------- big frames
def write_frames(folder: Path, n: int, shape=(2048, 1056), overscan: int = 32, seed: int = 0,
                 kind: str = "fits", leak: int | None = None) -> list[str]:
    """``n`` seeded bias frames, one int16 (BZERO 32768) image HDU 'CCD' each: level 1000 ADU
    drifting along the rows, a fixed column pattern, read noise 5 ADU, overscan columns at the
    right; ``kind`` 'fits', 'gz', 'bz2' or 'fz' (RICE tile compression, lossless on integers).
    Frame ``leak`` gets a light leak (a gradient of 60 ADU on the data)."""
    folder.mkdir(parents=True, exist_ok=True)
    ny, nx = shape
    rng = np.random.default_rng(seed)
    pattern = rng.normal(0, 3, nx - overscan)
    drift = 2.0 * np.sin(np.linspace(0, 3, ny))[:, None]
    names = []
    for i in range(n):
        img = 1000.0 + drift + rng.normal(0, 5.0, shape)
        img[:, : nx - overscan] += pattern
        if leak == i:
            img[:, : nx - overscan] += 60.0 * np.linspace(0, 1, ny)[:, None]
        data = np.round(img).astype(np.uint16)
        hdr = fits.Header()
        hdr["IMAGETYP"], hdr["EXPTIME"] = "bias", 0.0
        hdr["DATE-OBS"] = f"2026-11-20T20:{i // 60:02d}:{i % 60:02d}"
        name = f"b{i:03d}.fits" + {"gz": ".gz", "bz2": ".bz2"}.get(kind, "")
        if kind == "fz":
            hdul = fits.HDUList([fits.PrimaryHDU(header=hdr),
                                 fits.CompImageHDU(data, name="CCD", compression_type="RICE_1")])
        else:
            hdul = fits.HDUList([fits.PrimaryHDU(header=hdr), fits.ImageHDU(data, name="CCD")])
        if kind in ("gz", "bz2"):
            opener = gzip.open if kind == "gz" else bz2.open
            with opener(folder / name, "wb", compresslevel=1) as fh:
                hdul.writeto(fh)
        else:
            hdul.writeto(folder / name, overwrite=True)
        names.append(name)
    return names


def one_ccd_night(tmp_path: Path, folder: Path, names, shape=(2048, 1056), overscan=32,
                  mem_mb: int = 64, imtype: str = "bias"):
    """A minimal ``night`` (profile with one detector 'CCD' with overscan) and the set."""
    ny, nx = shape
    text = load_profile("demo").path.read_text()
    head = text[: text.index("[[detectors]]")]
    tail = text[text.index("[overscan]"):]
    det = (f'[[detectors]]\nname = "CCD"\nhdu = "CCD"\nbiassec = "[{nx - overscan + 3}:{nx},1:{ny}]"\n'
           f'trimsec = "[1:{nx - overscan},1:{ny}]"\ngain = 1.5\nrdnoise = 7.5\nsaturate = 60000.0\n\n')
    tail = tail.replace("offsets = { CCD1 = [0.0, 0.0], CCD2 = [520.0, 0.0] }", "")
    pdir = tmp_path / "profiles"
    pdir.mkdir(exist_ok=True)
    (pdir / "onebig.toml").write_text(head.replace('name = "demo"', 'name = "onebig"') + det + tail)
    profile = load_profile("onebig", [str(pdir)])
    settings = {"calib": {}, "overscan": {"axis": "columns", "method": "median",
                                          "fit": "smooth", "smooth_rows": 15},
                "combine": {"mem_limit_mb": mem_mb}}
    night = SimpleNamespace(settings=settings, profile=profile, raw_dir=folder, utdate="20261120",
                            digest=lambda *a: "test")
    frames = [SimpleNamespace(file=nm, mjd=61000.0 + i / 1440, exptime=0.0, type=imtype,
                              usable=True) for i, nm in enumerate(names)]
    cs = M.CalSet(imtype, {"binning": "1x1", "shape": f"{nx}x{ny}", "readout": ""}, frames)
    return night, cs


def traced_peak(fn):
    """(result, peak bytes) of ``fn()`` under tracemalloc (numpy's buffers included)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return out, peak


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    names = write_frames(root / "raw", 12, seed=1)
    return root, names


@pytest.mark.slow
def test_peak_memory_is_bounded_and_does_not_grow_with_n(big, tmp_path):
    """12 frames of 2048x1024 (trimmed; 96 MiB as float32): the master is built with a 64 MiB
    bound and everything it allocates (tracemalloc) stays below it, with 6 or 12 frames."""
    root, names = big
    mem = 64 * 2**20
    peaks = {}
    for n in (6, 12):
        night, cs = one_ccd_night(tmp_path, root / "raw", names[:n], mem_mb=64)
        out = tmp_path / f"m{n}.fits"
        M.build_master(cs, night=night, out_path=out)        # warm-up: imports, caches
        built, peaks[n] = traced_peak(lambda: M.build_master(cs, night=night, out_path=out))
        assert built.nframes == n and not built.rejected
        assert peaks[n] < mem, f"{n} frames: peak {peaks[n] / 2**20:.1f} MiB"
        with fits.open(out) as h:
            assert h["CCD"].data.shape == (2048, 1024)
            assert np.isfinite(h["CCD"].data).all()
        # the whole stack as float32 would not fit: the bound is real
        assert n * 2048 * 1024 * 4 > mem or n == 6
    # measured 47.5 and 50.0 MiB: the strip height follows the bound, not N
    assert peaks[12] < 1.15 * peaks[6], {k: v / 2**20 for k, v in peaks.items()}


@pytest.mark.slow
def test_big_frames_equal_in_memory_and_light_leak_screened_on_block_medians(tmp_path, monkeypatch):
    """At a 64 MiB bound the 2048x1024 biases are screened on block-median images (b > 1)
    and the light-leak frame is still rejected; the master equals the in-memory recipe
    (which screens at full resolution and rejects the same frame)."""
    names = write_frames(tmp_path / "raw", 7, seed=2, leak=3)
    night, cs = one_ccd_night(tmp_path, tmp_path / "raw", names, mem_mb=64)
    used = []
    real = M._block_median_into

    def spy(buf, y0, b, small):
        used.append(b)
        return real(buf, y0, b, small)

    monkeypatch.setattr(M, "_block_median_into", spy)
    built = M.build_master(cs, night=night, out_path=tmp_path / "m.fits")
    assert min(used) > 1
    assert [f for f, _ in built.rejected] == [names[3]] and "light leak" in built.rejected[0][1]
    ref, rejected, diffs = in_memory_master(cs, night)
    assert [f for f, _ in rejected] == [names[3]]
    with fits.open(tmp_path / "m.fits") as h:
        same_to_rounding(h["CCD"].data, ref["CCD"][0], "data")
        same_to_rounding(h["CCD_UNC"].data, ref["CCD"][1], "unc")
        assert np.array_equal(h["CCD_CNT"].data, ref["CCD"][2])
    # NOISE verification gets a bounded sample: every k-th row of frame 1 - frame 2
    d = built.pair_diffs["CCD"]
    assert d.size <= M.PAIR_DIFF_MAX_VALUES and d.shape[0] <= M.PAIR_DIFF_MAX_ROWS
    assert np.array_equal(d, diffs["CCD"][:: -(-2048 // d.shape[0])])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gz", "bz2", "fz"])
def test_compressed_inputs(tmp_path, kind, monkeypatch):
    """gzip- and bzip2-compressed (decompressed once per frame to a private temporary folder,
    removed afterwards) and tile-compressed frames give the same master as uncompressed
    ones, within the same bound."""
    import tempfile
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    plain = write_frames(tmp_path / "plain", 6, seed=3)
    packed = write_frames(tmp_path / kind, 6, seed=3, kind=kind)
    night, cs = one_ccd_night(tmp_path, tmp_path / "plain", plain)
    M.build_master(cs, night=night, out_path=tmp_path / "plain.fits")
    night, cs = one_ccd_night(tmp_path, tmp_path / kind, packed)
    built, peak = traced_peak(lambda: M.build_master(cs, night=night, out_path=tmp_path / "c.fits"))
    assert peak < 64 * 2**20
    assert list(tmp.iterdir()) == []                      # temporary copies removed
    with fits.open(tmp_path / "plain.fits") as a, fits.open(tmp_path / "c.fits") as b:
        for ext in ("CCD", "CCD_UNC", "CCD_CNT"):
            assert np.array_equal(a[ext].data, b[ext].data, equal_nan=True), ext


# --------------------------------------------------------------------------- approximations
def test_flat_median_of_a_row_subsample_is_within_0p1_percent():
    """The sky-flat scale and the scalar normalisation take the clipped median of every k-th
    row when the whole area does not fit: with >= 1e5 values it is within 0.1 % of the full
    one on a vignetted, dusty, noisy flat (measured: a few 1e-5)."""
    rng = np.random.default_rng(5)
    ny, nx = 2048, 2048
    y, x = np.mgrid[0:ny, 0:nx]
    r2 = ((x - nx / 2) ** 2 + (y - ny / 2) ** 2) / (nx / 2) ** 2
    flat = 20000.0 * (1 - 0.25 * r2) * (1 + 0.02 * np.sin(x / 50.0))
    for cx, cy in rng.uniform(100, 1900, (40, 2)):          # dust donuts
        flat[(x - cx) ** 2 + (y - cy) ** 2 < 30 ** 2] *= 0.93
    flat = rng.poisson(flat).astype(np.float32)
    ys, xs = M.illuminated(flat.shape)
    full = M.clipped_median(flat[ys, xs])
    area = (ys.stop - ys.start) * (xs.stop - xs.start)
    k = area // M.SAMPLE_MIN_VALUES
    sub = flat[ys][::k, xs]
    assert sub.size >= 1e5
    assert abs(M.clipped_median(sub) / full - 1) < 1e-3


def test_sky_flat_with_a_small_bound_stays_close(snight, tmp_path, monkeypatch):
    """A sky flat built with a bound too small for exact pre-pass statistics (block-median
    screening, subsampled medians and normalisation, the first detector's outputs moved
    to disk) stays within 0.1 % of the exact one."""
    night, sets = snight.night, snight.sets
    bias = tmp_path / "bias.fits"
    M.build_master(_set(sets, "bias"), night=night, out_path=bias)
    cs = _set(sets, "flat", subtype="sky")
    M.build_master(cs, night=night, out_path=tmp_path / "a.fits", bias=bias)
    calls = {"spill": 0, "b": set()}
    spill, block = M._Scratch.spill, M._block_median_into

    def spy_spill(self, arr):
        calls["spill"] += 1
        return spill(self, arr)

    def spy_block(buf, y0, b, small):
        calls["b"].add(b)
        return block(buf, y0, b, small)

    monkeypatch.setattr(M._Scratch, "spill", spy_spill)
    monkeypatch.setattr(M, "_block_median_into", spy_block)
    small = 14 * 2**20
    built, peak = traced_peak(lambda: M.build_master(cs, night=night, out_path=tmp_path / "b.fits",
                                                     bias=bias, mem_limit=small))
    assert peak < small
    assert calls["spill"] == 3 and min(calls["b"]) > 1
    with fits.open(tmp_path / "a.fits") as a, fits.open(tmp_path / "b.fits") as b:
        for det in ("CCD1", "CCD2"):
            ra, rb = a[det].data, b[det].data
            ok = np.isfinite(ra) & (ra > 0.3)
            assert np.median(np.abs(rb[ok] / ra[ok] - 1)) < 1e-3
            assert np.mean(np.abs(rb[ok] / ra[ok] - 1) < 1e-3) > 0.99


def test_screening_decisions_on_block_medians():
    """Light leaks and level jumps are flagged alike on the frames and on their 4x4 and 8x8
    block-median images: the thresholds (3 RN on the level, 2 RN floor on the gradient)
    keep their meaning."""
    rng = np.random.default_rng(3)
    ny, nx = 1024, 512
    pattern = rng.normal(0, 3, nx)
    det = SimpleNamespace(rdnoise=7.5, gain=1.5, saturate=60000.0)
    for bad, flagged in [(("grad", 7.0), False), (("grad", 14.0), True),
                         (("level", 12.0), False), (("level", 18.0), True)]:
        frames = []
        for i in range(5):
            img = (rng.normal(0, 5.0, (ny, nx)) + pattern).round().astype(np.float32)
            if i == 2:
                ramp = np.linspace(0, 1, ny, dtype=np.float32)[:, None]
                img += np.float32(bad[1]) * (ramp if bad[0] == "grad" else np.float32(1))
            frames.append(img)
        for b in (1, 4, 8):
            smalls = []
            for i, img in enumerate(frames):
                s = np.empty((ny // b, nx // b), np.float32)
                M._block_median_into(img, 0, b, s)
                smalls.append((SimpleNamespace(file=str(i)), s, None))
            got = M.screen_inputs("bias", smalls, det)
            assert ("2" in got) == flagged and set(got) <= {"2"}, (bad, b, got)


def test_smooth_normalisation_by_strips_is_identical():
    """The strip-wise smooth normalisation (what build_master runs) is bit-identical to
    smooth_normalise on the whole image, with NaNs, low pixels and a region map."""
    rng = np.random.default_rng(9)
    ny, nx = 301, 97
    flat = (1000 * (1 + 0.1 * rng.standard_normal((ny, nx)))).astype(np.float32)
    flat[rng.integers(0, ny, 50), rng.integers(0, nx, 50)] = np.nan
    flat[:, :5] = 10.0
    unc = np.sqrt(np.abs(np.nan_to_num(flat))).astype(np.float32)
    regions = np.zeros((ny, nx), np.int16)
    regions[:, 10:40], regions[:, 45:] = 1, 2
    for reg in (None, regions):
        ref = M.smooth_normalise(flat, unc, reg)
        for budget in (1, 40 * M._SMOOTH_BYTES * nx, 2**30):
            d, u = flat.copy(), unc.copy()
            src = None if reg is None else ArraySource(reg)
            M._smooth_normalise_inplace(d, u, src, M.FLAT_SMOOTH_SIGMA, M.FLAT_LOW_DN, budget)
            assert np.array_equal(d, ref[0], equal_nan=True)
            assert np.array_equal(u, ref[1], equal_nan=True)


def test_too_small_a_bound_is_a_clear_master_error(big, tmp_path):
    root, names = big
    night, cs = one_ccd_night(tmp_path, root / "raw", names[:6], mem_mb=8)
    with pytest.raises(M.MasterError, match="mem_limit.*too small.*mem_limit_mb"):
        M.build_master(cs, night=night, out_path=tmp_path / "x.fits")
