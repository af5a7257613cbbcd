"""The science chain on the sky: ARCSAT, night 2019-05-01, against the observatory's PinPoint.

Acceptance test of the a and t steps on real frames, without network.

Calibrations first, as an observatory would: night 20190506 (biases, darks) and 20190503
(dome flats) with ``doit calib``; they go to the masters store and its registry. Then night
20190501 is made and ``doit science:<TARGET>`` runs for M 51, NGC 2841, NGC 3310 and M 81.

**The reference catalogue** (``refcat_pinpoint.ecsv`` in ``tmp_path``, one file for all
targets) is built honestly from the frames themselves, since Gaia/SDSS are not at hand
offline. For each target ONE of its own sdss_r frames (``CATALOGUE_FRAME``) is taken raw,
the certified master bias and dark of the registry are subtracted and the certified
sdss_r dome flat divided out (a median level alone is not enough: warm pixels would be
"stars" and fool the matcher). Stars are found with
:func:`reducer.ops.astrometry.detect_stars`; only point sources are kept (FWHM within
0.7-1.3 of the stellar FWHM: no galaxy nucleus, HII region or knot) whose peak stays well in
the linear range (< 30 000 ADU above the background). Their pixel positions go to RA/Dec
through that frame's PinPoint WCS (CD matrix, CRVAL/CRPIX, read by astropy; PinPoint's
TR* polynomial cards are not used). Magnitudes are ``-2.5 log10(flux [ADU] / EXPTIME) +
ZMAG`` with ``flux`` from photutils aperture photometry (radius 3 FWHM, sigma-clipped
median in an annulus), ZMAG being PinPoint's zero point of that frame for 1 s. The
column is ``mag_r``: the profile maps the filter sdss_r to band "r" and the catalogue
column defaults to ``mag_<band>`` (``steps.catalog_mag_column``). So the catalogue is on
PinPoint's photometric system of the catalogue frame and on its astrometric frame.

**PinPoint's WCS is hidden from the solver.** The a step (``steps._astrometry``) starts
from the header pointing RA/DEC (the RA/DEC cards, ACP's target coordinates) and the
profile's ``[wcs]`` pixel scale, rotation and flip: it never reads CD/CRVAL/CRPIX. Nor
could it: the products carry only the cards ``steps._base_header`` writes, which is
asserted below on every ``zsfp`` product (the input of the a step) -- no CTYPE/CD/CRVAL/
CDELT/TR*/ZMAG/PLTSOLVD anywhere. ASTOFFS (solved centre minus header pointing) shows
the solver had real work: about 1' for M 51.

**Checks.**

1. Astrometry: every solved frame (detector 'CCD' of its ``azsfp`` product) of the
   targets that PinPoint also solved agrees with that frame's own PinPoint WCS to
   <= 0.5" median over the field (:func:`reducer.ops.astrometry.wcs_offset_arcsec`, a
   10 x 10 grid). All g, r, i, z frames must be solved. The catalogue frames agree
   trivially (their catalogue *is* their PinPoint WCS), so they are printed apart; the
   others (other sdss_r exposures and the g, i, z frames, dithered by arcminutes) are the
   real test. u and H-alpha frames are solved when enough stars are found; PinPoint did
   not solve most of them, so they have no reference and are only reported.
2. Zero points: only sdss_r frames are calibrated (the catalogue has r magnitudes). PHOTZP
   is ``m = -2.5 log10(e-/s) + PHOTZP``; ZMAG (header: "Mag zero point for 1 sec
   exposure") is ``m = -2.5 log10(ADU/s) + ZMAG``. With e- = GAIN x ADU, ``PHOTZP = ZMAG
   + 2.5 log10(GAIN)`` up to the small constant of the catalogue's aperture; so for two
   frames i, j ``PHOTZP_i - PHOTZP_j = ZMAG_i - ZMAG_j`` with no exposure-time term. The
   test also evaluates the other reading (ZMAG for the whole exposure: a term
   ``-2.5 log10(t_i / t_j)``) and requires the data to prefer the 1 s one. Over all pairs
   of sdss_r frames of the same target, rms[(PHOTZP_i - PHOTZP_j) - (ZMAG_i - ZMAG_j)] <=
   0.05 mag. Pairs with the catalogue frame are included: they are not trivial (the
   reducer measures frame j against frame 1's stars, PinPoint against UCAC4); only the
   catalogue frame's own absolute PHOTZP - ZMAG is fixed by construction. Across targets
   the difference also carries each catalogue frame's own ZMAG error and aperture
   constant, so it is printed and held to a looser 0.10 mag. The common constant
   median(PHOTZP - ZMAG) must be 2.5 log10(GAIN) = 0.51 mag within 0.15 mag (a chain in
   ADU instead of e- would be off by 0.51).

M3 is left out: in the globular cluster the aperture photometry is crowded (zero points
then differ from ZMAG by tenths of a magnitude, frame to frame), which is not what this
test is about. M82 has a single full-frame sdss_r exposure.
"""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS, FITSFixedWarning

from conftest import real_set, run_cli, run_doit

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

SET = "arcsat-2019-ugriz-ha"
NIGHT = "20190501"
#: reducer target name -> the sdss_r frame that defines its part of the catalogue
CATALOGUE_FRAME = {
    "M51": "M51_sdss_r_20190501_080359.fits",
    "NGC_2841": "NGC 2841_sdss_r_20190501_051735.fits",   # 180 s: the first (90 s) is shallower
    "NGC_3310": "NGC 3310_sdss_r_20190501_070238.fits",
    "M_81": "M 81_sdss_r_20190501_061120.fits",
}
BAND_COLUMN = "mag_r"          # steps.catalog_mag_column for sdss_r with the default columns
WCS_MEDIAN_MAX = 0.5           # arcsec
ZP_RMS_MAX = 0.05              # mag, pairs of the same target
ZP_RMS_CROSS_MAX = 0.10        # mag, pairs of different targets
PEAK_MAX_ADU = 30000.0         # linear range kept for catalogue stars (above the background)
PINPOINT_CARDS = ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2",
                  "CD2_1", "CD2_2", "CDELT1", "CDELT2", "CROTA1", "CROTA2", "TR1_0", "TR2_0",
                  "ZMAG", "PLTSOLVD", "PA")


def _site(root):
    cfg = root / "reducer.toml"
    cfg.write_text('instrument = "arcsat"\nredux = "redux"\nmasters_store = "store"\n')
    return cfg


def _night(root, cfg, raw, utdate):
    run_cli("--config", str(cfg), "night", utdate, "--raw", str(raw), cwd=root)
    return root / "redux" / utdate


def _certified(registry_url, imtype, **keys):
    """Data of the certified full-frame master of a type (and set keys) from the registry."""
    from reducer.registry import Registry
    with Registry(registry_url, create=False) as reg:
        recs = [r for r in reg.list(instrument="arcsat", imtype=imtype, certified=True, bad=False)
                if r.set_keys.get("shape") == "1024x1024" and r.set_keys.get("binning") == "1x1"
                and all(r.set_keys.get(k) == v for k, v in keys.items())]
    assert recs, f"no certified {imtype} {keys} in {registry_url}"
    rec = recs[-1]
    return fits.getdata(rec.path, "CCD").astype(np.float64), f"{rec.night} {rec.path.name}"


def _catalogue_part(path, bias, dark, flat, target):
    """Stars of one raw frame on its own PinPoint WCS and ZMAG (see the module docstring)."""
    from astropy.stats import SigmaClip
    from photutils.aperture import (ApertureStats, CircularAnnulus, CircularAperture,
                                    aperture_photometry)
    from reducer.ops.astrometry import detect_stars

    with fits.open(path) as h:
        hdr = h[0].header.copy()
        raw = h[0].data.astype(np.float64)
    t = float(hdr["EXPTIME"])
    data = (raw - bias - dark * t) / flat                      # ADU, as PinPoint's ZMAG
    level = float(np.median(bias))
    st = detect_stars(data, ~np.isfinite(data), fwhm_px=3.0, saturation=60000.0 - level,
                      max_stars=500)
    fw = float(st.meta["fwhm_px"])
    point = (st["fwhm"] > 0.7 * fw) & (st["fwhm"] < 1.3 * fw) & (st["peak"] < PEAK_MAX_ADU)
    st = st[point]
    xy = np.column_stack([st["x"], st["y"]])
    r_ap, r_in, r_out = 3.0 * fw, 4.0 * fw + 3.0, 4.0 * fw + 10.0
    ny, nx = data.shape
    inside = ((xy[:, 0] > r_out) & (xy[:, 0] < nx - 1 - r_out)
              & (xy[:, 1] > r_out) & (xy[:, 1] < ny - 1 - r_out))
    st, xy = st[inside], xy[inside]
    bkg = ApertureStats(data, CircularAnnulus(xy, r_in=r_in, r_out=r_out),
                        sigma_clip=SigmaClip(sigma=3.0, maxiters=10)).median
    aper = CircularAperture(xy, r=r_ap)
    flux = np.asarray(aperture_photometry(data, aper)["aperture_sum"], float) - bkg * aper.area
    ok = np.isfinite(flux) & (flux > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        ra, dec = WCS(hdr).all_pix2world(xy[ok, 0], xy[ok, 1], 0)
    tab = Table({"ra": ra, "dec": dec,
                 BAND_COLUMN: -2.5 * np.log10(flux[ok] / t) + float(hdr["ZMAG"])})
    tab["ra"].unit = tab["dec"].unit = "deg"
    tab[BAND_COLUMN].unit = "mag"
    tab["target"] = target
    tab["frame"] = path.name
    print(f"catalogue {target}: {len(tab)} stars from {path.name} (stellar FWHM {fw:.2f} px, "
          f"ZMAG {hdr['ZMAG']:.4f}, r {np.min(tab[BAND_COLUMN]):.2f}..{np.max(tab[BAND_COLUMN]):.2f})")
    return tab


def _wcs(header):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def _rms(values):
    return float(np.sqrt(np.mean(np.square(values)))) if len(values) else float("nan")


def test_arcsat_sky_astrometry_and_zero_points(tmp_path):
    from reducer.night import Night
    from reducer.ops.astrometry import wcs_offset_arcsec
    from reducer.products import read_product

    raw = real_set(SET)
    cfg = _site(tmp_path)

    # 1. calibration nights, then the science night
    for utdate in ("20190506", "20190503"):
        run_doit(_night(tmp_path, cfg, raw, utdate), "calib")
    nd = _night(tmp_path, cfg, raw, NIGHT)

    # 2. the reference catalogue from the frames' own PinPoint solutions (no network)
    url = Night(nd).site.registry_url
    bias, bias_name = _certified(url, "bias")
    dark, dark_name = _certified(url, "dark")
    flat, flat_name = _certified(url, "flat", filter="sdss_r", subtype="dome")
    print(f"catalogue calibration: bias {bias_name}, dark {dark_name}, flat {flat_name}")
    cat = vstack([_catalogue_part(raw / f, bias, dark, flat, t) for t, f in CATALOGUE_FRAME.items()])
    catpath = tmp_path / "refcat_pinpoint.ecsv"
    cat.meta["comment"] = ["Stars of one sdss_r frame per target: positions through its PinPoint WCS,",
                           "mag_r = -2.5 log10(ADU/s) + its PinPoint ZMAG (tests/test_arcsat_sky.py)"]
    cat.write(catpath, format="ascii.ecsv")
    with open(nd / "night.toml", "a") as f:
        f.write(f'\n[catalog]\npath = "{catpath}"\n')

    # 3. + 4. the chain, solving from the header pointing only
    out = run_doit(nd, *[f"science:{t}" for t in CATALOGUE_FRAME]).stdout
    print(out)

    frames = {}
    for target in CATALOGUE_FRAME:
        for p in sorted((nd / target).glob("tazsfp*.fits")):
            frames[p.name.removeprefix("tazsfp")] = (target, p)
    assert len(frames) >= 28, sorted(frames)

    astro, zps, trivial, unsolved, noref = [], [], [], [], []
    for name, (target, tp) in sorted(frames.items()):
        # PinPoint's solution never reached the input of the a step
        z = read_product(nd / target / f"zsfp{name}")
        for hdr in [z.header] + [d.header for d in z.detectors.values()]:
            leaked = [k for k in PINPOINT_CARDS if k in hdr]
            assert not leaked, f"zsfp{name} carries PinPoint cards {leaked}"
        th = fits.getheader(tp)
        if th.get("FAILED"):
            unsolved.append((name, th.get("FAILWHY")))
            continue
        a = read_product(nd / target / f"azsfp{name}")
        t = read_product(tp)
        ccd = a.detectors["CCD"]
        assert t.detectors["CCD"].header["CRVAL1"] == ccd.header["CRVAL1"]
        rh = fits.getheader(raw / th["RAWFILE"])
        if not rh.get("PLTSOLVD"):
            noref.append((name, ccd.header["ASTRMS"], ccd.header["ASTNMAT"]))
            continue
        med, mx = wcs_offset_arcsec(_wcs(ccd.header), _wcs(rh), ccd.data.shape)
        row = (name, th["FILTER"], med, mx, ccd.header["ASTRMS"], ccd.header["ASTNMAT"],
               ccd.header["ASTOFFS"])
        (trivial if th["RAWFILE"] in CATALOGUE_FRAME.values() else astro).append(row)
        if th.get("PHOTCAL"):
            zps.append({"target": target, "file": th["RAWFILE"], "zp": float(th["PHOTZP"]),
                        "zperr": float(th["PHOTZPER"]), "n": int(th["PHOTNSTR"]),
                        "zmag": float(rh["ZMAG"]), "t": float(th["EXPTIME"]),
                        "gain": float(ccd.header["GAINORIG"])})

    print("\nsolved WCS vs the frame's own PinPoint WCS [arcsec] (median, max over a 10x10 grid)")
    print(f"  {'frame':44s} {'filter':7s} {'median':>7s} {'max':>7s} {'ASTRMS':>7s} {'NMATCH':>6s} {'ASTOFFS':>7s}")
    for label, rows in (("", astro), ("  catalogue frames (trivially agree):", trivial)):
        if label:
            print(label)
        for r in rows:
            print(f"  {r[0]:44s} {r[1]:7s} {r[2]:7.3f} {r[3]:7.3f} {r[4]:7.4f} {r[5]:6d} {r[6]:7.1f}")
    for name, rms_, n in noref:
        print(f"  {name:44s} solved (ASTRMS {rms_}\", {n} stars), no PinPoint solution to compare")
    for name, why in unsolved:
        print(f"  {name:44s} not solved: {why}")
    meds = [r[2] for r in astro]
    print(f"  non-catalogue frames: {len(astro)}, median of the medians {np.median(meds):.3f}\", "
          f"worst median {max(meds):.3f}\"")

    # every g, r, i, z frame of the targets is solved and agrees with PinPoint
    solved = {r[0] for r in astro + trivial}
    want = {n for n in frames if any(f"_sdss_{b}_" in n for b in "griz")}
    assert want <= solved, f"not solved or no reference: {sorted(want - solved)}"
    assert len(astro) >= 16
    bad = [(r[0], round(r[2], 3)) for r in astro + trivial if not r[2] <= WCS_MEDIAN_MAX]
    assert not bad, f"median offset from PinPoint above {WCS_MEDIAN_MAX}\": {bad}"

    # zero points: every sdss_r frame calibrated
    r_frames = {n for n in frames if "_sdss_r_" in n}
    assert {z["file"] for z in zps} == r_frames, (sorted(r_frames), [z["file"] for z in zps])
    print("\nzero points of the sdss_r frames [mag]")
    print(f"  {'frame':44s} {'EXPTIME':>7s} {'PHOTZP':>8s} {'+-':>6s} {'NSTAR':>5s} {'ZMAG':>8s} {'PHOTZP-ZMAG':>11s}")
    for z in zps:
        flag = "  (catalogue frame)" if z["file"] in CATALOGUE_FRAME.values() else ""
        print(f"  {z['file']:44s} {z['t']:7.0f} {z['zp']:8.4f} {z['zperr']:6.4f} {z['n']:5d} "
              f"{z['zmag']:8.4f} {z['zp'] - z['zmag']:11.4f}{flag}")
    same, cross, same_exp = [], [], []
    print("  pairs: (PHOTZP_i - PHOTZP_j) - (ZMAG_i - ZMAG_j)  [ZMAG per 1 s | per exposure]")
    for i, j in itertools.combinations(zps, 2):
        d1 = (i["zp"] - j["zp"]) - (i["zmag"] - j["zmag"])
        dexp = d1 + 2.5 * math.log10(i["t"] / j["t"])
        if i["target"] == j["target"]:
            same.append(d1)
            same_exp.append(dexp)
            print(f"    {i['file']:40s} - {j['file']:40s} {d1:+.4f} | {dexp:+.4f}")
        else:
            cross.append(d1)
    rms_same, rms_exp, rms_cross = _rms(same), _rms(same_exp), _rms(cross)
    gain = zps[0]["gain"]
    const = float(np.median([z["zp"] - z["zmag"] for z in zps]))
    print(f"  same target: {len(same)} pairs, rms {rms_same:.4f} mag (ZMAG per 1 s); "
          f"{rms_exp:.4f} mag if ZMAG were per exposure")
    print(f"  across targets: {len(cross)} pairs, rms {rms_cross:.4f} mag")
    print(f"  median(PHOTZP - ZMAG) = {const:.4f} mag; 2.5 log10(GAIN {gain}) = "
          f"{2.5 * math.log10(gain):.4f} mag")

    assert len(same) >= 8
    assert rms_same <= ZP_RMS_MAX, f"same-target ZP differences rms {rms_same:.4f} > {ZP_RMS_MAX}"
    assert rms_same < rms_exp, "the data do not prefer ZMAG's 1 s convention"
    assert rms_cross <= ZP_RMS_CROSS_MAX, f"cross-target rms {rms_cross:.4f} > {ZP_RMS_CROSS_MAX}"
    assert abs(const - 2.5 * math.log10(gain)) < 0.15, const
