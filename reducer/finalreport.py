"""The end-of-night report: ``finalreport.txt``, ``finalreport.html`` and ``finalreport/*.png``.

The text is ``report.txt``'s content followed by the per-frame table, the masters'
verification, the time spent per step (``logs/tasks.jsonl``) and the disk used. The HTML page
(``templates/finalreport.html.j2``, jinja2 with autoescaping, inline CSS, no network) adds the
plots: FWHM, sky, zero point and airmass through the night; previews of the masters and the
stacks; the light curves (copied next to the other plots). Every image link is relative to
the page (``finalreport/<name>.png``), so ``finalreport.html`` and ``finalreport/`` can be
copied or mailed together. Files are written atomically; images of an earlier run that no
longer apply are removed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .nightsummary import _finite

IMAGES_DIR = "finalreport"


@dataclass
class FinalReport:
    """What :func:`build_finalreport` wrote."""

    text_path: Path
    html_path: Path
    images_dir: Path
    images: list = field(default_factory=list)      # Paths of the PNGs (inside images_dir)
    text: str = ""
    subject: str = ""


def _safe(name: str) -> str:
    from .inventory import safe_name
    return safe_name(name)


def _image_hdus(hdul):
    """The data planes of a master or product (not the uncertainty, count, mask or sky planes)."""
    out = []
    for h in hdul[1:]:
        if h.name.endswith(("_UNC", "_CNT", "_MASK", "_SKY")) or h.data is None or h.data.ndim != 2:
            continue
        out.append(h)
    return out


def master_previews(summary, outdir: Path, problems: list) -> dict:
    """A preview PNG per master built tonight: {master set name: Path}."""
    from astropy.io import fits
    from .plots import image_preview
    out = {}
    for m in summary.masters:
        if not m.file:
            continue
        try:
            with fits.open(summary.dir / m.file, memmap=False) as h:
                planes = _image_hdus(h)
                arrays = [p.data for p in planes]
                unit = planes[0].header.get("BUNIT", "") if planes else ""
        except OSError as exc:
            problems.append(f"preview of {m.file}: {exc}")
            continue
        if not arrays:
            continue
        verdict = "PASS" if m.passed else "FAIL"
        out[m.name] = image_preview(arrays, outdir / f"master_{_safe(m.name)}.png",
                                    title=f"{m.name} ({m.nframes} frames, {verdict})",
                                    method="percentile", unit=str(unit))
    return out


def stack_previews(summary, outdir: Path, problems: list) -> dict:
    """A zscale preview PNG per stack image: {stack name: Path}."""
    from astropy.io import fits
    from .plots import image_preview
    from .report import stack_name, target_rows
    out = {}
    order = [stack_name(r.target, r.filter) for r in target_rows(summary)]
    for name in sorted(summary.stacks, key=lambda n: (order.index(n) if n in order else 999, n)):
        st = summary.stacks[name]
        if not st.fits:
            continue
        try:
            with fits.open(summary.dir / st.fits, memmap=False) as h:
                data = h["STACK"].data
        except (OSError, KeyError) as exc:
            problems.append(f"preview of {st.fits}: {exc}")
            continue
        obj = next((f.object for f in summary.frames if f.target == st.target), st.target)
        marks = [st.xy] if st.xy and _finite(st.mag) else []
        out[name] = image_preview([data], outdir / f"stack_{_safe(name)}.png",
                                  title=f"{obj} {st.filter}: {_frames(st.nframes)}, {st.exptime_total:.0f} s",
                                  method="zscale", unit="e-/s", marks=marks)
    return out


def _frames(n: int) -> str:
    return f"{n} frame{'' if n == 1 else 's'}"


def lightcurve_images(summary, outdir: Path) -> dict:
    """The light curves' PNGs, copied next to the other plots: {name: Path}."""
    import shutil
    from .fitsio import atomic_path
    out = {}
    for lc in summary.lightcurves:
        if not lc.png:
            continue
        dest = outdir / f"lightcurve_{_safe(lc.name)}.png"
        with atomic_path(dest, ".png") as tmp:
            shutil.copyfile(summary.dir / lc.png, tmp)
        out[lc.name] = dest
    return out


def _fmt(v, fmt: str) -> str:
    return format(v, fmt) if _finite(v) else "-"


def _size(b: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000.0
    return f"{b:.1f} TB"


def frame_rows(summary) -> list[dict]:
    """Per-frame rows for the tables (strings, ready to show)."""
    from .report import failure_text
    rows = []
    for f in sorted(summary.frames, key=lambda f: (f.mjd if _finite(f.mjd) else 1e9, f.file)):
        sky_mag = math.nan
        if _finite(f.zp) and _finite(f.sky_rate) and f.sky_rate > 0 and _finite(summary.pixel_scale):
            sky_mag = f.zp - 2.5 * math.log10(f.sky_rate / summary.pixel_scale ** 2)
        rows.append({
            "ut": f.ut, "file": f.file, "object": f.object, "kind": "std" if f.kind == "standard" else "sci",
            "filter": f.filter, "exptime": _fmt(f.exptime, ".1f"), "airmass": _fmt(f.airmass, ".3f"),
            "fwhm": _fmt(f.fwhm, ".2f"), "sky": _fmt(f.sky_rate, ".2f"), "sky_rms": _fmt(f.sky_rms, ".1f"),
            "sky_mag": _fmt(sky_mag, ".2f"), "zp": _fmt(f.zp, ".3f") + (" (rel.)" if f.relative and _finite(f.zp) else ""), "zp_err": _fmt(f.zp_err, ".3f"),
            "nstars": str(f.nstars) if f.nstars else "-", "lim5": _fmt(f.lim5, ".2f"),
            "status": f.status,
            "why": failure_text(f.why) if f.status == "failed" else f.why,
        })
    return rows


def nightlog_rows(night) -> list[dict]:
    from .inventory import read_nightlog
    if not night.nightlog.is_file():
        return []
    out = []
    for f in read_nightlog(night.nightlog):
        out.append({"file": f.file, "type": f.type + (f"/{f.subtype}" if f.subtype else ""),
                    "object": f.object, "filter": f.filter, "exptime": _fmt(f.exptime, ".1f"),
                    "ut": f.date_obs[11:19] if len(f.date_obs) >= 19 else f.date_obs,
                    "airmass": _fmt(f.airmass, ".3f"), "reason": f.reason})
    return out


def _check_rows(summary) -> list[dict]:
    rows = []
    for m in summary.masters:
        if not m.built:
            rows.append({"master": m.name, "check": "NOT BUILT", "value": "", "threshold": "",
                         "detail": m.reason, "passed": False})
            continue
        for c in m.checks:
            v = c.get("value")
            rows.append({"master": m.name, "check": str(c.get("name", "")),
                         "value": _fmt(v, ".4g") if isinstance(v, (int, float)) else str(v or ""),
                         "threshold": str(c.get("threshold", "")), "detail": str(c.get("detail", "")),
                         "passed": bool(c.get("passed", False))})
    return rows


def _text_table(headers, rows, aligns=None) -> list[str]:
    """Fixed-width text table: left-aligned text, right-aligned numbers (``aligns`` 'l'/'r')."""
    widths = [max([len(h)] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    aligns = aligns or ["l"] * len(headers)

    def line(vals):
        return "  " + " ".join(str(v).rjust(w) if a == "r" else str(v).ljust(w)
                               for v, w, a in zip(vals, widths, aligns)).rstrip()
    return [line(headers), "  " + " ".join("-" * w for w in widths)] + [line(r) for r in rows]


def format_final_text(report_text: str, frames: list, checks: list, timing, disk: list) -> str:
    """``finalreport.txt``: report.txt, then frames, verification, timing and disk."""
    from .report import clean_text
    L = [report_text.rstrip(), "", "Frames"]
    if not frames:
        L.append("  (no science or standard frame)")
    else:
        L += _text_table(
            ["UT", "File", "Object", "Typ", "Filt", "Exp", "Airm", "FWHM", "Sky e/s", "ZP", "Lim5s", "Status"],
            [[r["ut"], clean_text(r["file"], 32), clean_text(r["object"], 20), r["kind"],
              clean_text(r["filter"], 6), r["exptime"], r["airmass"], r["fwhm"], r["sky"], r["zp"],
              r["lim5"], r["status"] + (f": {clean_text(r['why'], 60)}" if r["why"] else "")]
             for r in frames],
            ["l", "l", "l", "l", "l", "r", "r", "r", "r", "r", "r", "l"])
    L += ["", "Masters: verification"]
    if checks:
        L += _text_table(["Master", "Check", "Value", "Threshold", "Result"],
                         [[c["master"], c["check"], c["value"], c["threshold"],
                           "PASS" if c["passed"] else "FAIL" + (f" {c['detail']}" if c["detail"] else "")]
                          for c in checks], ["l", "l", "r", "l", "l"])
    else:
        L.append("  (no master made tonight)")
    L += ["", "Time spent per step"]
    if timing is None:
        L.append("  no timing log (logs/tasks.jsonl)")
    else:
        L += _text_table(["Step", "Tasks", "Seconds", "Failed"],
                         [[s["step"], s["tasks"], f"{s['seconds']:.1f}", s["failed"]] for s in timing["steps"]]
                         + [["total", sum(s["tasks"] for s in timing["steps"]), f"{timing['total']:.1f}", ""]],
                         ["l", "r", "r", "r"])
        L.append(f"  over {timing['runs']} doit run(s)")
    L += ["", "Disk used"]
    L += _text_table(["What", "Files", "Size"],
                     [[w, n, _size(b)] for w, n, b in disk] + [["total", sum(n for _, n, _ in disk),
                                                               _size(sum(b for _, _, b in disk))]],
                     ["l", "r", "r"])
    return "\n".join(L) + "\n"


def subject_of(summary) -> str:
    """Mail subject: instrument, night, and the headline counts."""
    nt = len({f.target for f in summary.frames})
    nfail = sum(1 for f in summary.frames if f.status == "failed")
    return (f"reducer {summary.instrument} night {summary.night}: final report "
            f"({nt} target{'s' if nt != 1 else ''}, {len(summary.frames)} frames, {nfail} failed)")


def build_finalreport(night) -> FinalReport:
    """Write ``finalreport.txt``, ``finalreport.html`` and their plots for a night.

    Parameters
    ----------
    night : reducer.night.Night

    Returns
    -------
    FinalReport
    """
    from datetime import datetime, timezone
    from . import __version__
    from .fitsio import atomic_write_text
    from .nightsummary import collect, disk_usage, task_timing
    from .plots import night_trends
    from .report import format_report, target_rows, zero_points
    summary = collect(night)
    ndir = night.dir
    outdir = ndir / IMAGES_DIR
    outdir.mkdir(exist_ok=True)
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    problems = list(summary.problems)
    trends = night_trends(summary.frames, outdir / "night_trends.png",
                          title=f"{summary.instrument} {summary.night}")
    masters = master_previews(summary, outdir, problems)
    stacks = stack_previews(summary, outdir, problems)
    lcs = lightcurve_images(summary, outdir)
    images = [p for p in [trends, *masters.values(), *stacks.values(), *lcs.values()] if p]
    keep = {p.name for p in images}
    for old in outdir.glob("*.png"):
        if old.name not in keep:
            old.unlink()
    timing = task_timing(ndir)
    disk = disk_usage(ndir, {f.target for f in summary.frames})
    frames = frame_rows(summary)
    checks = _check_rows(summary)
    report_text = format_report(summary, written=written, version=__version__)
    text = format_final_text(report_text, frames, checks, timing, disk)
    text_path = ndir / "finalreport.txt"
    atomic_write_text(text_path, text)
    rows = target_rows(summary)
    rel = lambda p: f"{IMAGES_DIR}/{Path(p).name}"   # noqa: E731  (links relative to the page)
    context = {
        "night": summary.night, "instrument": summary.instrument, "written": written,
        "version": __version__, "night_dir": str(ndir), "subject": subject_of(summary),
        "total_frames": summary.total_frames, "rows": [_row_dict(r) for r in rows],
        "zero_points": [_zp_dict(z) for z in zero_points(summary)],
        "trends": rel(trends) if trends else "",
        "uses": [{"role": u.role, "file": u.file, "origin": u.origin, "night": u.night,
                  "age": (f"{abs(u.age_days):.1f} d {'before' if u.age_days >= 0 else 'after'}"
                          if u.origin == "fallback" else ""), "users": u.users} for u in summary.uses],
        "masters": [{"name": m.name, "imtype": m.imtype, "nframes": m.nframes, "built": m.built,
                     "passed": m.passed, "failed": ", ".join(m.failed), "reason": m.reason,
                     "image": rel(masters[m.name]) if m.name in masters else ""}
                    for m in summary.masters],
        "checks": checks,
        "stacks": [{"name": n, "image": rel(p), "caption": _stack_caption(summary, n)}
                   for n, p in stacks.items()],
        "lightcurves": [{"name": lc.name, "npoints": lc.npoints, "ecsv": lc.ecsv,
                         "image": rel(lcs[lc.name]) if lc.name in lcs else ""}
                        for lc in summary.lightcurves],
        "frames": frames,
        "set_aside": [vars(a) for a in summary.set_aside],
        "ignored": summary.ignored,
        "nightlog": nightlog_rows(night),
        "timing": timing,
        "disk": [{"what": w, "files": n, "size": _size(b)} for w, n, b in disk],
        "disk_total": _size(sum(b for _, _, b in disk)),
        "problems": problems,
    }
    html = render_html(context)
    html_path = ndir / "finalreport.html"
    atomic_write_text(html_path, html)
    return FinalReport(text_path, html_path, outdir, images, text, context["subject"])


def _row_dict(r) -> dict:
    am = f"{r.airmass[0]:.2f}–{r.airmass[1]:.2f}" if _finite(r.airmass[0]) else "-"
    return {"ut": r.ut_start, "object": r.object, "kind": r.kind, "filter": r.filter,
            "used": r.n_used, "rejected": r.n_rejected, "pending": r.n_pending,
            "exptime": _fmt(r.exptime, ".0f"), "airmass": am, "fwhm": _fmt(r.fwhm, ".2f"),
            "sky": _fmt(r.sky_rate, ".2f"),
            "zp": _fmt(r.zp, ".3f") + (" (rel.)" if r.relative and _finite(r.zp) else ""),
            "lim5": _fmt(r.lim5, ".2f") + (" (rel.)" if r.relative and _finite(r.lim5) else ""),
            "mag": _fmt(r.mag, ".3f") + ("" if r.calibrated or not _finite(r.mag)
                                         else " (rel.)" if r.relative else " (instr.)"),
            "mag_err": _fmt(r.mag_err, ".3f"), "flag": r.flag, "note": r.note}


def _zp_dict(z) -> dict:
    def cell(d):
        if d is None:
            return "-"
        return f"{d['zp']:.3f} ± {_fmt(d['scatter'], '.3f')} ({d['n']})"
    diff = (z["standard"]["zp"] - z["science"]["zp"]) if z["standard"] and z["science"] else math.nan
    return {"filter": z["filter"], "standard": cell(z["standard"]), "science": cell(z["science"]),
            "diff": _fmt(diff, "+.3f")}


def _stack_caption(summary, name: str) -> str:
    st = summary.stacks[name]
    fr = [f for f in summary.frames if f.target == st.target]
    obj = fr[0].object if fr else st.target
    if _finite(st.mag):
        mag = f"; target (circled) {st.mag:.3f} ± {st.mag_err:.3f}{'' if st.calibrated else ' (relative)' if st.relative else ' (instrumental)'}"
    elif fr and fr[0].kind == "standard":
        mag = ""            # a standard field has no target of its own
    else:
        mag = f"; {st.reason or 'no target magnitude'}"
    return f"{obj} {st.filter}: {_frames(st.nframes)}, {st.exptime_total:.0f} s{mag}"


def render_html(context: dict) -> str:
    """``finalreport.html`` from its template (jinja2, autoescaped)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined
    from .resources import templates_dir
    env = Environment(loader=FileSystemLoader(str(templates_dir())), undefined=StrictUndefined,
                      autoescape=True, keep_trailing_newline=True)
    return env.get_template("finalreport.html.j2").render(**context)
