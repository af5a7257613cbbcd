"""Reference catalogues: local ECSV/FITS files and Gaia DR3 cones with an offline cache.

- :func:`load_catalog` reads a catalogue file (ECSV or FITS) into a table with ``ra``,
  ``dec`` [deg] and the requested magnitude columns;
- :func:`cone` selects the rows within a radius of a sky position;
- :func:`gaia_cone` fetches a Gaia DR3 cone through astroquery and caches it as ECSV in a
  cache folder, so later runs (and other frames of the same field) need no network;
  with ``offline=True`` or when the archive cannot be reached it uses the cache or
  raises :class:`CatalogUnavailable` with a one-line reason;
- :func:`gaia_to_sdss` turns Gaia G, BP, RP into SDSS g, r, i with the documented
  Gaia photometric relationships (:data:`GAIA_SDSS_RELATIONS`).
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "CatalogError",
    "CatalogUnavailable",
    "GAIA_COLUMNS",
    "GAIA_SDSS_RELATIONS",
    "cone",
    "gaia_cone",
    "gaia_to_sdss",
    "load_catalog",
]


class CatalogError(ValueError):
    """A catalogue file is missing, unreadable or lacks a required column."""


class CatalogUnavailable(RuntimeError):
    """No reference catalogue: offline (or the archive failed) and nothing cached."""


# --------------------------------------------------------------------------- local files
_FORMATS = {".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits", ".fts": "fits"}


def load_catalog(path, *, ra_column: str = "ra", dec_column: str = "dec",
                 mag_columns: Sequence[str] | Mapping[str, str] | None = None):
    """Read a reference catalogue (ECSV or FITS table).

    Parameters
    ----------
    path : path-like
        ``.ecsv`` or ``.fits``/``.fit``/``.fts`` (optionally ``.gz``) file.
    ra_column, dec_column : str
        Position columns (matched exactly, else case-insensitively): numbers in degrees
        (or any angular unit the column carries), or sexagesimal strings (RA in hours,
        Dec in degrees).  They are returned as float64 ``ra``, ``dec`` [deg].
    mag_columns : sequence of str, mapping or None
        Magnitude columns that must exist; a mapping ``{new_name: column}`` also renames
        them (e.g. ``{'g': 'mag_g'}``).  None: no requirement.

    Returns
    -------
    astropy.table.Table
        All columns of the file, with ``ra``/``dec`` [deg, RA in 0..360] replacing the
        position columns; ``meta['catalog_path']`` is the file.

    Raises
    ------
    CatalogError
        Missing or unreadable file, missing column, Dec outside -90..90.
    """
    from astropy.table import Table

    p = Path(path)
    if not p.is_file():
        raise CatalogError(f"{p}: catalogue file not found")
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1] if suffixes else "")
    try:
        t = Table.read(p, format=fmt) if fmt else Table.read(p)
    except Exception as e:   # astropy raises many types for bad files
        what = fmt or "a table"
        raise CatalogError(f"{p}: cannot read as {what}: {type(e).__name__}: {_one_line(e)}") from None
    out = Table(t, copy=True)
    out.meta["catalog_path"] = str(p)
    rac = _column(out, ra_column, p, "RA")
    decc = _column(out, dec_column, p, "Dec")
    try:
        ra = _angles(out[rac], hours_if_text=True)
        dec = _angles(out[decc], hours_if_text=False)
    except ValueError as e:
        raise CatalogError(f"{p}: position columns {rac!r}/{decc!r} are not angles: {_one_line(e)}") from None
    with np.errstate(invalid="ignore"):
        if np.any(np.abs(dec[np.isfinite(dec)]) > 90.0):
            raise CatalogError(f"{p}: column {decc!r} has values outside -90..90 (not degrees?)")
    for c in {rac, decc}:
        out.remove_column(c)
    out["ra"] = np.mod(ra, 360.0)
    out["dec"] = dec
    out["ra"].unit = out["dec"].unit = "deg"
    if mag_columns is not None:
        items = (mag_columns.items() if isinstance(mag_columns, Mapping)
                 else ((c, c) for c in mag_columns))
        for new, old in list(items):
            src = _column(out, old, p, "magnitude")
            if new != src:
                out[new] = out[src]
    return out


def _column(t, name: str, path: Path, what: str) -> str:
    if name in t.colnames:
        return name
    low = [c for c in t.colnames if c.lower() == str(name).lower()]
    if len(low) == 1:
        return low[0]
    raise CatalogError(f"{path}: no {what} column {name!r} (columns: {', '.join(t.colnames)})")


def _angles(col, *, hours_if_text: bool) -> np.ndarray:
    """Column -> float64 degrees (NaN for masked / empty entries)."""
    import astropy.units as u
    from astropy.coordinates import Angle

    if np.issubdtype(col.dtype, np.number):
        vals = np.ma.filled(np.ma.asarray(col).astype(np.float64), np.nan)
        unit = getattr(col, "unit", None)
        if unit is not None and unit != u.deg:
            try:
                vals = (vals * unit).to_value(u.deg)
            except u.UnitsError:
                pass   # e.g. a dimensionless unit: take the numbers as degrees
        return vals
    data = np.ma.filled(np.ma.asarray(col).astype(str), "")
    out = np.full(len(col), np.nan)
    for k, v in enumerate(np.asarray(data).astype(str)):
        v = v.strip()
        if not v or v == "--":
            continue
        out[k] = Angle(v, unit=u.hourangle if hours_if_text else u.deg).deg
    return out


def cone(table, ra: float, dec: float, radius_deg: float):
    """Rows of a catalogue within a radius of a sky position.

    Parameters
    ----------
    table : astropy.table.Table
        Catalogue with ``ra``, ``dec`` [deg] columns (e.g. from :func:`load_catalog`).
    ra, dec : float
        Centre [deg].
    radius_deg : float
        Radius [deg], > 0.

    Returns
    -------
    astropy.table.Table
        The rows inside the cone, in their original order (a copy).
    """
    if not (float(radius_deg) > 0):
        raise ValueError(f"radius_deg must be > 0, not {radius_deg!r}")
    for c in ("ra", "dec"):
        if c not in table.colnames:
            raise ValueError(f"catalogue table has no {c!r} column (columns: {', '.join(table.colnames)})")
    r = np.asarray(table["ra"], dtype=float)
    d = np.asarray(table["dec"], dtype=float)
    with np.errstate(invalid="ignore"):
        sel = _sep_deg(r, d, float(ra), float(dec)) <= float(radius_deg)
    return table[sel]


def _sep_deg(ra1, dec1, ra2, dec2):
    """Angular separation [deg] (see :func:`reducer.ops.astrometry._sep_deg`)."""
    from .ops.astrometry import _sep_deg as sep
    return sep(ra1, dec1, ra2, dec2)


# --------------------------------------------------------------------------- Gaia DR3
#: Columns of a :func:`gaia_cone` table (lower case, as the Gaia archive names them).
GAIA_COLUMNS = ("source_id", "ra", "dec", "pmra", "pmdec",
                "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag")
_GAIA_TABLE = "gaiadr3.gaia_source"
_GAIA_EPOCH = 2016.0            # Gaia DR3 reference epoch [Julian year, TCB]
_CACHE_GRID = 0.01              # cache key grid for centre and radius [deg]
_CACHE_RE = re.compile(r"^gaiadr3_(?P<ra>\d+\.\d+)(?P<dec>[+-]\d+\.\d+)_r(?P<r>\d+\.\d+)"
                       r"(?:_g(?P<g>\d+\.\d+))?\.ecsv$")


def _gaia_service():
    """The astroquery Gaia service object -- the network boundary (mocked in tests)."""
    from astroquery.gaia import Gaia   # imported lazily: optional dependency, contacts the archive
    return Gaia


def gaia_cone(ra: float, dec: float, radius_deg: float, *, cache_dir, offline: bool = False,
              mag_limit: float | None = None, epoch: float | None = None, max_rows: int = 200000):
    """Gaia DR3 sources within a cone, cached per field so later runs need no network.

    The query (ADQL on ``gaiadr3.gaia_source`` through ``astroquery.gaia.Gaia``'s
    ``launch_job_async``; asynchronous because synchronous jobs stop at 2000 rows) asks
    for a larger cone (by 10 % of the radius, at least 0.02 deg) centred on a 0.01 deg
    grid, so dithered frames of one field share one cache file ``gaiadr3_<ra><dec>_r<radius>[_g<limit>].ecsv`` in
    ``cache_dir``.  Any cached cone that covers the request (and is at least as deep)
    is used without contacting the archive.

    Parameters
    ----------
    ra, dec : float
        Centre [deg, ICRS].
    radius_deg : float
        Radius [deg], > 0.
    cache_dir : path-like
        Folder of the cache (created).
    offline : bool
        Never contact the archive: use the cache or raise :class:`CatalogUnavailable`.
    mag_limit : float or None
        Keep only ``phot_g_mean_mag < mag_limit`` [mag].
    epoch : float or None
        Propagate positions with the proper motions (linearly, sources without proper
        motion stay put) from the Gaia epoch J2016.0 to this Julian year (e.g. 2019.33).
    max_rows : int
        ``TOP`` of the query (brightest first); a truncated answer is cached as it is.

    Returns
    -------
    astropy.table.Table
        :data:`GAIA_COLUMNS`: ``source_id``, ``ra``, ``dec`` [deg], ``pmra``, ``pmdec``
        [mas/yr], ``phot_g_mean_mag``, ``phot_bp_mean_mag``, ``phot_rp_mean_mag`` [mag]
        (missing values as NaN), sorted by G; ``meta`` says where it came from.

    Raises
    ------
    CatalogUnavailable
        Offline (or the query failed, or astroquery is missing) and no cached cone
        covers the request; the message is one line.
    """
    ra, dec, radius = float(ra) % 360.0, float(dec), float(radius_deg)
    if not (-90.0 <= dec <= 90.0) or not (radius > 0) or not math.isfinite(ra):
        raise ValueError(f"invalid cone ra={ra!r}, dec={dec!r}, radius={radius_deg!r} [deg]")
    cache = Path(cache_dir)
    where = f"ra={ra:.4f}, dec={dec:+.4f}, r={radius:.4f} deg"
    hit = _cache_lookup(cache, ra, dec, radius, mag_limit)
    if hit is not None:
        t = _read_cache(hit)
        src = f"cache {hit.name}"
    else:
        if offline:
            raise CatalogUnavailable(f"offline and no cached Gaia DR3 cone covering {where} in {cache}")
        # query centre on the cache grid, radius enlarged to cover the request
        qra = round(ra / _CACHE_GRID) * _CACHE_GRID % 360.0
        qdec = float(np.clip(round(dec / _CACHE_GRID) * _CACHE_GRID, -90.0, 90.0))
        # padded so that dithered frames of the field (centres a few arcmin apart) hit it
        need = radius + float(_sep_deg(ra, dec, qra, qdec)) + max(2 * _CACHE_GRID, 0.1 * radius)
        qr = round(math.ceil(need / _CACHE_GRID - 1e-9) * _CACHE_GRID, 6)
        adql = _gaia_adql(qra, qdec, qr, mag_limit, max_rows)
        try:
            gaia = _gaia_service()
        except ImportError:
            raise CatalogUnavailable(f"astroquery is not installed (pip install astroquery) and no "
                                     f"cached Gaia DR3 cone covering {where} in {cache}") from None
        try:
            job = (gaia.launch_job_async(adql) if hasattr(gaia, "launch_job_async")
                   else gaia.launch_job(adql))
            raw = job.get_results()
        except Exception as e:   # network, HTTP, TAP errors: all mean "unavailable"
            raise CatalogUnavailable(f"Gaia DR3 query for {where} failed "
                                     f"({type(e).__name__}: {_one_line(e)}) and nothing is cached "
                                     f"in {cache}") from None
        t = _normalise_gaia(raw)
        t.meta.update({"source": f"Gaia DR3 ({_GAIA_TABLE})", "query_ra": qra, "query_dec": qdec,
                       "query_radius": qr, "mag_limit": mag_limit, "epoch": _GAIA_EPOCH,
                       "retrieved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "adql": adql})
        path = cache / _cache_name(qra, qdec, qr, mag_limit)
        _write_atomic(t, path)
        src = f"archive, cached as {path.name}"
    out = cone(t, ra, dec, radius)
    if mag_limit is not None:
        with np.errstate(invalid="ignore"):
            out = out[np.asarray(out["phot_g_mean_mag"], float) < float(mag_limit)]
    if epoch is not None:
        dt = float(epoch) - _GAIA_EPOCH
        pmra = np.nan_to_num(np.asarray(out["pmra"], float))
        pmdec = np.nan_to_num(np.asarray(out["pmdec"], float))
        d0 = np.asarray(out["dec"], float)
        out["ra"] = np.mod(np.asarray(out["ra"], float)
                           + pmra * dt / 3.6e6 / np.maximum(np.cos(np.radians(d0)), 1e-12), 360.0)
        out["dec"] = d0 + pmdec * dt / 3.6e6
        out["ra"].unit = out["dec"].unit = "deg"
    out.meta["epoch"] = _GAIA_EPOCH if epoch is None else float(epoch)
    out.meta["from"] = src
    out.meta["cone"] = [ra, dec, radius]
    return out


def _gaia_adql(ra: float, dec: float, radius: float, mag_limit, max_rows: int) -> str:
    cut = "" if mag_limit is None else f" AND phot_g_mean_mag < {float(mag_limit):.3f}"
    return (f"SELECT TOP {int(max_rows)} {', '.join(GAIA_COLUMNS)} FROM {_GAIA_TABLE} "
            f"WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', {ra:.6f}, {dec:.6f}, {radius:.6f}))"
            f"{cut} ORDER BY phot_g_mean_mag")


def _normalise_gaia(raw):
    """Archive answer -> GAIA_COLUMNS, lower-case names, NaN for missing values."""
    from astropy.table import Table

    names = {c.lower(): c for c in raw.colnames}
    missing = [c for c in ("ra", "dec", "phot_g_mean_mag") if c not in names]
    if missing:
        raise CatalogUnavailable(f"Gaia DR3 answer lacks columns {missing} (has {', '.join(raw.colnames)})")
    cols = {}
    n = len(raw)
    for c in GAIA_COLUMNS:
        if c not in names:
            cols[c] = np.full(n, -1 if c == "source_id" else np.nan,
                              dtype=np.int64 if c == "source_id" else np.float64)
            continue
        col = raw[names[c]]
        if c == "source_id":
            v = col.filled(-1) if hasattr(col, "filled") else col
            cols[c] = np.asarray(v, dtype=np.int64)
        else:
            v = col.filled(np.nan) if hasattr(col, "filled") else col
            cols[c] = np.asarray(np.ma.getdata(v), dtype=np.float64)
    t = Table(cols)
    for c in ("ra", "dec"):
        t[c].unit = "deg"
    for c in ("pmra", "pmdec"):
        t[c].unit = "mas / yr"
    for c in ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag"):
        t[c].unit = "mag"
    order = np.argsort(np.nan_to_num(t["phot_g_mean_mag"], nan=np.inf), kind="stable")
    return t[order]


def _cache_name(ra: float, dec: float, radius: float, mag_limit) -> str:
    g = "" if mag_limit is None else f"_g{float(mag_limit):.1f}"
    return f"gaiadr3_{ra:06.2f}{dec:+06.2f}_r{radius:.2f}{g}.ecsv"


def _cache_lookup(cache: Path, ra: float, dec: float, radius: float, mag_limit) -> Path | None:
    """A cached cone containing the requested one and at least as deep, or None."""
    if not cache.is_dir():
        return None
    best = None
    for p in sorted(cache.glob("gaiadr3_*.ecsv")):
        m = _CACHE_RE.match(p.name)
        if not m:
            continue
        cra, cdec, cr = float(m["ra"]), float(m["dec"]), float(m["r"])
        cg = None if m["g"] is None else float(m["g"])
        if cg is not None and (mag_limit is None or cg + 0.05 < float(mag_limit)):
            continue   # shallower than asked (the name rounds the limit to 0.1 mag)
        if float(_sep_deg(ra, dec, cra, cdec)) + radius <= cr + 1e-9:
            if best is None or cr < best[0]:
                best = (cr, p)
    return None if best is None else best[1]


def _read_cache(path: Path):
    from astropy.table import Table
    try:
        return Table.read(path, format="ascii.ecsv")
    except Exception as e:
        raise CatalogUnavailable(f"cached Gaia cone {path} is unreadable "
                                 f"({type(e).__name__}: {_one_line(e)}); delete it") from None


def _write_atomic(table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".ecsv", dir=path.parent)
    os.close(fd)
    try:
        table.write(tmp, format="ascii.ecsv", overwrite=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else ""


# --------------------------------------------------------------------------- colours
#: Gaia (E)DR3 -> SDSS photometric relationships ``G - X = sum_k c_k (BP - RP)^k``.
#:
#: Source: Gaia EDR3 documentation, section 5.5.1 "Photometric relationships with other
#: photometric systems" (SDSS12 relations, polynomial coefficients and scatter) and
#: Riello et al. 2021, A&A 649, A3, Table C.2 (coefficients) and Table C.1 (validity
#: ranges in BP - RP).  Gaia DR3 G/BP/RP are the EDR3 photometry (with the G correction
#: already applied in ``gaiadr3.gaia_source``), so the EDR3 relations apply to DR3.
#: ``sigma`` [mag] is the scatter of the fit; ``valid`` the BP - RP range of the fitted
#: stars (for G - r, BP - RP > 2.0 holds only for M giants according to Table C.1).
GAIA_SDSS_RELATIONS = {
    "g": {"coeffs": (0.2199, -0.6365, -0.1548, 0.0064), "sigma": 0.0745, "valid": (0.3, 3.0)},
    "r": {"coeffs": (-0.09837, 0.08592, 0.1907, -0.1701, 0.02263), "sigma": 0.03776, "valid": (0.0, 3.0)},
    "i": {"coeffs": (-0.293, 0.6404, -0.09609, -0.002104), "sigma": 0.04092, "valid": (0.5, 2.0)},
}


def gaia_to_sdss(g, bp, rp, *, extrapolate: bool = False) -> dict:
    """SDSS g, r, i magnitudes from Gaia G, BP, RP (:data:`GAIA_SDSS_RELATIONS`).

    Parameters
    ----------
    g, bp, rp : float or array-like
        Gaia ``phot_g_mean_mag``, ``phot_bp_mean_mag``, ``phot_rp_mean_mag`` [mag].
    extrapolate : bool
        Also evaluate the polynomials outside their validity range in BP - RP (by
        default those stars get NaN in that band).

    Returns
    -------
    dict
        ``{'g': ..., 'r': ..., 'i': ...}`` [mag, SDSS], arrays of the broadcast input
        shape (floats for scalar input); NaN where an input is NaN or, unless
        ``extrapolate``, outside the validity range.  The transformation scatter is
        :data:`GAIA_SDSS_RELATIONS` ``[band]['sigma']`` (0.04-0.07 mag).
    """
    g, bp, rp = (np.asarray(v, dtype=np.float64) for v in (g, bp, rp))
    x = bp - rp
    scalar = np.ndim(x) == 0 and np.ndim(g) == 0
    out = {}
    for band, rel in GAIA_SDSS_RELATIONS.items():
        poly = np.polynomial.polynomial.polyval(x, rel["coeffs"])
        m = g - poly
        if not extrapolate:
            lo, hi = rel["valid"]
            with np.errstate(invalid="ignore"):
                m = np.where((x >= lo) & (x <= hi), m, np.nan)
        out[band] = float(m) if scalar else np.asarray(m)
    return out
