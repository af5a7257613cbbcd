"""Bad input never stops the night: each case gets a one-line reason naming the problem."""
from __future__ import annotations

import gzip
import os
import time
from datetime import datetime, timezone

import numpy as np
import pytest
from astropy.io import fits

from reducer.headers import (FrameError, FrameIncomplete, parse_angle, parse_datetime,
                             parse_number, read_headers)
from reducer.instruments import load_profile
from reducer.inventory import inspect_frame, scan

from conftest import demo_frame, run_cli, run_doit

DEMO = load_profile("demo")


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_good_frame(tmp_path):
    fr = inspect_frame(demo_frame(tmp_path / "a.fits"), DEMO)
    assert fr.usable and fr.type == "science" and fr.ndet == 2 and fr.shape == "544x1024"


def test_zero_byte(tmp_path):
    p = tmp_path / "empty.fits"
    p.touch()
    fr = inspect_frame(p, DEMO)
    assert fr.type == "unusable" and fr.reason == "empty file (0 bytes)"


def test_not_fits(tmp_path):
    p = tmp_path / "notes.fits"
    p.write_text("observing log: clouds at 3am\n")
    fr = inspect_frame(p, DEMO)
    assert fr.reason.startswith("not a FITS file")


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_old_file_is_set_aside(tmp_path, keep):
    p = demo_frame(tmp_path / "t.fits")
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep) // 2880 * 2880 + 100])
    _age(p, 3600)
    fr = inspect_frame(p, DEMO)
    assert fr.type == "unusable" and "truncated" in fr.reason


def test_truncated_on_block_boundary(tmp_path):
    """Whole blocks but fewer than the headers promise: truncated, not accepted."""
    p = demo_frame(tmp_path / "t.fits")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2 // 2880 * 2880])
    _age(p, 3600)
    fr = inspect_frame(p, DEMO)
    assert "truncated" in fr.reason


def test_file_still_arriving_is_left_for_next_run(tmp_path):
    p = demo_frame(tmp_path / "arriving.fits")
    data = p.read_bytes()
    p.write_bytes(data[:100000])          # just written, not whole
    with pytest.raises(FrameIncomplete, match="still being written"):
        inspect_frame(p, DEMO)
    res = scan(tmp_path, DEMO)
    assert res.incomplete == ["arriving.fits"] and res.frames == []


def test_corrupt_header(tmp_path):
    p = tmp_path / "corrupt.fits"
    p.write_bytes(b"SIMPLE  =                    T" + b"\x00\xff" * 1425)
    _age(p, 3600)
    fr = inspect_frame(p, DEMO)
    assert fr.type == "unusable" and fr.reason


def test_gzip_frame(tmp_path):
    p = demo_frame(tmp_path / "g.fits")
    gz = tmp_path / "g.fits.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    p.unlink()
    fr = inspect_frame(gz, DEMO)
    assert fr.usable and fr.ndet == 2


def test_missing_detector(tmp_path):
    p = tmp_path / "one.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((4, 4)), name="CCD1")]).writeto(p)
    fr = inspect_frame(p, DEMO)
    assert "no HDU named 'CCD2'" in fr.reason


def test_no_date(tmp_path):
    fr = inspect_frame(demo_frame(tmp_path / "nd.fits", date=""), DEMO)
    assert fr.reason == "no observation date (DATE-OBS missing or empty)"


def test_unknown_type_word(tmp_path):
    fr = inspect_frame(demo_frame(tmp_path / "x.fits", imagetyp="mystery"), DEMO)
    assert fr.reason.startswith("no type rule matched (type word 'mystery'")


def test_focus_frames_are_ignored_with_reason(tmp_path):
    fr = inspect_frame(demo_frame(tmp_path / "f.fits", imagetyp="FOCUS"), DEMO)
    assert fr.type == "focus" and fr.reason == "ignored: a focus frame" and not fr.usable


@pytest.mark.parametrize("value,expected", [
    (12.5, 12.5), ("12.5", 12.5), ("6,4E-05", 6.4e-5), ("0,5", 0.5), (" 30 ", 30.0), ("", None),
])
def test_parse_number(value, expected):
    assert parse_number(value, "EXPTIME") == expected


@pytest.mark.parametrize("value", ["1,000,5", "abc", "1.5,3"])
def test_parse_number_ambiguous(value):
    with pytest.raises(FrameError, match=r"EXPTIME value .* is not a number"):
        parse_number(value, "EXPTIME")


@pytest.mark.parametrize("date,time_,order,expected", [
    ("2019-05-01T06:11:30", None, "dmy", "2019-05-01T06:11:30"),
    ("2019-05-01T06:11:30.250Z", None, "dmy", "2019-05-01T06:11:30.250"),
    ("2024-04-16T17:33:10+02:00", None, "dmy", "2024-04-16T15:33:10"),   # local time with offset
    ("2024-04-16T01:33:10-0700", None, "dmy", "2024-04-16T08:33:10"),
    ("2018-08-02", "01:49:55.225", "dmy", "2018-08-02T01:49:55.225"),
    ("15/11/2015", "08:18:35", "dmy", "2015-11-15T08:18:35"),
    ("19/05/94", "15:41:16", "dmy", "1994-05-19T15:41:16"),
    ("05/19/1994", "15:41:16", "mdy", "1994-05-19T15:41:16"),
])
def test_parse_datetime(date, time_, order, expected):
    t = parse_datetime(date, time_, order)
    assert t.tzinfo == timezone.utc
    assert t == datetime.fromisoformat(expected).replace(tzinfo=timezone.utc)


@pytest.mark.parametrize("date,time_,msg", [
    ("", None, "no observation date"),
    ("2019-05-01", None, "has no time of day"),
    ("31/02/2019", "01:00:00", "not a valid dmy date"),
    ("2019-13-01T00:00:00", None, "not a valid date"),
    ("May 1 2019", None, "not a date reducer can read"),
    ("2019-05-01T25:00:00", None, "impossible time"),
])
def test_parse_datetime_rejects(date, time_, msg):
    with pytest.raises(FrameError, match=msg):
        parse_datetime(date, time_)


@pytest.mark.parametrize("value,kind,unit,deg", [
    ("09 55 33.17", "ra", None, 148.888208), ("+69 03 55.1", "dec", None, 69.065306),
    ("-07:25:57.6", "dec", None, -7.4326667), (114.915783, "ra", None, 114.915783),
    ("-00:30:00", "dec", None, -0.5), ("148.888", "ra", "deg", 148.888),
])
def test_parse_angle(value, kind, unit, deg):
    assert parse_angle(value, kind, unit) == pytest.approx(deg, abs=1e-6)


def test_night_goes_on_with_bad_frames(tmp_path):
    """A raw folder with every kind of bad frame: the inventory finishes and explains each."""
    raw = tmp_path / "raw"
    raw.mkdir()
    demo_frame(raw / "good.fits")
    (raw / "empty.fits").touch()
    (raw / "text.fits").write_text("hello")
    bad = demo_frame(raw / "short.fits")
    bad.write_bytes(bad.read_bytes()[:5000])
    _age(bad, 3600)
    (raw / "README.txt").write_text("not a frame and not named like one: not listed")
    run_cli("night", "20261120", "--raw", str(raw), "--instrument", "demo", cwd=tmp_path)
    nd = tmp_path / "redux" / "20261120"
    os.chmod(raw, 0o555)
    try:
        r = run_doit(nd, "inventory")
    finally:
        os.chmod(raw, 0o755)
    assert "set aside empty.fits: empty file (0 bytes)" in r.stdout
    assert "set aside text.fits: not a FITS file" in r.stdout
    assert "set aside short.fits: truncated" in r.stdout
    assert "README" not in r.stdout
    from reducer.inventory import read_nightlog
    log = {f.file: f for f in read_nightlog(nd / "nightlog.ecsv")}
    assert log["good.fits"].usable and not log["empty.fits"].usable
    assert sorted(os.listdir(raw)) == ["README.txt", "empty.fits", "good.fits", "short.fits", "text.fits"]
