"""doit task generators of a night directory.

A night's ``dodo.py`` calls :func:`night_tasks` and puts what it returns into its globals:
``DOIT_CONFIG`` and one ``task_*`` generator per stage. Generators are cheap: they read the
night's settings and ``nightlog.ecsv`` (no pixels) so ``doit list`` stays fast; actions are
module-level functions (picklable for ``doit -n N``).
"""
from __future__ import annotations

from pathlib import Path


def doit_config(night) -> dict:
    """doit settings for every night: sqlite3 state, timestamps for file checks."""
    d = night.settings.get("doit", {})
    return {
        "backend": "sqlite3",
        "dep_file": str(night.dir / ".doit.db"),
        "check_file_uptodate": "timestamp",
        "default_tasks": ["science"],
        # one frame failing never stops the night: what does not depend on it goes on
        "continue": True,
        "num_process": int(d.get("num_process", 1)),
        "par_type": "process",
        "verbosity": 2,
    }


def night_tasks(dodo_file) -> dict:
    """``DOIT_CONFIG`` and the ``task_*`` generators of the night holding ``dodo_file``."""
    from ..night import Night
    import os
    from . import calib, inventory, science
    night = Night(Path(dodo_file))
    # each doit process uses this many threads (OpenMP in astroscrappy, BLAS): with
    # num_process workers on the machine's cores, more only makes them fight
    threads = str(night.settings.get("doit", {}).get("threads", 1))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, threads)
    out = {"DOIT_CONFIG": doit_config(night)}
    out["task_inventory"] = inventory.make_task_generator(night)
    out["task_calib"] = calib.make_task_generator(night)
    out["task_science"] = science.make_task_generator(night)
    return out
