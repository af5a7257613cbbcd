"""The project's own chores as doit tasks: `doit list` in the repository root.

    doit test          run the test suite
    doit demo          simulate a night and reduce it (in ./demo)
    doit bench         run every benchmark under bench/ (prints the figures)
    doit bench:NAME    one benchmark, e.g. doit bench:combine
"""
import sys
from pathlib import Path

DOIT_CONFIG = {"default_tasks": ["test"], "backend": "sqlite3", "dep_file": ".doit-project.db",
               "verbosity": 2}
PY = sys.executable


def task_test():
    """Run the test suite (pytest, 2 workers)."""
    return {"actions": [f"{PY} -m pytest -n 2 -q"], "uptodate": [False]}


def task_demo():
    """Simulate a night and reduce it in ./demo."""
    return {"actions": [f"{PY} -m reducer.cli demo demo"], "uptodate": [False]}


def task_bench():
    """Benchmarks under bench/ (reducer vs the library a user would otherwise pick)."""
    for script in sorted(Path("bench").glob("*.py")):
        yield {"name": script.stem, "actions": [f"{PY} {script}"], "uptodate": [False],
               "doc": f"benchmark {script.stem}"}
