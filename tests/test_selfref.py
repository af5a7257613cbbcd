"""No reference catalogue (offline): frames registered and scaled to the target's own
reference frame (reducer.fieldref), against the simulator's truth."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from reducer.products import raw_stem

from conftest import run_cli, run_doit


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    from reducer.testing import Target, make_night
    root = tmp_path_factory.mktemp("selfref")
    sim = make_night(root / "raw" / "20261120", seed=11, filters=("g", "r"),
                     targets=[Target("FIELD-B", filters=("g", "r"), nexp=3, exptime=90.0)],
                     standard=False)
    cfg = root / "reducer.toml"
    # no [catalog]: nothing to solve against but the target's own frames
    cfg.write_text('instrument = "demo"\nredux = "redux"\nmasters_store = "masters"\n')
    run_cli("--config", str(cfg), "night", "20261120", "--raw", str(sim.raw_dir), cwd=root)
    nd = root / "redux" / "20261120"
    out = run_doit(nd, "science").stdout
    sci = [f for f in sim.truth["frames"] if f["type"] == "science"]
    return {"sim": sim, "dir": nd, "out": out, "frames": sci}


def _t(nd, fr):
    return nd / "FIELD-B" / f"tazsfp{raw_stem(fr['file'])}.fits"


def _fr(file, filt, exptime, mjd, target="T"):
    from types import SimpleNamespace
    return SimpleNamespace(file=file, filter=filt, exptime=exptime, mjd=mjd, target=target)


def test_reference_frames_rule_and_freezing(tmp_path):
    from reducer.fieldref import fieldref_path, reference_frames
    frames = [_fr("u1", "u", 600, 1.0), _fr("r1", "r", 60, 2.0), _fr("r2", "r", 120, 3.0),
              _fr("r3", "r", 120, 4.0), _fr("g1", "g", 300, 5.0)]
    by_t, by_f = reference_frames(frames)
    assert by_t["T"].file == "r2"          # most frames in r; longest; earliest
    assert by_f[("T", "u")].file == "u1" and by_f[("T", "g")].file == "g1"
    assert reference_frames(frames, prefer=["i", "g"])[0]["T"].file == "g1"
    # frozen: the frame named in the sidecar stays, whatever arrives later
    p = fieldref_path(tmp_path, "T").with_suffix(".json")
    p.parent.mkdir()
    p.write_text(json.dumps({"frame": "r1"}))
    later = frames + [_fr("r4", "r", 900, 6.0)]
    assert reference_frames(later, tmp_path)[0]["T"].file == "r1"
    # ... unless that frame left the night (dropped): chosen again
    assert reference_frames([f for f in later if f.file != "r1"], tmp_path)[0]["T"].file == "r4"


def test_reference_frame_and_frozen(night):
    nd, frames = night["dir"], night["frames"]
    ref = json.loads((nd / "FIELD-B" / "fieldref.json").read_text())["frame"]
    # g and r have 3 frames each of the same exposure: g comes first; then the earliest
    want = min((f for f in frames if f["filter"] == "g"),
               key=lambda f: (-f["exptime"], f["mjd_start"], f["file"]))
    assert ref == want["file"]
    for filt in ("g", "r"):
        rel = json.loads((nd / "FIELD-B" / f"relref_{filt}.json").read_text())["frame"]
        assert rel in [f["file"] for f in frames if f["filter"] == filt]
    # every frame solved against it, and a second run does nothing
    for fr in frames:
        h = fits.getheader(_t(nd, fr))
        assert not h.get("FAILED"), h.get("FAILWHY")
        assert h["PHOTCAL"] is False and h["PHOTREL"] is True
    assert "fieldref" in night["out"]
    again = run_doit(nd, "science").stdout
    assert ".  fieldref" not in again and ".  astrometry" not in again


def test_frames_are_registered_to_each_other(night):
    """Pixel -> sky -> reference pixel through the solved WCSs matches the same mapping through
    the true WCSs: the stacks line up although the absolute frame is only the pointing's."""
    sim, nd, frames = night["sim"], night["dir"], night["frames"]
    ref_file = json.loads((nd / "FIELD-B" / "fieldref.json").read_text())["frame"]
    ref = next(f for f in frames if f["file"] == ref_file)
    det = "CCD1"
    w_ref = WCS(fits.getheader(_t(nd, ref), det))
    t_ref = sim.true_wcs(ref, det)
    errs = []
    for fr in frames:
        if fr is ref:
            continue
        w = WCS(fits.getheader(_t(nd, fr), det))
        t = sim.true_wcs(fr, det)
        ny, nx = fits.getdata(_t(nd, fr), det).shape
        yy, xx = np.mgrid[ny * 0.2:ny * 0.8:8j, nx * 0.2:nx * 0.8:8j]
        q = np.column_stack(w_ref.world_to_pixel_values(*w.pixel_to_world_values(xx.ravel(), yy.ravel())))
        qt = np.column_stack(t_ref.world_to_pixel_values(*t.pixel_to_world_values(xx.ravel(), yy.ravel())))
        errs.append(np.sqrt(np.mean(np.sum((q - qt) ** 2, axis=1))))
    print("relative registration rms [px]:", np.round(errs, 4))
    assert max(errs) < 0.1


def test_relative_zero_points_track_the_truth(night):
    """PHOTZP_X - PHOTZP_ref = true (zp - k X + 2.5 log10 T) difference, within the errors."""
    nd, frames = night["dir"], night["frames"]
    for filt in ("g", "r"):
        rel = json.loads((nd / "FIELD-B" / f"relref_{filt}.json").read_text())["frame"]
        fs = [f for f in frames if f["filter"] == filt]
        ref = next(f for f in fs if f["file"] == rel)

        def true_zp(f):
            return f["zeropoint"] - f["extinction"] * f["airmass"] + 2.5 * math.log10(f["transparency"])
        href = fits.getheader(_t(nd, ref))
        assert href["PHOTZP"] == pytest.approx(25.0, abs=1e-3)   # the reference defines the scale
        for f in fs:
            h = fits.getheader(_t(nd, f))
            got = h["PHOTZP"] - href["PHOTZP"]
            want = true_zp(f) - true_zp(ref)
            tol = 4 * math.hypot(h["PHOTZPER"], href["PHOTZPER"]) + 0.01
            assert abs(got - want) < tol, (f["file"], got, want, tol)
            # the flux scale is what the stack applies
            assert h["FLXSCALE"] == pytest.approx(10 ** (0.4 * (25.0 - h["PHOTZP"])), rel=2e-4)   # PHOTZP is rounded to 1e-4 mag


def test_stacks_and_report_without_catalogue(night):
    nd = night["dir"]
    for filt in ("g", "r"):
        st = nd / "stacks" / f"FIELD-B_{filt}.fits"
        assert st.is_file()
        assert fits.getheader(st)["PHOTCAL"] is False
        tgt = json.loads(st.with_suffix(".json").read_text())
        assert tgt["nframes"] == 3
