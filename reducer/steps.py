"""Step 3 of a night: carry one science frame through p f s z a t.

Each ``run_*`` function is a doit action for one frame and one step: it reads the previous
step's product (or the raw frame), calls the pure algorithm in :mod:`reducer.ops`, and writes
the next product atomically with provenance. A frame that cannot go on prints one line
naming the file and the reason and leaves, in place of its product, a record of the failure
(see :func:`_fail`): the later steps pass it on, the stacks leave the frame out and the
reports give the reason, while the rest of the night finishes.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from .products import Detector, Product, read_product, write_product
# without numpy, for the task generators too (reducer.stepconfig)
from .stepconfig import self_reference, step_digest  # noqa: F401


class StepError(ValueError):
    """A frame cannot go through a step; the message is the one-line reason."""


def _frame(night, filename):
    from .inventory import read_nightlog
    for f in read_nightlog(night.nightlog):
        if f.file == filename:
            return f
    raise StepError(f"{filename} is not in nightlog.ecsv")


def _fail(night, filename: str, step: str, exc: Exception, out) -> dict:
    """Record a frame that cannot go on: print one line, and write in place of the product a
    record (an empty FITS with FAILED = T and the reason) so that the rest of the chain, the
    stacks and the reports go on without it and say why. The record is replaced as soon as
    the step succeeds (a new master, a pinned flat, a fixed setting)."""
    from astropy.io import fits
    from .fitsio import add_provenance
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    print(f"{step} {filename}: {reason}")
    h = fits.Header()
    h["FAILED"] = (True, "this frame did not go through the chain")
    h["FAILSTEP"] = (step, "step that failed")
    h["FAILWHY"] = (reason[:68], "why")
    h["RAWFILE"] = (filename[-68:], "raw frame")
    if len(reason) > 68:
        h.add_comment(reason)
    add_provenance(h, digest=step_digest(night, step), step=step)
    write_product(Product(h), Path(out))
    return {"digest": step_digest(night, step), "failed": reason}


def _check_not_failed(prod: Product) -> None:
    if prod.header.get("FAILED"):
        raise StepError(f"failed earlier at {prod.header.get('FAILSTEP')}: {prod.header.get('FAILWHY')}")


def _masters(night, frame, runtime=True):
    """Bias, dark and flat choices for a frame (see :mod:`reducer.tasks.calib`)."""
    from .masters import calib_settings, frame_key
    from .tasks.calib import _load_sets, choose, choose_flat
    _, sets = _load_sets(night)
    keys = calib_settings(night.settings)["set_keys"]
    out = {}
    for imtype in ("bias", "dark"):
        ch = choose(night, sets, imtype, frame_key(frame, keys[imtype]), frame.mjd, runtime=runtime)
        if ch is not None:
            out[imtype] = ch
    ch = choose_flat(night, sets, frame, runtime=runtime)
    if ch is not None:
        out["flat"] = ch
    return out


def _defects(night, frame) -> dict:
    """The night's defects map for this frame's detector configuration ({} when none)."""
    from astropy.io import fits
    from .masters import calib_settings, frame_key
    from .tasks.calib import defects_key, defects_path
    keys = calib_settings(night.settings)["set_keys"]
    p = defects_path(night, defects_key(night, frame_key(frame, keys["bias"])))
    if not p.is_file():
        return {}
    with fits.open(p) as h:
        return {x.name: x.data.copy() for x in h[1:]}


def _read_master(path, det):
    from astropy.io import fits
    with fits.open(path, memmap=False) as h:
        return h[det].data.astype(np.float32), h[f"{det}_UNC"].data.astype(np.float32)


def _base_header(night, frame, step: str, inputs, masters=()):
    from astropy.io import fits
    from .fitsio import add_provenance, sha256_file
    h = fits.Header()
    h["OBJECT"] = (frame.object, "OBJECT of the raw frame")
    h["TARGET"] = (frame.target, "reducer target name")
    h["FILTER"] = (frame.filter, "filter")
    h["EXPTIME"] = (float(frame.exptime), "[s] exposure time")
    h["DATE-OBS"] = (frame.date_obs, "UTC start of exposure")
    h["MJD-OBS"] = (frame.mjd, "[d] MJD (UTC) at start")
    h["MJD-MID"] = (frame.mjd + frame.exptime / 2 / 86400.0, "[d] MJD (UTC) at mid-exposure")
    if np.isfinite(frame.airmass):
        h["AIRMASS"] = (float(frame.airmass), "airmass from the raw header")
    if np.isfinite(frame.ra):
        h["RA"] = (float(frame.ra), "[deg] header pointing")
        h["DEC"] = (float(frame.dec), "[deg] header pointing")
    h["NIGHT"] = (night.utdate, "observing night")
    h["RAWFILE"] = (frame.file[-68:], "raw frame")
    add_provenance(h, inputs=[(Path(p).name, sha256_file(p)) for p in inputs],
                   masters=masters, digest=night.digest(step), step=step)
    return h


# --------------------------------------------------------------------------- p
def run_prepare(night_dir: str, filename: str, out: str) -> bool:
    """doit action: raw -> p (overscan, bias, dark; electrons, uncertainty, mask)."""
    from .night import Night
    from .masters import detector_inputs
    from .ops.calibrate import prepare
    night = Night(night_dir)
    try:
        frame = _frame(night, filename)
        used = _masters(night, frame)
        dets = detector_inputs(night.profile, night.raw_dir, frame, night.settings)
        dmaps = _defects(night, frame)
        product = Product(_base_header(night, frame, "prepare", [night.raw_dir / filename],
                                       [c.header_entry() for k, c in used.items() if k != "flat"]))
        for det, rd in zip(night.profile.detectors, dets):
            raw_os, sat, ov_level = rd.load(with_level=True)
            gain, rn = det.gain or 1.0, det.rdnoise or 0.0
            kw = {}
            if "bias" in used:
                kw["bias"], kw["bias_unc"] = _read_master(used["bias"].path, det.name)
            if "dark" in used:
                kw["dark_rate"], kw["dark_unc"] = _read_master(used["dark"].path, det.name)
            if det.name in dmaps and dmaps[det.name].shape == raw_os.shape:
                kw["defects"] = dmaps[det.name]
            data, unc, mask = prepare(raw_os, gain=gain, rdnoise_e=rn, exptime=frame.exptime,
                                      saturated=sat, **kw)
            from astropy.io import fits
            dh = fits.Header()
            dh["GAIN"] = (1.0, "e-/e-: data are in electrons")
            dh["GAINORIG"] = (gain, "[e-/ADU] gain applied")
            dh["RDNOISE"] = (rn, "[e-] read noise")
            if det.saturate:
                # the raw saturation level (ADU) minus what was subtracted from the raw
                # values: the overscan level and the master bias (medians)
                level = ov_level + (float(np.nanmedian(kw["bias"])) if "bias" in kw else 0.0)
                dh["SATURATE"] = ((det.saturate - level) * gain,
                                  "[e-] saturation after overscan and bias")
            product.detectors[det.name] = Detector(data, unc, mask, dh)
        write_product(product, Path(out))
    except (StepError, ValueError, OSError) as exc:
        return _fail(night, filename, "prepare", exc, out)
    return {"digest": step_digest(night, "prepare")}


# --------------------------------------------------------------------------- f
def run_flatten(night_dir: str, filename: str, src: str, out: str) -> bool:
    """doit action: p -> fp (divide by the master flat of the frame's filter)."""
    from .night import Night
    from .ops.calibrate import flatten
    night = Night(night_dir)
    try:
        frame = _frame(night, filename)
        used = _masters(night, frame)
        if "flat" not in used:
            raise StepError(f"no usable flat for filter {frame.filter!r} tonight nor by fallback")
        prod = read_product(Path(src))
        _check_not_failed(prod)
        low = float(night.settings.get("flatten", {}).get("low", 0.5))
        hdr = prod.header.copy()
        from .fitsio import add_provenance
        add_provenance(hdr, masters=[used["flat"].header_entry()], digest=night.digest("flatten"),
                       step="flatten")
        out_p = Product(hdr)
        for name, d in prod.detectors.items():
            flat, flat_unc = _read_master(used["flat"].path, name)
            data, unc, mask = flatten(d.data, d.unc, d.mask, flat, flat_unc, low=low)
            out_p.detectors[name] = Detector(data, unc, mask, d.header)
        write_product(out_p, Path(out))
    except (StepError, ValueError, OSError) as exc:
        return _fail(night, filename, "flatten", exc, out)
    return {"digest": step_digest(night, "flatten")}


def _transform(night_dir: str, filename: str, src: str, out: str, step: str, fn) -> dict | bool:
    """Read ``src``, apply ``fn(night, product) -> product`` and write ``out`` with provenance."""
    from .fitsio import add_provenance
    from .night import Night
    night = Night(night_dir)
    try:
        prod = read_product(Path(src))
        _check_not_failed(prod)
        new = fn(night, prod)
        add_provenance(new.header, digest=step_digest(night, step), step=step)
        write_product(new, Path(out))
    except (StepError, ValueError, OSError) as exc:
        return _fail(night, filename, step, exc, out)
    return {"digest": step_digest(night, step)}


# --------------------------------------------------------------------------- s
def _sky(night, prod: Product, mastersky: str = "", mastersky_why: str = "") -> Product:
    from .ops.sky import estimate_sky, subtract_sky
    opts = night.settings.get("sky", {})
    out = Product(prod.header.copy())
    levels = []
    dets = {n: (d.data, d.unc, d.mask) for n, d in prod.detectors.items()}
    if mastersky:
        from .mastersky import load_master_sky, master_settings
        from .ops.mastersky import apply_master_sky
        master, why = load_master_sky(mastersky)
        if master is None:
            mastersky_why = why
        else:
            modes = master_settings(night)["modes"]
            app = apply_master_sky(dets, master, modes, box=int(opts.get("box", 64)))
            dets = {n: (app.data[n], app.unc[n], dets[n][2]) for n in dets}
            out.header["MSKYFILE"] = (Path(mastersky).name, "master sky applied before the sky fit")
            out.header["MSKYMODE"] = (",".join(modes), "master sky corrections")
            if "fringe" in modes:
                out.header["FRNGSCL"] = (round(app.fringe_scale, 4), "fringe scale fitted (1 = as the sky)")
                out.header["FRNGERR"] = (round(app.fringe_scale_err, 4), "its 1-sigma error")
    if mastersky_why:
        out.header["MSKYWHY"] = (mastersky_why[:68], "")
    for name, d in prod.detectors.items():
        data0, unc0, _ = dets[name]
        res = estimate_sky(data0, d.mask, box=int(opts.get("box", 64)),
                           filter_size=int(opts.get("filter_size", 3)))
        data, unc = subtract_sky(data0, unc0, res)
        h = d.header.copy()
        h["SKYLEVEL"] = (round(float(res.level), 3), "[e-/px] median sky subtracted")
        h["SKYRMS"] = (round(float(res.rms_level), 3), "[e-] median sky noise per pixel")
        levels.append((res.level, res.rms_level))
        out.detectors[name] = Detector(data, unc, d.mask, h, sky=res.sky)
    out.header["SKYLEVEL"] = (round(float(np.median([l for l, _ in levels])), 3), "[e-/px] sky level")
    out.header["SKYRMS"] = (round(float(np.median([r for _, r in levels])), 3), "[e-] sky noise")
    return out


def run_sky(night_dir: str, filename: str, src: str, out: str, mastersky: str = "",
            mastersky_why: str = ""):
    """doit action: fp -> sfp (the master sky's corrections when one is given, then a sky
    model with sources masked, subtracted; level and rms recorded)."""
    def fn(night, prod):
        return _sky(night, prod, mastersky, mastersky_why)
    return _transform(night_dir, filename, src, out, "sky", fn)


# --------------------------------------------------------------------------- z
def _companion_products(paths) -> tuple[list, list]:
    """The companion frames' products the z step compares with: (name, Product) of those
    that are there and went through, and one-line notes on the others."""
    comps, notes = [], []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            notes.append(f"{p.name}: not there (pruned)")
            continue
        cp = read_product(p)
        if cp.header.get("FAILED"):
            notes.append(f"{p.name}: failed at {cp.header.get('FAILSTEP')}")
            continue
        comps.append((p.name, cp))
    return comps, notes


def _cosmics(night, prod: Product, companions=()) -> Product:
    from .ops.cosmics import clean_cosmics
    opts = {k: v for k, v in night.settings.get("cosmics", {}).items()
            if k in ("sigclip", "sigfrac", "objlim", "niter", "cleantype", "psfmodel",
                     "psf_test", "psf_delta", "grow_sigma", "fwhm_px", "compare",
                     "compare_nsigma", "compare_scale_noise")}
    out = Product(prod.header.copy())
    comps, notes = _companion_products(companions)
    for i, (name, _) in enumerate(comps, 1):
        out.header[f"CRCMP{i}"] = (name, "companion frame compared with (z step)")
    for note in notes:
        print(f"cosmics {out.header.get('RAWFILE', '')}: companion {note}")
    total = 0
    for name, d in prod.detectors.items():
        rn = float(d.header.get("RDNOISE", 0.0))
        sat = float(d.header.get("SATURATE", 1e9))
        sky = d.sky if d.sky is not None else 0.0
        more = {}
        cnames = [n for n, c in comps if name in c.detectors]
        cdet = [(c.detectors[name].data, c.detectors[name].unc, c.detectors[name].mask)
                for _, c in comps if name in c.detectors]
        if cdet:
            more = {"companions": cdet, "unc_e": d.unc}
        res = clean_cosmics(d.data, d.mask, sky_e=sky, rdnoise_e=rn, saturate_e=sat, **opts, **more)
        h = d.header.copy()
        h["NCOSMIC"] = (res.ncosmic, "cosmic-ray events found and repaired")
        h["NCRPIX"] = (res.npix, "pixels flagged COSMIC")
        if res.psf_fwhm == res.psf_fwhm:     # not NaN: the PSF test ran
            h["CRFWHM"] = (round(res.psf_fwhm, 3), "[px] FWHM of the z step's PSF test")
        if cdet:
            h["NCRCMP"] = (res.ncompanions, "companion frames used for cosmic rays")
            h["NCRPIXC"] = (res.npix_compare, "pixels flagged by the companion comparison")
            h["NCRCLR"] = (res.npix_cleared, "single-frame flags cleared (a source in all)")
            for c in res.companions:
                if not c.used:
                    print(f"cosmics {out.header.get('RAWFILE', '')} {name}: companion "
                          f"{cnames[c.index]} not used: {c.why}")
        total += res.ncosmic
        out.detectors[name] = Detector(res.data, d.unc, res.flag(d.mask), h)
    out.header["NCOSMIC"] = (total, "cosmic-ray events, all detectors")
    return out


def run_cosmics(night_dir: str, filename: str, src: str, out: str, companions=()):
    """doit action: sfp -> zsfp (astroscrappy in electrons with the s step's sky as
    background, then the comparison with the companion frames ``companions``, the sfp
    products of other exposures of the same target and filter)."""
    def fn(night, prod):
        return _cosmics(night, prod, companions)
    return _transform(night_dir, filename, src, out, "cosmics", fn)


# --------------------------------------------------------------------------- a
def focal_crpix(profile, det_name: str, shapes: dict) -> tuple[float, float] | None:
    """FITS pixel of the mosaic centre (the header pointing) in a detector's frame.

    Detector offsets (``[wcs] offsets``: the focal-plane position of each detector's pixel
    (1,1)) place the detectors; the pointing refers to the centre of their bounding box.
    ``None`` (the detector's own centre) for a single detector without offsets.
    """
    offs = profile.table("wcs").get("offsets", {})
    if not offs or det_name not in offs:
        return None
    xs, ys = [], []
    for name, (ny, nx) in shapes.items():
        ox, oy = offs.get(name, (0.0, 0.0))
        xs += [ox, ox + nx]
        ys += [oy, oy + ny]
    cx, cy = (min(xs) + max(xs) - 1) / 2.0, (min(ys) + max(ys) - 1) / 2.0   # zero-based
    ox, oy = offs[det_name]
    return cx - ox + 1.0, cy - oy + 1.0


def reference_catalog(night, ra: float, dec: float, radius_deg: float, *,
                      target: str | None = None, filt: str | None = None):
    """The reference catalogue around a field: the configured file, or Gaia DR3 (cached),
    or else the target's own field reference (:mod:`reducer.fieldref`).

    Raises
    ------
    StepError
        When no catalogue is configured or none can be had (one line, says what to set).
    """
    from .catalogs import CatalogError, CatalogUnavailable, cone, gaia_cone, load_catalog
    c = night.settings.get("catalog", {})
    try:
        if c.get("path"):
            path = Path(c["path"]).expanduser()
            if not path.is_absolute():
                path = night.site.base / path
            tab = load_catalog(path, ra_column=c.get("ra_column", "ra"),
                               dec_column=c.get("dec_column", "dec"))
            return cone(tab, ra, dec, radius_deg)
        if c.get("gaia"):
            cache = c.get("cache_dir") or str(night.site.path("masters_store") / "gaia-cache")
            return gaia_cone(ra, dec, radius_deg, cache_dir=cache)
    except (CatalogError, CatalogUnavailable, OSError) as exc:
        raise StepError(str(exc)) from None
    if self_reference(night) and target:
        return field_reference(night, target, filt)
    raise StepError("no reference catalogue: set [catalog] path (or gaia = true) in reducer.toml "
                    "or night.toml")


def field_reference(night, target: str, filt: str | None = None):
    """The target's field reference as a catalogue; with ``filt``, its stars' relative
    magnitudes (``mag_ref`` of the filter's reference frame + ``zp_reference``) as the filter's
    magnitude column, so the t step fits a relative zero point (``meta['selfref']``)."""
    from astropy.table import Table
    from .fieldref import fieldref_path, relref_path
    path = fieldref_path(night.dir, target)
    if not path.is_file():
        raise StepError(f"no field reference {path.name} for {target} (no catalogue configured)")
    tab = Table.read(path, format="ascii.ecsv")
    if len(tab) == 0:
        raise StepError(tab.meta.get("reason", "empty field reference"))
    col = catalog_mag_column(night, filt) if filt else None
    rel = relref_path(night.dir, target, filt) if filt else None
    if rel is not None and rel.is_file():
        r = Table.read(rel, format="ascii.ecsv")
        if len(r) == len(tab):
            zref = float(night.settings.get("photometry", {}).get("zp_reference", 25.0))
            tab[col] = np.asarray(r["mag_inst"], float) + zref
            tab.meta["relref_frame"] = r.meta.get("frame", "")
    return tab


def pointing(night, header) -> tuple[float, float]:
    """RA, Dec [deg] the telescope pointed at: the header's, else the target's coordinates
    in night.toml ``[targets]``.

    Raises
    ------
    StepError
        Neither is there.
    """
    ra, dec = header.get("RA"), header.get("DEC")
    tgt = night.settings.get("targets", {}).get(header.get("OBJECT", ""), {})
    if (ra is None or dec is None) and tgt:
        from .headers import parse_angle
        ra, dec = parse_angle(tgt["ra"], "ra"), parse_angle(tgt["dec"], "dec")
    if ra is None or dec is None:
        raise StepError("no pointing (RA/DEC) in the header and none in night.toml [targets]")
    return float(ra), float(dec)


def _astrometry(night, prod: Product) -> Product:
    from .ops.astrometry import detect_stars, initial_wcs, match_and_fit
    opts = night.settings.get("astrometry", {})
    w = night.profile.table("wcs")
    ra, dec = pointing(night, prod.header)
    scale = float(w.get("pixel_scale", 1.0))
    shapes = {n: d.data.shape for n, d in prod.detectors.items()}
    span = max(max(s) for s in shapes.values()) * scale / 3600.0
    cat = reference_catalog(night, float(ra), float(dec), radius_deg=1.2 * span,
                            target=prod.header.get("TARGET"))
    out = Product(prod.header.copy())
    rms, nmat = [], 0
    for name, d in prod.detectors.items():
        wcs0 = initial_wcs(float(ra), float(dec), shape=d.data.shape, pixel_scale_arcsec=scale,
                           rotation_deg=float(w.get("rotation", 0.0)),
                           flip_x=bool(w.get("flip_x", True)),
                           crpix=focal_crpix(night.profile, name, shapes))
        sat = d.header.get("SATURATE")          # e- (the p step converts it)
        from .ops.bits import UNUSABLE
        # after the s step (SKYLEVEL recorded) the sky is already subtracted: no second
        # background map (saturated pixels are in the mask)
        stars = detect_stars(d.data, d.mask & UNUSABLE, fwhm_px=float(opts.get("fwhm_px", 3.0)),
                             saturation=float(sat) if sat else None,
                             sky_subtracted="SKYLEVEL" in d.header)
        res = match_and_fit(stars, cat["ra"], cat["dec"], wcs0, shape=d.data.shape,
                            sip_degree=opts.get("sip_degree"), cat_mag=_brightness(night, cat, prod))
        if not res.ok:
            raise StepError(f"{name}: {res.reason}")
        h = d.header.copy()
        for k in list(h.keys()):
            if k.startswith(("CD1_", "CD2_", "CRPIX", "CRVAL", "CTYPE", "CUNIT", "A_", "B_", "AP_", "BP_")):
                h.remove(k, ignore_missing=True, remove_all=True)
        h.update(res.wcs.to_header(relax=True))
        h["ASTRMS"] = (round(float(res.rms_arcsec), 4), "[arcsec] astrometric rms")
        h["ASTNMAT"] = (int(res.nmatch), "stars matched to the reference catalogue")
        h["ASTOFFS"] = (round(float(res.offset_arcsec), 2), "[arcsec] header pointing error")
        rms.append(res.rms_arcsec)
        nmat += res.nmatch
        out.detectors[name] = Detector(d.data, d.unc, d.mask, h)
    out.header["ASTRMS"] = (round(float(np.median(rms)), 4), "[arcsec] median astrometric rms")
    out.header["ASTNMAT"] = (nmat, "matched stars, all detectors")
    return out


def _brightness(night, cat, prod):
    """Catalogue magnitudes to rank sources for pattern matching: the frame's band, else any."""
    col = catalog_mag_column(night, prod.header.get("FILTER", ""))
    for c in [col, "phot_g_mean_mag", *[n for n in cat.colnames if n.startswith("mag")]]:
        if c in cat.colnames:
            return np.asarray(cat[c], dtype=float)
    return None


def run_astrometry(night_dir: str, filename: str, src: str, out: str):
    """doit action: zsfp -> azsfp (detect stars, match the catalogue, fit TAN(-SIP))."""
    return _transform(night_dir, filename, src, out, "astrometry", _astrometry)


# --------------------------------------------------------------------------- t
def catalog_mag_column(night, filt: str) -> str | None:
    """Catalogue magnitude column of a filter: ``[photometry] bands`` maps a filter to a band,
    ``[catalog] mag_columns`` a band to a column (default ``mag_<band>``)."""
    band = night.profile.table("photometry").get("bands", {}).get(filt, filt)
    cols = night.settings.get("catalog", {}).get("mag_columns", {})
    return cols.get(band, f"mag_{band}")


class StarPhotometry(NamedTuple):
    """Aperture-corrected instrumental magnitudes of catalogue stars on one frame."""

    index: np.ndarray      #: rows of the catalogue measured (flags clean, flux > 0)
    mag: np.ndarray        #: [mag] -2.5 log10(e-/s), aperture-corrected to total flux
    mag_err: np.ndarray    #: [mag]
    fwhm_px: float         #: median stellar FWHM over the detectors [px] (nan if none)
    apcorr: float = 1.0    #: aperture correction applied (all detectors together)
    apcorr_err: float = float("nan")   #: its 1-sigma error (nan: fewer than 3 stars)
    apcorr_n: int = 0      #: stars it was measured on


def star_photometry(night, prod: Product, cat) -> StarPhotometry:
    """Measure the catalogue's stars on a solved frame (the t step's photometry).

    Each detector: stars inside (20 px from the edges) through the detector's WCS;
    FWHM from those stars (the frame's: the median over the detectors); aperture
    ``[photometry] aperture_fwhm`` x FWHM (default 2), local background in an annulus
    (mean); fluxes times the aperture correction to total flux, measured at 4 FWHM on the
    brighter stars of *all* detectors together (they share the seeing; per detector, a
    sparse field left 1-2 stars and no correction). A star touching an unusable pixel
    (defect, saturated, low flat, off-image) is dropped; repaired cosmic-ray pixels are
    not reasons to drop (on ARCSAT keeping stars with a hot pixel in the aperture took
    the same-target ZP rms from 0.015 to 0.039 mag).
    """
    from astropy.wcs import WCS
    from .ops.bits import UNUSABLE
    from .ops.photometry import (aperture_photometry, combine_growth_ratios, fwhm_estimate,
                                 growth_ratios, instrumental_mag)
    opts = night.settings.get("photometry", {})
    exptime = float(prod.header["EXPTIME"])
    rows = np.arange(len(cat))
    dets, fwhms = [], []
    for d in prod.detectors.values():
        wcs = WCS(d.header)
        x, y = wcs.world_to_pixel_values(np.asarray(cat["ra"]), np.asarray(cat["dec"]))
        ny, nx = d.data.shape
        inside = (x > 20) & (x < nx - 21) & (y > 20) & (y < ny - 21)
        if not inside.any():
            continue
        xy = np.column_stack([x[inside], y[inside]])
        pmask = d.mask & UNUSABLE
        fw = fwhm_estimate(d.data, xy, mask=pmask, saturation=d.header.get("SATURATE"))
        if np.isfinite(fw):
            fwhms.append(fw)
        dets.append((d, inside, xy, pmask))
    fwhm = float(np.median(fwhms)) if fwhms else float("nan")
    f0 = fwhm if np.isfinite(fwhm) else 3.0
    r = float(opts.get("aperture_fwhm", 2.0)) * f0
    big = 4.0 * f0
    tabs, ratios, rerrs = [], [], []
    for d, inside, xy, pmask in dets:
        tab = aperture_photometry(d.data, d.unc, pmask, xy, r_ap=r, r_in=big + 3, r_out=big + 10,
                                  bkg_stat="mean")
        ra_, re_ = growth_ratios(d.data, d.unc, pmask, xy, r_ap=r, r_big=big, r_in=big + 3,
                                 r_out=big + 10, small=tab)
        tabs.append(tab)
        ratios.append(ra_)
        rerrs.append(re_)
    apc, apc_err, apc_n = combine_growth_ratios(np.concatenate(ratios) if ratios else [],
                                                np.concatenate(rerrs) if rerrs else [], nmax=100)
    idx, mags, errs = [], [], []
    for (d, inside, xy, pmask), tab in zip(dets, tabs):
        good = (np.asarray(tab["flags"]) == 0) & (np.asarray(tab["flux"]) > 0)
        m, e = instrumental_mag(np.asarray(tab["flux"]) * apc, np.asarray(tab["flux_err"]) * apc,
                                exptime)
        idx.append(rows[inside][good])
        mags.append(m[good])
        errs.append(e[good])
    cat_ = (np.concatenate(idx) if idx else np.zeros(0, int),
            np.concatenate(mags) if mags else np.zeros(0), np.concatenate(errs) if errs else np.zeros(0))
    return StarPhotometry(*cat_, fwhm, apc, apc_err, apc_n)


#: Relative error given to the aperture correction when it could not be measured (fewer
#: than 3 stars with S/N >= 20 at 4 FWHM): it is then 1.0, while a 2-FWHM aperture
#: typically misses 2-4 % of a star's flux.
APCFAILE = 0.03


def _zeropoint(night, prod: Product) -> Product:
    from .ops.photometry import MAG_PER_LN, zero_point
    opts = night.settings.get("photometry", {})
    limits = night.profile.raw.get("limits", {}) | night.settings.get("limits", {})
    filt = prod.header.get("FILTER", "")
    col = catalog_mag_column(night, filt)
    scale = float(night.profile.table("wcs").get("pixel_scale", 1.0))
    ra0, dec0 = prod.header.get("RA"), prod.header.get("DEC")
    shapes = [d.data.shape for d in prod.detectors.values()]
    cat = reference_catalog(night, float(ra0), float(dec0),
                            radius_deg=1.2 * max(max(s) for s in shapes) * scale / 3600.0,
                            target=prod.header.get("TARGET"), filt=filt)
    calibrated = col in cat.colnames
    selfref = bool(cat.meta.get("selfref"))
    ph = star_photometry(night, prod, cat)
    fwhm = ph.fwhm_px
    out = Product(prod.header.copy(), prod.detectors)
    h = out.header
    h["FWHM"] = (round(fwhm * scale, 3) if np.isfinite(fwhm) else "nan", "[arcsec] median stellar FWHM")
    reasons = []
    if calibrated and len(ph.index):
        cm = np.asarray(cat[col], float)[ph.index]
        fin = np.isfinite(cm)
        zp = zero_point(ph.mag[fin], ph.mag_err[fin], cm[fin], min_stars=int(opts.get("min_stars", 3)))
        h["PHOTZP"] = (round(float(zp.zp), 4), "[mag] zero point: m = -2.5log10(e-/s) + PHOTZP")
        # the aperture correction is common to every star: its error is the zero point's
        # too (a failed correction, fewer than 3 stars, counts as APCFAILE relative)
        apc_rel = ph.apcorr_err / ph.apcorr if np.isfinite(ph.apcorr_err) else APCFAILE
        zperr = float(np.hypot(zp.zp_err, MAG_PER_LN * apc_rel))
        h["PHOTZPER"] = (round(zperr, 4), "[mag] zero point uncertainty (apcorr incl.)")
        h["PHOTZPFE"] = (round(float(zp.zp_err), 4), "[mag] zero point fit error (stars)")
        h["PHOTNSTR"] = (int(zp.n_used), "stars used for the zero point")
        h["APCORR"] = (round(float(ph.apcorr), 5), f"aperture correction, {ph.apcorr_n} stars")
        h["APCORERR"] = (round(float(apc_rel * ph.apcorr), 5), "its 1-sigma error")
        if selfref:
            # relative to the reference frame of this target and filter: scaled, not calibrated
            h["PHOTCAL"] = (False, "uncalibrated: relative to PHOTREF")
            h["PHOTREL"] = (True, "zero point relative to the field reference")
            h["PHOTREF"] = (str(cat.meta.get("relref_frame", ""))[-68:], "flux reference frame")
        else:
            h["PHOTCAL"] = (True, "calibrated against the catalogue column " + col)
        # flux scale to a common zero point: data x FLXSCALE is on the PHOTZP = ZPREF system
        zref = float(opts.get("zp_reference", 25.0))
        h["FLXSCALE"] = (float(10 ** (0.4 * (zref - zp.zp))), f"flux scale to zero point {zref}")
        if "zp_min" in limits and not selfref and zp.zp < limits["zp_min"]:
            reasons.append(f"zero point {zp.zp:.2f} below {limits['zp_min']}")
    else:
        h["PHOTCAL"] = (False, f"no catalogue magnitudes ({col}): uncalibrated")
        h["FLXSCALE"] = (1.0, "uncalibrated: relative scale 1")
    if "fwhm_max_arcsec" in limits and np.isfinite(fwhm) and fwhm * scale > limits["fwhm_max_arcsec"]:
        reasons.append(f"FWHM {fwhm * scale:.2f}\" above {limits['fwhm_max_arcsec']}\"")
    if "astrms_max_arcsec" in limits and h.get("ASTRMS", 0) > limits["astrms_max_arcsec"]:
        reasons.append(f"astrometric rms {h['ASTRMS']}\" above {limits['astrms_max_arcsec']}\"")
    h["QUALFLAG"] = (not reasons, "True: good for stacks")
    if reasons:
        h["QUALWHY"] = ("; ".join(reasons)[:68], "why the frame is left out of stacks")
    return out


def run_zeropoint(night_dir: str, filename: str, src: str, out: str):
    """doit action: azsfp -> tazsfp (zero point, flux scale, FWHM, quality flag)."""
    return _transform(night_dir, filename, src, out, "zeropoint", _zeropoint)
