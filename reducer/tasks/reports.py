"""doit tasks: ``report`` (``report.txt``) and ``finalreport`` (text, HTML, plots, mail).

``report`` is up to date while nothing it reads has changed: its ``uptodate`` check compares a
signature (:func:`report_signature`: the night log, ``night.toml`` and the modification times
of the folders holding products, stacks, masters and light curves; no file opened but the
night log) with the one stored beside ``report.txt`` when it was written. ``doit science`` rewrites it
at the end through its ``science:_report`` subtask (see :func:`science_report_task`), which
shares that signature, so a no-op ``doit science`` costs a few ``stat`` calls.

``finalreport`` runs whenever asked (it is the end-of-night action, and it sends mail when
mail is configured).
"""
from __future__ import annotations

import os
from pathlib import Path

#: where the signature of what report.txt was made from is kept
SIGNATURE_FILE = ".report-signature"


def _stamp(path: Path) -> str:
    """``name:size:mtime_ns`` of a file or folder, ``name:-`` when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return f"{path.name}:-"
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def report_signature(night_dir) -> str:
    """A digest of what ``report.txt`` is made from, without opening any file but the night log.

    The night log and ``night.toml`` by size and time; the target folders, ``stacks/``,
    ``masters/`` and ``lightcurves/`` by their folder's modification time: reducer writes every
    product by renaming a finished temporary file into place (:mod:`reducer.fitsio`), which
    changes its folder's time, so a new or rewritten product shows without listing the folder
    (one ``stat`` per folder: a few milliseconds for a 500-frame night).
    """
    import hashlib
    from .. import __version__
    from ..inventory import read_nightlog
    ndir = Path(night_dir)
    parts = [__version__, _stamp(ndir / "nightlog.ecsv"), _stamp(ndir / "night.toml")]
    targets = set()
    if (ndir / "nightlog.ecsv").is_file():
        targets = {f.target for f in read_nightlog(ndir / "nightlog.ecsv") if f.target}
    parts += [_stamp(ndir / t) for t in sorted(targets)]
    parts += [_stamp(ndir / d) for d in ("stacks", "masters", "lightcurves")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


class ReportUnchanged:
    """doit ``uptodate``: ``report.txt`` exists and was made from what is there now."""

    def __init__(self, night_dir: str):
        self.night_dir = night_dir

    def __call__(self, task, values):
        ndir = Path(self.night_dir)
        from ..report import REPORT_NAME
        sig = ndir / SIGNATURE_FILE
        if not (ndir / REPORT_NAME).is_file() or not sig.is_file():
            return False
        return sig.read_text().strip() == report_signature(ndir)


def run_report(night_dir: str) -> None:
    """doit action: write ``report.txt`` (and remember what it was made from)."""
    from ..fitsio import atomic_write_text
    from ..night import Night
    from ..report import write_report
    night = Night(night_dir)
    sig = report_signature(night.dir)        # before reading: a change meanwhile rebuilds next time
    out, text = write_report(night)
    atomic_write_text(night.dir / SIGNATURE_FILE, sig + "\n")
    nrows = text.count("\n")
    print(f"report: {out} ({nrows} lines)")


def run_finalreport(night_dir: str) -> None:
    """doit action: ``report.txt``, ``finalreport.txt``, ``finalreport.html`` and plots; mail
    them when ``[mail]`` is configured (a mail failure is one line; the files stay)."""
    from ..finalreport import build_finalreport
    from ..night import Night
    night = Night(night_dir)
    res = build_finalreport(night)
    print(f"finalreport: {res.text_path} and {res.html_path} ({len(res.images)} images in "
          f"{res.images_dir.name}/)")
    from ..mail import MailError, mail_settings, send_report
    try:
        cfg = mail_settings(night.settings)
        if cfg is None:
            print("finalreport: mail not configured ([mail] host in reducer.toml); not sent")
            return
        send_report(cfg, night, res)
    except MailError as exc:
        print(f"finalreport: mail NOT sent: {exc}")
        return
    print(f"finalreport: mailed to {', '.join(cfg.to)} via {cfg.host}:{cfg.port}")


def remove_report_files(night_dir: str) -> None:
    """doit clean action of ``report``."""
    from ..report import REPORT_NAME
    for name in (REPORT_NAME, SIGNATURE_FILE):
        p = Path(night_dir) / name
        if p.exists():
            p.unlink()


def remove_finalreport_files(night_dir: str) -> None:
    """doit clean action of ``finalreport``: the text, the page and its plots folder."""
    import shutil
    ndir = Path(night_dir)
    for name in ("finalreport.txt", "finalreport.html"):
        if (ndir / name).exists():
            (ndir / name).unlink()
    if (ndir / "finalreport").is_dir():
        shutil.rmtree(ndir / "finalreport")


def report_task_dict(night, **extra) -> dict:
    """The task dict that writes ``report.txt`` (for ``report`` and ``science:_report``)."""
    return {
        "actions": [(run_report, [str(night.dir)])],
        "uptodate": [ReportUnchanged(str(night.dir))],
        "verbosity": 2,
        **extra,
    }


def science_report_task(night, task_dep: list) -> dict:
    """``science:_report``: ``report.txt`` again once every target of ``doit science`` is done."""
    return report_task_dict(night, basename="science", name="_report", task_dep=list(task_dep),
                            doc="report.txt after every target")


def make_task_generators(night) -> dict:
    """``task_report`` and ``task_finalreport`` of a night."""
    def task_report():
        """report.txt: one row per target and filter, calibrations, frames set aside."""
        return report_task_dict(night, targets=[str(night.dir / "report.txt")],
                                clean=[(remove_report_files, [str(night.dir)])],
                                doc="report.txt: one row per target and filter, calibrations, "
                                    "frames set aside or failed")

    def task_finalreport():
        """End-of-night report: finalreport.txt/.html with plots; mailed if [mail] is set."""
        return {
            "actions": [(run_finalreport, [str(night.dir)])],
            "task_dep": ["report"],
            "targets": [str(night.dir / "finalreport.txt"), str(night.dir / "finalreport.html")],
            "uptodate": [False],
            "clean": [(remove_finalreport_files, [str(night.dir)])],
            "verbosity": 2,
            "doc": "end-of-night report: finalreport.txt and .html with plots (mailed if [mail] is set)",
        }
    return {"task_report": task_report, "task_finalreport": task_finalreport}
