"""The inventory on every real data set: `reducer night` + a real `doit` run.

Expected types come from each set's MANIFEST (keyword values and notes), written out here
file by file. Where headers carry no type at all (KAIT, ZWO, PANOPTES) the profile's rule is
named in the comment.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from reducer.inventory import read_nightlog

from conftest import real_set, run_cli, run_doit

pytestmark = pytest.mark.realdata


def _arcsat_expected(night: str) -> dict:
    d = real_set("arcsat-2019-ugriz-ha")
    exp = {}
    for p in sorted(d.glob("*.fits")):
        n = p.name
        if n.startswith("Bias"):
            t = ("bias", "")
        elif n.startswith("Dark"):
            t = ("dark", "")
        elif n.startswith("domeflat"):
            t = ("flat", "dome")
        elif n.startswith("skyflat"):
            t = ("flat", "sky")
        else:
            t = ("science", "")
        exp[n] = t
    # which night each frame belongs to (local noon to noon at APO, America/Denver)
    def night_of(n):
        if n == "Bias_BIN1_20190506_223801.fits":
            return "20190507"   # taken 16:38 local on 6 May: the afternoon of the next night
        if n.startswith(("Bias", "Dark_BIN1")):
            return "20190506"
        if n.startswith("domeflat"):
            return "20190503"
        return "20190501"       # science, sky flats, the 2x2 darks
    return {n: t for n, t in exp.items() if night_of(n) == night}


CAHA = {
    "uamA_0001.fits": ("bias", "", "20210319"), "uamA_0002.fits": ("bias", "", "20210319"),
    "uamA_0043.fits": ("flat", "dome", "20210319"), "uamA_0048.fits": ("flat", "dome", "20210319"),
    **{f"uamA_00{i}.fits": ("science", "", "20210329") for i in range(23, 34)},
}
WHT = {
    "r2700982.fit.gz": ("bias", ""), "r2700984.fit.gz": ("bias", ""), "r2700986.fit.gz": ("bias", ""),
    "r2701242.fit.gz": ("science", ""), "r2701244.fit.gz": ("science", ""),
}


def _night(tmp_path, raw, utdate, instrument):
    run_cli("night", utdate, "--raw", str(raw), "--instrument", instrument, cwd=tmp_path)
    nd = tmp_path / "redux" / utdate
    r = run_doit(nd, "inventory")
    log = {f.file: f for f in read_nightlog(nd / "nightlog.ecsv")}
    return nd, r, log


@pytest.mark.parametrize("utdate", ["20190501", "20190503", "20190506", "20190507"])
def test_arcsat_nights(tmp_path, utdate):
    raw = real_set("arcsat-2019-ugriz-ha")
    nd, r, log = _night(tmp_path, raw, utdate, "arcsat")
    exp = _arcsat_expected(utdate)
    assert set(log) == set(exp), "exactly this night's frames are listed"
    for name, (typ, sub) in exp.items():
        assert (log[name].type, log[name].subtype) == (typ, sub), name
        assert log[name].usable and log[name].night == utdate
    if utdate == "20190501":
        m82 = log["M82_sdss_g_20190501_040858.fits"]
        assert (m82.binning, m82.shape) == ("2x2", "512x512")
        assert log["M 81_sdss_r_20190501_061120.fits"].target == "M_81"
        assert log["NGC 2841_sdss_g_20190501_053223.fits"].object == "NGC 2841"
        filters = {f.filter for f in log.values() if f.type == "science"}
        assert filters == {"sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z", "halpha"}
    # a second run does nothing
    again = run_doit(nd, "inventory")
    assert "-- inventory" in again.stdout


def test_caha(tmp_path):
    raw = real_set("caha22-cafos-ngc2420-BV")
    for utdate in ("20210319", "20210329"):
        nd, r, log = _night(tmp_path, raw, utdate, "caha-cafos")
        exp = {n: v for n, v in CAHA.items() if v[2] == utdate}
        assert set(log) == set(exp)
        for name, (typ, sub, _) in exp.items():
            assert (log[name].type, log[name].subtype) == (typ, sub), name
    # the filter comes from INSFLNAM (no FILTER keyword in CAHA headers)
    assert log["uamA_0023.fits"].filter == "JohnsonB"
    assert log["uamA_0029.fits"].filter == "JohnsonV"


def test_wht(tmp_path):
    raw = real_set("wht-isis-red-longslit")
    nd, r, log = _night(tmp_path, raw, "20180802", "wht-isis-red")
    assert {n: (f.type, f.subtype) for n, f in log.items()} == WHT
    # DATE-OBS holds only the date; the time comes from UTSTART
    assert log["r2701242.fit.gz"].date_obs.startswith("2018-08-02T01:49:55")
    assert log["r2700982.fit.gz"].shape == "966x4200"


def test_kait_traps(tmp_path):
    """KAIT headers carry no image type: the profile types any frame with an OBJECT as science."""
    raw = real_set("kait-format-traps")
    nd, r, log = _night(tmp_path, raw, "20151115", "kait")
    good = log["goodkait.fits"]
    assert good.type == "science" and good.usable
    # DATE-OBS '15/11/2015' (old FITS day-first form) + UT '08:18:35'
    assert good.date_obs == "2015-11-15T08:18:35.000"
    assert good.filter == "clear" and good.exptime == 18.0


def test_kait_lzw_needs_uncompresspy(tmp_path, monkeypatch):
    from reducer import headers
    from reducer.instruments import load_profile
    from reducer.inventory import inspect_frame
    raw = real_set("kait-format-traps")
    prof = load_profile("kait")
    fr = inspect_frame(raw / "badkait.fts.Z", prof)
    if headers.lzw_available():
        assert fr.type == "science" and fr.date_obs == "2015-09-30T07:47:17.000"
    monkeypatch.setattr(headers, "lzw_available", lambda: False)
    fr = inspect_frame(raw / "badkait.fts.Z", prof)
    assert fr.type == "unusable"
    assert "uncompresspy" in fr.reason and "LZW" in fr.reason


def test_zwo_decimal_comma_and_file_names(tmp_path):
    """No IMAGETYP: typed from the file names; EXPTIME '6,4E-05' read as 6.4e-05 s."""
    raw = real_set("zwo-asi120-lab-malformed-headers")
    nd, r, log = _night(tmp_path, raw, "20240416", "zwo-asi120")
    assert {n: f.type for n, f in log.items()} == {
        **{f"Bias_ASIImg_frame000{i}.fit": "bias" for i in (1, 2, 3)},
        **{f"Dark_ASIImg_100sec_frame000{i}.fit": "dark" for i in (1, 2, 3)}}
    assert log["Bias_ASIImg_frame0001.fit"].exptime == pytest.approx(6.4e-5)
    nd, r, log = _night(tmp_path, raw, "20240418", "zwo-asi120")
    assert {n: f.type for n, f in log.items()} == {f"Flat_ASIImg_frame000{i}.fit": "flat" for i in (1, 2, 3)}


def test_panoptes(tmp_path):
    """DSLR frames carry no type: the profile makes them all science; .fz read from HDU 1."""
    raw = real_set("panoptes-dslr-astrometry")
    nd, r, log = _night(tmp_path, raw, "20160909", "panoptes")
    assert {n: f.type for n, f in log.items()} == {
        "solved.fits.fz": "science", "tiny.fits": "science", "unsolved.fits": "science"}
    assert log["solved.fits.fz"].shape == "700x700"
    assert log["unsolved.fits"].object == "KIC 8462852"


@pytest.mark.parametrize("instrument,utdate,own,ndet", [
    ("saao-ste3", "20130712", "a8280271.fits", 1),
    ("gmos-s", "20190808", "gmos.fits", 1),
    ("hst-wfpc2", "19940520", "test0.fits", 4),
    ("hst-stis", "19980421", "o4sp040b0_raw.fits", 2),
])
def test_tiny_mixed_instruments(tmp_path, instrument, utdate, own, ndet):
    """One folder, four instruments: each profile takes its own frame, names the others."""
    raw = real_set("tiny-real-frames-from-pypi")
    nd, r, log = _night(tmp_path, raw, utdate, instrument)
    assert log[own].type == "science" and log[own].usable and log[own].ndet == ndet
    for name, f in log.items():
        if name != own:
            assert f.type == "unusable" and f.reason.startswith(f"not a {instrument} frame"), name
    assert f"set aside" in r.stdout


def test_nights_lists_every_night(tmp_path):
    raw = real_set("arcsat-2019-ugriz-ha")
    r = run_cli("nights", "--raw", str(raw), "--instrument", "arcsat", cwd=tmp_path)
    for n in ("20190501", "20190503", "20190506", "20190507"):
        assert n in r.stdout
        assert (tmp_path / "redux" / n / "dodo.py").is_file()
    assert "4 night(s)" in r.stdout


def test_explain(tmp_path):
    raw = real_set("arcsat-2019-ugriz-ha")
    r = run_cli("explain", str(raw / "skyflat_sdss_g_001.fits"), "--instrument", "arcsat")
    assert "typed flat (sky)" in r.stdout
    assert "skyflat*" in r.stdout and "'FLAT'" in r.stdout
    r = run_cli("explain", str(real_set("zwo-asi120-lab-malformed-headers") / "Bias_ASIImg_frame0001.fit"),
                "--instrument", "zwo-asi120")
    assert "card EXPTIME is not valid FITS" in r.stdout
    assert "typed bias" in r.stdout
