"""Time stamps, comparison stars and differential light curves.

Pure functions, no I/O except :func:`plot_lightcurve`, which may write a PNG
(matplotlib Agg canvas, no pyplot state).  Inputs are never modified.

Magnitudes are instrumental, ``m = -2.5 log10(flux)`` (mag) with
``sigma_m = 1.0857 flux_err / flux``; fluxes in e- (any common unit works:
only ratios enter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["bjd_tdb", "choose_comparisons", "differential_lightcurve", "DiffLightCurve",
           "plot_lightcurve"]

_MAG = 2.5 / math.log(10.0)
_MAD = 1.482602218505602


# --------------------------------------------------------------------------- time
def bjd_tdb(mjd_utc_mid, ra, dec, location, *, ephemeris: str = "builtin"):
    """Barycentric Julian Date in the TDB scale of a mid-exposure time.

    Parameters
    ----------
    mjd_utc_mid : float or array_like
        Mid-exposure time, MJD in UTC (days).
    ra, dec : float or array_like
        ICRS coordinates of the target, degrees (or a ``SkyCoord`` as ``ra``
        with ``dec=None``).
    location : astropy.coordinates.EarthLocation
        Observatory.
    ephemeris : str
        Solar-system ephemeris for the Earth's barycentric position:
        'builtin' (ERFA ``epv00``, no download, ~km accuracy, i.e. far below
        1 ms) or e.g. 'de432s' if the caller has it cached.

    Returns
    -------
    float or ndarray
        ``BJD_TDB = JD_TDB + Roemer + Shapiro`` delays toward the target
        (astropy ``Time.light_travel_time(kind='barycentric')``), days (JD).
        Float64 JD has a resolution of ~40 us.

    Notes
    -----
    No network access: the caller sets ``astropy.utils.iers.conf.auto_download
    = False``; UTC->TT uses the leap-second table and the observatory's
    geocentric position needs UT1 / polar motion from the bundled
    ``astropy-iers-data`` tables.  Outside their range the degraded-accuracy
    fallback of astropy is accepted: a UT1 error of even 1 s moves the
    observatory by < 0.5 km, i.e. < 2 us of light time.
    """
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    if isinstance(ra, SkyCoord):
        target = ra
    else:
        target = SkyCoord(np.asarray(ra, float) * u.deg, np.asarray(dec, float) * u.deg,
                          frame="icrs")
    t = Time(np.asarray(mjd_utc_mid, dtype=float), format="mjd", scale="utc",
             location=location)
    try:
        ltt = t.light_travel_time(target, kind="barycentric", ephemeris=ephemeris)
    except iers.IERSRangeError:
        with iers.conf.set_temp("iers_degraded_accuracy", "ignore"):
            ltt = t.light_travel_time(target, kind="barycentric", ephemeris=ephemeris)
    b = t.tdb + ltt
    jd = b.jd1 + b.jd2
    return float(jd) if np.ndim(jd) == 0 else np.asarray(jd)


# --------------------------------------------------------------------------- comparisons
def choose_comparisons(cat_table, target_xy, *, n: int = 5, flux_col: str = "flux",
                       flags_col: str | None = "flags", peak_col: str | None = None,
                       saturation: float | None = None, target_radius: float = 3.0,
                       isolation_px: float = 12.0, isolation_frac: float = 0.01,
                       flux_series=None, err_series=None, var_clip: float = 2.0,
                       max_iter: int = 100) -> np.ndarray:
    """Pick comparison stars: bright, unsaturated, isolated and not variable.

    Parameters
    ----------
    cat_table : astropy.table.Table or mapping of arrays
        Stars of the reference frame with columns ``x``, ``y`` (px) and
        ``flux_col`` (e-); optionally ``flags_col`` (nonzero = reject, e.g. the
        flags of :func:`reducer.ops.photometry.aperture_photometry`) and
        ``peak_col`` (peak pixel value, e-).  The target may be in the table.
    target_xy : (float, float)
        Target position, px; stars within ``target_radius`` px are the target.
    n : int
        Number of comparisons wanted.
    saturation : float, optional
        Stars with ``peak_col >= saturation`` (e-) are rejected.
    isolation_px, isolation_frac : float
        A star with another catalogue star (target included) within
        ``isolation_px`` px brighter than ``isolation_frac`` times its own flux
        is rejected (its aperture/annulus would be contaminated).
    flux_series : array_like, shape (n_frames, n_stars), optional
        Fluxes of the catalogue stars (columns in table order) in every frame;
        enables the variability test.
    err_series : array_like, shape (n_frames, n_stars), optional
        Their errors, e-; without them the expected scatter is taken as
        photon-limited, ``~ 1 / sqrt(median flux)`` up to a common factor.
    var_clip : float
        A star is variable when its scatter relative to the ensemble exceeds
        ``var_clip`` times the median (over candidates) of the scatter-to-
        expected ratio.
    max_iter : int
        At most this many stars are rejected as variable (one per iteration).

    Returns
    -------
    ndarray of int
        Row indices of the chosen comparisons, brightest first (fewer than
        ``n`` if not enough qualify).

    Notes
    -----
    Variability: ``L_fs = ln F_fs - median_f ln F_fs``; for each candidate the
    ensemble is the leave-one-out weighted mean ``E_fs`` of the other
    candidates' ``L`` (weights ``1 / e_s^2``, ``e_s`` the expected relative
    scatter: median of ``err/flux``), the star's scatter the robust sigma
    (1.4826 MAD) of ``L_fs - E_fs`` over frames, and its ratio ``q_s`` to the
    expected ``sqrt(e_s^2 + 1 / sum_others w)``.  The star with the largest
    ``q_s`` is dropped while ``q_s > var_clip * median(q)`` (relative to the
    median, so scintillation or error-model offsets common to all stars do not
    reject everything), one at a time, the ensemble being rebuilt each time.
    The ``n`` brightest survivors are returned.
    """
    from scipy.spatial import cKDTree

    x = np.asarray(cat_table["x"], dtype=float)
    y = np.asarray(cat_table["y"], dtype=float)
    f = np.asarray(cat_table[flux_col], dtype=float)
    ns = len(x)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(f) & (f > 0)
    tx, ty = (float(v) for v in target_xy)
    ok &= np.hypot(x - tx, y - ty) > target_radius
    names = getattr(cat_table, "colnames", None) or list(cat_table.keys())
    if flags_col is not None and flags_col in names:
        ok &= np.asarray(cat_table[flags_col]) == 0
    if saturation is not None and peak_col is not None:
        ok &= ~(np.asarray(cat_table[peak_col], dtype=float) >= saturation)
    # isolation (every catalogue star can contaminate, usable or not)
    fin = np.isfinite(x) & np.isfinite(y)
    pts = np.c_[x[fin], y[fin]]
    fl = np.where(np.isfinite(f), f, np.inf)[fin]
    idx_fin = np.flatnonzero(fin)
    tree = cKDTree(pts)
    for k in np.flatnonzero(ok):
        for j in tree.query_ball_point([x[k], y[k]], isolation_px):
            if idx_fin[j] != k and fl[j] > isolation_frac * f[k]:
                ok[k] = False
                break
    cand = np.flatnonzero(ok)
    if flux_series is not None and cand.size >= 3:
        F = np.asarray(flux_series, dtype=float)
        if F.ndim != 2 or F.shape[1] != ns:
            raise ValueError(f"flux_series must have shape (n_frames, {ns}), got {F.shape}")
        with np.errstate(invalid="ignore", divide="ignore"):
            L = np.log(np.where(F > 0, F, np.nan))
            L = L - np.nanmedian(L, axis=0)
            if err_series is not None:
                E = np.asarray(err_series, dtype=float)
                if E.shape != F.shape:
                    raise ValueError("err_series must have the shape of flux_series")
                expct = np.nanmedian(E / np.where(F > 0, F, np.nan), axis=0)
            else:
                expct = 1.0 / np.sqrt(np.nanmedian(np.where(F > 0, F, np.nan), axis=0))
        cur = cand.copy()
        for _ in range(max(1, int(max_iter))):
            if cur.size < 3:
                break
            w = 1.0 / expct[cur] ** 2
            Lc = L[:, cur]
            okv = np.isfinite(Lc)
            wl = np.where(okv, w[None, :], 0.0)
            sw = wl.sum(axis=1, keepdims=True)
            swl = (wl * np.nan_to_num(Lc)).sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                # leave-one-out weighted ensemble and its expected noise
                ens = (swl - wl * np.nan_to_num(Lc)) / (sw - wl)
                ens_var = 1.0 / np.nanmedian(sw - wl, axis=0)
                res = Lc - ens
                sc = _MAD * np.nanmedian(np.abs(res - np.nanmedian(res, axis=0)), axis=0)
                q = sc / np.sqrt(expct[cur] ** 2 + ens_var)
            qm = float(np.nanmedian(q))
            worst = int(np.nanargmax(np.where(np.isfinite(q), q, np.inf)))
            if np.isfinite(q[worst]) and q[worst] <= var_clip * qm:
                break
            cur = np.delete(cur, worst)
        cand = cur
    order = np.argsort(-f[cand], kind="stable")
    return cand[order][: int(n)].astype(int)


# --------------------------------------------------------------------------- light curve
@dataclass(frozen=True)
class DiffLightCurve:
    """Result of :func:`differential_lightcurve` (iterable as ``(dmag, dmag_err, zero)``).

    Attributes
    ----------
    dmag : ndarray, (n_frames,)
        Target minus ensemble magnitude, mag (NaN where undefined).
    dmag_err : ndarray, (n_frames,)
        1-sigma error of ``dmag``, mag.
    zero : ndarray, (n_frames,)
        Ensemble zero ``Z_f``: the frame's common magnitude offset of the
        comparisons (transparency / airmass term), mag, ~0 at median conditions.
    zero_err : ndarray, (n_frames,)
        1-sigma error of ``zero``, mag.
    n_comp : ndarray of int, (n_frames,)
        Comparisons used in each frame.
    comp_offset : ndarray, (n_stars,)
        Median instrumental magnitude ``o_s`` of each comparison, mag.
    """

    dmag: np.ndarray
    dmag_err: np.ndarray
    zero: np.ndarray
    zero_err: np.ndarray
    n_comp: np.ndarray
    comp_offset: np.ndarray

    def __iter__(self):
        return iter((self.dmag, self.dmag_err, self.zero))


def differential_lightcurve(target_flux, comp_flux, target_err, comp_err, *,
                            clip_sigma: float | None = 5.0) -> DiffLightCurve:
    """Differential photometry of a target against an ensemble of comparisons.

    Parameters
    ----------
    target_flux, target_err : array_like, shape (n_frames,)
        Target flux and 1-sigma error per frame, e-.
    comp_flux, comp_err : array_like, shape (n_frames, n_stars)
        Comparison fluxes and errors, e-.  Non-finite or non-positive values
        drop that star from that frame only.
    clip_sigma : float or None
        One pass of per-frame rejection of comparison values deviating from the
        ensemble by more than ``clip_sigma * max(sigma_fs, s_s)`` (``s_s`` the
        robust scatter of star s about the ensemble); None disables it.

    Returns
    -------
    DiffLightCurve
        Unpacks as ``(dmag, dmag_err, zero)``.

    Notes
    -----
    With ``m = -2.5 log10(F)`` and ``sigma_m = 1.0857 sigma_F / F``:

    - ``o_s = median_f m_fs`` (each comparison's own level);
    - ``Z_f = sum_s w_fs (m_fs - o_s) / sum_s w_fs``, ``w_fs = 1 / sigma_m,fs^2``,
      ``sigma_Z,f = (sum_s w_fs)^-1/2`` (the ensemble zero);
    - ``m_E,f = Z_f + O``, ``O = sum_s W_s o_s / sum_s W_s`` with
      ``W_s = median_f w_fs`` (the ensemble magnitude);
    - ``dmag_f = m_T,f - m_E,f``,
      ``dmag_err_f = sqrt(sigma_mT,f^2 + sigma_Z,f^2)``.

    The errors of the ``o_s`` (a constant offset common to all frames) are not
    included.
    """
    T = np.asarray(target_flux, dtype=float)
    Te = np.asarray(target_err, dtype=float)
    C = np.asarray(comp_flux, dtype=float)
    Ce = np.asarray(comp_err, dtype=float)
    if C.ndim == 1:
        C = C[:, None]
        Ce = Ce.reshape(C.shape)
    nf = T.shape[0]
    if T.shape != (nf,) or Te.shape != (nf,) or C.shape[0] != nf or Ce.shape != C.shape:
        raise ValueError("target_flux/target_err must be (n_frames,) and comp_flux/comp_err "
                         "(n_frames, n_stars)")
    with np.errstate(invalid="ignore", divide="ignore"):
        okc = np.isfinite(C) & np.isfinite(Ce) & (C > 0) & (Ce > 0)
        m = np.where(okc, -2.5 * np.log10(np.where(okc, C, 1.0)), np.nan)
        sm = np.where(okc, _MAG * Ce / np.where(okc, C, 1.0), np.nan)
        okt = np.isfinite(T) & np.isfinite(Te) & (T > 0)
        mt = np.where(okt, -2.5 * np.log10(np.where(okt, T, 1.0)), np.nan)
        smt = np.where(okt, _MAG * Te / np.where(okt, T, 1.0), np.nan)
    ncol = C.shape[1]
    o = np.full(ncol, np.nan)
    for s in range(ncol):
        if okc[:, s].any():
            o[s] = np.median(m[okc[:, s], s])
    use = okc & np.isfinite(o)[None, :]
    w = np.where(use, 1.0 / np.where(use, sm, 1.0) ** 2, 0.0)
    dev = np.where(use, m - o[None, :], 0.0)

    def zero_of(wt):
        sw = wt.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(sw > 0, (wt * dev).sum(axis=1) / sw, np.nan)
            ze = np.where(sw > 0, 1.0 / np.sqrt(sw), np.nan)
        return z, ze

    z, ze = zero_of(w)
    if clip_sigma is not None and ncol >= 3:
        res = np.where(use, dev - z[:, None], np.nan)
        with np.errstate(invalid="ignore"):
            s_rob = _MAD * np.nanmedian(np.abs(res), axis=0)
            thr = clip_sigma * np.fmax(sm, s_rob[None, :])
            rej = use & (np.abs(res) > thr)
        if rej.any():
            use = use & ~rej
            w = np.where(use, w, 0.0)
            z, ze = zero_of(w)
    W = np.array([np.median(w[use[:, s], s]) if use[:, s].any() else 0.0 for s in range(ncol)])
    O = float(np.sum(W * np.nan_to_num(o)) / np.sum(W)) if np.sum(W) > 0 else float("nan")
    dmag = mt - (z + O)
    derr = np.sqrt(smt ** 2 + ze ** 2)
    return DiffLightCurve(dmag=dmag, dmag_err=derr, zero=z, zero_err=ze,
                          n_comp=use.sum(axis=1).astype(int), comp_offset=o)


# --------------------------------------------------------------------------- plotting
def plot_lightcurve(times, mags, errs, path_or_fig=None, *, title: str | None = None,
                    time_label: str = "BJD_TDB", ylabel: str = "Δmag", dpi: int = 100):
    """Plot a light curve (magnitudes, brighter up).

    Parameters
    ----------
    times : array_like
        Times, days (e.g. BJD_TDB); plotted relative to their integer part.
    mags, errs : array_like
        Magnitudes and 1-sigma errors, mag.
    path_or_fig : str, Path, matplotlib.figure.Figure, or None
        A path: the figure is written there as PNG (the only I/O of this
        module); a Figure: drawn into (one new axes); None: a new Figure.
    title : str, optional
    time_label, ylabel : str
        Axis labels.
    dpi : int
        PNG resolution, dots per inch.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = np.asarray(times, dtype=float)
    mg = np.asarray(mags, dtype=float)
    er = np.asarray(errs, dtype=float)
    fig = path_or_fig if isinstance(path_or_fig, Figure) else Figure(figsize=(7, 4))
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    fin = np.isfinite(t)
    t0 = math.floor(float(np.min(t[fin]))) if fin.any() else 0.0
    ax.errorbar(t - t0, mg, yerr=er, fmt="o", ms=3, lw=0.8, color="k", ecolor="0.5")
    ax.invert_yaxis()
    ax.set_xlabel(f"{time_label} - {t0:.0f}" if t0 else time_label)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if isinstance(path_or_fig, (str, Path)):
        fig.savefig(Path(path_or_fig), format="png", dpi=dpi)
    return fig
