"""report.txt on a small seeded night, against the simulator's truth and the products."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from conftest import run_doit
from reportnight import JUNK, WEIRD, build_night, parse_rows, section

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    n = build_night(tmp_path_factory.mktemp("report"))
    n["science_out"] = run_doit(n["dir"], "science").stdout
    n["text"] = (n["dir"] / "report.txt").read_text()
    n["rows"] = parse_rows(n["text"])
    return n


def _truth_frames(sim, obj, filt, exclude=()):
    return [f for f in sim.truth["frames"] if f["object"] == obj and f["filter"] == filt
            and f["file"] not in exclude]


def test_science_writes_the_report(night):
    # the fixture ran `doit science` only: its science:_report subtask wrote report.txt
    assert night["text"].startswith("reducer night report: 20261120  instrument demo")
    # one row per target and filter, in order of the first exposure
    assert list(night["rows"]) == [("SA 95", "r"), ("SA 95", "g"), ("FIELD-A", "r"), ("FIELD-A", "g"),
                                   (WEIRD, "r"), ("SHORT", "r")]


@pytest.mark.parametrize("obj,filt,used,rejected,kind,flag", [
    ("FIELD-A", "r", 3, 0, "sci", "OK"),
    ("FIELD-A", "g", 2, 0, "sci", "OK"),        # the third g frame is dropped in night.toml
    (WEIRD, "r", 2, 0, "sci", "OK"),
    ("SA 95", "r", 1, 0, "std", "OK"),
    ("SA 95", "g", 1, 0, "std", "OK"),
    ("SHORT", "r", 0, 1, "sci", "FAIL"),
])
def test_rows_against_truth(night, obj, filt, used, rejected, kind, flag):
    """Frames used/rejected, exposure, airmass range, UT start, sky, FWHM and zero point of each
    row against the simulator's truth of the frames used."""
    row = night["rows"][(obj, filt)]
    assert row["used"] == f"{used}/{rejected}"
    assert (row["kind"], row["flag"]) == (kind, flag)
    truth = _truth_frames(night["sim"], obj, filt, exclude=[night["dropped"]])
    assert row["ut"] == truth[0]["date_obs"][11:19]
    am = [f["airmass_header"] for f in truth]
    lo, hi = (float(x) for x in row["airmass"].split("-"))
    assert abs(lo - min(am)) <= 0.006 and abs(hi - max(am)) <= 0.006
    if not used:
        assert row["exptime"] == "0.0" and row["zp"] == "-" and row["mag"] == "-"
        return
    assert float(row["exptime"]) == pytest.approx(sum(f["exptime"] for f in truth))
    assert float(row["sky"]) == pytest.approx(np.median([f["sky_rate"] for f in truth]), rel=0.02)
    # the t step's FWHM (its own estimator) within 25 % of the true one
    assert float(row["fwhm"]) == pytest.approx(np.median([f["fwhm"] for f in truth]), rel=0.25)
    zp_true = np.median([f["zeropoint"] - f["extinction"] * f["airmass"] + 2.5 * np.log10(f["transparency"])
                         for f in truth])
    assert abs(float(row["zp"]) - zp_true) < 0.04


def test_rows_match_the_product_headers(night):
    """Each row's medians are those of the frames' last products (what the report claims)."""
    from astropy.io import fits
    nd = night["dir"]
    row = night["rows"][("FIELD-A", "r")]
    heads = [fits.getheader(p) for p in sorted((nd / "FIELD-A").glob("taz*.fits"))
             if fits.getheader(p)["FILTER"] == "r"]
    assert len(heads) == 3
    assert float(row["fwhm"]) == pytest.approx(np.median([h["FWHM"] for h in heads]), abs=0.006)
    assert float(row["zp"]) == pytest.approx(np.median([h["PHOTZP"] for h in heads]), abs=0.0006)
    assert float(row["sky"]) == pytest.approx(np.median([h["SKYLEVEL"] / h["EXPTIME"] for h in heads]),
                                              abs=0.006)


def test_limiting_magnitude(night):
    """The 5-sigma limit: the documented formula from each product's headers, combined over
    the frames of the stack (1.25 log10 N deeper for N equal frames)."""
    from astropy.io import fits
    from reducer.nightsummary import APERTURE_FRACTION, APERTURE_FWHM
    nd = night["dir"]
    lims = []
    for p in sorted((nd / "FIELD-A").glob("taz*.fits")):
        h = fits.getheader(p)
        if h["FILTER"] != "r":
            continue
        r_px = APERTURE_FWHM * h["FWHM"] / 0.60
        flux = 5 * h["SKYRMS"] * math.sqrt(math.pi * r_px ** 2) / APERTURE_FRACTION
        lims.append(h["PHOTZP"] - 2.5 * math.log10(flux / h["EXPTIME"]))
    expect = 1.25 * math.log10(sum(10 ** (0.8 * m) for m in lims))
    row = night["rows"][("FIELD-A", "r")]
    assert float(row["lim5"]) == pytest.approx(expect, abs=0.006)
    assert max(lims) < expect < max(lims) + 1.25 * math.log10(3) + 0.01
    # and it is sensible for 3 x 120 s on a 0.6"/px camera in dark time
    assert 21.5 < expect < 25.5


def test_target_magnitude_near_truth(night):
    """FIELD-A's target (a catalogue star set in night.toml) comes back at its magnitude."""
    for filt in ("r", "g"):
        row = night["rows"][("FIELD-A", filt)]
        mag, err = float(row["mag"]), float(row["mag_err"])
        assert 0 < err < 0.05
        assert abs(mag - night["star"][f"mag_{filt}"]) < 0.03 + 3 * err, (filt, mag, night["star"])


def test_standards_beside_science(night):
    lines = section(night["text"], "Zero points by filter")
    byfilt = {ln.split()[0]: ln for ln in lines[1:]}
    assert set(byfilt) == {"g", "r"}
    for filt, ln in byfilt.items():
        nums = [float(x) for x in ln.replace("±", " ").replace("(", " ").replace(")", " ").split()[1:]]
        std_zp, _, nstd, sci_zp, _, nsci, diff = nums
        assert nstd == 1 and nsci == {"r": 5, "g": 2}[filt]
        assert abs(std_zp - sci_zp) < 0.05 and diff == pytest.approx(std_zp - sci_zp, abs=0.0011)


def test_calibrations_used(night):
    lines = section(night["text"], "Calibrations used")
    roles = {}
    for ln in lines[1:]:
        tok = ln.split()
        roles.setdefault(tok[0], []).append(tok)
    assert set(roles) == {"bias", "dark", "flat"}
    for tok in (t for ts in roles.values() for t in ts):
        assert tok[1:3] == ["tonight", "20261120"] and "verification PASS]" in " ".join(tok)
    assert len(roles["flat"]) == 2      # one per filter


def test_fallback_calibrations_with_night_and_age(night):
    """A night without calibration frames uses last night's certified masters: the report
    names them as fallbacks with their night and age."""
    from reducer.testing import Target, make_night
    from conftest import run_cli
    root = night["root"]
    sim = make_night(root / "raw" / "20261121", seed=13, utdate="20261121", filters=("r",),
                     standard=False, shape=night["sim"].truth["parameters"]["shape"],
                     nbias=0, ndark=0, nflat=0, catalog_path=root / "raw" / "refcat2.ecsv",
                     truth_dir=root / "raw" / "truth2",
                     targets=[Target("FIELD-B", filters=("r",), nexp=1, exptime=120.0)])
    run_cli("--config", str(night["cfg"]), "night", "20261121", "--raw", str(sim.raw_dir), cwd=root)
    nd = root / "redux" / "20261121"
    with open(nd / "night.toml", "a") as fh:
        fh.write(f'\n[catalog]\npath = "{sim.catalog_path}"\n')
    run_doit(nd, "science")
    text = (nd / "report.txt").read_text()
    lines = section(text, "Calibrations used")
    used = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert set(used) == {"bias", "dark", "flat"}
    for role, tok in used.items():
        # fallback, from 20261120, about a day before (the masters' mid-times vs the frame)
        assert tok[1:3] == ["fallback", "20261120"], tok
        assert tok[4:6] == ["d", "before"] and 0.3 < float(tok[3]) < 1.7, tok
    assert "Masters made tonight" not in text
    row = parse_rows(text)[("FIELD-B", "r")]
    assert row["used"] == "1/0" and row["flag"] == "OK"


def test_set_aside_and_failed_frames_with_reasons(night):
    aside = section(night["text"], "Frames set aside")
    text = "\n".join(aside)
    assert f"{JUNK}" in text and "inventory: not a FITS file" in text
    dropped = next(ln for ln in aside if night["dropped"] in ln)
    assert "FIELD-A" in dropped and "night.toml: dropped in night.toml" in dropped
    failed = section(night["text"], "Frames failed (1)")
    assert len(failed) == 1 and night["short"] in failed[0] and "SHORT" in failed[0]
    assert "astrometry: " in failed[0] and "stars" in failed[0]
    assert section(night["text"], "Frames rejected by the quality limits (0)") == []


def test_lightcurves_listed(night):
    lines = section(night["text"], "Light curves (1)")
    assert len(lines) == 1 and "FIELD-A_r" in lines[0] and "3 points" in lines[0]


def test_report_is_up_to_date_until_something_changes(night):
    """`doit report` and a no-op `doit science` leave report.txt alone; a deleted report, or a
    product changing, rebuilds it."""
    nd = night["dir"]
    rep = nd / "report.txt"
    before = rep.stat().st_mtime_ns
    run_doit(nd, "report")
    run_doit(nd, "science")
    assert rep.stat().st_mtime_ns == before
    rep.unlink()
    run_doit(nd, "report")
    assert rep.is_file()
    before = rep.stat().st_mtime_ns
    # a product rewritten (as reducer writes every product: atomically, by renaming)
    from reducer.fitsio import atomic_write_bytes
    time.sleep(0.02)
    p = next((nd / "FIELD-A").glob("taz*.fits"))
    atomic_write_bytes(p, p.read_bytes())
    run_doit(nd, "report")
    assert rep.stat().st_mtime_ns > before
    before = rep.stat().st_mtime_ns
    time.sleep(0.02)
    nt = nd / "night.toml"
    nt.write_text(nt.read_text() + "\n")          # an edited night.toml
    run_doit(nd, "report")
    assert rep.stat().st_mtime_ns > before


def test_report_of_a_night_without_products(tmp_path):
    """Before any frame is reduced the report says so instead of failing."""
    from reducer.night import Night
    from reducer.report import write_report
    from reportnight import write_small_profile
    from conftest import run_cli
    from reducer.testing import make_night
    sim = make_night(tmp_path / "raw" / "20261120", seed=3, filters=("r",), targets=[],
                     standard=False, shape=(64, 96), nbias=3, ndark=0, nflat=0)
    write_small_profile(tmp_path / "profiles", (64, 96))
    cfg = tmp_path / "reducer.toml"
    cfg.write_text('instrument = "demo"\nprofiles_dirs = ["profiles"]\nredux = "redux"\n')
    run_cli("--config", str(cfg), "night", "20261120", "--raw", str(sim.raw_dir), cwd=tmp_path)
    nd = tmp_path / "redux" / "20261120"
    path, text = write_report(Night(nd))
    assert path == nd / "report.txt" and path.read_text() == text
    assert "(no science or standard frames yet)" in text and "Frames failed (0)" in text


@pytest.mark.parametrize("name,cards,status,why", [
    ("tazsfpx.fits", {"QUALFLAG": True, "FWHM": 1.2, "PHOTZP": 25.0}, "ok", ""),
    ("tazsfpx.fits", {"QUALFLAG": False, "QUALWHY": "FWHM 2.50\" above 2.0\""}, "rejected",
     "FWHM 2.50\" above 2.0\""),
    ("tazsfpx.fits", {"FAILED": True, "FAILSTEP": "zeropoint",
                      "FAILWHY": "failed earlier at astrometry: CCD1: only 3 stars detected"},
     "failed", "zeropoint: failed earlier at astrometry: CCD1: only 3 stars detected"),
    ("zsfpx.fits", {"SKYLEVEL": 100.0}, "pending", "last product so far: zsfpx.fits"),
])
def test_frame_status_from_the_last_product(tmp_path, name, cards, status, why):
    """How a frame's last product (a real FITS file) classifies it."""
    from astropy.io import fits
    from reducer.inventory import Frame
    from reducer.nightsummary import frame_summary
    from reducer.report import failure_text
    h = fits.Header()
    for k, v in cards.items():
        h[k] = v
    h["EXPTIME"] = 60.0
    p = tmp_path / name
    fits.PrimaryHDU(header=h).writeto(p)
    fr = Frame("x.fits", "science", object="X", target="X", filter="r", exptime=60.0,
               date_obs="2026-11-20T03:00:00.000", mjd=61364.125, airmass=1.2)
    s, problem = frame_summary(fr, p, f"X/{name}", 0.6, "t")
    assert (s.status, s.why, problem) == (status, why, "")
    if status == "failed":
        assert failure_text(s.why) == "astrometry: CCD1: only 3 stars detected"
    if status == "ok":
        assert s.fwhm == 1.2 and s.zp == 25.0 and s.ut == "03:00:00"


def test_unreadable_product_is_a_failure_with_its_reason(tmp_path):
    from reducer.inventory import Frame
    from reducer.nightsummary import frame_summary
    p = tmp_path / "tazsfpx.fits"
    p.write_bytes(b"SIMPLE  =                    T" + b" " * 50)      # no END card, cut short
    fr = Frame("x.fits", "science", object="X", target="X", filter="r", exptime=60.0)
    s, problem = frame_summary(fr, p, "X/tazsfpx.fits", 0.6, "t")
    assert s.status == "failed" and "FITS header ends before its END card" in s.why
    assert str(p) in problem


def test_header_reader_agrees_with_astropy(tmp_path):
    """The standard-library header reader gives astropy's values (strings with quotes,
    long strings continued, booleans, numbers, 'nan' text)."""
    from astropy.io import fits
    from reducer.nightsummary import read_primary_header
    h = fits.Header()
    h["OBJECT"] = "M<b>&\"'x o'clock"
    h["LONGSTR"] = "a reason that is much longer than sixty-eight characters, " * 2
    h["QUALFLAG"] = False
    h["FAILED"] = True
    h["NSTAR"] = 12
    h["PHOTZP"] = 24.9695
    h["FWHM"] = "nan"
    h["COMMENT"] = "not a value"
    p = tmp_path / "h.fits"
    fits.PrimaryHDU(header=h).writeto(p)
    got = read_primary_header(p)
    for k in ("OBJECT", "LONGSTR", "QUALFLAG", "FAILED", "NSTAR", "PHOTZP", "FWHM"):
        assert got[k] == fits.getheader(p)[k], k
    assert "COMMENT" not in got
