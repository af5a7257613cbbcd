"""Step 4 of a night: stacks per target and filter, their catalogues, target photometry,
and light curves.

**Stack** (``stacks/<TARGET>_<filter>.fits``): the night's ``t`` frames of a target and
filter that passed the quality limits, every detector resampled onto one common TAN grid at
the profile's pixel scale (bilinear; the variance is resampled with the same weights, so it
is right for aperture and block sums — see :mod:`reducer.ops.resample`), each frame scaled to
electrons per second on the common zero point (``FLXSCALE / EXPTIME``), weighted by inverse
variance and combined by the clipping engine. HDUs: ``STACK`` (e-/s), ``STACK_UNC``,
``STACK_MASK``, ``EXPMAP`` (s). Magnitudes: ``m = -2.5 log10(flux [e-/s]) + PHOTZP``. One good
frame still gives a (resampled) stack. Frames without a calibrated zero point are stacked at
scale ``1 / EXPTIME`` and the stack is marked uncalibrated.

Uncertainty: ``STACK_UNC`` is the noise-equivalent uncertainty, right for sums over
apertures and blocks of more than ~4 x 4 px; a single pixel's noise is
``STACK_UNC / sqrt(NOISECOR)`` (:func:`noise_correlation`, header ``NOISECOR``).  Header
``PHOTZPER``: the zero point's error, from the frames' (:func:`stack_zero_point_error`).

**Catalogue** (``stacks/<TARGET>_<filter>.ecsv``): stars detected on the stack, aperture
photometry (radius ``2 x FWHM``) with errors and calibrated magnitudes: ``flux_err``
(noise), ``mag_err_star`` (noise and :data:`STAR_FLOOR`), ``mag_err`` (and the calibration
error).

**Target** (``stacks/<TARGET>_<filter>.json``): the magnitude and error at the target's
coordinates (``night.toml [targets]``, else the header pointing of its frames).

**Light curve** (``lightcurves/<TARGET>_<filter>.ecsv`` and ``.png``): per ``t`` frame the
target's calibrated magnitude and its differential magnitude against comparison stars chosen
automatically (bright, unsaturated, isolated, steady through the night), time as BJD_TDB.
Comparison stars are chosen afresh each time the light curve is rebuilt (it depends on every
frame of the target anyway), so nothing earlier is rebuilt when a frame arrives.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .products import read_product


def _frames_info(paths):
    from astropy.io import fits
    out = []
    for p in paths:
        h = fits.getheader(p)
        out.append({"path": Path(p), "header": h})
    return out


def target_coords(night, headers) -> tuple[float, float]:
    """RA, Dec (deg) of a target: night.toml ``[targets."<OBJECT>"]`` else the header pointing."""
    from .headers import parse_angle
    obj = headers[0].get("OBJECT", "")
    tgt = night.settings.get("targets", {}).get(obj) or \
        night.settings.get("targets", {}).get(headers[0].get("TARGET", ""))
    if tgt:
        return parse_angle(tgt["ra"], "ra"), parse_angle(tgt["dec"], "dec")
    return float(np.median([h["RA"] for h in headers])), float(np.median([h["DEC"] for h in headers]))


def build_stack(night, paths, out: Path) -> dict:
    """Resample and combine the frames ``paths``; write the stack, catalogue and target JSON."""
    from astropy.io import fits
    from astropy.wcs import WCS
    from .fitsio import add_provenance, write_fits
    from .ops.resample import common_wcs, resample, stack
    opts = night.settings.get("stack", {})
    zref = float(night.settings.get("photometry", {}).get("zp_reference", 25.0))
    scale = float(night.profile.table("wcs").get("pixel_scale", 1.0))
    prods = [read_product(Path(p)) for p in paths]
    wcss, shapes = [], []
    for pr in prods:
        for d in pr.detectors.values():
            wcss.append(WCS(d.header))
            shapes.append(d.data.shape)
    wcs_out, shape_out = common_wcs(wcss, shapes, pixel_scale_arcsec=scale)
    frames, scales, exptimes, corr = [], [], [], []
    calibrated = all(pr.header.get("PHOTCAL", False) for pr in prods)
    for pr in prods:
        data = np.full(shape_out, np.nan, np.float32)
        var = np.full(shape_out, np.nan, np.float32)
        mask = np.full(shape_out, 0xFFFF, np.uint16)
        cf = []
        for d in pr.detectors.values():
            r = resample(d.data, d.unc, d.mask, WCS(d.header), wcs_out, shape_out)
            on = r.footprint > 0
            data[on], var[on], mask[on] = r.data[on], r.var[on], r.mask[on]
            if np.isfinite(r.corr_factor):
                cf.append(r.corr_factor)
        corr.append(float(np.median(cf)) if cf else 1.0)
        from .ops.bits import OFFIMAGE
        mask[mask == 0xFFFF] = OFFIMAGE
        frames.append((data, var, mask))
        t = float(pr.header["EXPTIME"])
        scales.append(float(pr.header.get("FLXSCALE", 1.0)) / t)
        exptimes.append(t)
    res = stack(frames, scales=scales, nsigma=float(opts.get("nsigma", 4.0)),
                mem_limit=int(night.settings.get("combine", {}).get("mem_limit_mb", 256)) * 2**20,
                exptimes=exptimes)
    data, unc, mask, expmap, cnt = res
    # each frame's share of the coadd: inverse-variance weights w_i = 1 / (s_i^2 var_i),
    # so a frame's share of the coadd's variance is proportional to w_i too
    share = np.ones(len(prods)) if res.weights is None else np.asarray(res.weights, float)
    share = share / share.sum()
    noisecor = noise_correlation(share, corr)
    zperr = stack_zero_point_error(share, [pr.header for pr in prods])
    hw = wcs_out.to_header()
    prim = fits.Header()
    h0 = prods[0].header
    for k in ("OBJECT", "TARGET", "FILTER", "NIGHT"):
        prim[k] = h0.get(k, "")
    prim["NCOMBINE"] = (len(prods), "frames stacked")
    prim["EXPTOTAL"] = (float(sum(exptimes)), "[s] total exposure")
    prim["MJD-BEG"] = (min(pr.header["MJD-OBS"] for pr in prods), "[d] first frame start")
    prim["MJD-END"] = (max(pr.header["MJD-OBS"] + pr.header["EXPTIME"] / 86400 for pr in prods),
                       "[d] last frame end")
    prim["BUNIT"] = "electron/s"
    prim["PHOTCAL"] = (calibrated, "frames calibrated against the catalogue")
    # no catalogue: frames scaled to the target's reference frame (reducer.fieldref) give
    # relative magnitudes on the same PHOTZP, never called calibrated
    relative = not calibrated and all(pr.header.get("PHOTREL", False) for pr in prods)
    if calibrated or relative:
        prim["PHOTZP"] = (zref, "[mag] m = -2.5 log10(flux [e-/s]) + PHOTZP")
        if np.isfinite(zperr):
            prim["PHOTZPER"] = (round(zperr, 5), "[mag] zero point error from the frames'")
    prim["NOISECOR"] = (round(noisecor, 4), "aperture-sum var / pixel var (resampling)")
    prim.add_comment("STACK_UNC is right for sums over areas of >~ 4x4 px (apertures); the "
                     "noise of a single pixel is STACK_UNC / sqrt(NOISECOR)")
    if relative:
        prim["PHOTREL"] = (True, "PHOTZP relative to the reference frame: uncalibrated")
    add_provenance(prim, inputs=[(Path(p).name, "") for p in paths], digest=night.digest("stack"),
                   step="stack")
    hdus = [fits.PrimaryHDU(header=prim)]
    for name, arr in (("STACK", data), ("STACK_UNC", unc), ("STACK_MASK", mask), ("EXPMAP", expmap)):
        h = hw.copy()
        h["BUNIT"] = {"STACK": "electron/s", "STACK_UNC": "electron/s", "EXPMAP": "s"}.get(name, "")
        hdus.append(fits.ImageHDU(np.asarray(arr), header=h, name=name))
    write_fits(fits.HDUList(hdus), out)
    # measurements on the coadd: a pixel is bad only where no frame contributed
    from .ops.bits import OFFIMAGE
    phot_mask = np.where(np.asarray(cnt) > 0, 0, OFFIMAGE).astype(np.uint16)
    cat = stack_catalogue(data, unc, phot_mask, wcs_out, prim.get("PHOTZP"), scale,
                          zp_err=prim.get("PHOTZPER", 0.0))
    from .fitsio import atomic_write_text
    import io
    buf = io.StringIO()
    cat.write(buf, format="ascii.ecsv")
    atomic_write_text(out.with_suffix(".ecsv"), buf.getvalue())
    ra, dec = target_coords(night, [pr.header for pr in prods])
    tgt = target_photometry(data, unc, phot_mask, wcs_out, ra, dec, cat.meta.get("fwhm_px", 3.0),
                            prim.get("PHOTZP"), cat.meta.get("aperture_correction", 1.0),
                            zp_err=cat.meta.get("zp_err", 0.0))
    tgt.update({"target": h0.get("TARGET", ""), "filter": h0.get("FILTER", ""),
                "calibrated": bool(calibrated), "relative": bool(relative),
                "nframes": len(prods), "exptime_total": float(sum(exptimes)),
                "inputs": [Path(p).name for p in paths]})
    atomic_write_text(out.with_suffix(".json"), json.dumps(tgt, indent=2, default=float))
    return tgt


def _clean(data, unc, mask):
    """Pixels with no value or no uncertainty become OFFIMAGE (never huge errors)."""
    from .ops.bits import OFFIMAGE
    bad = ~np.isfinite(data) | ~np.isfinite(unc)
    m = np.asarray(mask, np.uint16).copy()
    m[bad] |= OFFIMAGE
    return np.where(bad, 0.0, data).astype(np.float32), np.where(bad, 0.0, unc).astype(np.float32), m


def noise_correlation(share, corr_factors) -> float:
    """Correlated-noise factor of a coadd of resampled frames (dimensionless, >= 1).

    Each resampled frame's variance map is the noise-equivalent ('sum') variance of
    :func:`reducer.ops.resample.resample`, right for sums over apertures; a single pixel's
    own variance is smaller by the frame's ``corr_factor`` R_i (bilinear interpolation
    averages up to 4 input pixels: R between 1 and 4, ~2.3 for random sub-pixel phases).
    A frame contributing the fraction ``share_i`` of the coadd's variance (inverse-variance
    weights: ``share_i = w_i / sum w``) contributes ``share_i / R_i`` of its per-pixel
    variance, so the coadd's factor is the weighted harmonic mean
    ``1 / sum_i(share_i / R_i)``: the variance of a sum over an area of more than ~4 x 4 px
    is ``sum STACK_UNC^2``; that of one pixel ``STACK_UNC^2 / NOISECOR``.  This is the
    interpolation-kernel analogue of drizzle's correlated-noise ratio R (Fruchter & Hook
    2002, PASP 114, 144), measured here from the actual weights.
    """
    s = np.asarray(share, float)
    r = np.asarray(corr_factors, float)
    ok = np.isfinite(r) & (r > 0)
    if not ok.any():
        return 1.0
    return float(np.sum(s[ok]) / np.sum(s[ok] / r[ok]))


def stack_zero_point_error(share, headers) -> float:
    """Zero-point error of a coadd [mag], from its frames' (nan if a frame has none).

    The frames were scaled to the common zero point with their own PHOTZP, so the coadd's
    calibration carries their errors, weighted by each frame's share of the coadd
    (``share``): the zero-point *fits* (PHOTZPFE) use the same catalogue stars in every
    frame, so their errors are taken as fully correlated (``sum share_i e_i``: catalogue
    and colour-term errors do not average out by stacking), while the aperture
    corrections (APCORERR / APCORR) are measured independently on each frame
    (``sqrt(sum share_i^2 a_i^2)``).  Frames written before PHOTZPFE existed count their
    whole PHOTZPER as correlated.
    """
    fit, apc = [], []
    for h in headers:
        tot = h.get("PHOTZPER")
        if tot is None or not np.isfinite(float(tot)):
            return float("nan")
        a = 0.0
        if h.get("APCORERR") is not None and h.get("APCORR"):
            a = 1.0857 * float(h["APCORERR"]) / float(h["APCORR"])
        f = h.get("PHOTZPFE")
        fit.append(float(f) if f is not None else float(tot))
        apc.append(a if f is not None else 0.0)
    s = np.asarray(share, float)
    return float(np.hypot(np.sum(s * np.asarray(fit)), np.sqrt(np.sum((s * np.asarray(apc)) ** 2))))


#: Relative flux error [dimensionless] added in quadrature to every star's noise in a stack:
#: per-star systematics that do not average out over the frames.  On the simulator
#: (24 frames of 60 s, +-2 px guiding drift) the brightest stars, measured to 0.04-0.06 %
#: by their photon noise, scatter by ~0.1 % about the common offset in the coadd and in
#: the mean of the frames alike: the master flat's pixel noise (0.3 % per pixel from 3
#: flats; 0.04-0.06 % per star, the same in every frame when the dithers are small), the
#: resampling and the mix of PSFs (the aperture holds a seeing-dependent fraction).
STAR_FLOOR = 0.001


def stack_catalogue(data, unc, mask, wcs, zp, pixel_scale: float, zp_err: float = 0.0):
    """Stars detected on a stack, aperture photometry and calibrated magnitudes (Table).

    ``flux``/``flux_err`` [e-/s] are total fluxes (aperture 2 x FWHM times the aperture
    correction) with their noise; ``mag_err_star`` [mag] is the error of a star's
    magnitude relative to the other stars: that noise and :data:`STAR_FLOOR` in
    quadrature; ``mag_err`` adds the calibration error common to every star: the
    stack's zero-point error ``zp_err`` [mag] (:func:`stack_zero_point_error`) and the
    error of the stack's own aperture correction (meta ``zp_err``: the two combined).
    """
    from .ops.astrometry import detect_stars
    from .ops.bits import UNUSABLE
    from .ops.photometry import aperture_photometry
    data, unc, mask = _clean(data, unc, mask)
    img = data
    stars = detect_stars(img, (mask & UNUSABLE) != 0, fwhm_px=3.0, max_stars=2000)
    fwhm = float(stars.meta.get("fwhm_px", 3.0)) if len(stars) else 3.0
    r, big = 2.0 * fwhm, 4.0 * fwhm
    xy = np.column_stack([stars["x"], stars["y"]]) if len(stars) else np.zeros((0, 2))
    tab = aperture_photometry(img, unc, mask, xy, r_ap=r, r_in=big + 3, r_out=big + 10, bkg_stat="mean")
    from .ops.photometry import aperture_correction
    apc, apc_err, napc = aperture_correction(img, unc, mask, xy, r_ap=r, r_big=big,
                                             r_in=big + 3, r_out=big + 10, small=tab)
    tab["flux"] = np.asarray(tab["flux"]) * apc            # total flux (e-/s)
    tab["flux_err"] = np.asarray(tab["flux_err"]) * apc
    ra, dec = wcs.pixel_to_world_values(tab["x"], tab["y"]) if len(tab) else ([], [])
    tab["ra"], tab["dec"] = ra, dec
    with np.errstate(divide="ignore", invalid="ignore"):
        m = -2.5 * np.log10(np.asarray(tab["flux"], float))
        e = 1.0857 * np.asarray(tab["flux_err"], float) / np.asarray(tab["flux"], float)
    cal = float(np.hypot(zp_err if np.isfinite(zp_err) else 0.0,
                         1.0857 * apc_err / apc if np.isfinite(apc_err) else 0.0))
    e = np.hypot(e, 1.0857 * STAR_FLOOR)
    tab["mag"] = m + zp if zp is not None else m
    tab["mag_err_star"] = e
    tab["mag_err"] = np.hypot(e, cal) if zp is not None else e
    tab.meta["fwhm_px"] = fwhm
    tab.meta["zp_err"] = cal if zp is not None else 0.0
    tab.meta["fwhm_arcsec"] = fwhm * pixel_scale
    tab.meta["aperture_px"] = r
    tab.meta["aperture_correction"] = apc
    tab.meta["aperture_correction_err"] = apc_err
    tab.meta["aperture_correction_stars"] = napc
    tab.meta["calibrated"] = zp is not None
    return tab


def target_photometry(data, unc, mask, wcs, ra, dec, fwhm_px, zp, apcorr: float = 1.0,
                      zp_err: float = 0.0) -> dict:
    """Magnitude of the target at (ra, dec) in a stack (aperture 2 x FWHM, corrected to total
    flux by ``apcorr``); errors as in :func:`stack_catalogue`: ``mag_err_star`` (noise and
    :data:`STAR_FLOOR`), ``mag_err`` (and the calibration error ``zp_err`` [mag])."""
    from .ops.photometry import aperture_photometry
    x, y = wcs.world_to_pixel_values(ra, dec)
    out = {"ra": ra, "dec": dec, "x": float(x), "y": float(y)}
    ny, nx = data.shape
    r = 2.0 * fwhm_px
    if not (r < x < nx - r - 1 and r < y < ny - r - 1):
        out["reason"] = "target outside the stack"
        return out
    data, unc, mask = _clean(data, unc, mask)
    tab = aperture_photometry(data, unc, mask, np.array([[x, y]]), r_ap=r, r_in=2 * r + 3,
                              r_out=2 * r + 10, bkg_stat="mean")
    f, fe = float(tab["flux"][0]) * apcorr, float(tab["flux_err"][0]) * apcorr
    out.update({"flux_e_per_s": f, "flux_err": fe, "flags": int(tab["flags"][0])})
    if f > 0 and int(tab["flags"][0]) == 0:
        key = "mag" if zp is not None else "mag_inst"      # instrumental: -2.5 log10(e-/s)
        out[key] = -2.5 * np.log10(f) + (zp if zp is not None else 0.0)
        out["mag_err_star"] = float(np.hypot(1.0857 * fe / f, 1.0857 * STAR_FLOOR))
        out["mag_err"] = float(np.hypot(out["mag_err_star"], zp_err)) if zp is not None \
            else out["mag_err_star"]
        out["calibrated"] = zp is not None
    elif f <= 0:
        out["reason"] = "no positive flux at the target position"
    else:
        out["reason"] = f"aperture touches bad or off-image pixels (flags {int(tab['flags'][0])})"
    return out


def build_lightcurve(night, paths, out_ecsv: Path, out_png: Path) -> dict:
    """Light curve of a target in one filter from its t frames (see the module docstring)."""
    from astropy.table import Table
    from astropy.wcs import WCS
    from .fitsio import atomic_path
    from .ops.lightcurve import bjd_tdb, choose_comparisons, differential_lightcurve, plot_lightcurve
    from .fitsio import astropy_offline
    astropy_offline()
    from .ops.photometry import aperture_photometry
    prods = [read_product(Path(p)) for p in paths]
    prods.sort(key=lambda p: p.header["MJD-MID"])
    ra, dec = target_coords(night, [p.header for p in prods])
    # candidate comparison stars: the reference catalogue around the field
    from .steps import reference_catalog
    scale = float(night.profile.table("wcs").get("pixel_scale", 1.0))
    shape0 = next(iter(prods[0].detectors.values())).data.shape
    cat = reference_catalog(night, ra, dec, radius_deg=1.2 * max(shape0) * scale / 3600.0,
                            target=prods[0].header.get("TARGET"))
    sky = np.column_stack([[ra, *np.asarray(cat["ra"])], [dec, *np.asarray(cat["dec"])]])
    nstar = len(sky)
    flux = np.full((len(prods), nstar), np.nan)
    err = np.full((len(prods), nstar), np.nan)
    flags = np.zeros((len(prods), nstar), int)
    zps, zperr = [], []
    fwhm_px = 3.0
    for i, pr in enumerate(prods):
        t = float(pr.header["EXPTIME"])
        zps.append(pr.header.get("PHOTZP", np.nan))
        zperr.append(pr.header.get("PHOTZPER", np.nan))
        fw = pr.header.get("FWHM")
        if isinstance(fw, (int, float)) and np.isfinite(fw):
            fwhm_px = fw / scale
        r = 2.0 * fwhm_px
        # one aperture correction per frame, common to every star of the frame (so it
        # cancels in differential magnitudes): the t step's, measured on all its detectors
        # at this aperture; else measured here on all detectors together
        apc = float(pr.header["APCORR"]) if pr.header.get("APCORR") else None
        parts, ratios, rerrs = [], [], []
        for d in pr.detectors.values():
            w = WCS(d.header)
            x, y = w.world_to_pixel_values(sky[:, 0], sky[:, 1])
            ny, nx = d.data.shape
            inside = (x > r + 12) & (x < nx - r - 13) & (y > r + 12) & (y < ny - r - 13)
            if not inside.any():
                continue
            # defect and low-flat pixels are calibrated (dark-subtracted, their noise in unc):
            # keep them, so a hot pixel near the target does not drop the frame; saturated,
            # non-finite and off-image pixels still flag the measurement
            from .ops.bits import NONFINITE, OFFIMAGE, SATURATED
            keep = d.mask & (SATURATED | NONFINITE | OFFIMAGE)
            xy = np.column_stack([x[inside], y[inside]])
            tab = aperture_photometry(d.data, d.unc, keep, xy, r_ap=r, r_in=2 * r + 3,
                                      r_out=2 * r + 10, bkg_stat="mean")
            if apc is None:
                from .ops.photometry import growth_ratios
                a, b = growth_ratios(d.data, d.unc, keep, xy, r_ap=r, r_big=2 * r,
                                     r_in=2 * r + 3, r_out=2 * r + 10, small=tab)
                ratios.append(a)
                rerrs.append(b)
            parts.append((inside, tab))
        if apc is None:
            from .ops.photometry import combine_growth_ratios
            apc = combine_growth_ratios(np.concatenate(ratios) if ratios else [],
                                        np.concatenate(rerrs) if rerrs else [], nmax=100)[0]
        for inside, tab in parts:
            flux[i, inside] = np.asarray(tab["flux"]) * apc / t      # total e-/s
            err[i, inside] = np.asarray(tab["flux_err"]) * apc / t
            flags[i, inside] = np.asarray(tab["flags"])
    on = np.isfinite(flux[:, 0]) & (flags[:, 0] & 1 == 0)
    if on.sum() < 2:
        raise ValueError(f"the target is measured on {int(on.sum())} frame(s) of this filter")
    prods = [p for p, k in zip(prods, on) if k]
    flux, err, flags = flux[on], err[on], flags[on]
    zps = list(np.asarray(zps)[on])
    zperr = list(np.asarray(zperr)[on])
    seen = np.all(np.isfinite(flux), axis=0)
    comp_idx = np.where(seen)[0][1:]
    # positions on the tangent plane at the target, in pixels (for the isolation test)
    cosd = np.cos(np.radians(dec))
    px = ((sky[:, 0] - ra + 180.0) % 360.0 - 180.0) * cosd * 3600.0 / scale
    py = (sky[:, 1] - dec) * 3600.0 / scale
    ctab = Table({"x": px[comp_idx], "y": py[comp_idx],
                  "flux": np.nanmedian(flux[:, comp_idx], axis=0),
                  "flags": flags[:, comp_idx].max(axis=0)})
    chosen = choose_comparisons(ctab, (0.0, 0.0), n=int(night.settings.get("photometry", {}).get("ncomp", 5)),
                                flux_series=flux[:, comp_idx], err_series=err[:, comp_idx],
                                target_radius=1.0) if len(comp_idx) else np.array([], int)
    cols = comp_idx[np.asarray(chosen, int)]
    site = night.profile.site.earth_location()
    mjd = np.array([p.header["MJD-MID"] for p in prods])
    bjd = bjd_tdb(mjd, ra, dec, site)
    out = Table()
    out["bjd_tdb"] = bjd
    out["mjd_utc_mid"] = mjd
    out["file"] = [p.header.get("RAWFILE", "") for p in prods]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["mag"] = -2.5 * np.log10(flux[:, 0]) + np.asarray(zps, float)
        out["mag_err"] = np.hypot(1.0857 * err[:, 0] / flux[:, 0], np.nan_to_num(np.asarray(zperr, float)))
    if len(cols):
        dl = differential_lightcurve(flux[:, 0], flux[:, cols], err[:, 0], err[:, cols])
        out["dmag"], out["dmag_err"] = dl.dmag, dl.dmag_err
    out.meta.update({"target_ra": ra, "target_dec": dec, "comparisons_ra": list(sky[cols, 0]),
                     "comparisons_dec": list(sky[cols, 1]), "time": "BJD_TDB (mid-exposure)"})
    import io
    from .fitsio import atomic_write_text
    buf = io.StringIO()
    out.write(buf, format="ascii.ecsv")
    atomic_write_text(out_ecsv, buf.getvalue())
    y = out["dmag"] if "dmag" in out.colnames else out["mag"]
    ye = out["dmag_err"] if "dmag_err" in out.colnames else out["mag_err"]
    with atomic_path(out_png, ".png") as tmp:
        fig = plot_lightcurve(bjd, y, ye, None,
                              title=f"{prods[0].header.get('OBJECT', '')} {prods[0].header.get('FILTER', '')}",
                              ylabel="Δmag" if "dmag" in out.colnames else "mag")
        fig.savefig(tmp, format="png", dpi=100)
    return {"n": len(out), "ncomp": int(len(cols))}
