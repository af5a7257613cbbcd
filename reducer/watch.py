"""Automatic mode: ``reducer watch [UTDATE]`` reduces a night while it is observed.

The loop (seed 004's automated operations):

1. Poll the night's raw folder every ``[watch] poll_seconds`` (portable: no inotify).
2. A new or changed file waits until it has *settled*: its size and modification time
   unchanged for ``settle_seconds`` of watching (or, for a file already old when first
   seen, across two polls with its modification time ``settle_seconds`` in the past).
3. When every new file has settled, run ``doit science`` in the night directory (a
   subprocess, output streamed) under the night's run lock (:mod:`reducer.runlock`; when
   an observer's own doit run holds it, the batch waits for the next poll). The task
   generators build tonight's masters once enough calibration frames are in and fall back
   to the registry until then.
4. Stop when the night is over (``stop_at``: ``sunrise``, ``twilight`` -- the Sun back at
   -12 deg in the morning --, a local ``HH:MM``, or ``""`` for none) or after
   ``idle_minutes`` without a new frame since the last one came or the last run ended
   (0: never); then a last ``doit science`` if frames came since the previous one, and
   ``doit finalreport``.
5. SIGTERM or Ctrl-C: the running doit (its whole process group) gets SIGINT, which doit
   handles by finishing its bookkeeping; a second signal sends SIGTERM, a third SIGKILL.
   Products are written atomically, so nothing is ever half written; the next ``doit
   science`` finishes the night. Exit status 0, one line saying what was interrupted.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

#: temporary names of files still being copied (rsync, browsers, scp tools): not frames yet
_PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".filepart", ".crdownload")


class WatchError(ValueError):
    """Bad ``[watch]`` settings; the message is one line."""


@dataclass(frozen=True)
class WatchSettings:
    """``[watch]`` settings (see :mod:`reducer.config`)."""

    poll_seconds: float = 10.0
    settle_seconds: float = 30.0
    idle_minutes: float = 0.0
    stop_at: str = "sunrise"


def watch_settings(settings: dict) -> WatchSettings:
    """The ``[watch]`` table of a night's resolved settings, checked.

    Raises
    ------
    WatchError
        A non-positive poll interval, a negative time, or a ``stop_at`` that is none of
        ``sunrise``, ``twilight``, ``HH:MM`` or empty.
    """
    w = {**WatchSettings().__dict__, **settings.get("watch", {})}
    ws = WatchSettings(float(w["poll_seconds"]), float(w["settle_seconds"]),
                       float(w["idle_minutes"]), str(w["stop_at"]).strip())
    if ws.poll_seconds <= 0:
        raise WatchError(f"[watch] poll_seconds must be > 0, not {ws.poll_seconds:g}")
    for key in ("settle_seconds", "idle_minutes"):
        if getattr(ws, key) < 0:
            raise WatchError(f"[watch] {key} must be >= 0, not {getattr(ws, key):g}")
    if ws.stop_at not in ("", "sunrise", "twilight"):
        _parse_hhmm(ws.stop_at)
    return ws


def _parse_hhmm(text: str) -> tuple[int, int]:
    try:
        t = datetime.strptime(text, "%H:%M")
    except ValueError:
        raise WatchError(f"[watch] stop_at is {text!r}; allowed: 'sunrise', 'twilight', a local "
                         f"time 'HH:MM', or '' (no stop time)") from None
    return t.hour, t.minute


def stop_time(utdate: str, site, stop_at: str) -> datetime | None:
    """When the night labelled ``utdate`` is over, as an aware UTC datetime.

    Parameters
    ----------
    utdate : str
        Night label ``YYYYMMDD`` (:mod:`reducer.nights`).
    site : reducer.instruments.Site
    stop_at : str
        ``'sunrise'`` (the Sun's upper limb rising: altitude -0.833 deg), ``'twilight'``
        (morning nautical twilight: altitude -12 deg, rising), ``'HH:MM'`` (site's local
        civil time, the first such time after the night's local noon start) or ``''``
        (``None``: no stop time).
    """
    from .nights import night_bounds
    if not stop_at:
        return None
    start, end = night_bounds(utdate, site)
    if stop_at in ("sunrise", "twilight"):
        return _sun_rising(start, end, site, -0.833 if stop_at == "sunrise" else -12.0)
    from zoneinfo import ZoneInfo
    hh, mm = _parse_hhmm(stop_at)
    local = start.astimezone(ZoneInfo(site.timezone))
    t = local.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if t <= local:
        t = (local + timedelta(days=1)).replace(hour=hh, minute=mm, second=0, microsecond=0)
    return t.astimezone(timezone.utc)


def _sun_rising(start: datetime, end: datetime, site, altitude: float) -> datetime:
    """The last time between ``start`` and ``end`` the Sun rises through ``altitude`` [deg]
    (2-minute grid, linear interpolation; good to a few seconds)."""
    import numpy as np
    from astropy.coordinates import AltAz, get_sun
    from astropy.time import Time
    from .fitsio import astropy_offline
    astropy_offline()
    t0 = start.timestamp()
    grid = np.arange(t0, end.timestamp() + 1.0, 120.0)
    tt = Time(grid, format="unix")
    alt = get_sun(tt).transform_to(AltAz(obstime=tt, location=site.earth_location())).alt.deg
    a = alt - altitude
    up = np.nonzero((a[:-1] < 0) & (a[1:] >= 0))[0]
    if up.size == 0:
        raise WatchError(f"the Sun does not rise through {altitude:g} deg on night "
                         f"{start:%Y-%m-%d} at this site: set [watch] stop_at = 'HH:MM'")
    k = up[-1]
    ts = grid[k] + (grid[k + 1] - grid[k]) * (0 - a[k]) / (a[k + 1] - a[k])
    return datetime.fromtimestamp(float(ts), timezone.utc)


# --------------------------------------------------------------------------- the raw folder
class RawWatcher:
    """New and changed files of a raw folder, and whether they have settled.

    Parameters
    ----------
    raw_dir : Path
    settle_seconds : float
        [s] how long a file's (size, mtime) must stay unchanged.
    clock : callable
        Returns the time [s] (``time.time``); given for tests.
    """

    def __init__(self, raw_dir: Path, settle_seconds: float, clock=time.time):
        self.raw_dir = Path(raw_dir)
        self.settle = float(settle_seconds)
        self.clock = clock
        self.seen: dict = {}        # name -> [signature, first seen with it, polls seen]
        self.done: dict = {}        # name -> signature handed to doit
        self.last_change = clock()

    def poll(self) -> None:
        """Look at the folder once."""
        from .inventory import is_candidate
        now = self.clock()
        current = {}
        try:
            entries = list(os.scandir(self.raw_dir))
        except FileNotFoundError:
            entries = []
        for e in entries:
            if e.name.endswith(_PARTIAL_SUFFIXES) or not is_candidate(Path(e.path)):
                continue
            try:
                st = e.stat()
            except FileNotFoundError:
                continue               # gone between listing and stat
            current[e.name] = (st.st_size, st.st_mtime_ns)
        for name, sig in current.items():
            old = self.seen.get(name)
            if old is None or old[0] != sig:
                self.seen[name] = [sig, now, 1]
                if self.done.get(name) != sig:
                    self.last_change = now
            else:
                old[2] += 1
        for name in set(self.seen) - set(current):
            del self.seen[name]
            if name in self.done:
                del self.done[name]
                self.last_change = now

    def pending(self) -> list:
        """Files new or changed since they were last handed to doit."""
        return sorted(n for n, (sig, _, _) in self.seen.items() if self.done.get(n) != sig)

    def settled(self, name: str) -> bool:
        sig, first, polls = self.seen[name]
        now = self.clock()
        if now - first >= self.settle:
            return True
        return polls >= 2 and now - sig[1] / 1e9 >= self.settle

    def take(self) -> list:
        """Mark the pending files as handed to doit; returns them."""
        names = self.pending()
        for n in names:
            self.done[n] = self.seen[n][0]
        return names


# --------------------------------------------------------------------------- signals
class _Signals:
    """SIGTERM / SIGINT: remember the first, pass each on to the running doit's group."""

    ESCALATE = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)

    def __init__(self):
        self.got: str | None = None
        self.count = 0
        self.child: subprocess.Popen | None = None

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.got = self.got or signal.Signals(signum).name
        child = self.child
        if child is not None and child.poll() is None:
            sig = self.ESCALATE[min(self.count, len(self.ESCALATE) - 1)]
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                pass
        self.count += 1

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.got is None and time.monotonic() < end:
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))


def _wait_group(pgid: int, timeout: float = 30.0) -> None:
    """Wait until no process of group ``pgid`` is left (SIGKILL after ``timeout`` s)."""
    end = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > end:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return
            end = time.monotonic() + timeout
        time.sleep(0.1)


def remove_temporaries(night_dir) -> int:
    """Remove the temporary files of :func:`reducer.fitsio.atomic_path` (``.NAME.XXXX.tmp*``)
    under a night directory (never following links: raw/ is not looked at). Only safe while
    holding the night's run lock, with no doit run going on. Returns how many were removed.

    doit, interrupted, terminates its worker processes; one killed while writing a product
    leaves its temporary file (the product itself is never half written: it is renamed
    into place only when complete).
    """
    n = 0
    for folder, dirs, files in os.walk(night_dir):
        for f in files:
            if f.startswith(".") and ".tmp" in f:
                Path(folder, f).unlink(missing_ok=True)
                n += 1
    return n


# --------------------------------------------------------------------------- the loop
class Watch:
    """One ``reducer watch`` session on a night directory (see the module docstring)."""

    def __init__(self, night_dir, out=None):
        from .night import Night
        self.night = Night(night_dir)
        self.ws = watch_settings(self.night.settings)
        self.out = out or (lambda msg: print(msg, flush=True))
        self.signals = _Signals()
        self.interrupted: str | None = None     # the doit command a signal interrupted
        self.runs = 0
        self._busy = None                        # the last "night busy" message said

    def say(self, msg: str) -> None:
        self.out(f"watch {self.night.utdate}: {msg}")

    # ---------------------------------------------------------------- doit
    def doit(self, *args: str, announce: str = "") -> int | None:
        """Run ``python -m doit ARGS`` in the night directory under the run lock, output
        streamed (``announce`` said first); its exit status, or ``None`` when another run
        holds the lock (said once per holder)."""
        from .runlock import RunLocked, hold
        try:
            with hold(self.night.dir, "reducer watch: doit " + " ".join(args)):
                self._busy = None
                if self.signals.got:
                    return None                  # stopping: start nothing
                if announce:
                    self.say(announce)
                t0 = time.monotonic()
                # the lock's holder pid is in the environment: the doit child is let in
                child = subprocess.Popen([sys.executable, "-m", "doit", *args],
                                         cwd=self.night.dir, env=dict(os.environ),
                                         start_new_session=True)
                self.signals.child = child
                if self.signals.got:             # a signal came while it was starting
                    os.killpg(child.pid, signal.SIGINT)
                try:
                    rc = child.wait()
                finally:
                    self.signals.child = None
                if self.signals.got:
                    # still holding the lock: let the run's workers end, then remove what
                    # they were writing when doit terminated them
                    _wait_group(child.pid)
                    n = remove_temporaries(self.night.dir)
                    if n:
                        self.say(f"removed {n} temporary file(s) the interrupted run was writing")
        except RunLocked as exc:
            from .runlock import read_holder
            holder = read_holder(self.night.dir)         # said once per holder
            key = (holder.pid, holder.since) if holder else str(exc)
            if key != self._busy:
                self.say(f"{exc}; trying again every {self.ws.poll_seconds:g} s")
                self._busy = key
            return None
        self.runs += 1
        if self.signals.got:
            self.interrupted = "doit " + " ".join(args)
        elif rc != 0:
            self.say(f"doit {' '.join(args)} ended with status {rc} in {time.monotonic() - t0:.0f} s "
                     f"(failed tasks are tried again with the next frames; see above and logs/)")
        else:
            self.say(f"doit {' '.join(args)} done in {time.monotonic() - t0:.0f} s")
        return rc

    def has_task(self, name: str) -> bool:
        """True when ``doit list`` in the night names the task ``name``."""
        r = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=self.night.dir,
                           capture_output=True, text=True, env=dict(os.environ))
        return any(line.split()[:1] == [name] for line in r.stdout.splitlines())

    # ---------------------------------------------------------------- loop
    def run(self) -> int:
        ws, sig = self.ws, self.signals
        sig.install()
        end = stop_time(self.night.utdate, self.night.profile.site, ws.stop_at)
        watcher = RawWatcher(self.night.raw_dir, ws.settle_seconds)
        limits = []
        if end is not None:
            from zoneinfo import ZoneInfo
            local = end.astimezone(ZoneInfo(self.night.profile.site.timezone))
            limits.append(f"at {ws.stop_at} {local:%Y-%m-%d %H:%M %Z}")
        if ws.idle_minutes > 0:
            limits.append(f"after {ws.idle_minutes:g} min without new frames")
        self.say(f"watching {self.night.raw_dir} every {ws.poll_seconds:g} s (files settle "
                 f"{ws.settle_seconds:g} s); stops {' or '.join(limits) or 'on SIGTERM/Ctrl-C only'}")
        reason = None
        while sig.got is None:
            watcher.poll()
            pend = watcher.pending()
            if pend and all(watcher.settled(n) for n in pend):
                if self._science(watcher, pend) is None:
                    sig.sleep(ws.poll_seconds)
                    continue
                if sig.got:
                    break
                continue          # look again at once: frames may have come during the run
            now = datetime.now(timezone.utc)
            if end is not None and now >= end:
                reason = f"night over ({ws.stop_at} {end:%H:%M} UTC)"
                break
            if (ws.idle_minutes > 0 and not pend
                    and time.time() - watcher.last_change >= ws.idle_minutes * 60):
                reason = f"no new frames for {ws.idle_minutes:g} min"
                break
            sig.sleep(ws.poll_seconds)
        if sig.got is None:
            self._finish(watcher, reason)
        if sig.got:
            what = (f"{self.interrupted} interrupted, products so far kept; the next `doit "
                    f"science` finishes the night" if self.interrupted else "no doit run was going on")
            self.say(f"stopped by {sig.got}: {what}")
        return 0

    def _science(self, watcher: RawWatcher, pend: list) -> int | None:
        shown = ", ".join(pend[:4]) + (f" and {len(pend) - 4} more" if len(pend) > 4 else "")
        watcher.take()
        rc = self.doit("science", announce=f"{len(pend)} new or changed frame(s) ({shown}): "
                                           f"doit science")
        # the idle time counts from the end of the last run too (a run may outlast it)
        watcher.last_change = max(watcher.last_change, time.time())
        if rc is None:
            for n in pend:                       # not run: hand them over next time
                watcher.done.pop(n, None)
        return rc

    def _finish(self, watcher: RawWatcher, reason: str) -> None:
        """End of the night: the last frames (waiting for them to settle), the final report."""
        sig = self.signals
        self.say(f"{reason}: last frames and the final report")
        deadline = time.monotonic() + self.ws.settle_seconds + 2 * self.ws.poll_seconds
        while sig.got is None:
            watcher.poll()
            pend = watcher.pending()
            if not pend:
                break
            if all(watcher.settled(n) for n in pend) or time.monotonic() > deadline:
                if self._science(watcher, pend) is not None:
                    continue
            sig.sleep(self.ws.poll_seconds)
        if sig.got:
            return
        if not self.has_task("finalreport"):
            self.say("this night has no finalreport task (reducer without the end-of-night "
                     "report): skipped")
            return
        while sig.got is None:
            if self.doit("finalreport", announce="doit finalreport") is not None:
                break
            sig.sleep(self.ws.poll_seconds)
        if sig.got is None:
            self.say(f"done after {self.runs} doit run(s)")


def run_watch(night_dir, out=None) -> int:
    """Watch a night directory until the night is over; see :mod:`reducer.watch`."""
    return Watch(night_dir, out=out).run()
