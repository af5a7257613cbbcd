"""The field reference: a target's own stars, when no reference catalogue is at hand.

Offline, without a catalogue file or Gaia, the a and t steps still have work worth doing:
register every frame of a target onto one frame so that the stacks line up, and scale
every frame to one frame's flux so that the stacks and light curves are right in relative
terms. This module makes the two whole-night products that serve as the reference then
(seed 002's photopipe does the same with its first frame):

``<TARGET>/fieldref.ecsv``
    The stars of the target's reference frame (see :func:`reference_frames`), detected on its ``zsfp``
    product; their RA/Dec come from that frame's header pointing and the profile's pixel
    scale, rotation and flip (``initial_wcs``), so the absolute position of the whole
    reference is only as good as the telescope's pointing, but every frame solved against
    it is registered to the others to the centroid precision. ``mag_ref`` (instrumental,
    -2.5 log10(e-/s)) ranks the stars for pattern matching.
``<TARGET>/relref_<filter>.ecsv``
    Per filter, the instrumental magnitudes (aperture photometry, aperture-corrected, as
    the t step measures) of the field-reference stars on the reference frame of that target
    and filter (see :func:`reference_frames`). The t step fits each frame's zero point against ``mag_ref + zp_reference``:
    the frame's flux scale relative to the filter's reference frame. Such frames say
    ``PHOTCAL = F`` (uncalibrated): their magnitudes are relative, never absolute.

Both are **frozen** once made (a JSON sidecar names the frame, which stays the reference
as later frames arrive): a new frame never rebuilds an earlier one. ``doit redo:TARGET``
(which removes the target's folder) chooses again.
"""
from __future__ import annotations

from pathlib import Path

#: columns of a field reference (a reference catalogue like any other to the a step)
FIELDREF_COLUMNS = ("ra", "dec", "mag_ref")


def fieldref_path(night_dir: Path, target: str) -> Path:
    """``<night>/<TARGET>/fieldref.ecsv``."""
    return Path(night_dir) / target / "fieldref.ecsv"


def relref_path(night_dir: Path, target: str, filt: str) -> Path:
    """``<night>/<TARGET>/relref_<filter>.ecsv``."""
    from .inventory import safe_name
    return Path(night_dir) / target / f"relref_{safe_name(filt)}.ecsv"


def reference_frames(frames, night_dir: Path | None = None, prefer=()) -> tuple[dict, dict]:
    """The reference frame of each target and of each (target, filter).

    Among the frames known when the reference is first made: for a target, those in its
    preferred filter (the first of ``prefer`` it has, else the filter it has most frames
    in: broad bands, where most stars are; of equals, the one with the longest exposure);
    then the longest exposure; then the earliest.
    For a (target, filter): the longest exposure, then the earliest. From then on the
    reference is **frozen**: the frame named in
    the reference's sidecar (``fieldref.json``, ``relref_<filter>.json``) stays the
    reference as long as it is in the night, so later frames never rebuild earlier ones.

    Parameters
    ----------
    frames : iterable of inventory frames
        Science frames (with ``target``, ``filter``, ``exptime``, ``mjd``, ``file``).
    night_dir : Path or None
        Night directory holding frozen choices; None ignores them.
    prefer : sequence of str
        Filters preferred for a target's field reference (``[astrometry] reference_filters``).

    Returns
    -------
    by_target : dict
        target -> frame.
    by_filter : dict
        (target, filter) -> frame.
    """
    frames = list(frames)
    by_file = {f.file: f for f in frames}

    def pick(group, sidecar):
        if sidecar is not None and sidecar.is_file():
            import json
            name = json.loads(sidecar.read_text()).get("frame")
            if name in by_file:
                return by_file[name]
        return min(group, key=lambda f: (-(f.exptime or 0.0), f.mjd, f.file))

    groups_t, groups_f = {}, {}
    for f in frames:
        groups_t.setdefault(f.target, []).append(f)
        groups_f.setdefault((f.target, f.filter), []).append(f)
    nd = Path(night_dir) if night_dir is not None else None

    def in_band(group):
        from collections import Counter
        have = Counter(f.filter for f in group)
        longest = {b: max(f.exptime or 0.0 for f in group if f.filter == b) for b in have}
        band = next((b for b in prefer if b in have), None) or \
            min(have, key=lambda b: (-have[b], -longest[b], b))
        return [f for f in group if f.filter == band]
    by_target = {t: pick(in_band(g), nd and fieldref_path(nd, t).with_suffix(".json"))
                 for t, g in groups_t.items()}
    by_filter = {k: pick(g, nd and relref_path(nd, *k).with_suffix(".json"))
                 for k, g in groups_f.items()}
    return by_target, by_filter


def field_stars(data, mask, wcs, *, exptime: float, fwhm_px: float = 3.0,
                saturation: float | None = None, max_stars: int = 300):
    """Stars of one detector as a reference catalogue.

    Parameters
    ----------
    data : ndarray (ny, nx)
        Sky-subtracted image [e-].
    mask : ndarray of bool
        True for unusable pixels.
    wcs : astropy.wcs.WCS
        Pixel -> sky (the pointing-based first guess of the a step).
    exptime : float
        Exposure time [s].
    fwhm_px, saturation, max_stars
        As :func:`reducer.ops.astrometry.detect_stars` (saturation in e-).

    Returns
    -------
    astropy.table.Table
        ``ra``, ``dec`` [deg], ``mag_ref`` [mag, -2.5 log10(e-/s)], brightest first.
    """
    import numpy as np
    from astropy.table import Table
    from .ops.astrometry import detect_stars
    st = detect_stars(data, mask, fwhm_px=fwhm_px, saturation=saturation, max_stars=max_stars)
    ok = np.asarray(st["flux"]) > 0
    ra, dec = wcs.pixel_to_world_values(np.asarray(st["x"])[ok], np.asarray(st["y"])[ok])
    mag = -2.5 * np.log10(np.asarray(st["flux"])[ok] / float(exptime))
    return Table({"ra": np.asarray(ra, float) % 360.0, "dec": np.asarray(dec, float), "mag_ref": mag})


def build_fieldref(night, prod):
    """The field reference of a target from its reference frame's ``zsfp`` product.

    Parameters
    ----------
    night : reducer.night.Night
    prod : reducer.products.Product
        The reference frame after s and z (sky-subtracted, e-).

    Returns
    -------
    astropy.table.Table
        ``ra``, ``dec``, ``mag_ref``; ``meta`` names the frame and how it was made.

    Raises
    ------
    reducer.steps.StepError
        No pointing, or fewer stars than ``[astrometry] min_stars`` (default 6).
    """
    import numpy as np
    from astropy.table import vstack
    from .ops.astrometry import initial_wcs
    from .ops.bits import UNUSABLE
    from .steps import StepError, focal_crpix, pointing
    opts = night.settings.get("astrometry", {})
    w = night.profile.table("wcs")
    ra, dec = pointing(night, prod.header)
    scale = float(w.get("pixel_scale", 1.0))
    shapes = {n: d.data.shape for n, d in prod.detectors.items()}
    parts = []
    for name, d in prod.detectors.items():
        wcs0 = initial_wcs(ra, dec, shape=d.data.shape, pixel_scale_arcsec=scale,
                           rotation_deg=float(w.get("rotation", 0.0)),
                           flip_x=bool(w.get("flip_x", True)),
                           crpix=focal_crpix(night.profile, name, shapes))
        sat = d.header.get("SATURATE")
        parts.append(field_stars(d.data, (d.mask & UNUSABLE) != 0, wcs0,
                                 exptime=float(prod.header["EXPTIME"]),
                                 fwhm_px=float(opts.get("fwhm_px", 3.0)),
                                 saturation=float(sat) if sat else None))
    tab = vstack(parts) if parts else None
    nmin = int(opts.get("min_stars", 6))
    if tab is None or len(tab) < nmin:
        raise StepError(f"field reference: {0 if tab is None else len(tab)} stars found on "
                        f"{prod.header.get('RAWFILE', 'the reference frame')} (need {nmin})")
    tab.sort("mag_ref")
    tab.meta.update({"selfref": True, "frame": prod.header.get("RAWFILE", ""),
                     "ra_pointing": ra, "dec_pointing": dec,
                     "how": "stars of the target's reference frame placed by its header pointing "
                            "and the profile's pixel scale (no reference catalogue)"})
    return tab


def _write_table(tab, out: Path, frame: str) -> None:
    """The table as ECSV and, beside it, the JSON sidecar freezing the frame choice."""
    import io
    import json
    from .fitsio import atomic_write_text
    atomic_write_text(Path(out).with_suffix(".json"), json.dumps({"frame": frame}) + "\n")
    buf = io.StringIO()
    tab.write(buf, format="ascii.ecsv")
    atomic_write_text(Path(out), buf.getvalue())


def run_fieldref(night_dir: str, filename: str, src: str, out: str) -> dict:
    """doit action: the field reference of a target from its reference frame (``zsfp``)."""
    from .night import Night
    from .products import read_product
    from .steps import StepError, step_digest
    night = Night(night_dir)
    prod = read_product(Path(src))
    if prod.header.get("FAILED"):
        why = f"reference frame {filename} failed at {prod.header.get('FAILSTEP')}"
        print(f"fieldref {Path(out).parent.name}: {why}")
        _write_table(_empty(why), Path(out), filename)
        return {"digest": step_digest(night, "astrometry")}
    try:
        tab = build_fieldref(night, prod)
    except StepError as exc:
        print(f"fieldref {Path(out).parent.name}: {exc}")
        _write_table(_empty(str(exc)), Path(out), filename)
        return {"digest": step_digest(night, "astrometry")}
    _write_table(tab, Path(out), filename)
    print(f"fieldref {Path(out).parent.name}: {len(tab)} stars from {filename} "
          "(no reference catalogue: frames are registered to this one)")
    return {"digest": step_digest(night, "astrometry")}


def _empty(reason: str):
    from astropy.table import Table
    t = Table(names=FIELDREF_COLUMNS, dtype=(float, float, float))
    t.meta.update({"selfref": True, "reason": reason})
    return t


def run_relref(night_dir: str, filename: str, src: str, fieldref: str, out: str) -> dict:
    """doit action: instrumental magnitudes of the field-reference stars on the reference
    frame of a target and filter (its ``azsfp`` product)."""
    import numpy as np
    from .night import Night
    from .products import read_product
    from .steps import StepError, star_photometry, step_digest
    from astropy.table import Table
    night = Night(night_dir)
    prod = read_product(Path(src))
    ref = Table.read(fieldref, format="ascii.ecsv")
    tab = Table({"ra": ref["ra"], "dec": ref["dec"],
                 "mag_inst": np.full(len(ref), np.nan), "mag_err": np.full(len(ref), np.nan)})
    tab.meta.update({"frame": filename, "selfref": True})
    if prod.header.get("FAILED"):
        tab.meta["reason"] = f"{filename} failed at {prod.header.get('FAILSTEP')}"
    else:
        try:
            ph = star_photometry(night, prod, ref)
        except StepError as exc:
            tab.meta["reason"] = str(exc)
        else:
            tab["mag_inst"][ph.index] = ph.mag
            tab["mag_err"][ph.index] = ph.mag_err
    _write_table(tab, Path(out), filename)
    n = int(np.isfinite(tab["mag_inst"]).sum())
    print(f"relref {Path(out).parent.name} {Path(out).stem[7:]}: {n} stars measured on {filename}"
          + (f" ({tab.meta['reason']})" if "reason" in tab.meta else ""))
    return {"digest": step_digest(night, "photometry")}
