"""Benchmark of a night's doit runs: a no-op ``doit science`` on a 500-frame night, and
``doit -n N`` with T threads per process on a fresh night.

Usage::

    python bench/night.py [--part noop|parallel|both] [--workdir DIR] [--repeat 7]
                          [--par-repeat 2] [--configs 1x1,2x1,1x2,2x2] [--keep]
                          [--wait-quiet SECONDS] [--quiet CPUS]

(a) **no-op** (``--part noop``). A seeded synthetic night of the demo camera
    (:func:`reducer.testing.make_night`) with small frames (``--noop-shape``, default
    128 x 128 raw pixels per detector, two detectors): 5 biases, 3 darks, 3 dome flats in
    each of g, r, i and ``--noop-targets`` (16) targets x 3 filters x ``--noop-nexp`` (10)
    exposures: 497 frames, 480 of them science (~3000 doit tasks). The frames are made once
    and kept under the work folder, keyed by their parameters (and the simulator's source);
    the profile is the shipped ``demo`` one with its sections cut to the small frames (a
    copy in ``profiles/``). ``reducer night`` and ``doit science`` then bring the night up to
    date (the first time: a few minutes; later only what changed), and ``python -m doit
    science`` in the night folder -- the whole command as the user types it: interpreter
    start, imports, reading the settings and ``nightlog.ecsv``, making every task, doit's
    checks of its state, exit -- is timed ``--repeat`` times (each run checked to have
    executed nothing). Interleaved with it, the floor nobody can go under: the interpreter
    starting and importing doit (``python -c "import doit.doit_cmd"``). Figures: median,
    min and max wall time, the CPU time of the process (user + system: on a shared machine
    the wall time includes waiting for a CPU; the CPU time does not) and the 1-minute load
    average before each run.

(b) **parallel** (``--part parallel``). A fresh night with moderate frames
    (``--par-shape``, default 512 x 288 raw per detector) and enough work for per-task
    overhead not to dominate: 5 biases, 3 darks, 3 flats per filter, ``--par-targets`` (6)
    targets x g, r x ``--par-nexp`` (4) exposures = 48 science frames. For each
    configuration PxT (``--configs``; P doit processes, ``-n P``, and T threads per process,
    ``[doit] threads = T`` in ``night.toml``, which sets ``OMP_NUM_THREADS`` and the BLAS
    thread counts; none of them is inherited from this process) a new folder gets the site
    settings, its own masters store and registry, ``reducer night`` and then
    ``python -m doit -n P science`` from nothing (inventory, masters, chains, stacks, light
    curves, report), timed. Configurations are run in rounds (``--par-repeat``), the order
    rotated each round so that no configuration always runs first or last while the load of
    the machine changes. Per configuration: each wall time, the median, the CPU time, the
    CPUs it got (CPU time / wall time: 2 processes cannot beat 1 by more than the ratio of
    the CPUs they got, on a machine others use too), the load average during the runs, and
    from the night's task log (``logs/tasks.jsonl``) the phases: the time until the last
    master is done (inventory and calib: serial before any science task, since the science
    tasks are made after ``calib``), the time after the last frame's chain (stacks, light
    curves, report), and the share of the run during which 2 or more tasks ran at once.

The machine may be shared: Linux schedules each session as one group (autogroup), so while
another user's session keeps a CPU busy this benchmark gets about one CPU however many
processes it runs. ``--wait-quiet SECONDS`` waits before each run (up to that long) until the
others keep fewer than ``--quiet`` CPUs busy (from /proc/stat); every run prints what the
others kept busy just before it (``others``) and the CPUs it got (CPU time / wall time).

The last lines: ``no-op doit science: median N.NN s (target < 1 s)``, ``doit -n 2 x 1
thread vs -n 1 x 1 thread: N.NNx (target >= 1.8x)`` and the fastest configuration.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PY = sys.executable
UTDATE = "20261120"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------- the nights
def sim_params(shape, targets: int, filters, nexp: int, exptime: float, stars: int, seed: int) -> dict:
    return {"shape": list(shape), "targets": targets, "filters": list(filters), "nexp": nexp,
            "exptime": exptime, "stars_per_field": stars, "seed": seed, "utdate": UTDATE,
            "nbias": 5, "ndark": 3, "nflat": 3}


def sim_key(params: dict) -> str:
    """Short key of the simulation: its parameters and the simulator's source."""
    src = (ROOT / "reducer" / "testing.py").read_bytes()
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode() + src)
    return h.hexdigest()[:12]


def simulate(root: Path, params: dict) -> tuple[Path, Path, float]:
    """The raw night of ``params`` under ``root`` (made once): raw folder, catalogue, seconds
    spent making it now (0 when it was there)."""
    from reducer.testing import Target, make_night
    raw = root / "raw" / UTDATE
    done = root / "sim.json"
    if done.is_file() and json.loads(done.read_text()) == params:
        return raw, root / "raw" / "refcat.ecsv", 0.0
    t0 = time.perf_counter()
    filters = tuple(params["filters"])
    targets = [Target(f"F{i:02d}", filters=filters, nexp=params["nexp"], exptime=params["exptime"])
               for i in range(params["targets"])]
    sim = make_night(raw, seed=params["seed"], utdate=UTDATE, filters=filters, targets=targets,
                     standard=False, nbias=params["nbias"], ndark=params["ndark"],
                     nflat=params["nflat"], shape=tuple(params["shape"]),
                     stars_per_field=params["stars_per_field"], overwrite=True)
    done.write_text(json.dumps(params))
    return raw, Path(sim.catalog_path), time.perf_counter() - t0


def write_profile(folder: Path, shape) -> None:
    """The shipped demo profile with its sections for ``shape`` (rows, columns) raw frames:
    the simulator keeps 2 transition and 30 overscan columns whatever the shape."""
    from reducer.resources import instruments_dir
    ny, nx = shape
    nd = nx - 32
    text = (instruments_dir() / "demo.toml").read_text()
    for old, new in (('"[515:544,1:1024]"', f'"[{nd + 3}:{nx},1:{ny}]"'),
                     ('"[1:512,1:1024]"', f'"[1:{nd},1:{ny}]"'),
                     ("CCD2 = [520.0, 0.0]", f"CCD2 = [{520.0 * nd / 512:.3f}, 0.0]")):
        if old not in text:
            raise SystemExit(f"the demo profile changed: {old} not found; update bench/night.py")
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "demo.toml").write_text(text)


def site_settings(root: Path, catalog: Path, profiles: Path | None) -> Path:
    cfg = root / "reducer.toml"
    lines = ['instrument = "demo"', 'redux = "redux"', 'masters_store = "masters"']
    if profiles is not None:
        lines.append(f'profiles_dirs = ["{profiles}"]')
    lines += ["[catalog]", f'path = "{catalog}"']
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def make_night_dir(root: Path, raw: Path, catalog: Path, profiles: Path | None) -> Path:
    cfg = site_settings(root, catalog, profiles)
    r = subprocess.run([PY, "-m", "reducer.cli", "--config", str(cfg), "night", UTDATE,
                        "--raw", str(raw)], cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"reducer night failed:\n{r.stdout}{r.stderr}")
    return root / "redux" / UTDATE


def clean_env(threads: int | None = None) -> dict:
    """The environment of a doit run: thread counts only from the night's settings."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    if threads is not None:
        for v in THREAD_VARS:
            env[v] = str(threads)
    return env


def cpus_busy(window: float = 3.0) -> float:
    """CPUs busy on the machine over ``window`` seconds (/proc/stat: everything but idle and
    I/O wait), e.g. 1.5 = one and a half CPUs; NaN where /proc/stat is not there."""
    def read():
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    try:
        t0, i0 = read()
        time.sleep(window)
        t1, i1 = read()
    except OSError:
        return float("nan")
    return (os.cpu_count() or 1) * (1.0 - (i1 - i0) / max(t1 - t0, 1))


def wait_quiet(limit: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the machine's other users keep fewer than ``limit``
    CPUs busy; the CPUs they kept busy just before returning.

    Linux schedules each session as a group (autogroup): while another session keeps a CPU
    busy, this one gets about one CPU however many processes it runs, so ``-n 2`` can only
    show what it does on a machine left to it."""
    t0 = time.perf_counter()
    busy = cpus_busy()
    while busy >= limit and time.perf_counter() - t0 < max_wait:
        busy = cpus_busy(10.0)
    return busy


def timed(cmd: list, cwd: Path, env: dict) -> dict:
    """Run ``cmd``; wall time, CPU time (user + system of it and its children) and the
    1-minute load average: before the run, and its mean sampled every second during it."""
    import threading
    load = os.getloadavg()[0]
    samples, done = [], threading.Event()

    def sample():
        while not done.wait(1.0):
            samples.append(os.getloadavg()[0])
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    done.set()
    th.join()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"wall": wall, "cpu": cpu, "load": load,
            "load_during": statistics.fmean(samples) if samples else load,
            "rc": p.returncode, "out": p.stdout + p.stderr}


def executed(out: str) -> int | None:
    """Tasks a doit run executed, from its output (the reporter's summary line, or doit's
    own ``.  task`` lines)."""
    m = re.search(r"\((\d+) executed", out)
    if m:
        return int(m.group(1))
    if re.search(r"\(\s*0 executed|no task executed", out):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith(".  "))


def stats(values) -> str:
    v = sorted(values)
    return f"median {statistics.median(v):.3f} s (min {v[0]:.3f}, max {v[-1]:.3f})"


# --------------------------------------------------------------------------- (a) no-op
def part_noop(args, work: Path) -> float:
    params = sim_params(args.noop_shape, args.noop_targets, ("g", "r", "i"), args.noop_nexp,
                        10.0, args.noop_stars, args.seed)
    root = work / f"noop-{sim_key(params)}"
    root.mkdir(parents=True, exist_ok=True)
    raw, catalog, tsim = simulate(root, params)
    nframes = len(list(raw.glob("*.fits")))
    print(f"(a) no-op doit science: {nframes} raw frames of {params['shape'][0]} x "
          f"{params['shape'][1]} px x 2 detectors ({params['targets']} targets x g, r, i x "
          f"{params['nexp']} exposures + calibrations) in {root}"
          + (f"; simulated in {tsim:.0f} s" if tsim else "; simulation reused"))
    write_profile(root / "profiles", params["shape"])
    nd = make_night_dir(root, raw, catalog, root / "profiles")
    env = clean_env()
    t0 = time.perf_counter()
    first = timed([PY, "-m", "doit", "science"], nd, env)
    if first["rc"] != 0:
        print(first["out"][-3000:])
        raise SystemExit(f"doit science failed (exit {first['rc']})")
    print(f"    bringing the night up to date: {time.perf_counter() - t0:.1f} s, "
          f"{executed(first['out'])} tasks executed")
    listed = timed([PY, "-m", "doit", "list", "--all"], nd, env)
    ntasks = sum(1 for line in listed["out"].splitlines() if line.strip())
    noop, floor = [], []
    others = []
    for i in range(args.repeat):
        others.append(wait_quiet(args.quiet, args.wait_quiet) if args.wait_quiet else float("nan"))
        # interleaved: the floor (interpreter + doit import) and the no-op run
        floor.append(timed([PY, "-c", "import doit.doit_cmd"], nd, env))
        r = timed([PY, "-m", "doit", "science"], nd, env)
        n = executed(r["out"])
        if r["rc"] != 0 or n:
            print(r["out"][-3000:])
            raise SystemExit(f"the no-op run {i} was not one (exit {r['rc']}, {n} tasks executed)")
        noop.append(r)
    print(f"    doit list --all: {ntasks} tasks listed (delayed ones are not), "
          f"{listed['wall']:.3f} s")
    print(f"    {'run':>4} {'load':>5} {'others':>6} {'no-op wall':>11} {'no-op CPU':>10} "
          f"{'floor wall':>11} {'floor CPU':>10}")
    for i, (r, f, o) in enumerate(zip(noop, floor, others)):
        print(f"    {i:4d} {r['load']:5.2f} {o:6.2f} {r['wall']:10.3f}s {r['cpu']:9.3f}s "
              f"{f['wall']:10.3f}s {f['cpu']:9.3f}s")
    med = statistics.median(r["wall"] for r in noop)
    print(f"    no-op wall {stats([r['wall'] for r in noop])}; CPU "
          f"{stats([r['cpu'] for r in noop])}")
    print(f"    floor (python -c 'import doit.doit_cmd') wall "
          f"{stats([f['wall'] for f in floor])}; CPU {stats([f['cpu'] for f in floor])}")
    print(f"    load average (1 min) during the runs: {min(r['load'] for r in noop):.2f}-"
          f"{max(r['load'] for r in noop):.2f} on {os.cpu_count()} CPUs")
    return med


# --------------------------------------------------------------------------- (b) parallel
def phases(night_dir: Path) -> dict:
    """From the task log of the night's only run: seconds from the first task's start to the
    end of the last master (serial part before the science tasks exist), to the end of the
    last frame's chain, and to the end of everything; busy seconds summed over tasks."""
    log = night_dir / "logs" / "tasks.jsonl"
    if not log.is_file():
        return {}
    rows = []
    for line in log.read_text().splitlines():
        try:
            r = json.loads(line)
            t0 = datetime.fromisoformat(r["start"]).timestamp()
            rows.append((r.get("step", ""), t0, t0 + float(r["seconds"]), float(r["seconds"])))
        except (ValueError, KeyError, TypeError):
            continue
    if not rows:
        return {}
    start = min(r[1] for r in rows)
    chain = {"prepare", "flatten", "sky", "cosmics", "astrometry", "zeropoint"}
    # seconds during which k tasks ran at once
    events = sorted([(r[1], 1) for r in rows] + [(r[2], -1) for r in rows])
    k, last, running = 0, start, {}
    for t, d in events:
        running[k] = running.get(k, 0.0) + t - last
        last, k = t, k + d

    def end(pred):
        ends = [r[2] for r in rows if pred(r[0])]
        return max(ends) - start if ends else 0.0
    return {"calib_done": end(lambda s: s in ("inventory", "calib")),
            "chains_done": end(lambda s: s in chain), "all_done": end(lambda s: True),
            "busy": sum(r[3] for r in rows),
            "busy_chain": sum(r[3] for r in rows if r[0] in chain),
            "busy_after": sum(r[3] for r in rows if r[0] not in chain | {"inventory", "calib"}),
            "two_running": sum(v for n, v in running.items() if n >= 2)}


def part_parallel(args, work: Path) -> dict:
    params = sim_params(args.par_shape, args.par_targets, ("g", "r"), args.par_nexp, 60.0,
                        args.par_stars, args.seed + 1)
    base = work / f"par-{sim_key(params)}"
    base.mkdir(parents=True, exist_ok=True)
    raw, catalog, tsim = simulate(base, params)
    write_profile(base / "profiles", params["shape"])
    nsci = params["targets"] * len(params["filters"]) * params["nexp"]
    print(f"(b) fresh night, doit -n P with T threads per process: "
          f"{len(list(raw.glob('*.fits')))} raw frames ({nsci} science) of "
          f"{params['shape'][0]} x {params['shape'][1]} px x 2 detectors in {base}"
          + (f"; simulated in {tsim:.0f} s" if tsim else "; simulation reused"))
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    results: dict = {c: [] for c in configs}
    for rnd in range(args.par_repeat):
        order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
        for nproc, nthr in order:
            run = base / "runs" / f"{nproc}x{nthr}-{rnd}"
            if run.exists():
                shutil.rmtree(run)
            run.mkdir(parents=True)
            nd = make_night_dir(run, raw, catalog, base / "profiles")
            with open(nd / "night.toml", "a") as fh:
                fh.write(f"\n[doit]\nnum_process = {nproc}\nthreads = {nthr}\n")
            others = wait_quiet(args.quiet, args.wait_quiet) if args.wait_quiet else cpus_busy()
            r = timed([PY, "-m", "doit", "-n", str(nproc), "science"], nd, clean_env())
            r.update(phases(nd), executed=executed(r["out"]), others=others)
            results[(nproc, nthr)].append(r)
            print(f"    round {rnd} {nproc}x{nthr}: {r['wall']:7.1f} s wall, {r['cpu']:7.1f} s CPU, "
                  f"others {r['others']:.2f} CPUs busy before, load {r['load_during']:.2f} during, "
                  f"CPUs got {r['cpu'] / r['wall']:.2f}, exit {r['rc']}, "
                  f"{r['executed']} tasks"
                  + (f"; masters done at {r['calib_done']:.1f} s, chains at "
                     f"{r['chains_done']:.1f} s" if "calib_done" in r else ""), flush=True)
            if r["rc"] != 0:
                print(r["out"][-3000:])
            if not args.keep:
                shutil.rmtree(run)
    ref = statistics.median(r["wall"] for r in results[configs[0]])
    print(f"    {'PxT':>5} {'wall median':>12} {'CPU median':>11} {'speedup':>8} {'CPUs got':>9} "
          f"{'load during':>12} {'masters done':>13} {'chains done':>12} {'tail':>6} {'2+ running':>11}")
    med = {}
    for c in configs:
        rs = results[c]
        med[c] = statistics.median(r["wall"] for r in rs)
        ph = [r for r in rs if "calib_done" in r]
        pcal = statistics.median(r["calib_done"] for r in ph) if ph else float("nan")
        pch = statistics.median(r["chains_done"] for r in ph) if ph else float("nan")
        tail = statistics.median(r["all_done"] - r["chains_done"] for r in ph) if ph else float("nan")
        loads = [r["load_during"] for r in rs]
        got = statistics.median(r["cpu"] / r["wall"] for r in rs)
        two = statistics.median(r["two_running"] / r["all_done"] for r in ph) if ph else float("nan")
        print(f"    {c[0]}x{c[1]:<3} {med[c]:11.1f}s {statistics.median(r['cpu'] for r in rs):10.1f}s "
              f"{ref / med[c]:7.2f}x {got:9.2f} {min(loads):5.2f}-{max(loads):5.2f} {pcal:12.1f}s "
              f"{pch:11.1f}s {tail:5.1f}s {100 * two:10.0f}%")
    one = results[configs[0]]
    ph = [r for r in one if "busy" in r]
    if ph:
        b = statistics.median(r["busy"] for r in ph)
        s = statistics.median(r["calib_done"] for r in ph)
        print(f"    {configs[0][0]}x{configs[0][1]}: tasks busy {b:.1f} s of which inventory + masters "
              f"{s:.1f} s ({100 * s / b:.0f} %, serial: science tasks are made after calib); "
              f"Amdahl bound for 2 processes: {b / (s + (b - s) / 2):.2f}x")
    return {"ref": configs[0], "med": med}


def main(argv=None) -> int:
    def shape(text):
        ny, nx = (int(v) for v in text.lower().split("x"))
        return (ny, nx)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("noop", "parallel", "both"), default="both")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the nights are made and kept (default: "
                         "$TMPDIR/reducer-bench-night)")
    ap.add_argument("--repeat", type=int, default=7, help="no-op runs (median)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--noop-shape", type=shape, default=(128, 128), help="rows x columns (raw)")
    ap.add_argument("--noop-targets", type=int, default=16)
    ap.add_argument("--noop-nexp", type=int, default=10, help="exposures per target and filter")
    ap.add_argument("--noop-stars", type=int, default=2000,
                    help="catalogue stars per field at the demo's full frame size")
    ap.add_argument("--par-shape", type=shape, default=(512, 288), help="rows x columns (raw)")
    ap.add_argument("--par-targets", type=int, default=6)
    ap.add_argument("--par-nexp", type=int, default=4)
    ap.add_argument("--par-stars", type=int, default=500)
    ap.add_argument("--par-repeat", type=int, default=2, help="rounds of the configurations")
    ap.add_argument("--configs", default="1x1,2x1,1x2,2x2",
                    help="PxT: doit processes x threads each; the first is the reference")
    ap.add_argument("--keep", action="store_true", help="keep each parallel run's folder")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each parallel run wait up to this long for the machine's other "
                         "users to keep fewer than --quiet CPUs busy (default: do not wait)")
    ap.add_argument("--quiet", type=float, default=0.3, help="CPUs (default 0.3)")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.gettempdir()) / "reducer-bench-night"
    work.mkdir(parents=True, exist_ok=True)
    print(f"reducer night benchmark: {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, python {sys.version.split()[0]}")
    med_noop = par = None
    if args.part in ("noop", "both"):
        med_noop = part_noop(args, work)
    if args.part in ("parallel", "both"):
        par = part_parallel(args, work)
    print()
    if med_noop is not None:
        print(f"no-op doit science: median {med_noop:.2f} s (target < 1 s)")
    if par is not None:
        med, ref = par["med"], par["ref"]
        if (2, 1) in med and ref == (1, 1):
            print(f"doit -n 2 x 1 thread vs -n 1 x 1 thread: {med[ref] / med[(2, 1)]:.2f}x "
                  f"(target >= 1.8x)")
        best = min(med, key=med.get)
        print(f"fastest on {os.cpu_count()} CPUs: {best[0]} processes x {best[1]} thread(s), "
              f"{med[best]:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
