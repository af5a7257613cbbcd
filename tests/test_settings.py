"""Settings files, instrument profiles, layers and digests, sections, nights, night directories."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reducer.config import SettingsError, find_site_config, load_site, stage_digest
from reducer.instruments import (ProfileError, SectionError, Site, load_profile, parse_section,
                                 profile_paths)
from reducer.night import Night, NightError, make_night_dir
from reducer.nights import night_bounds, night_of

from conftest import demo_frame, run_cli, run_doit


# ------------------------------------------------------------------ site settings
def test_no_settings_file_gives_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_site()
    assert s.source is None
    assert s.path("redux") == tmp_path / "redux"
    assert s.registry_url == f"sqlite:///{tmp_path / 'masters' / 'registry.sqlite'}"


@pytest.mark.parametrize("text,msg", [
    ('redux = "x"\nrawdir = "y"\n', r"unknown key 'rawdir' \(did you mean 'raw'\? allowed: astrometry, .*raw, redux"),
    ('[mail]\nport = "25"\n', r"'mail.port' must be an integer, not a string '25'"),
    ('[mail]\nhost = "h"\nstarttls = "yes"\n', r"'mail.starttls' must be true/false"),
    ('[site]\nx = 1\n', r"unknown key 'site'"),
    ('profiles_dirs = "dir"\n', r"'profiles_dirs' must be an array of strings, not a string 'dir'"),
    ('redux = \n', r"not valid TOML"),
])
def test_settings_validation_messages(tmp_path, text, msg):
    p = tmp_path / "reducer.toml"
    p.write_text(text)
    with pytest.raises(SettingsError, match=msg) as ei:
        load_site(str(p))
    assert str(p) in str(ei.value)


def test_settings_discovery_order(tmp_path, monkeypatch):
    a, b, c = (tmp_path / n for n in ("a.toml", "b.toml", "xdg"))
    a.write_text('redux = "A"\n')
    b.write_text('redux = "B"\n')
    (c / "reducer").mkdir(parents=True)
    (c / "reducer" / "reducer.toml").write_text('redux = "C"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(c))
    assert load_site().data["redux"] == "C"
    monkeypatch.setenv("REDUCER_CONFIG", str(b))
    assert load_site().data["redux"] == "B"
    assert load_site(str(a)).data["redux"] == "A"
    # relative paths are relative to the settings file
    assert load_site(str(a)).path("redux") == tmp_path / "A"
    monkeypatch.setenv("REDUCER_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(SettingsError, match=r"missing.toml: settings file named by \$REDUCER_CONFIG does not exist"):
        find_site_config()


# ------------------------------------------------------------------ profiles
def test_every_shipped_profile_loads():
    names = sorted(profile_paths())
    assert {"demo", "arcsat", "caha-cafos", "wht-isis-red", "kait", "zwo-asi120", "panoptes",
            "saao-ste3", "gmos-s", "hst-wfpc2", "hst-stis"} <= set(names)
    for n in names:
        p = load_profile(n)
        assert p.detectors and p.rules


def _profile_text(**repl):
    text = (Path(load_profile("demo").path)).read_text()
    for a, b in repl.items():
        text = text.replace(a, b)
    return text


@pytest.mark.parametrize("old,new,msg", [
    ('pixel_scale = 0.60', 'pixel_scal = 0.60', r"\[wcs\] unknown key 'pixel_scal' \(did you mean 'pixel_scale'\? allowed: flip_x, offsets, pixel_scale, rotation\)"),
    ('gain = 1.5 ', 'gain = "1.5" ', r"'detectors\[0\].gain' must be a number, not a string '1.5'"),
    ('type = "dark"', 'type = "darkk"', r"'types\[1\].type' is 'darkk'; allowed: one of 'bias'"),
    ('timezone = "America/Denver"', 'timezone = "Mars/Olympus"', r"timezone 'Mars/Olympus' is not a known IANA time zone"),
    ('biassec = "[515:544,1:1024]"', 'biassec = "[515-544,1:1024]"', r"detector CCD1: biassec: cannot parse section"),
    ('[[detectors]]\nname = "CCD2"', '[[detectors]]\nname = "CCD1"', r"detector names repeat"),
])
def test_profile_validation_messages(tmp_path, old, new, msg):
    p = tmp_path / "bad.toml"
    text = _profile_text(**{old: new})
    assert text != _profile_text()
    p.write_text(text)
    with pytest.raises(ProfileError, match=msg) as ei:
        load_profile(p)
    assert str(p) in str(ei.value)


def test_unknown_profile_lists_known():
    with pytest.raises(ProfileError, match=r"unknown instrument profile 'nope'; known: .*arcsat.*demo"):
        load_profile("nope")


def test_user_profile_dir_adds_and_overrides(tmp_path):
    (tmp_path / "mycam.toml").write_text(_profile_text(**{'name = "demo"': 'name = "mycam"'}))
    assert load_profile("mycam", [tmp_path]).name == "mycam"


# ------------------------------------------------------------------ sections
@pytest.mark.parametrize("text,syntax,rows,cols", [
    ("[515:544,1:1024]", "iraf", (0, 1024), (514, 544)),
    ("[   4:  13,   1: 520]", "iraf", (0, 520), (3, 13)),     # padded, as SAAO writes it
    ("[1:966,4110:4190]", "iraf", (4109, 4190), (0, 966)),
    ("[513,513:1536,1536]", "xy", (512, 1536), (512, 1536)),   # CAHA's x1,y1:x2,y2 form
    ("[10:1,1:5]", "iraf", (0, 5), (0, 10)),                   # reversed range
])
def test_parse_section(text, syntax, rows, cols):
    r, c = parse_section(text, syntax)
    assert (r.start, r.stop) == rows and (c.start, c.stop) == cols


@pytest.mark.parametrize("text,msg", [("[0,513:0,1536]", "cannot parse"), ("[0:10,1:5]", "1-based"),
                                      ("1:10,1:5", "cannot parse")])
def test_parse_section_errors(text, msg):
    with pytest.raises(SectionError, match=msg):
        parse_section(text)


# ------------------------------------------------------------------ nights
APO = Site(-105.8203, 32.7803, 2788.0, "America/Denver")
LA_PALMA = Site(-17.8816, 28.7606, 2332.0, "Atlantic/Canary")
KISO = Site(137.6253, 35.7975, 1130.0, "Asia/Tokyo")
CALAR_ALTO = Site(-2.5461, 37.2236, 2168.0, "Europe/Madrid")


@pytest.mark.parametrize("site,iso,label", [
    (APO, "2019-05-01T01:42:13", "20190501"),   # evening twilight, 19:42 MDT 30 April
    (APO, "2019-05-01T11:50:00", "20190501"),   # 05:50 MDT: still the same night
    (APO, "2019-05-01T18:30:00", "20190502"),   # 12:30 MDT: after local noon, next night
    (APO, "2019-05-01T17:59:59", "20190501"),   # 11:59:59 MDT
    (LA_PALMA, "2018-08-01T19:23:13", "20180802"),
    (LA_PALMA, "2018-08-02T01:49:55", "20180802"),
    (KISO, "2020-01-01T10:00:00", "20200101"),  # 19:00 JST on 1 January
    (KISO, "2020-01-01T20:00:00", "20200101"),  # 05:00 JST on 2 January
    (CALAR_ALTO, "2021-03-28T23:06:34", "20210329"),  # the night daylight saving began
])
def test_night_of(site, iso, label):
    t = datetime.fromisoformat(iso).replace(tzinfo=timezone.utc)
    assert night_of(t, site) == label
    start, end = night_bounds(label, site)
    assert start <= t < end


@pytest.mark.parametrize("site", [APO, LA_PALMA, KISO, CALAR_ALTO])
def test_night_bounds_are_local_noons(site):
    from zoneinfo import ZoneInfo
    start, end = night_bounds("20210329", site)
    for t in (start, end):
        local = t.astimezone(ZoneInfo(site.timezone))
        assert (local.hour, local.minute) == (12, 0)
    assert 23 * 3600 <= (end - start).total_seconds() <= 25 * 3600


def test_night_bounds_rejects_bad_label():
    with pytest.raises(ValueError, match="not a UT date YYYYMMDD"):
        night_bounds("2021-03-29", APO)


# ------------------------------------------------------------------ night directories
def test_night_dir_keeps_user_edits_and_layers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "raw"
    raw.mkdir()
    site_toml = tmp_path / "reducer.toml"
    site_toml.write_text('instrument = "demo"\n[calib]\nclip = { bias = 3.0 }\n')
    site = load_site(str(site_toml))
    res = make_night_dir(site, "20261120", raw=raw)
    nd = res.path
    assert {p.name for p in res.made} == {"raw", "dodo.py", "night.toml"}
    assert (nd / "raw").resolve() == raw.resolve()
    night = Night(nd)
    # layers: the profile's calib table lies over the site's, then night.toml over both
    assert night.settings["calib"]["clip"] == {"bias": 3.0}
    assert night.settings["calib"]["min_frames"]["bias"] == 3
    bias0, flat0 = night.digest("calib"), night.digest("stack")
    text = (nd / "night.toml").read_text() + '\n[stack]\nnsigma = 3.0\n'
    (nd / "night.toml").write_text(text)
    again = make_night_dir(site, "20261120", raw=raw)
    assert again.made == [] and (nd / "night.toml").read_text() == text
    night = Night(nd)
    assert night.digest("calib") == bias0 and night.digest("stack") != flat0
    # a fixed profile or site file reaches the existing night
    site_toml.write_text('instrument = "demo"\n[calib]\nclip = { bias = 2.5 }\n')
    assert Night(nd).settings["calib"]["clip"]["bias"] == 2.5
    with pytest.raises(NightError, match="already points to"):
        other = tmp_path / "raw2"
        other.mkdir()
        make_night_dir(site, "20261120", raw=other)


def test_night_toml_validation_names_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw").mkdir()
    run_cli("night", "20261120", "--raw", "raw", "--instrument", "demo", cwd=tmp_path)
    nt = tmp_path / "redux" / "20261120" / "night.toml"
    nt.write_text(nt.read_text().replace("drop = []", "drop = \"x.fits\""))
    r = run_cli("settings", str(nt.parent), check=False)
    assert r.returncode == 2
    assert f"{nt}: 'drop' must be an array of strings, not a string 'x.fits'" in r.stderr


def test_cli_errors_are_one_line(tmp_path):
    r = run_cli("night", "20261120", "--raw", str(tmp_path / "nope"), "--instrument", "demo",
                cwd=tmp_path, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = run_cli("night", "2026-11-20", "--raw", str(tmp_path), "--instrument", "demo", cwd=tmp_path, check=False)
    assert "not a UT date YYYYMMDD" in r.stderr
    r = run_cli("night", "20261120", "--raw", str(tmp_path), cwd=tmp_path, check=False)
    assert "no instrument" in r.stderr


def test_settings_command_and_doit_config(tmp_path):
    (tmp_path / "raw").mkdir()
    run_cli("night", "20261120", "--raw", "raw", "--instrument", "demo", cwd=tmp_path)
    nd = tmp_path / "redux" / "20261120"
    r = run_cli("settings", cwd=nd)
    assert "instrument" in r.stdout and str(nd / "night.toml") in r.stdout
    body = json.loads(r.stdout[r.stdout.index("{"):])
    assert body["calib"]["min_frames"]["bias"] == 3
    from reducer.tasks import doit_config
    cfg = doit_config(Night(nd))
    assert cfg["backend"] == "sqlite3" and cfg["check_file_uptodate"] == "timestamp"
    out = run_doit(nd, "list").stdout
    assert "inventory" in out


def test_drop_in_night_toml_reruns_inventory(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    demo_frame(raw / "a.fits")
    demo_frame(raw / "b.fits")
    run_cli("night", "20261120", "--raw", str(raw), "--instrument", "demo", cwd=tmp_path)
    nd = tmp_path / "redux" / "20261120"
    run_doit(nd, "inventory")
    assert "-- inventory" in run_doit(nd, "inventory").stdout
    nt = nd / "night.toml"
    nt.write_text(nt.read_text().replace("drop = []", 'drop = ["b.fits"]'))
    r = run_doit(nd, "inventory")
    assert "set aside b.fits: dropped in night.toml" in r.stdout
