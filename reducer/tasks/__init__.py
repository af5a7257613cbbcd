"""doit task generators of a night directory.

A night's ``dodo.py`` calls :func:`night_tasks` and puts what it returns into its globals:
``DOIT_CONFIG`` and one ``task_*`` generator per stage. Generators are cheap: they read the
night's settings and ``nightlog.ecsv`` (no pixels) so ``doit list`` stays fast; actions are
module-level functions (picklable for ``doit -n N``).
"""
from __future__ import annotations

from pathlib import Path

from ..config import DEFAULTS
from ..progress import ProgressReporter


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
        "num_process": int(d.get("num_process", DEFAULTS["doit"]["num_process"])),
        "par_type": "process",
        # task output is captured and shown by the reporter when each task ends (so the
        # progress line stays whole); `doit -v 2` shows it live as well
        "verbosity": 0,
        "reporter": ProgressReporter,
    }


def night_tasks(dodo_file) -> dict:
    """``DOIT_CONFIG`` and the ``task_*`` generators of the night holding ``dodo_file``."""
    from doit.exceptions import InvalidDodoFile
    from ..config import SettingsError
    from ..mastersky import master_settings
    from ..night import Night
    import os
    from . import calib, inventory, redo, reports, science
    try:
        # settings errors (and those the delayed generators would meet) in one line: doit
        # prints "ERROR: ..." and exits with status 3
        night = Night(Path(dodo_file))
        master_settings(night)
    except SettingsError as exc:
        raise InvalidDodoFile(str(exc)) from None
    command = _guard_run(night)
    # each doit process uses this many threads (OpenMP in astroscrappy, BLAS): with
    # num_process workers on the machine's cores, more only makes them fight
    threads = str(night.settings.get("doit", {}).get("threads", DEFAULTS["doit"]["threads"]))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, threads)
    out = {"DOIT_CONFIG": doit_config(night)}
    out["task_inventory"] = inventory.make_task_generator(night)
    out["task_calib"] = calib.make_task_generator(night)
    if command in ALL_TASKS_NOW:
        out["task_science"] = science.make_task_generator(night)
    else:
        # one generator per delayed basename, so that `doit list` shows each one's doc
        out.update(science.make_task_generators(night))
    out.update(reports.make_task_generators(night))
    out["task_redo"] = redo.make_task_generator(
        night, also=["report"] if "task_report" in out else [])
    if command in ALL_TASKS_NOW:
        # doit makes delayed tasks (create_after) only while running: without this, `doit
        # info prepare:X`, `doit forget stack:T_r` or `doit clean science:T` would not find
        # them; these commands run nothing, so the generators can run at once
        for gen in out.values():
            if callable(gen) and hasattr(gen, "doit_create_after"):
                del gen.doit_create_after
    return out


#: doit commands that name tasks without running them: every task is made when they load
ALL_TASKS_NOW = frozenset({"info", "clean", "forget", "ignore", "reset-dep", "strace"})


def _guard_run(night) -> str | None:
    """Before the tasks of a doit command are made: tell the reporter the night, take the
    run lock (commands that run or alter tasks: :mod:`reducer.runlock`), and check the free
    space when the command builds things (:mod:`reducer.diskspace`). A refusal is one line
    (doit prints ``ERROR: ...`` and exits with status 3). Returns the doit command."""
    import sys
    from doit.exceptions import InvalidDodoFile
    from .. import progress, runlock
    from ..diskspace import DiskFull, check_before_run
    progress.bind(night.dir, night.utdate, night.settings)
    command = runlock.doit_command(sys.argv)
    try:
        state = runlock.for_doit(night.dir, night.settings)
        if state is not None and runlock.builds(command):
            warning = check_before_run(night)
            if warning:
                print(f"reducer: {warning}", file=sys.stderr, flush=True)
    except (runlock.RunLocked, DiskFull) as exc:
        raise InvalidDodoFile(str(exc)) from None
    return command
