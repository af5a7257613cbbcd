"""Benchmark: a master bias from raw frames with overscan, reducer against ccdproc.

Usage::

    python bench/masters.py [--nframes 20] [--ny 4096] [--nx 2048] [--overscan 32]
                            [--mem-limit-mib 256] [--outdir DIR] [--keep] [--skip-ccdproc]

Writes ``nframes`` seeded synthetic raw biases as FITS files (one image HDU ``CCD`` of
``ny`` rows x ``nx + overscan`` columns, int16 with BZERO 32768 as a camera writes them:
level 1000 ADU drifting along the rows, a fixed column pattern, 5 ADU read noise, a few
cosmic-ray hits, the overscan columns on the right), then, each in a fresh subprocess so
that the peak resident memory (``VmHWM`` of the child, the whole process, interpreter and
libraries included; not ``ru_maxrss``, which on Linux also counts the pages of the parent
at the fork) is honest:

(a) reducer: :func:`reducer.masters.build_master` on a one-detector profile (overscan
    median per row, smoothed over 15 rows; trim; input screening; clipped mean 2.1; the
    master FITS file written), with ``--mem-limit-mib``;
(b) ccdproc, the way its documentation builds a master bias: per frame ``CCDData.read``,
    ``ccdproc.subtract_overscan(median=True, overscan_axis=1)`` and ``ccdproc.trim_image``,
    kept in a list, then ``ccdproc.combine(..., method='average', sigma_clip=True,
    sigma_clip_low_thresh=2.1, sigma_clip_high_thresh=2.1, sigma_clip_func=np.ma.median,
    sigma_clip_dev_func=mad_std, mem_limit=350e6)`` and the result written.

The estimators differ (ccdproc's clip uses the MAD standard deviation, reducer's the
16-84 percentile half-spread, and reducer smooths the overscan model), so the masters
are compared only loosely (median absolute difference, printed).  Times are wall times of
the work inside the child (imports and interpreter start-up excluded); the frames are read
once beforehand so both start from the page cache.  The last line is
``speedup vs ccdproc: N.Nx``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_frames(folder: Path, n: int, ny: int, nx: int, overscan: int, seed: int = 0) -> list[str]:
    from astropy.io import fits
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pattern = rng.normal(0, 3, nx).astype(np.float32)
    drift = (2.0 * np.sin(np.linspace(0, 3, ny))).astype(np.float32)[:, None]
    names = []
    for i in range(n):
        img = rng.normal(1000.0, 5.0, (ny, nx + overscan)).astype(np.float32)
        img += drift
        img[:, :nx] += pattern
        hits = rng.integers(0, [ny, nx], size=(200, 2))
        img[hits[:, 0], hits[:, 1]] += rng.uniform(200, 5000, 200).astype(np.float32)
        data = np.clip(np.round(img), 0, 65535).astype(np.uint16)
        hdr = fits.Header()
        hdr["IMAGETYP"], hdr["EXPTIME"] = "bias", 0.0
        hdr["DATE-OBS"] = f"2026-11-20T20:{i // 60:02d}:{i % 60:02d}"
        name = f"bias{i:03d}.fits"
        fits.HDUList([fits.PrimaryHDU(header=hdr), fits.ImageHDU(data, name="CCD")]).writeto(
            folder / name, overwrite=True)
        names.append(name)
    return names


REDUCER_CHILD = r'''
import json, sys, time

def peak_rss():
    """Peak resident memory of this process image, bytes: VmHWM (Linux; ru_maxrss would
    also count the parent's pages at fork), else ru_maxrss."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from pathlib import Path
from types import SimpleNamespace
args = json.loads(sys.argv[1])
sys.path.insert(0, args["root"])
from reducer import masters as M
from reducer.instruments import load_profile
import astropy.io.fits, scipy.ndimage, astropy.stats   # imported before timing
work = Path(args["work"])
ny, nx, ov = args["ny"], args["nx"], args["overscan"]
text = load_profile("demo").path.read_text()
head = text[: text.index("[[detectors]]")].replace('name = "demo"', 'name = "benchcam"')
tail = text[text.index("[overscan]"):].replace(
    "offsets = { CCD1 = [0.0, 0.0], CCD2 = [520.0, 0.0] }", "")
det = (f'[[detectors]]\nname = "CCD"\nhdu = "CCD"\nbiassec = "[{nx + 3}:{nx + ov},1:{ny}]"\n'
       f'trimsec = "[1:{nx},1:{ny}]"\ngain = 1.5\nrdnoise = 7.5\nsaturate = 65000.0\n\n')
(work / "profiles").mkdir(exist_ok=True)
(work / "profiles" / "benchcam.toml").write_text(head + det + tail)
profile = load_profile("benchcam", [str(work / "profiles")])
settings = {"calib": {}, "overscan": {"axis": "columns", "method": "median", "fit": "smooth",
                                      "smooth_rows": 15},
            "combine": {"mem_limit_mb": args["mem_mib"]}}
night = SimpleNamespace(settings=settings, profile=profile, raw_dir=Path(args["raw"]),
                        utdate="20261120", digest=lambda *a: "bench")
frames = [SimpleNamespace(file=f, mjd=61000 + i / 1440, exptime=0.0) for i, f in
          enumerate(args["files"])]
cs = M.CalSet("bias", {"binning": "1x1", "shape": f"{nx + ov}x{ny}", "readout": ""}, frames)
rss0 = peak_rss()
t = time.perf_counter()
built = M.build_master(cs, night=night, out_path=Path(args["out"]))
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rss_peak": peak_rss(),
                  "rss_imports": rss0, "rejected": len(built.rejected)}))
'''

CCDPROC_CHILD = r'''
import json, sys, time, warnings

def peak_rss():
    """Peak resident memory of this process image, bytes: VmHWM (Linux; ru_maxrss would
    also count the parent's pages at fork), else ru_maxrss."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import numpy as np
args = json.loads(sys.argv[1])
import astropy.units as u
from astropy.nddata import CCDData
from astropy.stats import mad_std
import ccdproc
warnings.simplefilter("ignore")
nx, ov = args["nx"], args["overscan"]
rss0 = peak_rss()
t = time.perf_counter()
done = []
for f in args["paths"]:
    ccd = CCDData.read(f, hdu="CCD", unit=u.adu)
    ccd = ccdproc.subtract_overscan(ccd, fits_section=f"[{nx + 3}:{nx + ov},:]", median=True,
                                    overscan_axis=1)
    done.append(ccdproc.trim_image(ccd, fits_section=f"[1:{nx},:]"))
master = ccdproc.combine(done, method="average", sigma_clip=True, sigma_clip_low_thresh=2.1,
                         sigma_clip_high_thresh=2.1, sigma_clip_func=np.ma.median,
                         sigma_clip_dev_func=mad_std, mem_limit=350e6)
master.meta["COMBINED"] = True
master.write(args["out"], overwrite=True)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rss_peak": peak_rss(),
                  "rss_imports": rss0}))
'''


def run_child(code: str, args: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"child failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nframes", type=int, default=20)
    ap.add_argument("--ny", type=int, default=4096, help="rows")
    ap.add_argument("--nx", type=int, default=2048, help="data columns (overscan added)")
    ap.add_argument("--overscan", type=int, default=32)
    ap.add_argument("--mem-limit-mib", type=int, default=256)
    ap.add_argument("--outdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the frames and masters")
    ap.add_argument("--skip-ccdproc", action="store_true")
    a = ap.parse_args(argv)
    work = Path(a.outdir or tempfile.mkdtemp(prefix="reducer-bench-masters-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        raw = work / "raw"
        print(f"writing {a.nframes} frames of {a.ny} x {a.nx + a.overscan} int16 to {raw} ...",
              flush=True)
        files = write_frames(raw, a.nframes, a.ny, a.nx, a.overscan)
        for f in files:                                   # into the page cache
            (raw / f).read_bytes()
        stack_mib = a.nframes * a.ny * a.nx * 4 / 2**20
        print(f"trimmed stack as float32: {stack_mib:.0f} MiB; mem_limit {a.mem_limit_mib} MiB")
        red = run_child(REDUCER_CHILD, {"root": str(ROOT), "work": str(work), "raw": str(raw),
                                        "files": files, "ny": a.ny, "nx": a.nx,
                                        "overscan": a.overscan, "mem_mib": a.mem_limit_mib,
                                        "out": str(work / "master_reducer.fits")})
        print(f"reducer : {red['seconds']:7.2f} s   peak RSS {red['rss_peak'] / 2**20:7.0f} MiB "
              f"(after imports {red['rss_imports'] / 2**20:.0f} MiB)", flush=True)
        if a.skip_ccdproc:
            return 0
        cp = run_child(CCDPROC_CHILD, {"paths": [str(raw / f) for f in files], "nx": a.nx,
                                       "overscan": a.overscan,
                                       "out": str(work / "master_ccdproc.fits")})
        print(f"ccdproc : {cp['seconds']:7.2f} s   peak RSS {cp['rss_peak'] / 2**20:7.0f} MiB "
              f"(after imports {cp['rss_imports'] / 2**20:.0f} MiB)")
        from astropy.io import fits
        with fits.open(work / "master_reducer.fits") as h1, fits.open(work / "master_ccdproc.fits") as h2:
            d = h1["CCD"].data.astype(np.float64) - h2[0].data.astype(np.float64)
        print(f"master difference reducer - ccdproc: median {np.median(d):+.3f} ADU, "
              f"median |diff| {np.median(np.abs(d)):.3f} ADU (different clip and overscan model)")
        print(f"peak RSS: reducer {red['rss_peak'] / 2**20:.0f} MiB, ccdproc "
              f"{cp['rss_peak'] / 2**20:.0f} MiB")
        print(f"speedup vs ccdproc: {cp['seconds'] / red['seconds']:.1f}x")
        return 0
    finally:
        if not a.keep and a.outdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
