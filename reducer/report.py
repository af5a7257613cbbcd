"""``report.txt``: the night at a glance, one row per target and filter (SEDM style).

Built from a :class:`reducer.nightsummary.NightSummary` (headers, sidecars and the night log;
no pixels), so ``doit science`` can rewrite it after every run. Sections:

1. one row per target and filter, in order of the first exposure: UT start, object, kind
   (``sci``/``std``), filter, frames used / rejected, total exposure of the frames used,
   airmass range, median FWHM (arcsec), median sky level (e-/s/px), median zero point,
   5-sigma limiting magnitude of the stack of the frames used (see
   :mod:`reducer.nightsummary`), the target's magnitude and error from the stack, and a flag:
   ``OK`` (every frame used), ``PART`` (some frames failed or rejected), ``FAIL`` (none
   usable), ``WAIT`` (frames still going through the chain); ``i`` after a magnitude marks
   an instrumental (uncalibrated) magnitude, ``r`` after a zero point, limit or magnitude
   one relative to the target's reference frame (no catalogue: :mod:`reducer.fieldref`);
2. zero points per filter, standards beside science frames;
3. the calibrations used (tonight's, pinned, or a fallback with its night and age) and the
   masters built tonight with their verification;
4. every frame set aside (inventory, ``night.toml`` drop), failed or rejected, with its
   one-line reason; frames still on their way; light curves.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .nightsummary import NightSummary, _finite, combined_limit

REPORT_NAME = "report.txt"


@dataclass
class TargetRow:
    """One target in one filter."""

    target: str
    object: str
    kind: str
    filter: str
    ut_start: str
    mjd_start: float
    n_used: int
    n_rejected: int
    n_pending: int
    exptime: float
    airmass: tuple
    fwhm: float
    sky_rate: float
    zp: float
    lim5: float
    mag: float = math.nan
    mag_err: float = math.nan
    calibrated: bool = False
    relative: bool = False    # ZP, limit and magnitude relative to the reference frame
    flag: str = ""
    note: str = ""
    frames: list = field(default_factory=list)


def _median(values) -> float:
    v = [x for x in values if _finite(x)]
    return statistics.median(v) if v else math.nan


def stack_name(target: str, filt: str) -> str:
    """The stack's file stem of a target and filter (as :mod:`reducer.tasks.science` names it)."""
    from .inventory import safe_name
    return f"{target}_{safe_name(filt)}"


def target_rows(summary: NightSummary) -> list[TargetRow]:
    """One :class:`TargetRow` per target and filter, in order of the first exposure."""
    rows = []
    for (target, filt), frames in summary.groups():
        used = [f for f in frames if f.status == "ok"]
        bad = [f for f in frames if f.status in ("failed", "rejected")]
        pending = [f for f in frames if f.status == "pending"]
        basis = used or [f for f in frames if f.status == "rejected"]
        am = [f.airmass for f in frames if _finite(f.airmass)]
        first = frames[0]
        row = TargetRow(
            target=target, object=first.object, kind="std" if first.kind == "standard" else "sci",
            filter=filt, ut_start=first.ut, mjd_start=first.mjd, n_used=len(used),
            n_rejected=len(bad), n_pending=len(pending),
            exptime=sum(f.exptime for f in used if _finite(f.exptime)),
            airmass=(min(am), max(am)) if am else (math.nan, math.nan),
            fwhm=_median(f.fwhm for f in basis), sky_rate=_median(f.sky_rate for f in basis),
            zp=_median(f.zp for f in basis), lim5=combined_limit(f.lim5 for f in used),
            frames=frames, relative=any(f.relative for f in basis))
        st = summary.stacks.get(stack_name(target, filt))
        if st is not None:
            row.mag, row.mag_err, row.calibrated = st.mag, st.mag_err, st.calibrated
            row.relative = row.relative or st.relative
            # a standard field has no target of its own: only say why nothing was stacked
            if not _finite(st.mag) and (row.kind == "sci" or not used):
                row.note = st.reason or "no target magnitude"
            elif _finite(st.mag_err) and st.mag_err > 1.0857 / 5:
                row.note = f"target at {1.0857 / st.mag_err:.1f} sigma only (below 5 sigma)"
        elif used and summary.final_step == "t":
            row.note = "not stacked yet"
        if not used:
            row.flag = "WAIT" if pending else "FAIL"
        elif pending:
            row.flag = "WAIT"
        elif bad:
            row.flag = "PART"
        else:
            row.flag = "OK"
        rows.append(row)
    return rows


def zero_points(summary: NightSummary) -> list[dict]:
    """Per filter: median zero point, its scatter and count, for standards and science frames."""
    out: dict = {}
    for f in summary.frames:
        if f.status != "ok" or not _finite(f.zp) or f.relative:
            continue
        d = out.setdefault(f.filter, {"filter": f.filter, "standard": [], "science": []})
        d["standard" if f.kind == "standard" else "science"].append(f)
    rows = []
    for filt, d in sorted(out.items()):
        row = {"filter": filt}
        for kind in ("standard", "science"):
            fr = d[kind]
            zps = [f.zp for f in fr]
            if not zps:
                row[kind] = None
                continue
            scatter = statistics.stdev(zps) if len(zps) > 1 else (fr[0].zp_err if _finite(fr[0].zp_err) else math.nan)
            row[kind] = {"zp": statistics.median(zps), "scatter": scatter, "n": len(zps)}
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- formatting
def _f(v, fmt: str, width: int) -> str:
    """A number formatted, or '-' for a missing one, right-aligned in ``width``."""
    return (format(v, fmt) if _finite(v) else "-").rjust(width)


_CTRL = re.compile(r"[\x00-\x1f\x7f]")


def clean_text(text: str, width: int | None = None) -> str:
    """Text for a fixed-width report: control characters shown as '?', cut to ``width``."""
    t = _CTRL.sub("?", str(text))
    if width is not None and len(t) > width:
        t = t[: width - 1] + "~"
    return t


def failure_text(why: str) -> str:
    """``'zeropoint: failed earlier at astrometry: X'`` -> ``'astrometry: X'``."""
    m = re.match(r"^\w+: failed earlier at (\w+): (.*)$", why)
    return f"{m.group(1)}: {m.group(2)}" if m else why


ROW_HEADER = "{:8s}  {:20s} {:3s} {:8s} {:>8s} {:>7s} {:>11s} {:>5s} {:>8s} {:>6s} {:>6s} {:>7s}  {:>5s}  Flag".format(
    "UT start", "Object", "Typ", "Filt", "Used/Rej", "Exp(s)", "Airmass", 'FWHM"', "Sky e/s", "ZP",
    "Lim5s", "Mag", "±")


def format_row(r: TargetRow) -> str:
    am = (f"{r.airmass[0]:.2f}-{r.airmass[1]:.2f}" if _finite(r.airmass[0]) else "-").rjust(11)
    mag = _f(r.mag, ".3f", 7) + (mark(r) if _finite(r.mag) else " ")
    def rel(v):
        return "r" if r.relative and _finite(v) else " "
    used = f"{r.n_used}/{r.n_rejected}".rjust(8)
    return (f"{r.ut_start[:8]:8s}  {clean_text(r.object, 20):20s} {r.kind:3s} "
            f"{clean_text(r.filter, 8):8s} {used} {_f(r.exptime, '.1f', 7)} {am} "
            f"{_f(r.fwhm, '.2f', 5)} {_f(r.sky_rate, '.2f', 8)} {_f(r.zp, '.3f', 6)}{rel(r.zp)}"
            f"{_f(r.lim5, '.2f', 6)}{rel(r.lim5)}{mag} {_f(r.mag_err, '.3f', 5)}  {r.flag}")


def mark(r) -> str:
    """Suffix of a magnitude: ``r`` relative to the target's reference frame (no catalogue),
    ``i`` instrumental, nothing when calibrated."""
    return " " if r.calibrated else ("r" if r.relative else "i")


def _age(u) -> str:
    if u.origin != "fallback":
        return ""
    return f"{abs(u.age_days):.1f} d {'before' if u.age_days >= 0 else 'after'}"


def format_report(summary: NightSummary, *, written: str = "", version: str = "") -> str:
    """The text of ``report.txt``."""
    rows = target_rows(summary)
    L = []
    L.append(f"reducer night report: {summary.night}  instrument {summary.instrument}")
    L.append(f"night directory {summary.dir}")
    if written:
        L.append(f"written {written}{' by reducer ' + version if version else ''}")
    nsci = sum(1 for f in summary.frames if f.kind == "science")
    nstd = len(summary.frames) - nsci
    status = {}
    for f in summary.frames:
        status[f.status] = status.get(f.status, 0) + 1
    L.append(f"{summary.total_frames} raw frames: {nsci} science, {nstd} standard "
             f"({', '.join(f'{n} {s}' for s, n in sorted(status.items())) or 'none processed'}), "
             f"{len(summary.set_aside)} set aside")
    L.append("")
    L.append("Targets (Used/Rej: frames in the stack / failed or rejected; Exp: exposure used;")
    L.append("  Sky: median e-/s/px; ZP: median zero point, m = -2.5 log10(e-/s) + ZP;")
    L.append("  Lim5s: 5-sigma point-source limit of the stack; Mag: target in the stack;")
    L.append("  i = instrumental, r = relative to the target's reference frame: no catalogue)")
    L.append(ROW_HEADER)
    L.append("-" * len(ROW_HEADER))
    if not rows:
        L.append("(no science or standard frames yet)")
    for r in rows:
        L.append(format_row(r))
    notes = [(r, r.note) for r in rows if r.note]
    if notes:
        L.append("")
        for r, note in notes:
            L.append(f"  {clean_text(r.object, 30)} {clean_text(r.filter, 8)}: {clean_text(note, 90)}")
    # zero points
    L.append("")
    L.append("Zero points by filter (median, scatter, frames): standards beside science frames")
    zrows = zero_points(summary)
    if not zrows:
        L.append("  (no calibrated frame)")
    else:
        L.append(f"  {'Filt':8s} {'Standards':>24s} {'Science':>24s} {'Std-Sci':>8s}")

        def cell(d):
            if d is None:
                return "-".rjust(24)
            return f"{d['zp']:.3f} ±{_f(d['scatter'], '.3f', 5).strip()} ({d['n']})".rjust(24)
        for z in zrows:
            diff = (z["standard"]["zp"] - z["science"]["zp"]) if z["standard"] and z["science"] else math.nan
            L.append(f"  {clean_text(z['filter'], 8):8s} {cell(z['standard'])} {cell(z['science'])} "
                     f"{_f(diff, '+.3f', 8)}")
    # calibrations
    L.append("")
    L.append("Calibrations used")
    if not summary.uses:
        L.append("  (none recorded yet)")
    else:
        tonight = {Path(m.file).name: m for m in summary.masters if m.file}
        L.append(f"  {'Role':5s} {'Origin':9s} {'Night':8s} {'Age':>13s} {'Users':>5s}  Master")
        for u in summary.uses:
            m = tonight.get(u.file)
            ver = ""
            if m is not None:
                ver = f"  [{m.nframes} frames, verification {'PASS' if m.passed else 'FAIL ' + ','.join(m.failed)}]"
            L.append(f"  {u.role:5s} {u.origin:9s} {u.night:8s} {_age(u):>13s} {u.users:5d}  "
                     f"{clean_text(u.file)}{ver}")
    if summary.masters:
        L.append("Masters made tonight")
        for m in summary.masters:
            if not m.built:
                state = f"NOT BUILT: {clean_text(m.reason, 90)}"
            elif m.passed:
                state = "verification PASS"
            else:
                state = f"verification FAIL: {', '.join(m.failed)}"
            L.append(f"  {m.imtype:5s} {clean_text(m.name, 44):44s} {m.nframes:3d} frame"
                     f"{' ' if m.nframes == 1 else 's'}  {state}")
    if summary.skies:
        L.append("Master skies")
        for line in summary.skies:
            L.append(f"  {clean_text(line, 110)}")
    # frames set aside, failed, rejected, pending
    L.append("")
    L.append(f"Frames set aside ({len(summary.set_aside)})")
    for a in summary.set_aside:
        L.append(f"  {clean_text(a.file, 32):32s} {a.type:9s} {clean_text(a.object, 16):16s} "
                 f"{a.source}: {clean_text(a.reason, 100)}")
    if summary.ignored:
        L.append("  ignored kinds: " + ", ".join(f"{n} {t}" for t, n in sorted(summary.ignored.items())))
    failed = [f for f in summary.frames if f.status == "failed"]
    rejected = [f for f in summary.frames if f.status == "rejected"]
    pending = [f for f in summary.frames if f.status == "pending"]
    L.append(f"Frames failed ({len(failed)})")
    for f in failed:
        L.append(f"  {clean_text(f.file, 32):32s} {clean_text(f.object, 16):16s} {clean_text(f.filter, 8):8s} "
                 f"{clean_text(failure_text(f.why), 100)}")
    L.append(f"Frames rejected by the quality limits ({len(rejected)})")
    for f in rejected:
        L.append(f"  {clean_text(f.file, 32):32s} {clean_text(f.object, 16):16s} {clean_text(f.filter, 8):8s} "
                 f"{clean_text(f.why, 100)}")
    if pending:
        L.append(f"Frames not yet through the chain ({len(pending)})")
        for f in pending:
            L.append(f"  {clean_text(f.file, 32):32s} {clean_text(f.object, 16):16s} "
                     f"{clean_text(f.filter, 8):8s} {clean_text(f.why or 'no product yet', 80)}")
    for p in summary.problems:
        L.append(f"  note: {clean_text(p, 120)}")
    L.append("")
    L.append(f"Light curves ({len(summary.lightcurves)})")
    for lc in summary.lightcurves:
        L.append(f"  {clean_text(lc.name, 40):40s} {lc.npoints:4d} points  {lc.ecsv}")
    return "\n".join(L) + "\n"


def write_report(night, out: Path | None = None) -> tuple[Path, str]:
    """Collect the night's summary and write ``report.txt`` atomically.

    Returns
    -------
    (Path, str)
        The file written and its text.
    """
    from datetime import datetime, timezone
    from . import __version__
    from .fitsio import atomic_write_text
    from .nightsummary import collect
    summary = collect(night)
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    text = format_report(summary, written=written, version=__version__)
    out = Path(out) if out else night.dir / REPORT_NAME
    atomic_write_text(out, text)
    return out, text
