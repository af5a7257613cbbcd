"""``reducer demo``: simulate a night, make its directory, run doit there, say where results are."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

DEMO_UTDATE = "20261120"
#: the doit runs the demo makes, in order (each builds what it needs first)
DEMO_TASKS = (["science"], ["finalreport"])


def run_doit(night_dir: Path, *args: str) -> int:
    """Run ``doit ARGS`` in a night directory with this interpreter; return its exit status."""
    cmd = [sys.executable, "-m", "doit", *args]
    print(f"$ (cd {night_dir} && doit {' '.join(args)})", flush=True)
    return subprocess.call(cmd, cwd=night_dir)


def _give_target_coordinates(night_toml: Path, truth_json: Path) -> None:
    """Tell the night where the variable star is, as an observer would in night.toml."""
    import json
    text = night_toml.read_text()
    if any(line.startswith("[targets.") for line in text.splitlines()) or not truth_json.is_file():
        return
    var = json.loads(truth_json.read_text()).get("variable")
    if not var:
        return
    text += ("\n# the demo's transit host (an observer gives its coordinates like this)\n"
             f'[targets."{var["target"]}"]\nra = {var["ra"]}\ndec = {var["dec"]}\n')
    from .fitsio import atomic_write_text
    atomic_write_text(night_toml, text)


def run_demo(where: Path, seed: int = 1) -> int:
    """Simulate night :data:`DEMO_UTDATE` under ``where`` and reduce it.

    Layout: ``where/raw/UTDATE`` (raw frames), ``where/truth`` (the simulator's truth),
    ``where/refcat.ecsv`` (reference catalogue), ``where/redux/UTDATE`` (the night).
    """
    from .config import load_site
    from .night import make_night_dir
    from .testing import make_night
    where = Path(where).resolve()
    raw = where / "raw" / DEMO_UTDATE
    t0 = time.time()
    if not any(raw.glob("*.fits")):
        print(f"simulating night {DEMO_UTDATE} (seed {seed}) into {raw} ...", flush=True)
        make_night(raw, seed=seed, utdate=DEMO_UTDATE)
    else:
        print(f"using the simulated night already in {raw}")
    # the demo's own site settings file: paths, instrument, reference catalogue
    cfg = where / "reducer.toml"
    if not cfg.is_file():
        from .fitsio import atomic_write_text
        atomic_write_text(cfg, 'instrument = "demo"\nraw = "raw/{utdate}"\nredux = "redux"\n'
                               'masters_store = "masters"\n\n[catalog]\npath = "raw/refcat.ecsv"\n')
    site = load_site(str(cfg))
    res = make_night_dir(site, DEMO_UTDATE, raw=raw, instrument="demo")
    _give_target_coordinates(res.path / "night.toml", where / "raw" / "truth" / "truth.json")
    for tasks in DEMO_TASKS:
        rc = run_doit(res.path, *tasks)
        if rc != 0:
            print(f"reducer demo: `doit {' '.join(tasks)}` failed (exit {rc}); see above", file=sys.stderr)
            return rc
    print(f"\ndemo done in {time.time() - t0:.0f} s. Results in {res.path}:")
    for p in sorted(res.path.iterdir()):
        if not p.name.startswith("."):
            print(f"  {p.name}")
    print(f"\nread {res.path / 'report.txt'}; open {res.path / 'finalreport.html'} in a browser")
    return 0
