"""doit finalreport on a small seeded night: text, HTML (escaped, self-contained, relative
images), plots, timing and disk tables."""
from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import run_doit
from reportnight import JUNK, WEIRD, build_night

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    n = build_night(tmp_path_factory.mktemp("final"))
    run_doit(n["dir"], "science")
    # an image of an earlier run that no longer applies
    (n["dir"] / "finalreport").mkdir(exist_ok=True)
    (n["dir"] / "finalreport" / "stack_GONE_r.png").write_bytes(PNG)
    n["out"] = run_doit(n["dir"], "finalreport")
    n["html"] = (n["dir"] / "finalreport.html").read_text()
    n["text"] = (n["dir"] / "finalreport.txt").read_text()
    return n


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href"):
                self.refs.append((tag, k, v))

    def handle_data(self, data):
        self.text.append(data)


def test_files_written(night):
    nd = night["dir"]
    out = night["out"].stdout + night["out"].stderr
    assert "mail not configured" in out
    names = {p.name for p in (nd / "finalreport").iterdir()}
    stacks = {f"stack_{p.stem}.png" for p in (nd / "stacks").glob("*.fits")}
    masters = {f"master_{p.stem.removeprefix('master_')}.png" for p in (nd / "masters").glob("master_*.fits")}
    assert stacks and masters
    assert names == {"night_trends.png", "lightcurve_FIELD-A_r.png"} | stacks | masters
    for n in names:
        assert (nd / "finalreport" / n).read_bytes()[:8] == PNG
    # the light curve is the one the lightcurve task drew
    assert (nd / "finalreport" / "lightcurve_FIELD-A_r.png").read_bytes() == \
        (nd / "lightcurves" / "FIELD-A_r.png").read_bytes()
    # report.txt is the head of finalreport.txt (the same night summary; times differ)
    def body(t):
        return "\n".join(ln for ln in t.splitlines() if not ln.startswith("written "))
    assert body(night["text"]).startswith(body((nd / "report.txt").read_text()))
    assert "Frames\n" in night["text"] and "Masters: verification" in night["text"]


def test_html_escapes_object_names(night):
    """The raw OBJECT `M<b>&"'x` shows as text: escaped everywhere, never as markup."""
    html = night["html"]
    assert 'M<b>' not in html and "<b>" not in html
    assert "M&lt;b&gt;&amp;&#34;&#39;x" in html
    p = _Links()
    p.feed(html)
    assert "b" not in p.tags
    text = "".join(p.text)
    assert WEIRD in text          # the browser shows exactly the OBJECT value


def test_html_is_self_contained_with_relative_images(night):
    nd = night["dir"]
    p = _Links()
    p.feed(night["html"])
    assert "script" not in p.tags and "link" not in p.tags
    imgs = [v for tag, k, v in p.refs if tag == "img"]
    assert len(imgs) == len(list((nd / "finalreport").glob("*.png")))
    for src in imgs:
        assert not src.startswith(("/", "http:", "https:", "file:", "data:")), src
        assert src.startswith("finalreport/") and (nd / src).is_file()
    for tag, k, v in p.refs:
        if tag == "a":
            assert v.startswith("#"), v            # in-page links only
    assert "http://" not in night["html"] and "https://" not in night["html"]
    # the page and its folder can be moved together
    assert "stack_GONE_r.png" not in os.listdir(nd / "finalreport")


def test_html_shows_every_raw_frame_and_every_failure(night):
    html = night["html"]
    sim = night["sim"]
    for f in sim.truth["frames"]:
        assert f["file"] in html
    assert JUNK in html and "not a FITS file" in html
    assert "dropped in night.toml" in html
    rows = [r for r in html.split("<tr>") if night["short"] in r and 'class="failed"' in r]
    assert len(rows) == 2                      # in the frames table and in the failures table
    assert all("astrometry: " in r and "stars detected" in r for r in rows)
    # masters' verification table and their previews
    assert html.count('class="OK">PASS') >= 4
    for m in (night["dir"] / "masters").glob("master_*.json"):
        assert m.stem.removeprefix("master_") in html


def test_text_tables(night):
    text = night["text"]
    frames = text.split("\nFrames\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert len(frames) == 10                   # 8 science + 2 standard frames not set aside
    assert sum("failed: astrometry" in ln for ln in frames) == 1
    disk = text.split("\nDisk used\n", 1)[1].splitlines()
    masters = next(ln for ln in disk if ln.strip().startswith("masters"))
    nfiles = len(list((night["dir"] / "masters").iterdir()))
    assert int(masters.split()[1]) == nfiles
    size = sum(p.stat().st_size for p in (night["dir"] / "masters").iterdir())
    assert masters.split()[2] == f"{size / 1e6:.1f}" and masters.split()[3] == "MB"
    prods = {ln.split()[1]: int(ln.split()[2]) for ln in disk if ln.strip().startswith("products")}
    # every frame has each product; the failed frame's from its a step on are records of the failure
    assert prods["tazsfp*"] == 10 and prods["p*"] == 10


def test_timing_from_the_task_log(night):
    """Time per step comes from logs/tasks.jsonl (the progress reporter's log); without it
    the report says so. (Built in-process here: a doit run would append to the log.)"""
    from reducer.finalreport import build_finalreport
    from reducer.night import Night
    nd = night["dir"]
    log = nd / "logs" / "tasks.jsonl"
    saved = log.read_bytes() if log.is_file() else None
    try:
        if log.is_file():
            log.unlink()
        res = build_finalreport(Night(nd))
        assert "no timing log (logs/tasks.jsonl)" in res.text
        assert "No timing log" in res.html_path.read_text()
        log.parent.mkdir(exist_ok=True)
        recs = [("r1", "prepare:a", "prepare", "ok", 1.5), ("r1", "prepare:b", "prepare", "ok", 2.0),
                ("r1", "sky:a", "sky", "fail", 0.5), ("r2", "prepare:a", "prepare", "uptodate", 0.01)]
        log.write_text("\n".join(json.dumps({"run": r, "task": t, "step": s, "status": st,
                                             "start": "2026-11-21T01:00:00+00:00", "seconds": sec})
                                 for r, t, s, st, sec in recs) + "\nnot json\n")
        text = build_finalreport(Night(nd)).text.split("Time spent per step\n", 1)[1]
        rows = {}
        for ln in text.splitlines()[2:]:
            if not ln.strip() or ln.startswith("  over"):
                break
            rows[ln.split()[0]] = ln.split()[1:]
        assert rows["prepare"] == ["3", "3.5", "0"]      # up-to-date tasks count, take no time
        assert rows["sky"] == ["1", "0.5", "1"]
        assert rows["total"] == ["4", "4.0"]
        assert "over 2 doit run(s)" in text
        assert ">3.5<" in (nd / "finalreport.html").read_text()
    finally:
        if saved is not None:
            log.write_bytes(saved)


def test_screenshot_renders(night, tmp_path):
    """Headless Chromium renders the page with every image (when Chromium is installed)."""
    import shutil
    import subprocess
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed")
    # the page works from a copy of the report alone (relative links)
    dest = tmp_path / "copy"
    dest.mkdir()
    shutil.copy(night["dir"] / "finalreport.html", dest)
    shutil.copytree(night["dir"] / "finalreport", dest / "finalreport")
    shot = tmp_path / "fr.png"
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                        "--window-size=1280,2000", (dest / "finalreport.html").as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert shot.is_file(), r.stderr[-2000:]
    from PIL import Image
    import numpy as np
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape[:2] == (2000, 1280)
    # the header bar is dark, the page is not blank: images and tables drawn
    assert img[:40].mean() < 100 and img.std() > 30
