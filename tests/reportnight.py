"""A small seeded synthetic night for the report tests (report, finalreport, mail).

Frames are 256 x 256 data pixels per detector (the demo profile with its sections read from
the headers, so the simulator's small frames fit), which keeps a whole night to well under
a minute on 2 cores. The night holds:

- ``FIELD-A``: 3 x 120 s in r and in g (one g frame dropped in ``night.toml``), its target
  set in ``night.toml`` on an isolated catalogue star (the magnitude truth);
- ``M<b>&"'x``: 2 x 60 s in r (HTML characters in OBJECT);
- ``SA 95``: a standard field (typed by its name), 1 x 60 s in r and g;
- ``SHORT``: one 1 s frame in r, too few stars for the astrometry (fails in the chain);
- a file in raw/ that is not FITS (set aside by the inventory).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from conftest import run_cli

SHAPE = (256, 288)       # rows x columns per detector: 256 data + 32 transition/overscan
WEIRD = 'M<b>&"\'x'
JUNK = "demo_20261120_9000.fits"


def write_small_profile(dest: Path, shape=SHAPE) -> Path:
    """The demo profile with sections from the headers and offsets scaled to ``shape``."""
    from reducer.resources import instruments_dir
    nd = shape[1] - 32
    text = (instruments_dir() / "demo.toml").read_text()
    for key in ("biassec", "datasec", "trimsec"):
        text = re.sub(rf'{key} = "\[[^"]*\]"', f'{key} = {{ keyword = "{key.upper()}" }}', text)
    text = text.replace("CCD2 = [520.0, 0.0]", f"CCD2 = [{520.0 * nd / 512}, 0.0]")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "demo.toml").write_text(text)
    return dest


def pick_target_star(sim, field: str) -> dict:
    """An isolated catalogue star of 14.5 < r < 18 near the middle of one detector of ``field``."""
    from astropy.table import Table
    cat = Table.read(sim.catalog_path)
    t = next(t for t in sim.truth["targets"] if t["name"] == field)
    ra0, dec0 = t["ra"], t["dec"]
    dx = (np.asarray(cat["ra"]) - ra0) * np.cos(np.radians(dec0)) * 3600
    dy = (np.asarray(cat["dec"]) - dec0) * 3600
    r = np.asarray(cat["mag_r"])
    best = None
    for i in np.where((np.abs(dx) > 40) & (np.abs(dx) < 120) & (np.abs(dy) < 45)
                      & (r > 14.5) & (r < 18.0))[0]:
        d = np.hypot(dx - dx[i], dy - dy[i])
        near = (d > 0) & (((d < 12) & (r < r[i] + 1.5)) | ((d < 5) & (r < r[i] + 4)))
        if near.any():
            continue
        if best is None or r[i] < r[best]:
            best = i
    assert best is not None, "no isolated target star in the field"
    return {"ra": float(cat["ra"][best]), "dec": float(cat["dec"][best]),
            "mag_r": float(cat["mag_r"][best]), "mag_g": float(cat["mag_g"][best])}


def build_night(root: Path, extra_site: str = "") -> dict:
    """Simulate, set up and return the night (not yet reduced).

    Returns
    -------
    dict
        ``sim``, ``dir`` (night directory), ``star`` (target star truth), ``dropped``,
        ``short`` (the failing frame), ``cfg`` (site settings file).
    """
    from reducer.testing import Target, make_night
    sim = make_night(root / "raw" / "20261120", seed=11, filters=("r", "g"), standard=False,
                     shape=SHAPE, nflat=3, nbias=5, ndark=3,
                     targets=[Target("SA 95", filters=("r", "g"), nexp=1, exptime=60.0, dither=0.0),
                              Target("FIELD-A", filters=("r", "g"), nexp=3, exptime=120.0),
                              Target(WEIRD, filters=("r",), nexp=2, exptime=60.0),
                              Target("SHORT", filters=("r",), nexp=1, exptime=1.0)])
    (sim.raw_dir / JUNK).write_bytes(b"this is not a FITS file\n" * 200)
    write_small_profile(root / "profiles")
    cfg = root / "reducer.toml"
    cfg.write_text('instrument = "demo"\nprofiles_dirs = ["profiles"]\nredux = "redux"\n'
                   f'masters_store = "masters"\n[catalog]\npath = "{sim.catalog_path}"\n{extra_site}')
    run_cli("--config", str(cfg), "night", "20261120", "--raw", str(sim.raw_dir), cwd=root)
    nd = root / "redux" / "20261120"
    star = pick_target_star(sim, "FIELD-A")
    field_g = [f["file"] for f in sim.truth["frames"] if f["object"] == "FIELD-A" and f["filter"] == "g"]
    dropped = field_g[-1]
    short = next(f["file"] for f in sim.truth["frames"] if f["object"] == "SHORT")
    nt = nd / "night.toml"
    text = nt.read_text().replace("drop = []", f'drop = ["{dropped}"]')
    text += (f'\n[targets."FIELD-A"]\nra = {star["ra"]}\ndec = {star["dec"]}\n'
             '\n[photometry]\nlightcurve_min_frames = 3\n')
    nt.write_text(text)
    return {"sim": sim, "dir": nd, "star": star, "dropped": dropped, "short": short, "cfg": cfg,
            "root": root}


def parse_rows(report_text: str) -> dict:
    """The target rows of report.txt: {(object, filter): {column: text}}."""
    lines = report_text.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("UT start"))
    rows = {}
    for ln in lines[i + 2:]:
        if not ln.strip():
            break
        tok = ln.split()
        names = ["kind", "filter", "used", "exptime", "airmass", "fwhm", "sky", "zp", "lim5", "mag",
                 "mag_err", "flag"]
        row = dict(zip(names, tok[-12:]))
        row["ut"] = tok[0]
        row["object"] = " ".join(tok[1:-12])
        rows[(row["object"], row["filter"])] = row
    return rows


def section(report_text: str, title: str) -> list[str]:
    """The lines of a report section, from its title to the next blank line or title."""
    lines = report_text.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(title))
    out = []
    for ln in lines[i + 1:]:
        if not ln.strip() or not ln.startswith(" "):
            break
        out.append(ln)
    return out
