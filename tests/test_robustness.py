"""Robustness of a night through real doit runs: failing frames, a read-only raw folder,
unsafe OBJECT names (``kill -9`` and two runs at once: ``test_interrupted.py``)."""
from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import pytest
from astropy.io import fits

from reducer.testing import Target

from smallnight import checksums, doit, make_small_night

UNSAFE = {                       # OBJECT -> target name (folder, doit task name)
    "../../evil": "evil",
    "a/b c": "a_b_c",
    "it's \"q\"": "it_s_q",
    "<script>alert(1)</script>": "script_alert_1_script",
    "raw": "raw_target",          # the night's raw link must never be a target folder
    "UNICODE-PLACEHOLDER": "mega_Cen",   # patched below to UTF-8 'Ωmega Cen ñ'
}


def _listing(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _outside(root: Path) -> set:
    """Everything under ``root`` but the redux tree and the site's masters store."""
    return {x for x in _listing(root)
            if x.split("/")[0] not in ("redux", "masters")}


def _patch_card(path: Path, old: bytes, new: bytes) -> None:
    """Replace bytes inside a raw file, keeping its size (the header stays 80-byte cards)."""
    b = bytearray(path.read_bytes())
    i = b.find(old)
    assert i >= 0, (path, old)
    b[i:i + len(new)] = new
    path.write_bytes(bytes(b))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A night with a read-only raw folder, unsafe OBJECT values, a truncated frame and a frame
    corrupted after the inventory."""
    root = tmp_path_factory.mktemp("hostile")
    targets = [Target("FIELD-A", nexp=4, exptime=120.0)] + \
        [Target(name, nexp=1, exptime=120.0) for name in UNSAFE]
    sim, nd = make_small_night(root, targets, seed=3)
    raw = sim.raw_dir
    sci = [f for f in sim.truth["frames"] if f["type"] == "science"]
    by_obj = {}
    for f in sci:
        by_obj.setdefault(f["object"], []).append(f["file"])
    # a UTF-8 OBJECT (not valid FITS: astropy reads the bytes it cannot decode as '?')
    uni = raw / by_obj["UNICODE-PLACEHOLDER"][0]
    card = ("OBJECT  = '".encode() + "Ωmega Cen ñ".encode() + b"'").ljust(80, b" ")
    _patch_card(uni, b"OBJECT  = 'UNICODE-PLACEHOLDER'", card)
    # a frame truncated on disk (an hour old: not one still arriving)
    trunc = raw / by_obj["FIELD-A"][0]
    trunc.write_bytes(trunc.read_bytes()[:20000])
    old = time.time() - 3600
    os.utime(trunc, (old, old))
    doit(nd, "inventory")
    # a frame corrupted after the inventory, keeping its size and time
    bad = raw / by_obj["FIELD-A"][1]
    st = bad.stat()
    _patch_card(bad, b"EXTNAME = 'CCD1", b"EXTNAME = 'CCDX")
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    # the raw folder read-only (root ignores the bits: the checksums decide)
    sums = checksums(raw)
    modes = {p: p.stat().st_mode for p in [raw, *raw.iterdir()]}
    for p in [*raw.iterdir(), raw]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    outside = _outside(root)
    try:
        run = doit(nd, "science", check=False)
        yield {"sim": sim, "dir": nd, "root": root, "raw": raw, "run": run, "sums": sums,
               "modes": modes, "outside": outside, "by_obj": by_obj, "trunc": trunc.name,
               "bad": bad.name}
    finally:
        for p, m in modes.items():
            p.chmod(m)


def test_raw_folder_is_never_written(hostile):
    raw = hostile["raw"]
    assert hostile["run"].returncode == 0, hostile["run"].stdout + hostile["run"].stderr
    assert checksums(raw) == hostile["sums"]
    assert not os.access(raw, os.W_OK) or os.geteuid() == 0
    for p, m in hostile["modes"].items():
        assert p.stat().st_mode == m & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def test_a_failing_frame_is_recorded_and_the_night_finishes(hostile):
    nd, by_obj = hostile["dir"], hostile["by_obj"]
    from reducer.inventory import read_nightlog
    log = {f.file: f for f in read_nightlog(nd / "nightlog.ecsv")}
    # the truncated frame: set aside by the inventory, with its reason
    assert not log[hostile["trunc"]].usable
    assert re.search(r"truncated|corrupt", log[hostile["trunc"]].reason)
    # the frame corrupted after the inventory: a failure record, passed down the chain
    stem = hostile["bad"].rsplit(".", 1)[0]
    h = fits.getheader(nd / "FIELD-A" / f"p{stem}.fits")
    assert h["FAILED"] is True and h["FAILSTEP"] == "prepare"
    assert "has no HDU named 'CCD1'" in h["FAILWHY"]
    for pre in ("fp", "sfp", "zsfp", "azsfp", "tazsfp"):
        h = fits.getheader(nd / "FIELD-A" / f"{pre}{stem}.fits")
        assert h["FAILED"] is True and h["FAILWHY"].startswith("failed earlier at")
    out = hostile["run"].stdout
    assert re.search(rf"^prepare {re.escape(hostile['bad'])}: has no HDU named 'CCD1'", out, re.M)
    assert re.search(rf"stack FIELD-A_r: leaves out tazsfp{stem}\.fits: failed at zeropoint: "
                     r"failed earlier at", out)
    recs = [json.loads(ln) for ln in (nd / "logs" / "tasks.jsonl").read_text().splitlines()]
    rec = next(r for r in recs if r["task"] == f"prepare:{stem}")
    assert rec["status"] == "ok" and "has no HDU named 'CCD1'" in rec["reason"]
    # everything else went through
    good = [f for f in by_obj["FIELD-A"] if f not in (hostile["trunc"], hostile["bad"])]
    for f in good:
        assert "FAILED" not in fits.getheader(nd / "FIELD-A" / f"tazsfp{f.rsplit('.', 1)[0]}.fits")
    side = json.loads((nd / "stacks" / "FIELD-A_r.json").read_text())
    assert (nd / "stacks" / "FIELD-A_r.fits").is_file(), side
    assert re.search(rf"stack FIELD-A_r: {len(good)} frames", out)
    assert re.search(r"\d+ recorded a frame failure", hostile["run"].stderr)


def test_unsafe_object_names_stay_inside_the_night(hostile):
    nd, root = hostile["dir"], hostile["root"]
    from reducer.inventory import read_nightlog
    targets = {f.target for f in read_nightlog(nd / "nightlog.ecsv") if f.target}
    assert targets == {"FIELD-A", *UNSAFE.values()}
    for obj, name in UNSAFE.items():
        folder = nd / name
        assert folder.is_dir() and not folder.is_symlink()
        assert folder.resolve().parent == nd.resolve()
        (f,) = hostile["by_obj"][obj]
        last = folder / f"tazsfp{f.rsplit('.', 1)[0]}.fits"
        assert last.is_file()
        assert (nd / "stacks" / f"{name}_r.json").is_file()
    # nothing written outside the night directory (the masters store is the site's, by design)
    assert _outside(root) == hostile["outside"]
    assert not list(root.parent.glob("evil*")) and not list(root.glob("evil*"))
    # the raw link is still the raw link
    assert (nd / "raw").is_symlink() and (nd / "raw").resolve() == hostile["raw"].resolve()
    # every path under the night directory resolves inside it (or to the raw folder)
    for p in nd.rglob("*"):
        if p.parent == nd and p.name == "raw":
            continue
        p.resolve().relative_to(nd.resolve())
    # doit task names are the safe names
    lst = doit(nd, "list", "--all").stdout
    for name in UNSAFE.values():
        assert re.search(rf"^redo:{re.escape(name)}\s", lst, re.M)
        info = doit(nd, "info", f"science:{name}", check=False).stdout
        assert f"stack:{name}_r" in info
