"""Benchmark of the science chain (p f s z a t) against astroscrappy alone.

Usage::

    python bench/chain.py [--ny 4096 --nx 2048] [--repeat 1] [--threads 1,2]
                          [--seed 1] [--no-warmup]

Builds ONE seeded synthetic frame in memory (no file is read or written):

- raw, overscan-subtracted ADU (``RawDetector.load``'s output): a bias pattern, dark
  current with hot pixels, a flat response (vignetting, pixel-to-pixel, a low-response
  column), a sky with a gradient, a few thousand Moffat stars placed through a known TAN
  WCS of 0.6"/px, cosmic rays (the simulator's model, :func:`reducer.testing._cosmic_rays`),
  Poisson and read noise, 16-bit digitisation (saturation at 65535 ADU, overscan 1000 ADU);
- the masters (bias, dark rate, flat with their uncertainties, a defects map);
- a reference catalogue (ra, dec, mag_r) of the same stars over the whole cone the a and t
  steps ask for (1.2 x the frame's long side), with 0.02 mag of noise;
- a header whose pointing is ~5" off the true centre.

Then, with the thread count fixed before any import (``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS``, as ``reducer.tasks`` sets them for the
night: 1 by default), each thread count in a fresh subprocess, it times in one run:

=====  ===================================================================================
p      :func:`reducer.ops.calibrate.prepare` with bias, dark and defects, as ``run_prepare``
f      :func:`reducer.ops.calibrate.flatten` (low = 0.5), as ``run_flatten``
s      ``reducer.steps._sky``: ``estimate_sky`` + ``subtract_sky`` with the night's options
z      ``reducer.steps._cosmics``: ``clean_cosmics`` (sky as inbkg, gain 1, e-)
a      ``reducer.steps._astrometry``: cone of the catalogue, ``initial_wcs``,
       ``detect_stars`` + ``match_and_fit``
t      ``reducer.steps._zeropoint``: ``fwhm_estimate``, aperture photometry, aperture
       correction, ``zero_point``
=====  ===================================================================================

The s, z, a and t steps are the step functions themselves (on in-memory
:class:`reducer.products.Product` objects, default settings, a stub night whose
``reference_catalog`` is the in-memory cone of the catalogue: only the catalogue *file*
read is left out), so their parameters are exactly the night's.  Astroscrappy alone is
``astroscrappy.detect_cosmics`` called with the very arguments the z step passed it (the
padded, sky-restored float32 frame, its sky, its mask and keywords, captured during a
chain's call), on the same frame, and checked to give the same mask and cleaned image.

Imports (timed once, cold) are excluded; unless ``--no-warmup`` the frame goes through the
whole chain once untimed first, so that first-call costs (astropy frame graph, OpenMP pool,
lazy submodules, the allocator's pages) are not charged to one step, as in a long-lived
doit worker; astroscrappy alone is then timed just before and just after each timed chain
(the mean is reported: neither call order is favoured).  With ``--repeat N`` the step table
is from the fastest whole run and astroscrappy alone is its best mean.

Output: one table per thread count (step, wall seconds, fraction of the chain, CPU
seconds of the process, all threads, and where the wall time goes inside each step), the
total chain, astroscrappy alone, a few sanity figures against the truth, and as the last
line, for the first thread count, ``chain / astroscrappy: N.NNx (target <= 1.5x)`` (wall
time).  On a shared machine a wall time well above its CPU time means the process waited
for a CPU: compare the CPU ratio too, and the load averages printed with each table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
STEPS = (("p", "prepare (bias, dark, defects)"),
         ("f", "flatten"),
         ("s", "estimate_sky + subtract_sky"),
         ("z", "clean_cosmics"),
         ("a", "detect_stars + match_and_fit"),
         ("t", "photometry + apcorr + zero point"))
DET = "CCD1"


# --------------------------------------------------------------------------- the frame
def make_frame(nx: int, ny: int, seed: int, n_stars: int = 3000, n_cosmics: int = 2500) -> dict:
    """A seeded synthetic frame, its masters, its catalogue and its truth (all in memory).

    ``n_stars`` stars fall on the frame for a 2048 x 4096 frame (the density is kept for
    other sizes); ``n_cosmics`` events likewise (scaled by the area).
    """
    import numpy as np
    from reducer.ops.astrometry import initial_wcs
    from reducer.testing import _cosmic_rays, _render_stars

    rng = np.random.default_rng(seed)
    area_ratio = nx * ny / (2048.0 * 4096.0)
    gain, rn, exptime = 1.6, 5.0, 60.0          # e-/ADU, e-, s
    overscan, sat_adu = 1000.0, 65535.0          # ADU
    scale, fwhm, beta = 0.6, 3.0, 3.0            # "/px, px, Moffat beta
    ra0, dec0, rot = 150.1, 2.2, 0.15            # true centre [deg], rotation [deg]
    zp_true = 25.0                               # m = zp - 2.5 log10(e-/s), total flux
    sky_e = 1500.0                               # e-/px in the exposure (before the flat)

    # true WCS; header pointing 4" east, 3" south of the true centre
    wcs_true = initial_wcs(ra0, dec0, shape=(ny, nx), pixel_scale_arcsec=scale,
                           rotation_deg=rot, flip_x=True)
    ra_h = ra0 + 4.0 / 3600.0 / math.cos(math.radians(dec0))
    dec_h = dec0 - 3.0 / 3600.0

    # catalogue over the cone the a / t steps ask for (radius 1.2 x the long side), with
    # the stars' surface density: n_stars on a 2048 x 4096 frame
    radius_deg = 1.2 * max(nx, ny) * scale / 3600.0 * 1.02
    rpx = radius_deg * 3600.0 / scale
    density = n_stars / (2048.0 * 4096.0)
    n_cat = int(rng.poisson(density * math.pi * rpx ** 2))
    r = rpx * np.sqrt(rng.random(n_cat))
    phi = rng.uniform(0, 2 * math.pi, n_cat)
    cx, cy = (nx - 1) / 2.0 + r * np.cos(phi), (ny - 1) / 2.0 + r * np.sin(phi)
    ra, dec = wcs_true.all_pix2world(cx, cy, 0)
    u = rng.random(n_cat)                        # dN/dm ~ 10^(0.3 m), 12.5 < m < 21
    a1, a2 = 10 ** (0.3 * 12.5), 10 ** (0.3 * 21.0)
    mag = np.log10(a1 + u * (a2 - a1)) / 0.3
    from astropy.table import Table
    cat = Table({"ra": ra, "dec": dec, "mag_r": mag + rng.normal(0.0, 0.02, n_cat)})

    # the scene [e-]: stars (those within 40 px of the frame) + sky, times the flat response
    on = (cx > -40) & (cx < nx + 39) & (cy > -40) & (cy < ny + 39)
    flux = exptime * 10 ** (-0.4 * (mag[on] - zp_true))
    stars = _render_stars(ny, nx, cx[on], cy[on], flux, fwhm, beta)
    yy = np.arange(ny, dtype=np.float64)[:, None] / ny
    xx = np.arange(nx, dtype=np.float64)[None, :] / nx
    sky = sky_e * (1.0 + 0.04 * (xx - 0.5) + 0.02 * (yy - 0.5))
    rr2 = (xx - 0.5) ** 2 + (yy - 0.5) ** 2
    resp = (1.0 - 0.10 * rr2) * (1.0 + rng.normal(0.0, 0.01, (ny, nx)))
    resp[:, nx // 3] *= 0.3                      # a weak column: LOWFLAT
    resp /= np.median(resp)
    # dark current [ADU/s] with hot pixels
    dark = np.full((ny, nx), 0.002)
    nhot = int(300 * area_ratio) + 1
    hy, hx = rng.integers(0, ny, nhot), rng.integers(0, nx, nhot)
    dark[hy, hx] += np.exp(rng.uniform(math.log(0.5), math.log(50.0), nhot))
    # bias pattern [ADU, overscan-subtracted]: column structure
    col = 2.0 * np.sin(np.arange(nx) / 37.0) + rng.normal(0.0, 0.3, nx)
    bias = np.broadcast_to(col[None, :], (ny, nx))

    cr = _cosmic_rays(rng, ny, nx, int(round(n_cosmics * area_ratio)))
    expect = resp * (sky + stars) + gain * dark * exptime
    e = rng.poisson(expect).astype(np.float64) + cr + rng.normal(0.0, rn, (ny, nx))
    raw = np.clip(np.round(overscan + bias + e / gain), 0, sat_adu)
    saturated = raw >= sat_adu
    raw_os = (raw - overscan).astype(np.float32)   # RawDetector.load(): float32, trimmed

    nb, nd = 30, 10                                # frames in the master bias / dark
    bias_unc = np.full((ny, nx), rn / gain / math.sqrt(nb), np.float32)
    m_bias = (bias + rng.normal(0.0, 1.0, (ny, nx)) * bias_unc).astype(np.float32)
    dark_unc = np.full((ny, nx), rn / gain / math.sqrt(nd) / 300.0, np.float32)
    m_dark = (dark + rng.normal(0.0, 1.0, (ny, nx)) * dark_unc).astype(np.float32)
    flat_unc = (0.002 * resp).astype(np.float32)
    m_flat = (resp * (1.0 + rng.normal(0.0, 0.002, (ny, nx)))).astype(np.float32)
    defects = np.zeros((ny, nx), np.uint8)
    defects[hy[dark[hy, hx] > 5.0], hx[dark[hy, hx] > 5.0]] = 1

    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return dict(
        raw_os=raw_os, saturated=saturated, bias=m_bias, bias_unc=bias_unc, dark=m_dark,
        dark_unc=dark_unc, flat=m_flat, flat_unc=flat_unc, defects=defects, catalog=cat,
        gain=gain, rdnoise=rn, exptime=exptime, saturate_adu=sat_adu, overscan_adu=overscan,
        scale=scale,
        ra_h=ra_h, dec_h=dec_h,
        truth=dict(ra=ra0, dec=dec0, zp=zp_true, fwhm_arcsec=fwhm * scale, beta=beta,
                   alpha_px=alpha, n_stars_frame=int(np.count_nonzero(
                       (cx >= 0) & (cx < nx) & (cy >= 0) & (cy < ny))),
                   n_catalog=int(n_cat), n_cosmics=int(round(n_cosmics * area_ratio)),
                   n_saturated_px=int(saturated.sum()), sky_e=sky_e,
                   pointing_error_arcsec=5.0),
    )


# --------------------------------------------------------------------------- stub night
class _Profile:
    """The parts of an instrument profile the s z a t steps read (demo-like, one CCD)."""

    def __init__(self, scale):
        self.raw = {"wcs": {"pixel_scale": scale, "rotation": 0.0, "flip_x": True},
                    "photometry": {"bands": {"r": "r"}}}

    def table(self, name):
        return self.raw.get(name, {})


class _Night:
    """Default settings: empty stage tables, catalogue magnitudes in ``mag_r``."""

    def __init__(self, scale):
        self.settings = {"catalog": {"path": "", "ra_column": "ra", "dec_column": "dec",
                                     "mag_columns": {}, "gaia": False, "cache_dir": ""},
                         "sky": {}, "cosmics": {}, "astrometry": {}, "photometry": {}}
        self.profile = _Profile(scale)


# --------------------------------------------------------------------------- probes
class Probe:
    """Inclusive wall time of wrapped functions, keyed by ``parent>name`` (the innermost
    wrapped caller), and a capture of astroscrappy's arguments and result."""

    def __init__(self):
        self.t = defaultdict(float)
        self.n = defaultdict(int)
        self.stack = []
        self.undo = []
        self.captured = None
        self.step = "?"

    def wrap(self, module, name, label=None, capture=False):
        orig = getattr(module, name)
        label = label or name
        probe = self

        def wrapper(*args, **kw):
            key = probe.step + ":" + (probe.stack[-1] + ">" if probe.stack else "") + label
            probe.stack.append(label)
            t0 = time.perf_counter()
            try:
                out = orig(*args, **kw)
            finally:
                probe.t[key] += time.perf_counter() - t0
                probe.n[key] += 1
                probe.stack.pop()
            if capture:
                probe.captured = (orig, args, kw, out)
            return out

        wrapper.__wrapped__ = orig
        setattr(module, name, wrapper)
        self.undo.append((module, name, orig))

    def reset(self):
        self.t.clear()
        self.n.clear()

    def restore(self):
        for module, name, orig in reversed(self.undo):
            setattr(module, name, orig)
        self.undo.clear()


def _install(probe: Probe, catalog):
    import astroscrappy
    import photutils.segmentation
    import scipy.ndimage
    from reducer import catalogs, steps
    from reducer.ops import astrometry, cosmics, photometry, sky

    # the a and t steps' catalogue: the cone of the in-memory table (no file read)
    def reference_catalog(night, ra, dec, radius_deg, **kw):
        return catalogs.cone(catalog, ra, dec, radius_deg)

    probe.undo.append((steps, "reference_catalog", steps.reference_catalog))
    steps.reference_catalog = reference_catalog
    probe.wrap(steps, "reference_catalog", "catalogue cone")
    for m, names in ((sky, ("estimate_sky", "subtract_sky", "_mesh_stats", "_mesh_to_image")),
                     (cosmics, ("clean_cosmics", "_fill_from_neighbours")),
                     (astrometry, ("initial_wcs", "detect_stars", "match_and_fit", "_background",
                                   "_dao_candidates", "_measure", "_find_transform",
                                   "_vote_transform", "_fit")),
                     (photometry, ("fwhm_estimate", "aperture_photometry",
                                   "aperture_correction", "instrumental_mag", "zero_point"))):
        for n in names:
            probe.wrap(m, n)
    probe.wrap(photutils.segmentation, "detect_sources")
    for n in ("binary_dilation", "distance_transform_edt", "label"):
        probe.wrap(scipy.ndimage, n)
    probe.wrap(astroscrappy, "detect_cosmics", "astroscrappy.detect_cosmics", capture=True)


# --------------------------------------------------------------------------- the chain
def run_chain(fr: dict, night, probe: Probe) -> tuple[dict, dict, object]:
    """Time p f s z a t on the frame; returns wall and CPU (all threads) seconds per step
    and the final product."""
    import numpy as np
    from astropy.io import fits
    from reducer import steps
    from reducer.ops.calibrate import flatten, prepare
    from reducer.products import Detector, Product

    times, cpu = {}, {}
    h = fits.Header()
    h["OBJECT"], h["TARGET"], h["FILTER"] = "bench field", "bench_field", "r"
    h["EXPTIME"] = fr["exptime"]
    h["RA"], h["DEC"] = fr["ra_h"], fr["dec_h"]

    probe.step = "p"
    t0, c0 = time.perf_counter(), time.process_time()         # p, as run_prepare
    data, unc, mask = prepare(fr["raw_os"], gain=fr["gain"], rdnoise_e=fr["rdnoise"],
                              exptime=fr["exptime"], saturated=fr["saturated"],
                              bias=fr["bias"], bias_unc=fr["bias_unc"], dark_rate=fr["dark"],
                              dark_unc=fr["dark_unc"], defects=fr["defects"])
    dh = fits.Header()
    dh["GAIN"] = (1.0, "e-/e-: data are in electrons")
    dh["GAINORIG"] = (fr["gain"], "[e-/ADU] gain applied")
    dh["RDNOISE"] = (fr["rdnoise"], "[e-] read noise")
    level = fr["overscan_adu"] + float(np.nanmedian(fr["bias"]))   # as run_prepare
    dh["SATURATE"] = ((fr["saturate_adu"] - level) * fr["gain"], "[e-] saturation after overscan and bias")
    prod = Product(h, {DET: Detector(data, unc, mask, dh)})
    times["p"], cpu["p"] = time.perf_counter() - t0, time.process_time() - c0

    probe.step = "f"
    t0, c0 = time.perf_counter(), time.process_time()         # f, as run_flatten
    out = Product(prod.header.copy())
    for name, d in prod.detectors.items():
        data, unc, mask = flatten(d.data, d.unc, d.mask, fr["flat"], fr["flat_unc"], low=0.5)
        out.detectors[name] = Detector(data, unc, mask, d.header)
    prod = out
    times["f"], cpu["f"] = time.perf_counter() - t0, time.process_time() - c0

    for key, fn in (("s", steps._sky), ("z", steps._cosmics), ("a", steps._astrometry),
                    ("t", steps._zeropoint)):
        probe.step = key
        t0, c0 = time.perf_counter(), time.process_time()
        prod = fn(night, prod)
        times[key], cpu[key] = time.perf_counter() - t0, time.process_time() - c0
    return times, cpu, prod


def run_alone(captured) -> tuple[float, float, dict]:
    """astroscrappy.detect_cosmics with the arguments a z step gave it (``Probe.captured``);
    its result is checked to equal that call's."""
    import numpy as np
    orig, args, kw, (crm0, clean0) = captured
    t0, c0 = time.perf_counter(), time.process_time()
    crm, clean = orig(*args, **kw)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    same = bool(np.array_equal(crm, crm0) and np.array_equal(clean, clean0))
    info = {"shape": list(np.shape(args[0])), "same_result": same,
            "kwargs": {k: (v if isinstance(v, (int, float, str, bool)) else
                           f"array {getattr(v, 'dtype', '')}{list(np.shape(v))}")
                       for k, v in kw.items()}}
    return dt, dc, info


def _sanity(prod, fr) -> dict:
    d = prod.detectors[DET]
    h, dh = prod.header, d.header
    return {"sky_level_e": dh.get("SKYLEVEL"), "sky_rms_e": dh.get("SKYRMS"),
            "ncosmic": dh.get("NCOSMIC"), "ncrpix": dh.get("NCRPIX"),
            "ast_nmatch": dh.get("ASTNMAT"), "ast_rms_arcsec": dh.get("ASTRMS"),
            "ast_offset_arcsec": dh.get("ASTOFFS"), "zp": h.get("PHOTZP"),
            "zp_err": h.get("PHOTZPER"), "zp_nstars": h.get("PHOTNSTR"),
            "fwhm_arcsec": h.get("FWHM")}


# --------------------------------------------------------------------------- child
def child(args) -> dict:
    t0 = time.perf_counter()
    import numpy as np  # noqa: F401
    import astropy.coordinates  # noqa: F401
    import astropy.wcs.utils  # noqa: F401
    import astroalign  # noqa: F401
    import astroscrappy  # noqa: F401
    import photutils.aperture  # noqa: F401
    import photutils.background  # noqa: F401
    import photutils.detection  # noqa: F401
    import photutils.psf  # noqa: F401
    import photutils.segmentation  # noqa: F401
    import scipy.interpolate  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import scipy.spatial  # noqa: F401
    import scipy.stats  # noqa: F401
    from reducer import catalogs, steps  # noqa: F401
    from reducer.ops import astrometry, calibrate, cosmics, photometry, sky  # noqa: F401
    t_import = time.perf_counter() - t0

    t0 = time.perf_counter()
    fr = make_frame(args.nx, args.ny, args.seed)
    t_make = time.perf_counter() - t0
    night = _Night(fr["scale"])

    # warm-up: the whole chain once, untimed, on the same frame (first-call costs, the
    # allocator's pages at full size) -- it also captures astroscrappy's arguments, so that
    # astroscrappy alone can be timed both before and after each timed chain
    t_warm, captured = 0.0, None
    if not args.no_warmup:
        t0 = time.perf_counter()
        probe = Probe()
        _install(probe, fr["catalog"])
        try:
            run_chain(fr, night, probe)
        finally:
            probe.restore()
        captured = probe.captured
        t_warm = time.perf_counter() - t0

    runs = []
    load0 = os.getloadavg()[0]
    for _ in range(args.repeat):
        alone = []
        if captured is not None:
            alone.append(run_alone(captured))
        probe = Probe()
        _install(probe, fr["catalog"])
        try:
            times, cpu, prod = run_chain(fr, night, probe)
            breakdown = {k: (probe.t[k], probe.n[k]) for k in probe.t}
        finally:
            probe.restore()
        alone.append(run_alone(probe.captured))
        runs.append(dict(times=times, cpu=cpu, total=sum(times.values()),
                         total_cpu=sum(cpu.values()), breakdown=breakdown,
                         alone=sum(a[0] for a in alone) / len(alone),
                         alone_cpu=sum(a[1] for a in alone) / len(alone),
                         alone_each=[a[0] for a in alone],
                         alone_info=dict(alone[-1][2], same_result=all(a[2]["same_result"] for a in alone)),
                         sanity=_sanity(prod, fr)))
    best = min(runs, key=lambda r: r["total"])
    best_alone = min(runs, key=lambda r: r["alone"])
    return dict(threads={v: os.environ.get(v) for v in THREAD_VARS}, pid=os.getpid(),
                t_import=t_import, t_make=t_make, t_warm=t_warm,
                times=best["times"], cpu=best["cpu"], total=best["total"],
                total_cpu=best["total_cpu"], breakdown=best["breakdown"],
                alone=best_alone["alone"], alone_cpu=best_alone["alone_cpu"],
                alone_each=best_alone["alone_each"], alone_info=best["alone_info"],
                all_totals=[r["total"] for r in runs], all_alone=[r["alone"] for r in runs],
                sanity=best["sanity"], truth=fr["truth"],
                loadavg=(load0, os.getloadavg()[0]))


# --------------------------------------------------------------------------- report
def _tree(breakdown: dict) -> dict:
    """Breakdown keys grouped by step: {step: [(depth, label, seconds, calls)]}, each
    function under its innermost wrapped caller, slowest first."""
    out = defaultdict(list)
    by_step = defaultdict(dict)
    for k, v in breakdown.items():
        step, path = k.split(":", 1)
        by_step[step][path] = v
    for step, d in by_step.items():
        def add(path, depth):
            sec, n = d[path]
            out[step].append((depth, path.split(">")[-1], sec, n))
            kids = [k for k in d if k.startswith(path + ">") and k.count(">") == path.count(">") + 1]
            for k in sorted(kids, key=lambda k: -d[k][0]):
                add(k, depth + 1)
        for root in sorted((k for k in d if ">" not in k), key=lambda k: -d[k][0]):
            add(root, 1)
    return out


def report(res: dict) -> tuple[list[str], float]:
    lines = []
    thr = res["threads"]["OMP_NUM_THREADS"]
    total, alone = res["total"], res["alone"]
    lines.append(f"OMP_NUM_THREADS={thr} (OPENBLAS_NUM_THREADS={res['threads']['OPENBLAS_NUM_THREADS']}, "
                 f"MKL_NUM_THREADS={res['threads']['MKL_NUM_THREADS']}); 1-min load average "
                 f"{res['loadavg'][0]:.2f} before the runs, {res['loadavg'][1]:.2f} after "
                 f"({os.cpu_count()} CPUs)")
    lines.append(f"  imports (cold, excluded) {res['t_import']:.2f} s, frame synthesis (excluded) "
                 f"{res['t_make']:.2f} s, untimed warm-up chain on the same frame (excluded) "
                 f"{res['t_warm']:.2f} s")
    lines.append(f"  {'step':<4}  {'what':<40}  {'seconds':>8}  {'fraction':>8}  {'cpu s':>7}")
    tree = _tree(res["breakdown"])
    for key, what in STEPS:
        sec = res["times"][key]
        lines.append(f"  {key:<4}  {what:<40}  {sec:8.3f}  {100 * sec / total:7.1f} %  "
                     f"{res['cpu'][key]:7.3f}")
        for depth, label, s, n in tree.get(key, []):
            calls = f" x{n}" if n > 1 else ""
            lines.append(f"  {'':<4}  {'  ' * depth + label + calls:<40}  {s:8.3f}")
        if key in ("z", "a", "t", "s"):
            top = sum(s for d, label, s, n in tree.get(key, []) if d == 1)
            rest = sec - top
            lines.append(f"  {'':<4}  {'  other (headers, copies, WCS ...)':<40}  {rest:8.3f}")
    lines.append(f"  {'':<4}  {'total chain':<40}  {total:8.3f}  {100.0:7.1f} %  "
                 f"{res['total_cpu']:7.3f}")
    lines.append(f"  {'':<4}  {'astroscrappy alone':<40}  {alone:8.3f}  {100 * alone / total:7.1f} %  "
                 f"{res['alone_cpu']:7.3f}")
    info = res["alone_info"]
    each = res["alone_each"]
    if len(each) == 2:
        lines.append(f"  astroscrappy alone is the mean of a call just before the timed chain "
                     f"({each[0]:.3f} s) and one just after it ({each[1]:.3f} s)")
    lines.append(f"  astroscrappy alone: same call as the z step's on a {info['shape'][1]} x "
                 f"{info['shape'][0]} (padded) float32 frame; same mask and cleaned image: "
                 f"{'yes' if info['same_result'] else 'NO'}")
    lines.append("  its keywords: " + ", ".join(f"{k}={v}" for k, v in info["kwargs"].items()))
    if len(res["all_totals"]) > 1:
        lines.append("  repeats: chain " + ", ".join(f"{t:.2f}" for t in res["all_totals"])
                     + " s; astroscrappy " + ", ".join(f"{t:.2f}" for t in res["all_alone"]) + " s")
    s, tr = res["sanity"], res["truth"]
    lines.append(f"  sanity: sky {s['sky_level_e']} e- (rms {s['sky_rms_e']}), cosmic rays "
                 f"{s['ncosmic']} events / {s['ncrpix']} px (injected {tr['n_cosmics']}), "
                 f"astrometry {s['ast_nmatch']} matches rms {s['ast_rms_arcsec']}\" "
                 f"pointing error {s['ast_offset_arcsec']}\" (true {tr['pointing_error_arcsec']:.1f}\"), "
                 f"ZP {s['zp']} +- {s['zp_err']} from {s['zp_nstars']} stars (true {tr['zp']}), "
                 f"FWHM {s['fwhm_arcsec']}\" (true {tr['fwhm_arcsec']:.2f}\" Moffat beta {tr['beta']})")
    ratio = total / alone
    lines.append(f"  OMP_NUM_THREADS={thr}: chain / astroscrappy: {ratio:.2f}x wall, "
                 f"{res['total_cpu'] / res['alone_cpu']:.2f}x CPU (target <= 1.5x)")
    return lines, ratio


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nx", type=int, default=2048, help="columns (default 2048)")
    ap.add_argument("--ny", type=int, default=4096, help="rows (default 4096)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per thread count; best is shown")
    ap.add_argument("--threads", default="1,2",
                    help="comma-separated OMP_NUM_THREADS values, each in a fresh process; "
                         "the first one is the final line's (default 1,2)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-warmup", action="store_true", help="no untimed warm-up chain (astroscrappy alone then only after the chain)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    if args.child:
        print("BENCH-JSON " + json.dumps(child(args)))
        return 0

    threads = [int(v) for v in args.threads.split(",") if v.strip()]
    print(f"reducer science chain (p f s z a t) vs astroscrappy alone: one synthetic frame "
          f"{args.nx} x {args.ny} (nx x ny), seed {args.seed}, in memory, no file I/O timed; "
          f"best of {args.repeat}; {os.cpu_count()} CPUs")
    ratios = {}
    for n in threads:
        env = dict(os.environ)
        for v in THREAD_VARS:
            env[v] = str(n)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--nx", str(args.nx),
               "--ny", str(args.ny), "--repeat", str(args.repeat), "--seed", str(args.seed)]
        if args.no_warmup:
            cmd.append("--no-warmup")
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("BENCH-JSON ")]
        if p.returncode != 0 or not line:
            sys.stderr.write(p.stdout + p.stderr)
            print(f"OMP_NUM_THREADS={n}: the benchmark failed (exit {p.returncode})")
            return 1
        res = json.loads(line[-1][len("BENCH-JSON "):])
        if n == threads[0]:
            tr = res["truth"]
            print(f"frame: {tr['n_stars_frame']} Moffat stars on the frame (FWHM "
                  f"{tr['fwhm_arcsec']:.2f}\", beta {tr['beta']}), {tr['n_catalog']} catalogue "
                  f"rows in the cone, {tr['n_cosmics']} cosmic-ray events, sky {tr['sky_e']:.0f} e- "
                  f"(before the flat), {tr['n_saturated_px']} saturated px, TAN 0.6\"/px, "
                  f"pointing {tr['pointing_error_arcsec']:.0f}\" off")
        lines, ratios[n] = report(res)
        print()
        print("\n".join(lines))
    print()
    print(f"chain / astroscrappy: {ratios[threads[0]]:.2f}x (target <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
