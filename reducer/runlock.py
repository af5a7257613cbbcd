"""The run lock of a night directory: two runs that build or change things never overlap.

A doit command that runs or alters tasks (``run``, ``clean``, ``forget``, ``ignore``,
``reset-dep``, ``auto``, ``strace`` ...) takes an exclusive :func:`fcntl.flock` on
``<night>/.reducer.lock`` while the night's ``dodo.py`` is loaded, and keeps it until the
process ends; read-only commands (``list``, ``info``, ``help``, ``dumpdb``,
``tabcompletion``) take nothing. The lock file holds who has it (pid, host, command, since
when) so a second run can say so. The kernel releases an flock when its holder dies, even
by ``kill -9``: a stale lock never blocks.

A run that starts another doit run in the same night (``doit redo:TARGET``, ``reducer
watch``) passes ``REDUCER_RUNLOCK_HELD=<pid of the holder>`` in the environment: the nested
run is let in when that pid really holds the lock now. Worker processes forked by
``doit -n N`` drop their copy of the lock descriptor (so orphaned workers of a killed run
cannot keep the night locked) and, carrying the variable, never wait for it.

How long a second run waits: ``[doit] lock_wait`` seconds (night.toml or reducer.toml;
``$REDUCER_LOCK_WAIT`` overrides it for scripts). The default, 0, refuses at once: a doit
run may last an hour, and a command silently queued behind it looks hung and then works on
a night that changed under it; the refusal names the holder so the observer knows what to
wait for. Automatic callers (``reducer watch``) set a wait.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = ".reducer.lock"
ENV_HELD = "REDUCER_RUNLOCK_HELD"
ENV_WAIT = "REDUCER_LOCK_WAIT"
#: doit commands that neither run nor alter tasks: no lock
READ_ONLY_COMMANDS = frozenset({"list", "info", "help", "dumpdb", "tabcompletion"})
#: doit's loader options (they may come before the command name) that take a value
_LOADER_OPTS_WITH_VALUE = frozenset({"-f", "--file", "-d", "--dir"})


class RunLocked(RuntimeError):
    """Another run holds the night's lock; the message is one line naming the holder."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a night's lock, as written in the lock file."""

    pid: int
    host: str
    command: str
    since: str          # ISO 8601 UTC

    def describe(self, now: datetime | None = None) -> str:
        """``pid 4711 on host 'obs1' runs `doit science` since 03:12:05 UTC (2 min ago)``."""
        try:
            t = datetime.fromisoformat(self.since)
        except ValueError:
            return f"pid {self.pid} on host {self.host!r} runs `{self.command}` since {self.since}"
        now = now or datetime.now(timezone.utc)
        return (f"pid {self.pid} on host {self.host!r} runs `{self.command}` since "
                f"{t.strftime('%Y-%m-%d %H:%M:%S')} UTC ({_age(now - t)} ago)")

    def text(self) -> str:
        return (f"pid {self.pid}\nhost {self.host}\ncommand {self.command}\n"
                f"since {self.since}\n")

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        vals = {}
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            vals[k] = v
        try:
            return cls(int(vals["pid"]), vals.get("host", "?"), vals.get("command", "?"),
                       vals.get("since", "?"))
        except (KeyError, ValueError):
            return None


def _age(delta) -> str:
    s = max(0, int(delta.total_seconds()))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s / 3600:.1f} h"


#: locks held by this process: resolved lock path -> open file
_HELD: dict = {}


def _drop_in_child() -> None:
    """After fork: the child does not hold the parent's lock (see the module docstring)."""
    for fh in _HELD.values():
        try:
            fh.close()
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_in_child)


def lock_path(night_dir) -> Path:
    return Path(night_dir) / LOCK_NAME


def read_holder(night_dir) -> Holder | None:
    """The holder written in the lock file (meaningful only while the lock is held)."""
    try:
        return Holder.parse(lock_path(night_dir).read_text())
    except OSError:
        return None


def _try_lock(path: Path):
    """An open file holding the exclusive lock, or ``None`` when another holds it."""
    import fcntl
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    except OSError:
        fh.close()
        raise
    return fh


def is_locked(night_dir) -> bool:
    """True when some process holds the night's lock now."""
    import fcntl
    path = lock_path(night_dir)
    if path.resolve() in _HELD:
        return True
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


def acquire(night_dir, command: str, *, wait: float = 0.0, notify=None,
            poll: float = 0.5) -> str:
    """Take the night's run lock for this process (kept until :func:`release` or exit).

    Parameters
    ----------
    night_dir : path
        The night directory.
    command : str
        What this process runs, written into the lock file (e.g. ``'doit science'``).
    wait : float
        Seconds to wait for another holder to finish; 0 refuses at once.
    notify : callable, optional
        Called with a one-line message when this run starts waiting (default: print to
        stderr).
    poll : float
        [s] interval between tries while waiting.

    Returns
    -------
    str
        ``'acquired'``, ``'held'`` (this process already holds it) or ``'nested'`` (the
        holder named by ``$REDUCER_RUNLOCK_HELD`` holds it: a run started by that run).

    Raises
    ------
    RunLocked
        Another run holds the lock (after ``wait`` seconds); one line naming the holder.
    """
    night_dir = Path(night_dir)
    path = lock_path(night_dir)
    key = path.resolve()
    if key in _HELD:
        return "held"
    notify = notify or (lambda msg: print(msg, file=sys.stderr, flush=True))
    env_pid = os.environ.get(ENV_HELD, "")
    deadline = time.monotonic() + max(0.0, float(wait))
    said = None
    while True:
        fh = _try_lock(path)
        if fh is not None:
            holder = Holder(os.getpid(), socket.gethostname(), command,
                            datetime.now(timezone.utc).isoformat(timespec="seconds"))
            fh.seek(0)
            fh.truncate()
            fh.write(holder.text())
            fh.flush()
            _HELD[key] = fh
            os.environ[ENV_HELD] = str(os.getpid())
            return "acquired"
        holder = _read_settled(night_dir)
        if holder is not None and env_pid and str(holder.pid) == env_pid:
            return "nested"
        who = holder.describe() if holder else "another process (no details in the lock file)"
        if time.monotonic() >= deadline:
            if wait > 0:
                raise RunLocked(f"night {night_dir.name} still busy after {wait:g} s: {who}; "
                                f"not starting")
            raise RunLocked(f"night {night_dir.name} is busy: {who}; not starting (wait for it "
                            f"to finish, or set [doit] lock_wait = SECONDS in night.toml to wait)")
        if who != said:
            left = deadline - time.monotonic()
            notify(f"night {night_dir.name} is busy: {who}; waiting up to {left:.0f} s "
                   f"for it to finish (Ctrl-C to give up)")
            said = who
        time.sleep(min(poll, max(0.01, deadline - time.monotonic())))


def _read_settled(night_dir) -> Holder | None:
    """The holder text, allowing the new holder a moment to write it."""
    for _ in range(5):
        h = read_holder(night_dir)
        if h is not None:
            return h
        time.sleep(0.02)
    return None


def release(night_dir) -> None:
    """Release the lock this process holds on the night (no-op when it holds none)."""
    import fcntl
    key = lock_path(night_dir).resolve()
    fh = _HELD.pop(key, None)
    if fh is None:
        return
    try:
        fh.seek(0)
        fh.truncate()
        fh.flush()
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()
    if os.environ.get(ENV_HELD) == str(os.getpid()):
        del os.environ[ENV_HELD]


class hold:
    """Context manager: hold the night's run lock around a block (for ``reducer watch`` and
    other callers outside doit). Nested doit runs started inside the block are let in.

    >>> with hold(night_dir, "reducer watch", wait=60):   # doctest: +SKIP
    ...     subprocess.run([sys.executable, "-m", "doit", "science"], cwd=night_dir)
    """

    def __init__(self, night_dir, command: str, *, wait: float = 0.0, notify=None):
        self.night_dir, self.command, self.wait, self.notify = night_dir, command, wait, notify
        self.state = None

    def __enter__(self):
        self.state = acquire(self.night_dir, self.command, wait=self.wait, notify=self.notify)
        return self

    def __exit__(self, *exc):
        if self.state == "acquired":
            release(self.night_dir)
        return False


# --------------------------------------------------------------------------- doit commands
def doit_command(argv: list[str]) -> str | None:
    """The doit command a command line runs (``'run'`` when none is named), or ``None`` when
    this process is not doit (e.g. a test importing a night's ``dodo.py``).

    Follows doit's own rule: loader options (``-f FILE``, ``-d DIR``, ``-k``) and
    ``NAME=VALUE`` variables may come first; then the first argument is the command if it
    is one, else the command is ``run``.
    """
    prog = Path(argv[0]).name if argv else ""
    parent = Path(argv[0]).parent.name if argv else ""
    if prog not in ("doit", "doit.exe") and not (prog == "__main__.py" and parent == "doit"):
        return None
    args = list(argv[1:])
    while args:
        a = args[0]
        if a in _LOADER_OPTS_WITH_VALUE:
            args = args[2:]
        elif a.startswith("--") and "=" in a and a.split("=", 1)[0] in _LOADER_OPTS_WITH_VALUE:
            args = args[1:]
        elif a in ("-k", "--seek-file"):
            args = args[1:]
        elif not a.startswith("-") and "=" in a:
            args = args[1:]          # a doit "global variable" NAME=VALUE
        else:
            break
    known = {"auto", "clean", "dumpdb", "forget", "help", "ignore", "info", "list", "reset-dep",
             "run", "strace", "tabcompletion"}
    return args[0] if args and args[0] in known else "run"


def builds(command: str | None) -> bool:
    """True for doit commands that execute tasks (they check free space first)."""
    return command in ("run", "auto")


def for_doit(night_dir, settings: dict, argv: list[str] | None = None) -> str | None:
    """Take the lock as the doit command in ``argv`` needs (called while ``dodo.py`` loads).

    Returns the state of :func:`acquire`, or ``None`` when no lock is needed.
    """
    argv = sys.argv if argv is None else argv
    cmd = doit_command(argv)
    if cmd is None or cmd in READ_ONLY_COMMANDS:
        return None
    wait = os.environ.get(ENV_WAIT)
    if wait is None:
        wait = settings.get("doit", {}).get("lock_wait", 0)
    try:
        wait = float(wait)
    except ValueError:
        raise RunLocked(f"${ENV_WAIT} must be a number of seconds, not {wait!r}") from None
    state = acquire(night_dir, "doit " + " ".join(argv[1:]) if len(argv) > 1 else "doit",
                    wait=wait)
    if state == "acquired":
        import atexit
        atexit.register(release, night_dir)     # an empty lock file once the run is over
        clean_stale_temporaries(night_dir)
    return state


def clean_stale_temporaries(night_dir) -> list[Path]:
    """Remove the temporary files a killed run left behind (``.<name>.<random>.tmp*`` of
    :func:`reducer.fitsio.atomic_path`) in the night directory and its folders; the raw link
    is never followed. Safe only while holding the lock (no other run is writing)."""
    import re
    pat = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp")
    root = Path(night_dir)
    removed = []
    folders = [root]
    try:
        folders += [Path(e.path) for e in os.scandir(root)
                    if e.is_dir(follow_symlinks=False) and e.name != "raw"]
    except OSError:
        return removed
    for d in folders:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.is_file(follow_symlinks=False) and pat.match(e.name):
                try:
                    os.unlink(e.path)
                    removed.append(Path(e.path))
                except OSError:
                    pass
    return removed
