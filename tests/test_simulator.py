"""Tests of reducer.testing.make_night against its own truth and the demo profile."""
from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import json
import math
import os
import re
import time
import tomllib
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from reducer.resources import instruments_dir
from reducer.testing import (
    CR_MASK_E,
    Series,
    Target,
    Transit,
    load_truth,
    make_night,
    simulate_main,
)

SMALL = (256, 192)  # 160 data columns + 2 transition + 30 overscan


@pytest.fixture(scope="module")
def profile():
    with open(instruments_dir() / "demo.toml", "rb") as fh:
        return tomllib.load(fh)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A small-frame night with every kind of frame (SIMSEED=n tries another seed)."""
    base = tmp_path_factory.mktemp("night")
    return make_night(base / "raw", seed=int(os.environ.get("SIMSEED", 3)), shape=SMALL, flat_kind="both", include_arcs=True)


def _quick_targets():
    return (Target("QUICK", dec=25.0, exptime=30.0, nexp=2, dither=10.0,
                   series=Series("r", 4, 30.0, 60.0), variable=Transit()),)


def _quick(path, seed=0, **kw):
    kw.setdefault("shape", (96, 96))
    kw.setdefault("targets", _quick_targets())
    kw.setdefault("nbias", 2)
    kw.setdefault("ndark", 1)
    kw.setdefault("nflat", 1)
    kw.setdefault("standard", False)
    return make_night(path, seed, **kw)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _sec(s):
    x1, x2, y1, y2 = (int(v) for v in re.fullmatch(r"\[(\d+):(\d+),(\d+):(\d+)\]", s).groups())
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


def _load(night, fr, det):
    with fits.open(night.path(fr)) as h:
        return h[det].data.astype(np.float64), h[0].header, h[det].header


def _classify(profile, imagetyp, obj, name):
    norm = " ".join(imagetyp.lower().split())
    for rule in profile["types"]:
        if "values" in rule and norm not in [v.lower() for v in rule["values"]]:
            continue
        if "objects" in rule and not any(fnmatch.fnmatch(obj.lower(), p.lower()) for p in rule["objects"]):
            continue
        if "files" in rule and not any(fnmatch.fnmatch(name.lower(), p.lower()) for p in rule["files"]):
            continue
        return rule["type"], rule.get("subtype")
    return None, None


def _overscan_rows(data, nd, ntr):
    return data[:, nd + ntr:].mean(axis=1)


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = _quick(tmp_path / "a" / "raw", seed=7)
    b = _quick(tmp_path / "b" / "raw", seed=7)
    c = _quick(tmp_path / "c" / "raw", seed=8)
    ha, hb, hc = (_tree_hashes(tmp_path / k) for k in "abc")
    assert ha == hb
    assert len(ha) > len(a.files) + 3  # raw + truth.json + cr masks + calib + refcat
    raw = [k for k in ha if k.startswith("raw/")]
    assert raw and all(ha[k] != hc[k] for k in raw)
    assert a.truth == b.truth
    assert c.truth["detectors"]["CCD1"]["bias_level"] != a.truth["detectors"]["CCD1"]["bias_level"]
    # nothing but FITS frames in the raw folder
    assert {p.suffix for p in (tmp_path / "a" / "raw").iterdir()} == {".fits"}


def test_refuses_to_overwrite_then_overwrites(tmp_path):
    _quick(tmp_path / "raw")
    with pytest.raises(FileExistsError):
        _quick(tmp_path / "raw")
    n = _quick(tmp_path / "raw", nbias=1, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(p.name for p in n.files)


# --------------------------------------------------------------------------- files & headers
def test_files_headers_and_sections(night, profile):
    geom = night.truth["geometry"]
    ny, nx = geom["shape"]
    nd, ntr, nov = geom["data_columns"], geom["transition_columns"], geom["overscan_columns"]
    assert (nd, ntr, nov) == (SMALL[1] - 32, 2, 30)
    prim_fields = ["imagetyp", "filter", "exptime", "object", "date_obs", "ra", "dec", "xbin",
                   "ybin", "airmass", "ccdtemp", "readout", "program"]
    names = [p.name for p in night.files]
    assert names == [f"demo_20261120_{i:04d}.fits" for i in range(1, len(names) + 1)]
    for fr, path in zip(night.truth["frames"], night.files):
        with fits.open(path) as h:
            assert len(h) == 3 and h[0].data is None
            p = h[0].header
            for fld in prim_fields:
                assert profile["keywords"][fld][0] in p, (path.name, fld)
            assert p["INSTRUME"] == "demo" and p["TELESCOP"] == "Demo 1.0m"
            assert p["READOUTM"] == "normal" and p["XBINNING"] == 1 and p["YBINNING"] == 1
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", p["DATE-OBS"])
            assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d", p["RA"])
            assert re.fullmatch(r"[+-]\d\d:\d\d:\d\d\.\d", p["DEC"])
            assert p["IMAGETYP"] == fr["imagetyp"] and p["OBJECT"] == fr["object"]
            assert p["FILTER"] == fr["filter"] and p["EXPTIME"] == fr["exptime"]
            assert _classify(profile, p["IMAGETYP"], p["OBJECT"], path.name) == (fr["type"], fr["subtype"])
            for dp in profile["detectors"]:
                e = h[dp["hdu"]]
                assert e.header["EXTNAME"] == dp["hdu"]
                assert e.data.dtype == np.uint16 and e.data.shape == (ny, nx)
                assert e.header["BITPIX"] == 16 and e.header["BZERO"] == 32768
                assert e.header["GAIN"] == dp["gain"] and e.header["RDNOISE"] == dp["rdnoise"]
                assert e.header["SATURATE"] == dp["saturate"]
                assert e.header["DATASEC"] == f"[1:{nd},1:{ny}]" == e.header["TRIMSEC"]
                assert e.header["BIASSEC"] == f"[{nd + ntr + 1}:{nx},1:{ny}]"
    kinds = {(f["type"], f["subtype"]) for f in night.truth["frames"]}
    assert kinds == {("bias", None), ("dark", None), ("flat", "dome"), ("flat", "sky"),
                     ("arc", None), ("standard", None), ("science", None)}


def test_date_obs_inside_the_night_and_in_order(night):
    _check_night_window(night, "20261120", -105.8203)


@pytest.mark.parametrize("utdate", ["20260515", "20270102"])
def test_other_dates_inside_the_night(tmp_path, utdate):
    n = _quick(tmp_path / "raw", utdate=utdate)
    _check_night_window(n, utdate, -105.8203)


def _check_night_window(night, utdate, lon):
    d = dt.datetime.strptime(utdate, "%Y%m%d").replace(tzinfo=dt.timezone.utc)
    midnight = d + dt.timedelta(hours=(-lon / 15.0) % 24)
    assert midnight.date() == d.date()
    tz = ZoneInfo("America/Denver")
    eve = (midnight - dt.timedelta(hours=12)).astimezone(tz).date()
    start = dt.datetime.combine(eve, dt.time(12), tz)
    end = dt.datetime.combine(eve + dt.timedelta(days=1), dt.time(12), tz)
    prev = None
    sunset = dt.datetime.fromisoformat(night.truth["night"]["sunset"] + "+00:00")
    sunrise = dt.datetime.fromisoformat(night.truth["night"]["sunrise"] + "+00:00")
    for path in night.files:
        t = dt.datetime.fromisoformat(fits.getval(path, "DATE-OBS") + "+00:00")
        fr = night.frame(path)
        assert start <= t and t + dt.timedelta(seconds=fr["exptime"]) <= end, (path.name, t)
        if prev is not None:
            assert t > prev
        prev = t + dt.timedelta(seconds=fr["exptime"])
        if fr["type"] in ("science", "standard"):
            assert sunset < t < sunrise and fr["sun_alt"] < -12.0
        if fr["type"] == "bias" or fr["subtype"] == "dome":
            assert t < sunset
        if fr["subtype"] == "sky":
            assert -12.0 < fr["sun_alt"] < 0.0


# --------------------------------------------------------------------------- bias, noise, gain
def test_bias_levels_match_truth(night):
    geom = night.truth["geometry"]
    nd, ntr = geom["data_columns"], geom["transition_columns"]
    biases = night.frames("bias")
    assert len(biases) == 5
    for fr in biases:
        for det, dt_ in night.truth["detectors"].items():
            data, _, hdr = _load(night, fr, det)
            rn = dt_["rdnoise"] / dt_["gain"]
            ovr = fr["detectors"][det]["overscan"]
            ov = data[:, nd + ntr:]
            expect_ov = dt_["bias_level"] + ovr["mean"]
            assert abs(ov.mean() - expect_ov) < 5 * rn / math.sqrt(ov.size) + 0.01
            good = ~night.cr_mask(fr["file"], det)[:, :nd]
            d = data[:, :nd][good]
            expect = expect_ov + dt_["bias_pattern_mean"]
            assert abs(d.mean() - expect) < 5 * rn / math.sqrt(d.size) + 0.02
        # the detectors differ by ~1000 ADU
        lv = [night.truth["detectors"][k]["bias_level"] for k in ("CCD1", "CCD2")]
        assert 800 < lv[1] - lv[0] < 1200


def test_overscan_tracks_the_row_drift(night):
    """Row-by-row, data minus overscan is the fixed pattern: the drift cancels."""
    geom = night.truth["geometry"]
    nd, ntr = geom["data_columns"], geom["transition_columns"]
    fr = night.frames("bias")[0]
    det = "CCD1"
    data, _, _ = _load(night, fr, det)
    pat = night.calib_image("bias_pattern", det)
    rows_ov = _overscan_rows(data, nd, ntr)
    resid = data[:, :nd] - pat - rows_ov[:, None]
    o = fr["detectors"][det]["overscan"]
    y = np.arange(data.shape[0])
    drift = o["offset"] + o["amplitude"] * np.sin(2 * np.pi * y / o["period"] + o["phase"]) \
        + o["slope"] * (y / (y.size - 1) - 0.5)
    lvl = night.truth["detectors"][det]["bias_level"]
    rn = night.truth["detectors"][det]["rdnoise"] / night.truth["detectors"][det]["gain"]
    assert np.std(rows_ov - lvl - drift) < 1.5 * rn / math.sqrt(geom["overscan_columns"])
    assert abs(np.median(resid)) < 0.5
    # drifts differ between frames, so a master bias without overscan is not enough
    o2 = night.frames("bias")[1]["detectors"][det]["overscan"]
    assert o2 != o


@pytest.mark.parametrize("det", ["CCD1", "CCD2"])
def test_read_noise_from_bias_difference(night, det):
    nd = night.truth["geometry"]["data_columns"]
    b1, b2 = night.frames("bias")[:2]
    d1, _, h = _load(night, b1, det)
    d2, _, _ = _load(night, b2, det)
    bad = night.cr_mask(b1["file"], det) | night.cr_mask(b2["file"], det)
    diff = (d1 - d2)[:, :nd]
    diff = diff - diff.mean(axis=1, keepdims=True)  # the frames' row drifts differ
    v = diff[~bad[:, :nd]]
    n = v.size
    var = v.var() * nd / (nd - 1) / 2.0 - 1.0 / 12.0  # per frame, minus quantisation
    rn = math.sqrt(var) * h["GAIN"]
    assert rn == pytest.approx(h["RDNOISE"], rel=5 / math.sqrt(2 * n))


@pytest.mark.parametrize("det", ["CCD1", "CCD2"])
def test_gain_from_flat_pair(night, det):
    geom = night.truth["geometry"]
    nd, ntr = geom["data_columns"], geom["transition_columns"]
    f1, f2 = night.frames("flat", subtype="dome", filter="r")[:2]
    a, _, h = _load(night, f1, det)
    b, _, _ = _load(night, f2, det)
    pat = night.calib_image("bias_pattern", det)
    a = a[:, :nd] - _overscan_rows(a, nd, ntr)[:, None] - pat
    b = b[:, :nd] - _overscan_rows(b, nd, ntr)[:, None] - pat
    good = ~(night.cr_mask(f1["file"], det) | night.cr_mask(f2["file"], det))[:, :nd]
    good &= night.calib_image("dark_rate", det) < 0.5
    m1, m2 = a[good].mean(), b[good].mean()
    assert 15000 < m1 < 32000 and 15000 < m2 < 32000
    s = m1 / m2
    var = (a - s * b)[good].var()
    rn2 = (h["RDNOISE"] / h["GAIN"]) ** 2 + 1.0 / 12.0
    gain = (m1 + s * s * m2) / (var - (1 + s * s) * rn2)
    err = gain * math.sqrt(2.0 / good.sum())
    assert abs(gain - h["GAIN"]) < 4 * err + 0.002 * h["GAIN"]


# --------------------------------------------------------------------------- flats & darks
def test_flats_follow_the_truth_response(night):
    geom = night.truth["geometry"]
    nd, ntr = geom["data_columns"], geom["transition_columns"]
    for kind in ("dome", "sky"):
        frs = night.frames("flat", subtype=kind, filter="g")
        assert len(frs) == 3
        levels = []
        for det in ("CCD1", "CCD2"):
            resp = night.calib_image("flat_response", det, "g")
            pat = night.calib_image("bias_pattern", det)
            stack = []
            for fr in frs:
                d, _, h = _load(night, fr, det)
                assert d[:, :nd].max() < h["SATURATE"] or kind == "sky"  # sky flats can hold a star
                img = d[:, :nd] - _overscan_rows(d, nd, ntr)[:, None] - pat
                levels.append(np.median(img))
                stack.append(img / np.median(img))
            master = np.median(stack, axis=0)
            ratio = master / resp
            ratio /= np.median(ratio)
            core = (resp > 0.5)
            # what is left is photon noise (~0.7 % per frame, ~0.6 % for a median of 3)
            assert np.std(ratio[core]) < 0.012
            # the vignetting is in the response: outer corners darker than the centre
            outer = resp[:8, :8] if det == "CCD1" else resp[:8, -8:]
            assert np.median(outer) < np.median(resp[geom["shape"][0] // 2 - 4:, :][:8, nd // 2 - 4:][:, :8]) - 0.02
        assert all(15000 < lv < 32000 for lv in levels), levels
        if kind == "sky":
            exps = [fr["exptime"] for fr in frs]
            assert len(set(exps)) > 1  # the twilight changes fast


def test_dark_current_and_hot_pixels(night):
    nd = night.truth["geometry"]["data_columns"]
    ntr = night.truth["geometry"]["transition_columns"]
    darks = night.frames("dark")
    assert len(darks) == 3 and all(f["exptime"] == 300.0 for f in darks)
    for det in ("CCD1", "CCD2"):
        td = night.truth["detectors"][det]
        pat = night.calib_image("bias_pattern", det)
        stack = []
        for fr in darks:
            d, _, h = _load(night, fr, det)
            img = d[:, :nd] - _overscan_rows(d, nd, ntr)[:, None] - pat
            stack.append(np.where(night.cr_mask(fr["file"], det)[:, :nd], np.nan, img))
        rate = np.nanmedian(stack, axis=0) * td["gain"] / darks[0]["exptime"]
        hot = td["hot_pixels"]
        assert len(hot["x"]) >= 5
        truth_rate = np.asarray(hot["rate"])
        meas = rate[hot["y"], hot["x"]]
        strong = truth_rate > 5
        assert np.allclose(meas[strong], truth_rate[strong] + td["dark_rate_base"], rtol=0.15, atol=0.2)
        cold = night.calib_image("dark_rate", det) < 0.1
        assert abs(np.nanmedian(rate[cold]) - td["dark_rate_base"]) < 0.01


# --------------------------------------------------------------------------- stars & WCS
def test_truth_wcs_and_catalogue_agree(night):
    cat = Table.read(night.catalog_path)
    assert {"id", "ra", "dec", "mag_g", "mag_r", "mag_i"} <= set(cat.colnames)
    index = {int(i): k for k, i in enumerate(cat["id"])}
    for fr in night.frames("science") + night.frames("standard"):
        hp, tp = fr["header_pointing"], fr["true_pointing"]
        dra = (tp["ra"] - hp["ra"]) * math.cos(math.radians(hp["dec"])) * 3600
        ddec = (tp["dec"] - hp["dec"]) * 3600
        assert 0.0 < math.hypot(dra, ddec) < 12.0
        with fits.open(night.path(fr)) as h:
            from astropy.coordinates import Angle

            ra = Angle(h[0].header["RA"], unit="hourangle").deg
            dec = Angle(h[0].header["DEC"], unit="deg").deg
        assert abs(ra - hp["ra"]) * 3600 * math.cos(math.radians(dec)) < 0.2
        assert abs(dec - hp["dec"]) * 3600 < 0.1
        for det in ("CCD1", "CCD2"):
            st = fr["detectors"][det]["stars"]
            if not st["id"]:
                continue
            w = night.true_wcs(fr, det)
            k = np.array([index[i] for i in st["id"]])
            x, y = w.world_to_pixel_values(cat["ra"][k], cat["dec"][k])
            assert np.allclose(x, st["x"], atol=1e-3) and np.allclose(y, st["y"], atol=1e-3)
    # the true WCS is close to, but not exactly, the nominal one
    wm = night.truth["wcs_model"]
    assert 0 < abs(wm["true_rotation"] - wm["nominal_rotation"]) < 0.5
    assert wm["true_scale"] != wm["nominal_scale"]
    assert abs(wm["true_scale"] / wm["nominal_scale"] - 1) < 0.01


def _calibrated(night, fr, det):
    """Overscan, bias-pattern and flat corrected image of the data region [e-]."""
    geom = night.truth["geometry"]
    nd, ntr = geom["data_columns"], geom["transition_columns"]
    d, _, h = _load(night, fr, det)
    img = d[:, :nd] - _overscan_rows(d, nd, ntr)[:, None] - night.calib_image("bias_pattern", det)
    img = img - night.calib_image("dark_rate", det) * fr["exptime"] / h["GAIN"]
    return img * h["GAIN"] / night.calib_image("flat_response", det, fr["filter"]), h


def _isolated_bright(night, fr, det, flux_min=3e4, margin=16, sep=14.0):
    st = fr["detectors"][det]["stars"]
    x, y, f, sat = (np.asarray(st[k]) for k in ("x", "y", "flux", "saturated"))
    ny = night.truth["geometry"]["shape"][0]
    nd = night.truth["geometry"]["data_columns"]
    crm = night.cr_mask(fr["file"], det)
    hot = night.calib_image("dark_rate", det) > 0.5
    out = []
    for j in np.nonzero((f > flux_min) & ~sat)[0]:
        if not (margin < x[j] < nd - 1 - margin and margin < y[j] < ny - 1 - margin):
            continue
        dd = np.hypot(x - x[j], y - y[j])
        dd[j] = np.inf
        if (dd < sep).any() or ((dd < 3 * sep) & (f > 0.2 * f[j])).any():
            continue
        ix, iy = int(round(x[j])), int(round(y[j]))
        win = (slice(iy - 10, iy + 11), slice(ix - 10, ix + 11))
        if crm[win].any() or hot[win].any():
            continue
        out.append(j)
    return out, x, y, f


def test_star_centroids_and_fluxes_match_truth(night):
    from photutils.aperture import CircularAnnulus, CircularAperture, aperture_photometry
    from photutils.centroids import centroid_2dg

    nstars = 0
    ratios = []
    frames = night.frames("science", object="DEMO-FIELD") + night.frames("standard")
    for fr in frames + night.frames("science", object="DEMO-TRANSIT")[:12]:
        alpha = fr["fwhm_px"] / (2 * math.sqrt(2 ** (1 / fr["beta"]) - 1))
        for det in ("CCD1", "CCD2"):
            img, h = _calibrated(night, fr, det)
            sel, x, y, f = _isolated_bright(night, fr, det)
            for j in sel:
                ix, iy = int(round(x[j])), int(round(y[j]))
                cut = img[iy - 6:iy + 7, ix - 6:ix + 7]
                cut = cut - np.median(img[iy - 15:iy + 16, ix - 15:ix + 16])
                cx, cy = centroid_2dg(cut)
                assert abs(cx + ix - 6 - x[j]) < 0.1 and abs(cy + iy - 6 - y[j]) < 0.1, (fr["file"], det, j)
                r = 3.0 * fr["fwhm_px"]
                ap = CircularAperture((x[j], y[j]), r)
                an = CircularAnnulus((x[j], y[j]), r + 3, r + 8)
                tot = aperture_photometry(img, ap)["aperture_sum"][0]
                sky = np.median(an.to_mask(method="center").get_values(img))
                flux = tot - sky * ap.area
                ee = 1 - (1 + r * r / alpha ** 2) ** (1 - fr["beta"])
                expect = f[j] * ee
                sigma = math.sqrt(expect + ap.area * (fr["sky_e"] + h["RDNOISE"] ** 2)
                                  + (ap.area * 2 * math.sqrt(fr["sky_e"] + h["RDNOISE"] ** 2)
                                     / math.sqrt(an.area)) ** 2)
                assert abs(flux - expect) < 5 * sigma + 0.01 * expect, (fr["file"], det, j)
                ratios.append(flux / expect)
                nstars += 1
    assert nstars >= 8
    assert abs(np.median(ratios) - 1) < 0.01


def test_saturated_stars_reach_saturate(night):
    nd = night.truth["geometry"]["data_columns"]
    nsat = 0
    for fr in night.frames("science"):
        for det in ("CCD1", "CCD2"):
            st = fr["detectors"][det]["stars"]
            d, _, h = _load(night, fr, det)
            assert d.max() <= h["SATURATE"] <= 65535
            for x, y, s in zip(st["x"], st["y"], st["saturated"]):
                if s:
                    nsat += 1
                    assert d[int(round(y)), int(round(x))] == h["SATURATE"]
    assert nsat >= 3
    # each science field holds at least one saturated star in some frame
    for obj in ("DEMO-FIELD", "DEMO-TRANSIT"):
        assert any(any(fr["detectors"][k]["stars"]["saturated"]) for fr in night.frames("science", object=obj)
                   for k in ("CCD1", "CCD2"))


def test_seeing_transparency_airmass_sky(night):
    sci = night.frames("science") + night.frames("standard")
    fw = np.array([f["fwhm"] for f in sci])
    assert fw.min() >= 1.0 and fw.max() <= 2.0 and fw.std() > 0.02
    tr = np.array([f["transparency"] for f in sci])
    assert tr.min() >= 0.9 and tr.max() <= 1.0 and tr.std() > 0.002
    am = np.array([f["airmass"] for f in sci])
    hdr = np.array([fits.getval(night.path(f), "AIRMASS") for f in sci])
    assert am.min() >= 1.0 and am.max() < 2.0 and np.allclose(am, hdr, atol=0.02)
    sky = {flt: [f["sky_rate"] for f in sci if f["filter"] == flt] for flt in ("g", "r")}
    assert all(np.ptp(v) / np.mean(v) > 0.02 for v in sky.values())
    assert {f["object"] for f in night.frames("standard")} <= {
        "SA 92", "SA 95", "SA 98", "SA 101", "SA 104", "SA 107", "SA 110", "SA 113"}


def test_dithers_are_tens_of_pixels(night):
    for obj in ("DEMO-FIELD", "DEMO-TRANSIT"):
        frs = [f for f in night.frames("science", object=obj, filter="g")]
        d = np.array([f["dither_px"] for f in frs])
        assert len(frs) >= 3 and np.ptp(d, axis=0).max() > 15


# --------------------------------------------------------------------------- cosmic rays
def test_cosmic_ray_masks_are_high(night):
    from scipy.ndimage import median_filter

    nd = night.truth["geometry"]["data_columns"]
    total = 0
    for fr in night.frames("dark") + night.frames("bias"):
        for det in ("CCD1", "CCD2"):
            m = night.cr_mask(fr["file"], det)
            if not m.any():
                continue
            d, _, h = _load(night, fr, det)
            exc = (d - median_filter(d, size=7, mode="nearest"))[m] * h["GAIN"]
            assert not m[:, nd:].any()
            with np.load(night.truth_dir / fr["detectors"][det]["cosmic_rays"]["file"]) as z:
                dep = np.zeros(m.shape)
                dep[z[f"y_{det}"], z[f"x_{det}"]] = z[f"e_{det}"]
            assert (dep[m] >= CR_MASK_E).all()
            noise = 3 * h["RDNOISE"] + 3 * math.sqrt(0.02 * fr["exptime"] + 1)
            assert np.mean(exc > noise) > 0.97
            assert np.mean(np.abs(exc - dep[m]) < 6 * h["RDNOISE"] + 0.1 * dep[m]) > 0.9
            total += m.sum()
    assert total > 20
    # the event count follows the rate per area and time (read-out included)
    area = night.truth["geometry"]["data_columns"] * night.truth["geometry"]["shape"][0] * (15e-4) ** 2
    rate = night.truth["parameters"]["cr_rate"]
    expect = sum(rate * area * (fr["exptime"] + 10.0) for fr in night.truth["frames"]) * 2
    seen = sum(fr["detectors"][d]["cosmic_rays"]["n_events"] for fr in night.truth["frames"]
               for d in ("CCD1", "CCD2"))
    assert abs(seen - expect) < 5 * math.sqrt(expect)


def test_no_cosmic_rays_option(tmp_path):
    n = _quick(tmp_path / "raw", cosmic_rays=False)
    assert all(fr["detectors"][d]["cosmic_rays"]["n_pixels"] == 0
               for fr in n.truth["frames"] for d in ("CCD1", "CCD2"))


# --------------------------------------------------------------------------- variable star
def test_variable_star_dips_as_documented(night):
    var = night.truth["variable"]
    assert var["target"] == "DEMO-TRANSIT" and var["depth"] == 0.03
    series = [f for f in night.frames("science", object="DEMO-TRANSIT", filter=var["filter"])
              if f["exptime"] == 120.0]
    assert len(series) >= 20
    t0 = var["t0_mjd"]
    facs, model = [], []
    for fr in series:
        dets = [d for d in ("CCD1", "CCD2") if var["id"] in fr["detectors"][d]["stars"]["id"]]
        assert len(dets) == 1
        st = fr["detectors"][dets[0]]["stars"]
        flux = st["flux"][st["id"].index(var["id"])]
        base = fr["exptime"] * fr["transparency"] * 10 ** (
            -0.4 * (var["mags"][fr["filter"]] + fr["extinction"] * fr["airmass"] - fr["zeropoint"]))
        facs.append(flux / base)
        dt_s = abs(fr["mjd_mid"] - t0) * 86400
        model.append(1 - var["depth"] * min(max((var["duration_s"] / 2 - dt_s) / var["ingress_s"], 0), 1))
        assert flux / base == pytest.approx(fr["variable_factor"], rel=1e-5)
    facs, model = np.array(facs), np.array(model)
    assert np.allclose(facs, model, atol=1.5e-3)
    assert facs.min() == pytest.approx(1 - var["depth"], abs=1e-4)
    assert (facs > 0.9999).sum() >= 5 and (facs < 0.9701).sum() >= 5


def test_variable_dip_is_visible_in_the_images(night):
    from photutils.aperture import CircularAperture, aperture_photometry

    var = night.truth["variable"]
    series = [f for f in night.frames("science", object="DEMO-TRANSIT", filter=var["filter"])
              if f["exptime"] == 120.0]
    rel, infac = [], []
    for fr in series:
        det = next(d for d in ("CCD1", "CCD2") if var["id"] in fr["detectors"][d]["stars"]["id"])
        img, _ = _calibrated(night, fr, det)
        st = fr["detectors"][det]["stars"]
        k = st["id"].index(var["id"])
        sky = np.median(img)
        ap = CircularAperture((st["x"][k], st["y"][k]), 3 * fr["fwhm_px"])
        f = aperture_photometry(img - sky, ap)["aperture_sum"][0]
        rel.append(f / (st["flux"][k] / fr["variable_factor"]))
        infac.append(fr["variable_factor"])
    rel, infac = np.array(rel), np.array(infac)
    depth = 1 - np.median(rel[infac < 0.9701]) / np.median(rel[infac > 0.9999])
    assert depth == pytest.approx(0.03, abs=0.01)


# --------------------------------------------------------------------------- planted problems, arcs
def test_planted_light_leak_bias(tmp_path):
    n = _quick(tmp_path / "raw", nbias=3, bad_bias="light_leak")
    assert len(n.truth["planted"]) == 1
    p = n.truth["planted"][0]
    assert p["kind"] == "light_leak" and p["type"] == "bias"
    nd = n.truth["geometry"]["data_columns"]
    means = {}
    for fr in n.frames("bias"):
        d, _, _ = _load(n, fr, "CCD1")
        means[fr["file"]] = (d[-10:, nd - 10:nd].mean() - d[:10, :10].mean())
    good = [v for k, v in means.items() if k != p["file"]]
    assert means[p["file"]] > max(good) + 20


@pytest.mark.parametrize("kw, kind", [({"bias_level_shift": 60.0}, "level_shift"),
                                      ({"bad_bias": "data_jump", "bias_level_shift": 30.0}, "data_jump")])
def test_planted_bias_level_shift(tmp_path, kw, kind):
    n = _quick(tmp_path / "raw", nbias=3, **kw)
    geom = n.truth["geometry"]
    nd, ntr = geom["data_columns"], geom["transition_columns"]
    (p,) = n.truth["planted"]
    assert p["kind"] == kind
    lv = n.truth["detectors"]["CCD1"]["bias_level"]
    ov, dat = {}, {}
    for fr in n.frames("bias"):
        d, _, _ = _load(n, fr, "CCD1")
        ov[fr["file"]] = d[:, nd + ntr:].mean() - lv
        dat[fr["file"]] = d[:, :nd].mean() - d[:, nd + ntr:].mean()
        # the truth's overscan mean includes a planted level shift
        assert ov[fr["file"]] == pytest.approx(fr["detectors"]["CCD1"]["overscan"]["mean"], abs=1.0)
    others = [k for k in ov if k != p["file"]]
    if kind == "level_shift":
        assert ov[p["file"]] > max(ov[k] for k in others) + 40
        assert abs(dat[p["file"]] - np.mean([dat[k] for k in others])) < 2
    else:
        assert dat[p["file"]] > max(dat[k] for k in others) + 25
        assert abs(ov[p["file"]] - np.mean([ov[k] for k in others])) < 10


def test_too_few_biases_and_bad_flat(tmp_path):
    n = _quick(tmp_path / "raw", nbias=1, nflat=3, bad_flat="saturated")
    assert len(n.frames("bias")) == 1
    (p,) = n.truth["planted"]
    d, _, h = _load(n, n.frame(p["file"]), "CCD1")
    assert (d == h["SATURATE"]).mean() > 0.5


def test_arcs(night, profile):
    nd = night.truth["geometry"]["data_columns"]
    arcs = night.frames("arc")
    assert len(arcs) == 3 and all(a["object"] == "ArNe" for a in arcs)
    lines = arcs[0]["arc_lines"]
    gain = {k: v["gain"] for k, v in night.truth["detectors"].items()}
    nchecked = 0
    for det, off in (("CCD1", 0.0), ("CCD2", night.truth["detectors"]["CCD2"]["offset"][0])):
        d, _, _ = _load(night, arcs[0], det)
        prof = np.median(d[:, :nd], axis=0)
        prof -= np.median(prof)
        for fx, rate in zip(lines["focal_x"], lines["rate"]):
            x = fx - off
            if 3 < x < nd - 4:
                # >= ~25 % of a line's flux falls in its central column
                assert prof[int(round(x))] > 0.2 * rate * arcs[0]["exptime"] / gain[det]
                nchecked += 1
    assert nchecked >= 3


# --------------------------------------------------------------------------- default size, CLI
@pytest.mark.slow
def test_default_night_matches_the_profile(tmp_path, profile):
    t0 = time.perf_counter()
    n = make_night(tmp_path / "raw")
    elapsed = time.perf_counter() - t0
    assert elapsed < 90  # ~15 s on one core
    counts = {}
    for fr in n.truth["frames"]:
        counts[fr["type"]] = counts.get(fr["type"], 0) + 1
    assert counts == {"bias": 5, "flat": 6, "standard": 4, "science": 54, "dark": 3}
    first = n.files[len(n.files) // 2]
    with fits.open(first) as h:
        for dp in profile["detectors"]:
            e = h[dp["hdu"]].header
            for k in ("biassec", "datasec", "trimsec"):
                assert e[k.upper()] == dp[k]
            assert h[dp["hdu"]].data.shape == (1024, 544)
    sl = _sec(profile["detectors"][0]["biassec"])
    assert (sl[1].start, sl[1].stop) == (514, 544)
    offs = {k: v["offset"] for k, v in n.truth["detectors"].items()}
    assert offs == profile["wcs"]["offsets"]
    assert n.truth_dir == tmp_path / "truth" and n.catalog_path == tmp_path / "refcat.ecsv"
    assert load_truth(n.truth_dir) == n.truth
    cat = Table.read(n.catalog_path)
    assert 400 < (cat["field"] == "DEMO-FIELD").sum() < 700


def test_simulate_main(tmp_path, capsys):
    args = [str(tmp_path / "raw"), "--seed", "2", "--shape", "96x96", "--nbias", "3", "--nexp", "1",
            "--no-standard"]
    assert simulate_main(args) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "truth" in out
    assert (tmp_path / "truth" / "truth.json").is_file()
    assert json.loads((tmp_path / "truth" / "truth.json").read_text())["seed"] == 2
    assert simulate_main(args) == 2  # refuses to overwrite
    assert simulate_main(args + ["--overwrite", "-q"]) == 0
