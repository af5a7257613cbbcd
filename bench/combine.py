"""Benchmark of reducer's sigma-clipped combine against ccdproc and a read floor.

Usage::

    python bench/combine.py [--nframes 20] [--ny 4096 --nx 2048] [--outdir DIR]
                            [--repeat 3] [--threads 2] [--mem-limit-mib 160]

Writes ``nframes`` seeded synthetic bias-like float32 frames (level 1000 ADU,
a fixed column pattern, Gaussian read noise of 5 ADU, 0.1 % cosmic-ray-like
outliers) as FITS files, then times, each in a fresh subprocess so that the
peak memory (``ru_maxrss`` of the child, whole process) is honest:

(a)  reducer's :func:`reducer.ops.combine.combine` over :class:`FitsStripSource`
     strips, with ``--threads`` worker threads, and again with 1 thread;
(b)  ``ccdproc.combine(files, method='average', sigma_clip=True, ...)`` with the
     same estimator (centre ``np.ma.median``, deviation half the 16-84 percentile
     spread, thresholds ``nsigma``, one iteration) and its default ``mem_limit``;
(c)  the floor: read the frames and take their plain mean in one pass;
(d)  reducer with twice as many sources (the frames used twice) to show that the
     peak memory does not grow with N.

The reported time is the wall time of the operation inside the child (imports and
interpreter start-up excluded), best of ``--repeat`` subprocesses.  Then the
output of (a) is compared pixel by pixel with :func:`reference_clipped_mean`, a
straightforward float64 numpy implementation of the same estimator (kept here,
separate from the engine): the largest ``|delta| / max(|ref|, UNC_ref)`` of the
value and of the UNC, and the number of CNT mismatches, must be <= 1e-5 and 0.
The last line is ``speedup vs ccdproc: N.Nx``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- reference
def reference_clipped_mean(cube, nsigma, masks=None, scales=None, weights=None,
                           uncs=None, unc_from="scatter"):
    """Straightforward float64 numpy version of the KPF clipped mean (for checks).

    Mirrors the definitions in :mod:`reducer.ops.combine` with plain
    ``np.median``/``np.percentile`` on the whole stack; slow and memory hungry
    (about 40 bytes per value), use on blocks of rows.

    Parameters
    ----------
    cube : array_like, (N, ny, nx)
        Frames, data units.
    nsigma : float
        Clipping half-width (robust sigmas).
    masks : array_like of bool, optional
        True = bad.
    scales, weights : sequence of float, optional
        Per-frame scale and weight.
    uncs : array_like, optional
        Per-value 1-sigma uncertainties of the unscaled frames.
    unc_from : {'scatter', 'input'}

    Returns
    -------
    mean, unc : ndarray of float64
    cnt : ndarray of int
    """
    from scipy.stats import norm

    # working precision of the engine: float32 values, scaled in float32
    x = np.asarray(cube).astype(np.float32)
    if scales is not None:
        x = x * np.asarray(scales, np.float64).astype(np.float32)[:, None, None]
    x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if masks is not None:
        bad |= np.asarray(masks, bool)
    x = np.where(bad, np.nan, x)
    n = (~bad).sum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if bad.any():
            m = np.nanmedian(x, axis=0)
            p16, p84 = np.nanpercentile(x, [16, 84], axis=0)
        else:
            m = np.median(x, axis=0)
            p16, p84 = np.percentile(x, [16, 84], axis=0)
    s = (p84 - p16) / 2
    with np.errstate(invalid="ignore"):
        keep = ~bad & ((np.abs(x - m) <= nsigma * s) | (n <= 2))
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, float)
    W = np.where(keep, w[:, None, None], 0.0)
    V1 = W.sum(0)
    V2 = (W ** 2).sum(0)
    cnt = keep.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = (W * np.where(keep, x, 0)).sum(0) / V1
        var = (W * np.where(keep, (x - mu) ** 2, 0)).sum(0) / (V1 - V2 / V1)
        k = float(nsigma)
        f = 1 - 2 * k * norm.pdf(k) / (2 * norm.cdf(k) - 1)
        fac = np.where(n >= 3, f, 1.0)
        unc = np.sqrt(var / fac * V2 / V1 ** 2)
        unc[cnt < 2] = np.nan
        if uncs is not None:
            sc = np.ones(x.shape[0]) if scales is None else np.asarray(scales, float)
            su = np.asarray(uncs, float) * np.abs(sc)[:, None, None]
            prop = np.sqrt((W ** 2 * np.where(keep, su ** 2, 0)).sum(0)) / V1
            unc = prop if unc_from == "input" else np.where(cnt == 1, prop, unc)
    mu[cnt == 0] = np.nan
    unc[cnt == 0] = np.nan
    return mu, unc, cnt


def compare_to_reference(out, ref):
    """Largest |delta| of value and UNC, scaled by max(|ref|, UNC_ref), and CNT mismatches."""
    m, u, c = (np.asarray(a, np.float64) for a in out)
    rm, ru, rc = ref
    scale = np.maximum(np.abs(rm), np.nan_to_num(ru))
    with np.errstate(invalid="ignore", divide="ignore"):
        dm = np.abs(m - rm) / scale
        du = np.abs(u - ru) / scale
        du_rel = np.abs(u - ru) / ru
    nan_mismatch = int(np.sum(np.isnan(m) != np.isnan(rm)) + np.sum(np.isnan(u) != np.isnan(ru)))
    return {
        "value": float(np.nanmax(dm)) if np.isfinite(dm).any() else 0.0,
        "unc": float(np.nanmax(du)) if np.isfinite(du).any() else 0.0,
        "unc_rel": float(np.nanmax(du_rel)) if np.isfinite(du_rel).any() else 0.0,
        "cnt_mismatch": int(np.sum(c != rc)),
        "nan_mismatch": nan_mismatch,
    }


# --------------------------------------------------------------------------- frames
def write_frames(outdir: Path, nframes: int, ny: int, nx: int, seed: int = 12345):
    """Seeded bias-like float32 frames; returns the list of paths."""
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    pattern = (1000.0 + rng.normal(0, 2.0, nx)).astype(np.float32)  # column structure
    paths = []
    for i in range(nframes):
        frame = rng.normal(0.0, 5.0, (ny, nx)).astype(np.float32)
        frame += pattern[None, :]
        frame += np.float32(rng.normal(0, 0.5))                      # level drift
        nhit = max(1, ny * nx // 1000)
        yy = rng.integers(0, ny, nhit)
        xx = rng.integers(0, nx, nhit)
        frame[yy, xx] += rng.uniform(50, 5000, nhit).astype(np.float32)
        p = outdir / f"bias_{i:03d}.fits"
        hdu = fits.PrimaryHDU(frame)
        hdu.header["BUNIT"] = "adu"
        hdu.writeto(p, overwrite=True)
        paths.append(p)
        del frame
    return paths


# --------------------------------------------------------------------------- children
def _half_1684(a, axis=None, **kw):
    """Robust sigma for ccdproc: half the 16-84 percentile spread (data has no NaN)."""
    p16, p84 = np.percentile(a, [16, 84], axis=axis)
    return (p84 - p16) / 2


def child(args) -> None:
    files = [Path(p) for p in json.loads(Path(args.files).read_text())]
    mode = args.child
    res: dict = {}
    if mode == "reducer":
        sys.path.insert(0, str(ROOT))
        import astropy.io.fits  # noqa: F401  (imported untimed, as in the other children)

        from reducer.fitsio_strips import FitsStripSource
        from reducer.ops.combine import combine

        t0 = time.perf_counter()  # opening the files (header parsing) is timed too
        srcs = [FitsStripSource(p) for p in files]
        r = combine(srcs, args.nsigma, mem_limit=int(args.mem_limit_mib * 2**20),
                    threads=args.threads)
        res["time"] = time.perf_counter() - t0
        res["plan"] = {k: int(v) for k, v in vars(r.plan).items()}
        if args.save:
            np.save(Path(args.save) / "data.npy", r.data)
            np.save(Path(args.save) / "unc.npy", r.unc)
            np.save(Path(args.save) / "cnt.npy", r.cnt)
    elif mode == "ccdproc":
        import ccdproc

        t0 = time.perf_counter()
        ccd = ccdproc.combine([str(p) for p in files], method="average", sigma_clip=True,
                              sigma_clip_low_thresh=args.nsigma,
                              sigma_clip_high_thresh=args.nsigma,
                              sigma_clip_func=np.ma.median,
                              sigma_clip_dev_func=_half_1684, unit="adu")
        res["time"] = time.perf_counter() - t0
        if args.save:
            np.save(Path(args.save) / "ccdproc.npy", np.asarray(ccd.data, np.float32))
    elif mode == "floor":
        from astropy.io import fits

        t0 = time.perf_counter()
        acc = None
        for p in files:
            d = fits.getdata(p)
            if acc is None:
                acc = np.zeros(d.shape, np.float64)
            acc += d
            del d
        acc /= len(files)
        res["time"] = time.perf_counter() - t0
    else:
        raise SystemExit(f"unknown child mode {mode!r}")
    res["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def run_child(mode: str, files: list[Path], work: Path, args, *, threads=1, save=None) -> dict:
    flist = work / f"files_{mode}_{len(files)}.json"
    flist.write_text(json.dumps([str(p) for p in files]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--files", str(flist),
           "--nsigma", str(args.nsigma), "--threads", str(threads),
           "--mem-limit-mib", str(args.mem_limit_mib)]
    if save:
        cmd += ["--save", str(save)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{out.stdout}\n{out.stderr}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def best_of(mode, files, work, args, repeat, **kw) -> dict:
    runs = [run_child(mode, files, work, args, **kw) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["time"])
    best["maxrss_mib"] = max(r["maxrss_mib"] for r in runs)
    best["times"] = [r["time"] for r in runs]
    return best


def reference_check(files, work: Path, nsigma: float, block_rows: int = 128) -> dict:
    """Compare the saved reducer output with the numpy reference, block of rows by block."""
    from astropy.io import fits

    data = np.load(work / "data.npy", mmap_mode="r")
    unc = np.load(work / "unc.npy", mmap_mode="r")
    cnt = np.load(work / "cnt.npy", mmap_mode="r")
    ccd = np.load(work / "ccdproc.npy", mmap_mode="r") if (work / "ccdproc.npy").exists() else None
    hdus = [fits.open(p, memmap=True) for p in files]
    worst = {"value": 0.0, "unc": 0.0, "unc_rel": 0.0, "cnt_mismatch": 0, "nan_mismatch": 0}
    ccd_worst = 0.0
    ny = data.shape[0]
    try:
        for y0 in range(0, ny, block_rows):
            y1 = min(ny, y0 + block_rows)
            cube = np.stack([h[0].section[y0:y1] for h in hdus]).astype(np.float32)
            ref = reference_clipped_mean(cube, nsigma)
            c = compare_to_reference((data[y0:y1], unc[y0:y1], cnt[y0:y1]), ref)
            for k in ("value", "unc", "unc_rel"):
                worst[k] = max(worst[k], c[k])
            for k in ("cnt_mismatch", "nan_mismatch"):
                worst[k] += c[k]
            if ccd is not None:
                d = np.abs(ccd[y0:y1].astype(np.float64) - ref[0]) / np.maximum(
                    np.abs(ref[0]), ref[1])
                ccd_worst = max(ccd_worst, float(np.nanmax(d)))
    finally:
        for h in hdus:
            h.close()
    worst["ccdproc_value"] = ccd_worst if ccd is not None else None
    return worst


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nframes", type=int, default=20)
    ap.add_argument("--ny", type=int, default=4096)
    ap.add_argument("--nx", type=int, default=2048)
    ap.add_argument("--outdir", type=Path, default=None,
                    help="keep the frames here (default: a temporary directory, removed)")
    ap.add_argument("--nsigma", type=float, default=2.1)
    ap.add_argument("--repeat", type=int, default=3, help="subprocesses per timing (best)")
    ap.add_argument("--threads", type=int, default=2, help="reducer worker threads")
    ap.add_argument("--mem-limit-mib", type=float, default=160.0,
                    help="reducer mem_limit (MiB); interpreter + modules come on top")
    ap.add_argument("--skip-ccdproc", action="store_true")
    ap.add_argument("--skip-reference", action="store_true")
    # internal
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--files", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    tmp = None
    if args.outdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="reducer-bench-"))
        outdir = tmp
    else:
        outdir = args.outdir
        outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="reducer-bench-work-"))
    try:
        t0 = time.perf_counter()
        files = write_frames(outdir, args.nframes, args.ny, args.nx)
        mib = args.nframes * args.ny * args.nx * 4 / 2**20
        print(f"frames: {args.nframes} x {args.ny}x{args.nx} float32 ({mib:.0f} MiB) in {outdir} "
              f"(written in {time.perf_counter() - t0:.1f} s); nsigma = {args.nsigma}; "
              f"cpus = {os.cpu_count()}; load = {os.getloadavg()[0]:.2f}")
        # warm the page cache identically for everybody
        run_child("floor", files, work, args)
        rows = []
        floor = best_of("floor", files, work, args, args.repeat)
        rows.append(("(c) floor: read + plain mean", floor))
        red = best_of("reducer", files, work, args, args.repeat, threads=args.threads, save=work)
        rows.append((f"(a) reducer combine, {args.threads} threads", red))
        red1 = None
        if args.threads != 1:
            red1 = best_of("reducer", files, work, args, args.repeat, threads=1)
            rows.append(("(a) reducer combine, 1 thread", red1))
        red2 = best_of("reducer", files + files, work, args, 1, threads=args.threads)
        rows.append((f"(d) reducer, N={2 * args.nframes} (frames twice)", red2))
        ccd = None
        if not args.skip_ccdproc:
            ccd = best_of("ccdproc", files, work, args, 1, save=work)
            rows.append(("(b) ccdproc.combine", ccd))
        print(f"{'':44s} {'time [s]':>9s} {'peak RSS [MiB]':>15s} {'/ floor':>8s}")
        for label, r in rows:
            print(f"{label:44s} {r['time']:9.3f} {r['maxrss_mib']:15.1f} "
                  f"{r['time'] / floor['time']:8.2f}")
        print(f"reducer runs [s]: {', '.join(f'{t:.3f}' for t in red['times'])}; "
              f"plan: {red['plan']['strip_rows']} rows x {red['plan']['nstrips']} strips, "
              f"{red['plan']['threads']} threads, budget {red['plan']['total_bytes'] / 2**20:.1f} "
              f"MiB of mem_limit {args.mem_limit_mib:g} MiB")
        print(f"N={2 * args.nframes}: peak RSS {red2['maxrss_mib']:.1f} MiB, plan "
              f"{red2['plan']['strip_rows']} rows x {red2['plan']['nstrips']} strips, budget "
              f"{red2['plan']['total_bytes'] / 2**20:.1f} MiB "
              f"({'under' if red2['maxrss_mib'] < 256 else 'OVER'} 256 MiB)")
        if not args.skip_reference:
            t0 = time.perf_counter()
            chk = reference_check(files, work, args.nsigma)
            ok = chk["value"] <= 1e-5 and chk["unc"] <= 1e-5 and chk["cnt_mismatch"] == 0 \
                and chk["nan_mismatch"] == 0
            print(f"reducer vs numpy reference: max |dvalue|/max(|ref|,UNC) = {chk['value']:.2e}, "
                  f"max |dUNC|/max(|ref|,UNC) = {chk['unc']:.2e} (|dUNC|/UNC = "
                  f"{chk['unc_rel']:.2e}), CNT mismatches = "
                  f"{chk['cnt_mismatch']}, NaN mismatches = {chk['nan_mismatch']} -> "
                  f"{'EXACT (<= 1e-5)' if ok else 'NOT EXACT'} "
                  f"[{time.perf_counter() - t0:.0f} s]")
            if chk["ccdproc_value"] is not None:
                print(f"ccdproc vs numpy reference: max |dvalue|/max(|ref|,UNC) = "
                      f"{chk['ccdproc_value']:.2e}")
        best = min((r for r in (red, red1) if r), key=lambda r: r["time"])
        verdict = [
            f">= 8x ccdproc: {'yes' if ccd and ccd['time'] / red['time'] >= 8 else 'no/skipped'}",
            f"<= 2.5x floor: {'yes' if red['time'] / floor['time'] <= 2.5 else 'no'} "
            f"({red['time'] / floor['time']:.2f}x; best reducer run "
            f"{best['time'] / floor['time']:.2f}x)",
            f"peak < 256 MiB (N={args.nframes} and N={2 * args.nframes}): "
            f"{'yes' if max(red['maxrss_mib'], red2['maxrss_mib']) < 256 else 'no'}",
        ]
        if not args.skip_reference:
            verdict.append(f"exact: {'yes' if ok else 'no'}")
        print("targets: " + "; ".join(verdict))
        if ccd is not None:
            print(f"speedup vs ccdproc: {ccd['time'] / red['time']:.1f}x")
        else:
            print("speedup vs ccdproc: n/a (skipped)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
