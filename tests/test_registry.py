"""Tests of the calibration registry (reducer.registry) and ``reducer calib``.

Every database test runs on SQLite (a file in ``tmp_path``) and, when the environment
variable ``REDUCER_TEST_PG_URL`` is set (``source .ci/postgres.sh``), on PostgreSQL,
each test in a fresh schema that is dropped afterwards.
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sa = pytest.importorskip("sqlalchemy")

from reducer import registry as reg  # noqa: E402
from reducer import registry_cli  # noqa: E402
from reducer.registry import (  # noqa: E402
    DEFAULT_MAX_AGE_DAYS,
    ChecksumMismatch,
    InvalidValue,
    MasterFileMissing,
    MasterNotFound,
    Registry,
    RegistryError,
    master_filename,
    set_key_string,
)

PG_URL = os.environ.get("REDUCER_TEST_PG_URL")
FLAT_R = {"binning": "1x1", "filter": "r", "shape": (1024, 1024)}
FLAT_G = {"binning": "1x1", "filter": "g", "shape": (1024, 1024)}


# ----------------------------------------------------------------------- fixtures
@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """URL of an empty registry on each backend.

    Yields
    ------
    str
        ``sqlite:////.../registry.sqlite``, or the PostgreSQL URL with a fresh
        schema on its ``search_path``.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.sqlite'}"
        return
    if not PG_URL:
        pytest.skip("PostgreSQL tests need REDUCER_TEST_PG_URL (source .ci/postgres.sh)")
    pytest.importorskip("psycopg2")
    base = sa.engine.make_url(PG_URL)
    schema = f"test_registry_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        url = base.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
def registry(db_url):
    """An open :class:`Registry` on ``db_url``."""
    with Registry(db_url) as r:
        yield r


def make_fits(path: Path, value: float = 1.0, **header) -> Path:
    """Write a small FITS file with the given header cards.

    Parameters
    ----------
    path : Path
    value : float
        Pixel value (makes the content, hence the checksum, distinct).
    **header
        Cards; ``MJD_MID`` is written as ``MJD-MID``.

    Returns
    -------
    Path
    """
    import numpy as np
    from astropy.io import fits

    hdr = fits.Header()
    for key, val in header.items():
        hdr[key.replace("_", "-")] = val
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(np.full((8, 8), value, dtype=np.float32), header=hdr).writeto(path)
    return path


def sha256(path: Path) -> str:
    """SHA-256 (hex) of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cert(registry, mjd_mid, *, night=None, set_key=FLAT_R, imtype="flat", instrument="demo",
         **kw) -> int:
    """Register a certified master at ``mjd_mid`` (no file); return its id."""
    if night is None:  # the UT date of mjd_mid
        import datetime as dt

        night = (dt.date(1858, 11, 17) + dt.timedelta(days=int(mjd_mid))).strftime("%Y%m%d")
    return registry.register(instrument, imtype, set_key, night, f"/store/{night}_{imtype}.fits",
                             mjd_mid=mjd_mid, certified=True, **kw)


# -------------------------------------------------------------- keys and file names
def test_set_key_string_is_sorted_stable_and_canonical():
    """Equal key sets give one sorted string, whatever the order, case or number types."""
    a = set_key_string({"shape": (1024, 1024), "filter": "r", "binning": "1x1"})
    b = set_key_string({"binning": "1x1", "Filter": " r ", "shape": [1024, 1024]})
    assert a == b == "binning=1x1;filter=r;shape=1024x1024"
    assert set_key_string({"exptime": 30.0, "gain": 1.5, "amp": 2, "cds": True}) == (
        "amp=2;cds=true;exptime=30;gain=1.5"
    )
    assert set_key_string({}) == ""
    assert reg.parse_set_key(a) == {"binning": "1x1", "filter": "r", "shape": "1024x1024"}
    # strings are canonicalised too
    assert reg._canonical_set_key("shape=1024x1024; filter=r;binning=1x1") == a


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"filter": "r;g"}, "contains ';' or '='"),
        ({"filter": None}, "'filter' has no value"),
        ({"bad key": 1}, "not made of letters"),
        ({"a": 1, "A": 2}, "given twice"),
    ],
)
def test_set_key_string_errors(keys, match):
    """Ambiguous or empty keys are refused with a message naming the key."""
    with pytest.raises(InvalidValue, match=match):
        set_key_string(keys)


def test_master_filename_is_stable_and_safe():
    """Store names follow <instrument>_<UTDATE>_master_<type>[_<key>].fits."""
    assert master_filename("demo", "20240315", "flat", FLAT_R) == (
        "demo_20240315_master_flat_1x1_r_1024x1024.fits"
    )
    assert master_filename("demo", "20240315", "bias", {}) == "demo_20240315_master_bias.fits"
    assert master_filename("KPF", "20240315", "arc", {"lamp": "Th Ar/2"}) == (
        "KPF_20240315_master_arc_Th-Ar-2.fits"
    )
    with pytest.raises(InvalidValue, match="night '2024-03-15' is not a UTDATE"):
        master_filename("demo", "2024-03-15", "flat", FLAT_R)
    with pytest.raises(InvalidValue, match="calibration type 'sky' is not one of"):
        master_filename("demo", "20240315", "sky", FLAT_R)


def test_default_max_ages():
    """The documented default maximum ages and the MJD of a UTDATE."""
    assert dict(DEFAULT_MAX_AGE_DAYS) == {"bias": 90.0, "dark": 365.0, "flat": 180.0, "arc": 30.0}
    assert reg.night_mjd("20240315") == 60384.0


# -------------------------------------------------------------------- registration
def test_sqlite_connections_use_wal_and_busy_timeout(tmp_path):
    """Every SQLite connection is in WAL mode with the busy timeout."""
    path = tmp_path / "sub" / "dir" / "registry.sqlite"  # folder created on demand
    with Registry(path) as r:  # a plain path is an SQLite file
        assert str(r.url) == f"sqlite:///{path}"
        with r.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == reg.SQLITE_BUSY_TIMEOUT_MS


def test_register_upsert_is_idempotent(registry):
    """Re-registering a key updates its row (same id, bad mark and creation kept)."""
    first = registry.register("demo", "flat", FLAT_R, "20240315", "/night/a/flat.fits",
                              mjd_min=60384.9, mjd_max=60385.1, nframes=5,
                              verification="PASS", details={"rms": 0.01})
    again = registry.register("demo", "flat", "shape=1024x1024;filter=r;binning=1x1",
                              "20240315", "/night/a/flat.fits",
                              mjd_min=60384.9, mjd_max=60385.1, nframes=5,
                              verification="PASS", details={"rms": 0.01})
    assert first == again
    (rec,) = registry.list()
    assert rec.id == first
    assert rec.mjd_mid == pytest.approx(60385.0)  # mean of min and max
    assert rec.details == {"rms": 0.01}
    assert rec.verification == "PASS" and rec.nframes == 5 and not rec.certified
    assert rec.created.tzinfo is not None

    registry.mark_bad(first, "striped")
    updated = registry.register("demo", "flat", FLAT_R, "20240315", "/night/b/flat.fits",
                                nframes=7)
    assert updated == first
    rec2 = registry.get(first)
    assert rec2.path == Path("/night/b/flat.fits") and rec2.nframes == 7
    assert rec2.mjd_mid == reg.night_mjd("20240315") + 0.5  # default: middle of the UT date
    assert rec2.bad and rec2.bad_reason == "striped"  # a bad mark survives re-registration
    assert rec2.created == rec.created and rec2.updated >= rec.updated

    other = registry.register("demo", "flat", FLAT_G, "20240315", "/night/b/flat_g.fits")
    assert other != first
    assert [r.set_key for r in registry.list(imtype="flat")] == [
        "binning=1x1;filter=g;shape=1024x1024", "binning=1x1;filter=r;shape=1024x1024"]
    assert registry.list(instrument="other") == []


def test_register_checksum_of_existing_file(registry, tmp_path):
    """The checksum of an existing file is computed when not given."""
    f = make_fits(tmp_path / "bias.fits")
    rid = registry.register("demo", "bias", {"binning": "2x2"}, "20240315", f)
    assert registry.get(rid).checksum == sha256(f)


def test_register_rejects_bad_values(registry):
    """Invalid arguments raise InvalidValue with a precise message."""
    with pytest.raises(InvalidValue, match="calibration type 'science' is not one of"):
        registry.register("demo", "science", FLAT_R, "20240315", "/x.fits")
    with pytest.raises(InvalidValue, match="night '20241345' is not a valid date"):
        registry.register("demo", "flat", FLAT_R, "20241345", "/x.fits")
    with pytest.raises(InvalidValue, match="verification 'OK' is not one of"):
        registry.register("demo", "flat", FLAT_R, "20240315", "/x.fits", verification="OK")
    with pytest.raises(InvalidValue, match="validity range is empty"):
        registry.register("demo", "flat", FLAT_R, "20240315", "/x.fits",
                          valid_from_mjd=60400, valid_to_mjd=60300)
    with pytest.raises(InvalidValue, match="checksum 'abc' of /x.fits is not a sha256"):
        registry.register("demo", "flat", FLAT_R, "20240315", "/x.fits", checksum="abc")


def test_errors_name_the_id_and_path(registry, tmp_path):
    """Errors about a master name its id and its file."""
    with pytest.raises(MasterNotFound, match=r"no master with id 4242 in registry "):
        registry.get(4242)
    with pytest.raises(MasterNotFound, match="no master with id 77"):
        registry.decertify(77)
    with pytest.raises(MasterNotFound, match="no master with id 78"):
        registry.mark_bad(78, "why")
    rid = registry.register("demo", "bias", {}, "20240315", tmp_path / "gone.fits")
    with pytest.raises(InvalidValue, match=f"marking master id {rid} bad needs a reason"):
        registry.mark_bad(rid, "  ")
    with pytest.raises(MasterFileMissing, match=f"file .*gone.fits of master id {rid} does not exist"):
        registry.verify(rid)


# ----------------------------------------------------------------------- certify
def test_certify_copies_atomically_with_stable_name(registry, tmp_path):
    """certify copies into the store (stable name, verified checksum, no temporary)."""
    src = make_fits(tmp_path / "night" / "master_flat_r.fits", 2.0, MJD_MID=60384.8, NCOMBINE=9)
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    store = tmp_path / "store"
    # the night's reduction registered it first, with its verification
    rid = registry.register("demo", "flat", FLAT_R, "20240315", src, verification="PASS",
                            details={"flatness": 0.002}, mjd_mid=60384.75)

    rec = registry.certify(src, store, instrument="demo", imtype="flat", set_key=FLAT_R,
                           night="20240315")
    dest = store / "demo_20240315_master_flat_1x1_r_1024x1024.fits"
    assert rec.id == rid and rec.certified
    assert rec.path == dest
    assert rec.checksum == sha256(src) == sha256(dest)
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before  # original untouched
    assert sorted(p.name for p in store.iterdir()) == [dest.name]  # no temporary left
    assert not dest.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    # fields not given come from the registered row, not from the header
    assert rec.verification == "PASS" and rec.details == {"flatness": 0.002}
    assert rec.mjd_mid == 60384.75
    assert rec.nframes == 9  # not in the row: from NCOMBINE
    assert rec.valid_from_mjd is None and rec.valid_to_mjd is None  # open by default
    assert registry.verify(rid).id == rid

    # certifying a new version of the same master replaces the file, same row
    src2 = make_fits(tmp_path / "night2" / "flat.fits", 3.0)
    rec2 = registry.certify(src2, store, instrument="demo", imtype="flat", set_key=FLAT_R,
                            night="20240315", valid_from_mjd=60380.0, valid_to_mjd=60500.0)
    assert rec2.id == rid and rec2.checksum == sha256(src2) == sha256(dest)
    assert (rec2.valid_from_mjd, rec2.valid_to_mjd) == (60380.0, 60500.0)
    assert sorted(p.name for p in store.iterdir()) == [dest.name]
    # re-certifying the stored file itself is a no-op copy
    assert registry.certify(dest, store, instrument="demo", imtype="flat", set_key=FLAT_R,
                            night="20240315").checksum == rec2.checksum


def test_certify_header_times_for_a_new_master(registry, tmp_path):
    """Times and frame count of an unregistered master come from its FITS header."""
    src = make_fits(tmp_path / "bias.fits", MJD_MIN=60384.9, MJD_MAX=60385.3, NCOMBINE=11)
    rec = registry.certify(src, tmp_path / "store", instrument="demo", imtype="bias",
                           set_key={}, night="20240315")
    assert rec.path.name == "demo_20240315_master_bias.fits"
    assert rec.mjd_mid == pytest.approx(60385.1) and rec.nframes == 11
    assert rec.verification == "UNVERIFIED"


def test_certify_failed_copy_leaves_nothing(registry, tmp_path, monkeypatch):
    """A copy whose checksum differs leaves neither a file nor a row."""
    src = make_fits(tmp_path / "flat.fits")
    store = tmp_path / "store"
    monkeypatch.setattr(reg, "sha256_file", lambda path: "0" * 64)  # a corrupted copy
    with pytest.raises(ChecksumMismatch, match=r"checksum mismatch for .*\.tmp \(copy of .*flat\.fits\)"):
        registry.certify(src, store, instrument="demo", imtype="flat", set_key=FLAT_R,
                         night="20240315")
    assert list(store.iterdir()) == []
    assert registry.list() == []


def test_certify_refusals(registry, tmp_path):
    """Missing files, failed verification and store-name clashes are refused."""
    store = tmp_path / "store"
    with pytest.raises(MasterFileMissing, match=r"master to certify .*nothere\.fits does not exist"):
        registry.certify(tmp_path / "nothere.fits", store, instrument="demo", imtype="flat",
                         set_key=FLAT_R, night="20240315")
    src = make_fits(tmp_path / "flat.fits")
    rid = registry.register("demo", "flat", FLAT_R, "20240315", src, verification="FAIL")
    with pytest.raises(RegistryError, match=rf"refusing to certify .*flat\.fits: its verification "
                                            rf"is FAIL \(master id {rid}\)"):
        registry.certify(src, store, instrument="demo", imtype="flat", set_key=FLAT_R,
                         night="20240315")
    assert registry.certify(src, store, instrument="demo", imtype="flat", set_key=FLAT_R,
                            night="20240315", force=True).certified
    # another set key whose compact form is the same file name
    with pytest.raises(RegistryError, match=rf"store file .* already belongs to master id {rid}"):
        registry.certify(src, store, instrument="demo", imtype="flat", night="20240315",
                         set_key={"binning": "1x1", "grating": "r", "shape": "1024x1024"})


def test_tampered_store_file_fails_verification(registry, tmp_path):
    """verify() detects a stored file changed after certification."""
    rec = registry.certify(make_fits(tmp_path / "arc.fits"), tmp_path / "store",
                           instrument="demo", imtype="arc", set_key={"lamp": "ThAr"},
                           night="20240315")
    rec.path.chmod(0o644)
    rec.path.write_bytes(b"garbage")
    with pytest.raises(ChecksumMismatch, match=f"checksum mismatch for {rec.path}: expected"):
        registry.verify(rec.id)


# ----------------------------------------------------------------------- nearest
def test_nearest_before_after_tie_and_earlier_only(registry):
    """Nearest in time on either side; ties and earlier_only favour earlier masters."""
    early = cert(registry, 60100.0)
    late = cert(registry, 60110.0)
    n = registry.nearest("demo", "flat", FLAT_R, 60104.0)
    assert (n.id, n.night, n.age_days) == (early, "20230605", 4.0)
    n = registry.nearest("demo", "flat", FLAT_R, 60107.0)
    assert (n.id, n.age_days) == (late, -3.0)  # negative: master taken after the data
    assert registry.nearest("demo", "flat", FLAT_R, 60105.0).id == early  # tie -> earlier
    assert registry.nearest("demo", "flat", FLAT_R, 60107.0, earlier_only=True).id == early
    assert registry.nearest("demo", "flat", FLAT_R, 60099.0, earlier_only=True) is None
    assert registry.nearest("demo", "flat", FLAT_R, 60110.0, earlier_only=True).id == late
    assert registry.nearest("demo", "flat", FLAT_R, 60110.0, exclude_night="20230615").id == early
    n = registry.nearest("demo", "flat", FLAT_R, 60104.0)
    assert n.path == Path("/store/20230605_flat.fits") and n.checksum is None


def test_nearest_max_age(registry):
    """The maximum age (default per type, or given) is inclusive."""
    cert(registry, 60000.0, imtype="arc", set_key={"lamp": "ThAr"})
    assert registry.nearest("demo", "arc", {"lamp": "ThAr"}, 60030.0).age_days == 30.0  # inclusive
    assert registry.nearest("demo", "arc", {"lamp": "ThAr"}, 60030.5) is None  # default 30 d
    assert registry.nearest("demo", "arc", {"lamp": "ThAr"}, 60030.5, max_age_days=31) is not None
    assert registry.nearest("demo", "arc", {"lamp": "ThAr"}, 59969.0, max_age_days=31) is not None
    assert registry.nearest("demo", "arc", {"lamp": "ThAr"}, 59969.0, max_age_days=30) is None
    with pytest.raises(InvalidValue, match="max_age_days -1 must be a non-negative number"):
        registry.nearest("demo", "arc", {"lamp": "ThAr"}, 60000.0, max_age_days=-1)


def test_nearest_skips_bad_decertified_and_uncertified(registry):
    """Only certified masters not marked bad are candidates."""
    far = cert(registry, 60090.0)
    bad = cert(registry, 60101.0)
    withdrawn = cert(registry, 60099.0)
    registry.register("demo", "flat", FLAT_R, "20230604", "/night/flat.fits", mjd_mid=60100.2)
    registry.mark_bad(bad, "dust donut")
    registry.decertify(withdrawn)
    assert registry.nearest("demo", "flat", FLAT_R, 60100.0).id == far
    registry.unmark_bad(bad)
    assert registry.nearest("demo", "flat", FLAT_R, 60100.0).id == bad
    assert [r.id for r in registry.list(certified=True, bad=False)] == [far, bad]


def test_nearest_honours_validity_range(registry):
    """A master is used only inside its validity range (bounds inclusive)."""
    old = cert(registry, 60080.0)
    new = cert(registry, 60100.0, valid_from_mjd=60095.0, valid_to_mjd=60120.0)
    assert registry.nearest("demo", "flat", FLAT_R, 60110.0).id == new
    assert registry.nearest("demo", "flat", FLAT_R, 60120.0).id == new  # bounds inclusive
    assert registry.nearest("demo", "flat", FLAT_R, 60121.0).id == old  # past valid_to
    assert registry.nearest("demo", "flat", FLAT_R, 60094.0).id == old  # before valid_from


def test_nearest_never_mixes_set_keys_or_instruments(registry):
    """Other set keys, instruments and types are never substituted."""
    r_flat = cert(registry, 60100.0, set_key=FLAT_R)
    cert(registry, 60104.0, set_key=FLAT_G)
    cert(registry, 60104.5, set_key=FLAT_R, instrument="other")
    cert(registry, 60104.5, set_key=FLAT_R, imtype="dark")
    assert registry.nearest("demo", "flat", FLAT_R, 60105.0).id == r_flat
    assert registry.nearest("demo", "flat", {**FLAT_R, "binning": "2x2"}, 60105.0) is None
    assert registry.nearest("demo", "flat", {"filter": "r"}, 60105.0) is None


@pytest.mark.parametrize("earlier_only", [False, True])
@pytest.mark.parametrize("exclude_night", [None, "20230605"])
@pytest.mark.parametrize("max_age", [3.0, 180.0])
def test_candidates_read_once_choose_like_nearest(registry, earlier_only, exclude_night, max_age):
    """The task generators read a set's candidates once and pick per frame: the same master
    as one ``nearest`` query per frame, over ties, validity ranges, bad and other sets."""
    cert(registry, 60100.0)
    cert(registry, 60104.0)
    cert(registry, 60104.0, night="20230609")           # tie in time: the lower id wins
    cert(registry, 60090.0, valid_from_mjd=60085.0, valid_to_mjd=60101.5)
    registry.mark_bad(cert(registry, 60102.0), "dust")
    cert(registry, 60103.0, set_key=FLAT_G)
    rows = registry.candidates("demo", "flat", FLAT_R, exclude_night=exclude_night)
    assert {r.night for r in rows} >= {"20230609"}
    assert all(r.night != exclude_night for r in rows)
    for i in range(0, 400):
        mjd = 60086.0 + i * 0.055
        want = registry.nearest("demo", "flat", FLAT_R, mjd, max_age_days=max_age,
                                earlier_only=earlier_only, exclude_night=exclude_night)
        got = reg.pick_nearest(rows, mjd, max_age_days=max_age, earlier_only=earlier_only)
        assert got == want, mjd
    with pytest.raises(InvalidValue, match="max_age_days -2 must be a non-negative number"):
        reg.pick_nearest(rows, 60100.0, max_age_days=-2)


# -------------------------------------------------------------------- concurrency
def _register_many(url: str, worker: int, barrier) -> None:
    """Child process: 25 masters of its own plus upserts of 5 shared keys."""
    barrier.wait(timeout=60)  # all open the (fresh) registry together
    with Registry(url) as r:
        for i in range(25):
            r.register("conc", "bias", {"worker": worker}, f"202401{i + 1:02d}",
                       f"/store/w{worker}_{i}.fits", mjd_mid=60310.0 + i, nframes=i)
            r.register("conc", "dark", {"shared": 1}, f"2024020{i % 5 + 1}",
                       f"/store/shared_{i % 5}.fits", nframes=worker)


def test_concurrent_processes_lose_nothing(db_url):
    """Four processes registering at once (fresh registry) lose no row."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_register_many, args=(db_url, w, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with Registry(db_url) as r:
        own = r.list(instrument="conc", imtype="bias")
        assert len(own) == 4 * 25
        assert {(rec.set_key, rec.night) for rec in own} == {
            (f"worker={w}", f"202401{i + 1:02d}") for w in range(4) for i in range(25)}
        assert all(rec.nframes == int(rec.night[-2:]) - 1 for rec in own)
        shared = r.list(instrument="conc", imtype="dark")
        assert [rec.night for rec in shared] == [f"2024020{k}" for k in range(1, 6)]
        assert len({rec.id for rec in own + shared}) == 105


# ---------------------------------------------------------------------------- CLI
def calib(argv, url, **kw) -> int:
    """Parse ``reducer calib <argv>`` like the main CLI and run it."""
    parser = argparse.ArgumentParser(prog="reducer")
    registry_cli.add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calib", *argv])
    return registry_cli.run(args, url, **kw)


def test_cli_certify_list_mark_bad(db_url, tmp_path, capsys):
    """calib certify / list / mark-bad / decertify through run()."""
    src = make_fits(tmp_path / "flat.fits", MJD_MID=60384.9)
    store = tmp_path / "store"
    assert calib(["list"], db_url) == 0
    assert capsys.readouterr().out.strip() == "no masters registered"

    assert calib(["certify", str(src), "--instrument", "demo", "--night", "20240315",
                  "--type", "flat", "--set", "filter=r", "binning=1x1", "--store", str(store),
                  "--valid-to", "20240401"], db_url) == 0
    out = capsys.readouterr().out
    dest = store / "demo_20240315_master_flat_1x1_r.fits"
    assert out.startswith("certified master id ")
    assert out.rstrip().endswith(f": {dest} (sha256 {sha256(src)})")
    assert dest.is_file()
    # the site's default store and instrument
    assert calib(["certify", str(src), "--night", "20240316", "--type", "bias"], db_url,
                 store_dir=store, instrument="demo") == 0
    capsys.readouterr()

    assert calib(["list"], db_url) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "INSTRUMENT", "TYPE", "NIGHT", "SET", "MJD_MID", "N",
                                "VERIF", "CERT", "VALID", "BAD", "PATH"]
    assert len(lines) == 3
    col = lines[0].index("PATH")
    assert all(line.index(str(store)) == col for line in lines[1:])  # aligned columns
    flat = next(line for line in lines if " flat " in line)
    assert "binning=1x1;filter=r" in flat and "60384.900" in flat and "open..60402" in flat  # end of 20240401
    with Registry(db_url) as r:
        flat_id = r.list(imtype="flat")[0].id

    assert calib(["mark-bad", str(flat_id), "--reason", "light leak"], db_url) == 0
    assert f"marked master id {flat_id} bad (light leak)" in capsys.readouterr().out
    assert calib(["list", "--type", "flat"], db_url) == 0
    assert "BAD: light leak" in capsys.readouterr().out
    assert calib(["list", "--usable"], db_url) == 0
    assert " flat " not in capsys.readouterr().out

    assert calib(["decertify", str(flat_id)], db_url) == 0
    assert f"decertified master id {flat_id}" in capsys.readouterr().out
    assert calib(["list", "--certified", "--type", "flat"], db_url) == 0
    assert capsys.readouterr().out.strip() == "no masters registered matching the filters"


def test_cli_errors(db_url, tmp_path, capsys):
    """CLI errors go to stderr with exit status 1 (registry) or 2 (usage)."""
    assert calib(["mark-bad", "999", "--reason", "x"], db_url) == 1
    assert "reducer calib mark-bad: error: no master with id 999" in capsys.readouterr().err
    assert calib(["certify", str(tmp_path / "none.fits"), "--instrument", "demo", "--night",
                  "20240315", "--type", "arc", "--store", str(tmp_path)], db_url) == 1
    assert "none.fits does not exist" in capsys.readouterr().err
    assert calib(["list"], None) == 2
    assert "no registry" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        calib(["certify", "f.fits", "--night", "2024-03-15", "--type", "flat"], db_url)


def test_cli_registry_option_and_times(tmp_path, capsys):
    """--registry overrides the site URL; default store; time parsing."""
    path = tmp_path / "reg.sqlite"
    assert calib(["list", "--registry", str(path)], "sqlite:////nonexistent/dir/x.sqlite") == 0
    assert path.is_file()
    # without --store, an SQLite registry keeps its masters next to it
    src = make_fits(tmp_path / "dark.fits")
    assert calib(["certify", str(src), "--registry", str(path), "--instrument", "demo",
                  "--night", "20240315", "--type", "dark", "--set", "exptime=300"], None) == 0
    assert (tmp_path / "masters" / "demo_20240315_master_dark_300.fits").is_file()
    assert registry_cli.parse_time("20240315") == 60384.0
    assert registry_cli.parse_time("20240315", end_of_day=True) == 60385.0
    assert registry_cli.parse_time("60384.25") == 60384.25
    with pytest.raises(argparse.ArgumentTypeError, match="neither an MJD nor a date"):
        registry_cli.parse_time("soon")
    assert registry_cli._IMTYPES == reg.IMTYPES


def test_cli_module_does_not_import_sqlalchemy():
    """Importing registry_cli stays cheap (no SQLAlchemy) for `reducer --help`."""
    root = Path(reg.__file__).resolve().parents[1]
    code = ("import sys, reducer.registry_cli; "
            "sys.exit('sqlalchemy' in sys.modules or 'reducer.registry' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
