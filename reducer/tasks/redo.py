"""doit task ``redo:TARGET``: forget and rebuild every product of one target.

The action removes the target's products from the night directory (its folder
``<night>/<TARGET>/`` with every prefix, failure records, field references and the prune
manifest ``.pruned.json``; ``stacks/<TARGET>_<filter>.*``; ``lightcurves/<TARGET>_<filter>.*``)
and then runs ``python -m doit science:TARGET`` in a subprocess in the night directory, then
``python -m doit report`` when the night has that task. Products missing from disk are what
makes doit rebuild them, so nothing has to be forgotten in doit's database: the nested run
records the new state itself, and the outer run writes only its own ``redo`` entry when it ends (doit's
sqlite3 backend keeps what a run changes in memory and commits once, at the end). The
nested run is let through the night's run lock by ``REDUCER_RUNLOCK_HELD``
(:mod:`reducer.runlock`); two ``redo`` actions of one run (``doit -n 2 redo:A redo:B``)
take turns. Other targets are never touched; afterwards ``doit science`` finds everything
up to date.
"""
from __future__ import annotations

from pathlib import Path

REDO_LOCK = ".reducer.redo.lock"


def target_products(night, target: str) -> list[Path]:
    """The paths ``redo`` removes for ``target`` (those that exist).

    Stack and light-curve files are matched by name (``<TARGET>_<filter>.<ext>``); files of
    another target whose name starts with ``<TARGET>_`` are never included.
    """
    from ..inventory import read_nightlog
    frames = read_nightlog(night.nightlog) if night.nightlog.is_file() else []
    # other targets whose names start with '<target>_' (e.g. 'M_81_B' next to 'M_81')
    longer = sorted({f.target for f in frames if f.target and f.target != target
                     and f.target.startswith(f"{target}_")})
    out = []
    folder = night.dir / target
    if _inside(night.dir, folder) and folder.is_dir() and not folder.is_symlink():
        out.append(folder)
    for sub in ("stacks", "lightcurves"):
        d = night.dir / sub
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if (p.name.startswith(f"{target}_") and p.is_file()
                    and not any(p.name.startswith(f"{o}_") for o in longer)):
                out.append(p)
    return out


def _inside(root: Path, p: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return p.resolve() != root.resolve()


def remove_products(night, target: str) -> tuple[int, int]:
    """Remove the target's products; returns (files, bytes) removed."""
    import shutil
    nfiles = nbytes = 0
    for p in target_products(night, target):
        if p.is_dir():
            for q in p.rglob("*"):
                if q.is_file():
                    nfiles += 1
                    nbytes += q.stat().st_size
            shutil.rmtree(p)
        else:
            nfiles += 1
            nbytes += p.stat().st_size
            p.unlink()
    return nfiles, nbytes


def run_redo(night_dir: str, target: str, also: list) -> object:
    """doit action: remove the target's products, then ``doit science:TARGET`` in a nested
    run. Returns a failure when the nested run fails."""
    import fcntl
    import os
    import subprocess
    import sys
    from doit.exceptions import TaskFailed
    from ..diskspace import human
    from ..night import Night
    night = Night(night_dir)
    # this run holds the night's lock and exported REDUCER_RUNLOCK_HELD (runlock.acquire):
    # the nested run inherits it and is let in
    env = dict(os.environ)
    with open(night.dir / REDO_LOCK, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        nfiles, nbytes = remove_products(night, target)
        print(f"redo {target}: removed {nfiles} files ({human(nbytes)}); rebuilding from the raw frames",
              flush=True)
        # the target first, then what is made from every target (report.txt), once the
        # target is done: in one run doit -n N would write the report meanwhile
        for args in ([f"science:{target}"], *([a] for a in also)):
            cmd = [sys.executable, "-m", "doit", *args]
            rc = subprocess.run(cmd, cwd=night.dir, env=env).returncode
            if rc != 0:
                return TaskFailed(f"redo {target}: `doit {' '.join(args)}` exited with status {rc}")
    print(f"redo {target}: done")
    return None


def make_task_generator(night, also=()):
    """``task_redo``: ``redo:TARGET`` for every target in the night log."""
    from .science import known_targets
    targets = known_targets(night)

    names = f" ({', '.join(targets)})" if targets else " (no targets yet)"

    def task_redo():
        yield {"basename": "redo", "name": None,
               "doc": "forget and rebuild every product of a target: doit redo:TARGET" + names}
        for t in targets:
            yield {"basename": "redo", "name": t,
                   "actions": [(run_redo, [str(night.dir), t, list(also)])],
                   "uptodate": [False],
                   # the nested run writes to the terminal itself
                   "verbosity": 2,
                   "doc": f"forget and rebuild every product of {t} from its raw frames"}

    task_redo.__doc__ = "Forget and rebuild a target's products: doit redo:TARGET" + names
    return task_redo
