"""Progress of a doit run in a night directory: a progress line and log files.

:class:`ProgressReporter` is the night's doit reporter (``DOIT_CONFIG['reporter']``). It
lives in doit's main process (``doit -n N`` workers send it their events), and it

- prints what doit's console reporter prints: ``.  TASK`` when a task starts, ``-- TASK``
  for an up-to-date task shown at verbosity 2 (``doit -v 2``; the night's default is to
  count them instead), ``!! TASK`` for an ignored one, each task's output (``print`` of the
  actions, shown when the task ends unless doit already showed it live), and every failure
  in full at the end;
- prints ``FAILED TASK: <one-line reason>`` as soon as a task fails;
- keeps a progress line on stderr, ``[done/total] elapsed  current task``: rewritten in place
  (``\\r``) when stderr is a terminal, a plain line every ``[doit] progress_interval``
  seconds (default 10) otherwise; the total grows while the run creates delayed tasks
  (``doit`` makes the science tasks once the masters exist) and shows a ``+`` until it is
  final;
- writes ``<night>/logs/doit-<run id>.log`` (everything above, with times; ``logs/latest.log``
  points to it) and appends one JSON object per task to ``<night>/logs/tasks.jsonl``:
  ``{"run", "task", "step", "status": "ok"|"fail"|"uptodate"|"ignored", "start", "seconds"}``
  (plus ``"reason"`` for a failure, or for a frame whose step recorded a failure). A run
  that executes nothing leaves its up-to-date tasks out of ``tasks.jsonl`` (``reducer
  watch`` runs ``doit science`` every few minutes; the log says how many there were).

The run id is the run's UTC start time in ISO 8601 basic format, e.g.
``20261120T051233.123Z``.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from doit.reporter import ConsoleReporter

LOG_DIR = "logs"
TASKS_JSONL = "tasks.jsonl"
LATEST = "latest.log"
DEFAULT_INTERVAL = 10.0

#: the night this process's dodo.py loaded (set by :func:`bind`)
_BOUND: dict = {"night_dir": None, "utdate": "", "interval": DEFAULT_INTERVAL}


def bind(night_dir, utdate: str = "", settings: dict | None = None) -> None:
    """Tell the reporter which night this doit process runs (called by ``night_tasks``)."""
    opts = (settings or {}).get("doit", {})
    _BOUND.update(night_dir=str(night_dir), utdate=utdate,
                  interval=float(opts.get("progress_interval", DEFAULT_INTERVAL)))


def run_id(t: datetime) -> str:
    """``20261120T051233.123Z``: a UTC time in ISO 8601 basic format, to the millisecond."""
    t = t.astimezone(timezone.utc)
    return t.strftime("%Y%m%dT%H%M%S.") + f"{t.microsecond // 1000:03d}Z"


def clock(seconds: float) -> str:
    """``0:01:23``."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def one_line(fail) -> str:
    """The one-line reason of a doit failure (the exception line, or the unmet dependency)."""
    from doit.exceptions import UnmetDependency
    if isinstance(fail, UnmetDependency):
        return f"not run: a task it needs failed or is ignored ({fail.message.strip()})"
    tb = "".join(fail.traceback) if fail.traceback else ""
    lines = [ln.strip() for ln in tb.splitlines() if ln.strip()]
    if lines:
        return lines[-1]
    msg = [ln.strip() for ln in str(fail.message).splitlines() if ln.strip()]
    return msg[0] if msg else fail.get_name()


def step_of(task_name: str) -> str:
    """The step of a task: its basename (``prepare:r123`` -> ``prepare``)."""
    return task_name.split(":", 1)[0]


class RunLog:
    """The human log and the task-timing log of one run (appended line by line, flushed,
    so a killed run leaves a readable log)."""

    def __init__(self, night_dir, rid: str):
        self.dir = Path(night_dir) / LOG_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"doit-{rid}.log"
        self.fh = open(self.path, "a", encoding="utf-8", buffering=1)
        self.jsonl = self.dir / TASKS_JSONL
        self._latest()

    def _latest(self) -> None:
        link = self.dir / LATEST
        tmp = self.dir / f".{LATEST}.{os.getpid()}"
        try:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(self.path.name, tmp)
            os.replace(tmp, link)
        except OSError:
            self.copy_latest = True
        else:
            self.copy_latest = False

    def write(self, text: str) -> None:
        stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
        for line in text.rstrip("\n").splitlines() or [""]:
            self.fh.write(f"{stamp} {line}\n")

    def records(self, recs: list[dict]) -> None:
        """Append task records to tasks.jsonl (one write per record: O_APPEND keeps lines
        whole when two runs of different nights share nothing but the habit)."""
        if not recs:
            return
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(r, sort_keys=False) + "\n")

    def close(self) -> None:
        self.fh.close()
        self._latest()          # again: a nested run (doit redo) pointed it to its own log
        if self.copy_latest:
            import shutil
            from .fitsio import atomic_write_bytes
            try:
                atomic_write_bytes(self.dir / LATEST, self.path.read_bytes())
            except OSError:
                shutil.copyfile(self.path, self.dir / LATEST)


class ProgressReporter(ConsoleReporter):
    """doit reporter of a night: progress line, doit's console output, log files."""

    desc = "reducer: progress line and night logs (logs/doit-<run>.log, logs/tasks.jsonl)"

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.err = sys.stderr
        self.live = bool(getattr(self.err, "isatty", lambda: False)()) and \
            os.environ.get("TERM", "") != "dumb"
        self.t0 = time.monotonic()
        self.started = datetime.now(timezone.utc)
        self.rid = run_id(self.started)
        self.night_dir = Path(_BOUND["night_dir"] or os.getcwd())
        self.interval = float(os.environ.get("REDUCER_PROGRESS_INTERVAL", _BOUND["interval"]))
        self.log = None
        self.tasks = {}
        self.selected = []
        self.reach: set = set()
        self.pending = False       # delayed task creators not yet run: the total may grow
        self.total = 0
        self.status: dict = {}     # task name -> ok / fail / uptodate / ignored
        self.running: dict = {}    # task name -> (monotonic start, ISO start)
        self.records: list = []
        self.frame_failures = 0
        self.not_run: set = set()
        self.last_plain = time.monotonic()     # the first plain line after one interval
        self.line_shown = False
        self.last_line = ""
        self.lock = threading.RLock()
        self.ticker = None
        self.done_flag = threading.Event()

    # ------------------------------------------------------------------ doit's interface
    def initialize(self, tasks, selected_tasks):
        self.tasks = tasks
        self.selected = list(selected_tasks or [])
        try:
            self.log = RunLog(self.night_dir, self.rid)
        except OSError as exc:
            self.err.write(f"reducer: cannot write the run log in {self.night_dir / LOG_DIR}: "
                           f"{exc.strerror}\n")
            self.log = None
        cmd = "doit " + " ".join(sys.argv[1:])
        self._log(f"reducer doit run {self.rid}: `{cmd.strip()}` (pid {os.getpid()} on "
                  f"{socket.gethostname()}) in {self.night_dir}")
        self._recount()

    def get_status(self, task):
        if task.name not in self.reach:
            self._recount()

    def execute_task(self, task):
        if task.name not in self.reach:
            self._recount()
        if self._counted(task):
            self.running[task.name] = (time.monotonic(), datetime.now(timezone.utc))
        if self.live and self.ticker is None:
            # started with the first task, not before: `doit -n N` forks its workers
            # before any task starts, and a fork must not copy a thread holding a lock
            self.ticker = threading.Thread(target=self._tick, daemon=True)
            self.ticker.start()
        if self._counted(task):
            self._out(f".  {task.title()}\n")
            self._log(f".  {task.name}")
        self._progress()

    def add_success(self, task):
        values = getattr(task, "values", None) or {}
        reason = values.get("failed") if isinstance(values, dict) else None
        self._finish(task, "ok", reason=reason)
        if reason:
            self.frame_failures += 1

    def add_failure(self, task, fail):
        reason = one_line(fail)
        ran = task.name in self.running
        if not ran and self._counted(task):
            self.not_run.add(task.name)
        self._finish(task, "fail", reason=reason)
        if fail.report:
            self.failures.append({"task": task, "exception": fail})
            self._out(f"FAILED {task.name}: {reason}\n")
            self._log(f"FAILED {task.name}: {reason}")
            if ran:
                self._log(fail.get_msg())

    def skip_uptodate(self, task):
        self._finish(task, "uptodate")
        if task.name[0] != "_" and (task.verbosity or 0) >= 2:
            self._out(f"-- {task.title()}\n")

    def skip_ignore(self, task):
        self._finish(task, "ignored")
        self._out(f"!! {task.title()}\n")
        self._log(f"!! {task.name} (ignored)")

    def cleanup_error(self, exception):
        self._clear()
        self.err.write(exception.get_msg())
        self._log(exception.get_msg())

    def runtime_error(self, msg):
        self.runtime_errors.append(msg)
        self._log(f"doit error: {msg}")

    def complete_run(self):
        self.done_flag.set()
        with self.lock:
            self._clear()
        for result in self.failures:
            task, fail = result["task"], result["exception"]
            if not getattr(task, "executed", False):
                continue
            block = [f"{'#' * 40}", f"{fail.get_name()} - taskid:{task.name}", fail.get_msg().rstrip()]
            out = "".join(a.out for a in task.actions if getattr(a, "out", None))
            err = "".join(a.err for a in task.actions if getattr(a, "err", None))
            if out and (task.verbosity or 0) < 2:
                block += [f"{task.name} <stdout>:", out.rstrip()]
            if err and (task.verbosity or 0) < 1:
                block += [f"{task.name} <stderr>:", err.rstrip()]
            self._out("\n".join(block) + "\n")
        if self.runtime_errors:
            self._out("#" * 40 + "\nExecution aborted.\n" + "\n".join(self.runtime_errors) + "\n")
        summary = self._summary()
        self.err.write(summary + "\n")
        self.err.flush()
        if self.log is not None:
            self._log(summary)
            executed = any(r["status"] in ("ok", "fail") for r in self.records)
            self.log.records(self.records if executed else
                             [r for r in self.records if r["status"] != "uptodate"])
            self.log.close()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _counted(task) -> bool:
        return bool(task.actions) and task.name[0] != "_"

    def _recount(self) -> None:
        """The tasks this run may execute: those reachable from the selected ones, now or
        before (a delayed creator replaces its placeholder by a group that no longer lists
        what the placeholder waited for, e.g. ``inventory``)."""
        seen, stack, pending = set(), list(self.selected), False
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            t = self.tasks.get(name)
            if t is None:
                continue
            deps = list(t.task_dep) + list(t.setup_tasks) + list(t.calc_dep)
            loader = t.loader
            if loader:
                if not loader.created:
                    pending = True
                if loader.task_dep:
                    deps.append(loader.task_dep)
            stack.extend(deps)
        self.reach |= seen
        self.pending = pending
        self.total = sum(1 for n in self.reach if n in self.tasks and self._counted(self.tasks[n]))

    def _finish(self, task, status: str, reason: str | None = None) -> None:
        if task.name not in self.reach:
            self._recount()
        start = self.running.pop(task.name, None)
        if not self._counted(task):      # group tasks (science, science:T): no actions
            self._progress()
            return
        self.status[task.name] = status
        now = datetime.now(timezone.utc)
        secs = time.monotonic() - start[0] if start else 0.0
        rec = {"run": self.rid, "task": task.name, "step": step_of(task.name), "status": status,
               "start": (start[1] if start else now).isoformat(timespec="milliseconds"),
               "seconds": round(secs, 3)}
        if reason:
            rec["reason"] = reason
        self.records.append(rec)
        if status in ("ok", "fail") and start is not None:
            out = "".join(a.out for a in task.actions if getattr(a, "out", None))
            err = "".join(a.err for a in task.actions if getattr(a, "err", None))
            if out and (task.verbosity or 0) < 2 and status == "ok":
                self._out(out if out.endswith("\n") else out + "\n")
            if err and (task.verbosity or 0) < 1 and status == "ok":
                self._clear()
                self.err.write(err if err.endswith("\n") else err + "\n")
            self._log(f"{status:4s} {task.name} ({secs:.1f} s)" + (f": {reason}" if reason else ""))
            if out:
                self._log("\n".join("    " + ln for ln in out.rstrip("\n").splitlines()))
            if err:
                self._log("\n".join("    stderr: " + ln for ln in err.rstrip("\n").splitlines()))
        self._progress()

    def _counts(self) -> tuple[int, int, int, int, int]:
        """(executed, failed while executing, not run for a failed dependency, up to date,
        ignored)."""
        ok = sum(1 for s in self.status.values() if s == "ok")
        fail = sum(1 for s in self.status.values() if s == "fail")
        up = sum(1 for s in self.status.values() if s == "uptodate")
        ign = sum(1 for s in self.status.values() if s == "ignored")
        notrun = len(self.not_run)
        return ok + fail - notrun, fail - notrun, notrun, up, ign

    def _line(self) -> str:
        done = len(self.status)
        total = max(self.total, done)
        cur = ""
        if self.running:
            name = max(self.running, key=lambda n: self.running[n][0])
            more = len(self.running) - 1
            cur = f"  {name}" + (f" (+{more} more)" if more else "")
        fail = sum(1 for s in self.status.values() if s == "fail")
        return (f"[{done}/{total}{'+' if self.pending else ''}] "
                f"{clock(time.monotonic() - self.t0)}{cur}"
                + (f"  {fail} failed" if fail else ""))

    def _progress(self) -> None:
        with self.lock:
            if self.live:
                if any((self.tasks[n].verbosity or 0) >= 2 for n in self.running
                       if n in self.tasks):
                    return          # a task is writing to the terminal: do not draw over it
                self._draw()
            elif self.interval >= 0 and time.monotonic() - self.last_plain >= self.interval:
                line = self._line()
                if line != self.last_line:
                    self.last_plain = time.monotonic()
                    self.last_line = line
                    self.err.write(f"progress {line}\n")
                    self.err.flush()

    def _draw(self) -> None:
        import shutil
        width = shutil.get_terminal_size((100, 20)).columns
        self.err.write("\r\033[K" + self._line()[: max(10, width - 1)])
        self.err.flush()
        self.line_shown = True

    def _clear(self) -> None:
        if self.live and self.line_shown:
            self.err.write("\r\033[K")
            self.err.flush()
            self.line_shown = False

    def _tick(self) -> None:
        while not self.done_flag.wait(1.0):
            with self.lock:
                if self.done_flag.is_set():
                    return
                if not any((self.tasks[n].verbosity or 0) >= 2 for n in list(self.running)
                           if n in self.tasks):
                    self._draw()

    def _out(self, text: str) -> None:
        with self.lock:
            self._clear()
            self.outstream.write(text)
            self.outstream.flush()

    def _log(self, text: str) -> None:
        if self.log is not None:
            self.log.write(text)

    def _summary(self) -> str:
        ran, fail, notrun, up, ign = self._counts()
        parts = [f"{ran} executed"]
        if fail:
            parts.append(f"{fail} failed")
        if notrun:
            parts.append(f"{notrun} not run (a task they need failed)")
        if up:
            parts.append(f"{up} up to date")
        if ign:
            parts.append(f"{ign} ignored")
        if self.frame_failures:
            parts.append(f"{self.frame_failures} recorded a frame failure (see above)")
        if self.running:
            parts.append(f"stopped while {len(self.running)} ran: "
                         + ", ".join(sorted(self.running)))
        night = _BOUND["utdate"] or self.night_dir.name
        where = ""
        if self.log is not None:
            try:
                where = f"; log {self.log.path.relative_to(Path.cwd())}"
            except ValueError:
                where = f"; log {self.log.path}"
        return (f"night {night}: {len(self.status)} tasks ({', '.join(parts)}) in "
                f"{clock(time.monotonic() - self.t0)}{where}")
