"""Seeded synthetic raw nights of the ``demo`` instrument, with a truth file.

:func:`make_night` writes one observing night of raw frames of the simulated camera
described by ``share/instruments/demo.toml`` (two 512 x 1024 CCDs with overscan):
afternoon biases, dome flats and (optionally) arcs, evening twilight sky flats,
science and standard-star exposures during the dark night, and darks in the morning.
Everything is drawn from :class:`numpy.random.Generator` streams derived from ``seed``,
so the same arguments give byte-identical files; nothing depends on the clock.

Raw files
---------
``<raw dir>/demo_<utdate>_<nnnn>.fits``, sequence numbers in time order.  Each file has
an empty primary HDU with the frame keywords (``IMAGETYP``, ``OBJECT``, ``FILTER``,
``EXPTIME`` [s], ``DATE-OBS`` (UTC start, ISO-8601 with milliseconds), ``MJD-OBS``,
``RA``/``DEC`` (sexagesimal, ICRS, the *intended* pointing of the mosaic centre, a few
arcsec off the truth), ``AIRMASS`` (sec z at the start), ``XBINNING``/``YBINNING``,
``CCD-TEMP``, ``READOUTM``, ``PROGRAM``, ``INSTRUME``, ``TELESCOP``...) and two image
extensions ``CCD1``/``CCD2`` of ``shape`` = (rows, columns) = (1024, 544) by default,
unsigned 16-bit stored as int16 with ``BZERO = 32768``.  Columns 1-512 are data,
513-514 transition, 515-544 overscan (1-based, IRAF); the extension headers carry
``BIASSEC``/``DATASEC``/``TRIMSEC``/``DETSEC``, ``GAIN`` [e-/ADU], ``RDNOISE`` [e-] and
``SATURATE`` [ADU] from the profile.  With a non-default ``shape`` the transition and
overscan keep their widths (2 and 30 columns) and the data width is
``columns - 32``; the section keywords always describe the actual layout.

Signal model (per detector, data region, in electrons unless stated)::

    E(y, x)  = [sky_rate * t + stars(y, x) (+ lamp_rate * t)] * R_f(y, x) + D(y, x) * t
    N(y, x)  = Poisson(E) + CR(y, x)
    raw(y,x) = N / gain + L + P(y, x) + d(y) + rn/gain * normal()      (data, ADU)
    raw(y,j) = L + d(y) + trail_j(y) + rn/gain * normal()              (transition, ADU)
    raw(y,j) = L + d(y) + rn/gain * normal()                           (overscan, ADU)

then data pixels above ``SATURATE`` are set to ``SATURATE``, everything is rounded and
clipped to 0..65535.  ``L`` is the bias level, ``P`` the fixed 2-D bias pattern (column
pattern, gradient, amplifier-corner bump and a constant data-minus-overscan offset),
``d(y) = offset + amplitude * sin(2 pi y / period + phase) + slope * (y / (ny - 1) - 0.5)``
the per-frame row drift (``y`` zero-based row), ``R_f`` the flat response (vignetting
times pixel response non-uniformity, normalised to median 1 over both detectors),
``D`` the dark-current map [e-/s], ``CR`` the cosmic-ray deposit, ``trail_j`` 1 % and
0.2 % of the last data column's signal in the two transition columns.  Stars are Moffat
profiles (pixel-integrated in the core), placed through the true TAN WCS of the frame;
every frame collects cosmic rays for its exposure time plus 10 s of read-out (so biases
have a few).  Calibration frames are taken with the telescope parked at the zenith
(header RA/DEC = zenith, AIRMASS = 1).  Saturated stars do not bleed.

Truth (default ``<raw dir>/../truth/``)
---------------------------------------
``truth.json`` (JSON object; all paths in it are relative to the truth folder, raw files
are named by file name)::

    format, version        "reducer-simulated-night", 1
    seed, utdate, instrument, parameters (the make_night arguments)
    site                   longitude, latitude [deg], height [m], timezone
    night                  local_noon_start/end, sunset, sunrise, evening/morning
                           twilight at -12 deg, mean solar midnight (ISO UTC strings)
    geometry               shape, data/transition/overscan columns, sections,
                           focal_center (focal-plane pixel: detector pixel (i, j)
                           zero-based sits at focal (i + offset_x, j + offset_y); the
                           header pointing refers to this point), optical_center
                           (of the vignetting), pixel_size_um
    wcs_model              nominal/true pixel scale [arcsec/px], nominal/true rotation
                           [deg], flip_x, systematic pointing error [arcsec] (east, north)
    filters[f]             zeropoint [mag giving 1 e-/s above the atmosphere],
                           extinction [mag/airmass], sky_dark [mag/arcsec^2],
                           flat_response file (FITS, EXTNAME = detector, data region)
    detectors[name]        gain [e-/ADU], rdnoise [e-], saturate [ADU], bias_level L
                           [ADU], bias_pattern_mean (mean of P) [ADU], bias_pattern
                           file, dark_rate_base [e-/s], dark_rate file [e-/s],
                           hot_pixels {x, y, rate [e-/s]}, dead_pixels {x, y, response},
                           bad_column {x, y1, y2, response}, prnu_rms, offset
                           (focal plane, = the profile's [wcs] offsets at the default
                           shape)
    targets                name, kind, ra, dec [deg], field (catalogue field name)
    variable               id, target, ra, dec, model "trapezoid", t0 (ISO), t0_mjd,
                           depth, duration_s (first-fourth contact), ingress_s, mags;
                           f(t) = 1 - depth * clip((duration/2 - |t - t0|) / ingress, 0, 1)
                           multiplies its flux in every filter (averaged over the
                           exposure); null when no target has a variable
    planted                list of deliberately bad calibrations {file, type, kind, amp
                           [ADU] or factor (lamp)}
    cr_mask_threshold_e    CR_MASK_E
    catalog                path of the reference catalogue (ECSV)
    frames[]               one entry per raw file, in time order:
        file, seq, type (bias|dark|flat|arc|standard|science), subtype (dome|sky|null),
        imagetyp, object, filter, exptime [s], date_obs, mjd_start, mjd_mid,
        airmass (mid-exposure, used for the flux), airmass_header (start),
        sun_alt [deg], header_pointing / true_pointing {ra, dec} [deg], dither_px,
        fwhm [arcsec], fwhm_px, beta (Moffat), transparency, zeropoint, extinction,
        sky_rate [e-/s/px] and sky_e [e-/px] (before the flat response),
        lamp_rate [e-/s/px] (flats), variable_factor, planted, arc_lines, and
        detectors[name]:
            overscan {offset, amplitude, period, phase, slope, mean} [ADU, rows]
                (mean = mean of d(y) plus a planted level shift: the overscan
                level is bias_level + mean),
            wcs (on-sky frames: true TAN WCS header dict, FITS 1-based CRPIX of
                the raw array),
            cosmic_rays {file, n_events, n_pixels},
            stars {id, x, y, flux, mag, saturated}: stars whose centre is on the data
                region; x, y zero-based raw-array coordinates (astropy/photutils:
                the centre of data[j, i] is x=i, y=j); flux = total e- collected
                before the flat response (transparency, extinction, variability
                included): flux = exptime * transparency * variable_factor *
                10**(-0.4 * (mag + extinction * airmass - zeropoint)) (sky flats:
                transparency 1); stamps stop where the profile drops below
                0.5 e-/px (<= 40 px), losing < 0.2 % of a bright star's flux;
                saturated = the pixel under the centre is at SATURATE.

``cr/<file stem>.npz`` per frame: ``mask_<det>`` (bool, raw shape, pixels with
>= :data:`CR_MASK_E` e- deposited) and ``y_<det>``, ``x_<det>``, ``e_<det>``
(every pixel with a deposit, e-).  ``calib/bias_pattern.fits``,
``calib/dark_rate.fits`` and ``calib/flat_response_<f>.fits`` hold ``P`` [ADU],
``D`` [e-/s] and ``R_f`` (float32, one extension per detector, data-region shape).

The reference catalogue (default ``<raw dir>/../refcat.ecsv``) has ``id``, ``field``,
``ra``, ``dec`` [deg, ICRS] and ``mag_<band>`` for u, g, r, i, z and every simulated
filter, exact (noise-free) magnitudes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import re
import sys
import tempfile
import time
import tomllib
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field as _dc_field
from pathlib import Path
from typing import Any, Mapping, Sequence
from zoneinfo import ZoneInfo

import numpy as np

__all__ = [
    "CR_MASK_E",
    "Series",
    "SimulatedNight",
    "Target",
    "Transit",
    "default_targets",
    "load_truth",
    "make_night",
    "simulate_main",
]

TRUTH_FORMAT = "reducer-simulated-night"
TRUTH_VERSION = 1

#: Cosmic-ray deposit [e-] from which a pixel enters the truth mask.
CR_MASK_E = 50.0
#: Physical pixel size [micrometre], used for the cosmic-ray rate.
PIXEL_SIZE_UM = 15.0
#: Read-out time [s] between exposures; cosmic rays also hit during 10 s of it.
READOUT_S = 25.0
_CR_READOUT_S = 10.0
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

# Per-filter photometric model: zero point [mag for 1 e-/s], extinction [mag/airmass],
# dark-sky brightness [mag/arcsec^2], twilight colour [mag], PRNU scale, vignetting
# depth at the mosaic corner, dome-flat exposure time [s].
_FILTERS: dict[str, dict[str, float]] = {
    "u": dict(zp=23.4, k=0.50, sky=22.6, tw=-0.6, prnu=1.25, vig=0.120, dome_t=40.0),
    "g": dict(zp=25.3, k=0.18, sky=21.9, tw=-0.3, prnu=1.12, vig=0.110, dome_t=12.0),
    "r": dict(zp=25.1, k=0.10, sky=21.0, tw=0.0, prnu=1.00, vig=0.100, dome_t=6.0),
    "i": dict(zp=24.7, k=0.06, sky=20.2, tw=0.3, prnu=0.92, vig=0.095, dome_t=5.0),
    "z": dict(zp=24.0, k=0.05, sky=19.3, tw=0.5, prnu=0.88, vig=0.092, dome_t=8.0),
}
_DEFAULT_FILTER = dict(zp=24.5, k=0.12, sky=21.0, tw=0.0, prnu=1.0, vig=0.100, dome_t=8.0)
_BASE_BANDS = ("u", "g", "r", "i", "z")

# Landolt-like standard fields (name, RA, Dec [deg]); the one nearest the meridian is used.
_STANDARD_FIELDS = (
    ("SA 92", 13.9, 0.72), ("SA 95", 58.4, 0.02), ("SA 98", 103.0, -0.33),
    ("SA 101", 149.1, -0.42), ("SA 104", 190.6, -0.53), ("SA 107", 234.8, -0.25),
    ("SA 110", 280.6, 0.35), ("SA 113", 325.2, 0.47),
)

_STAMP_RADII = np.array([4, 6, 9, 13, 19, 27, 40])


# --------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Transit:
    """A transit-like dip of one catalogue star (the *variable*).

    Parameters
    ----------
    depth : float
        Fractional depth of the dip (0.03 = 3 %).
    duration : float
        Total duration, first to fourth contact [s].
    ingress : float
        Ingress (= egress) time [s]; the dip is a trapezoid.
    mag_r : float
        Out-of-transit r magnitude of the variable [mag]; other bands follow its colour.
    t0_offset : float or None
        Mid-transit time relative to the middle of the time series [s];
        None draws it uniformly within +-10 min from the seed.
    """

    depth: float = 0.03
    duration: float = 3600.0
    ingress: float = 600.0
    mag_r: float = 17.0
    t0_offset: float | None = None


@dataclass(frozen=True)
class Series:
    """A staring time series of one target in one filter.

    Parameters
    ----------
    filter : str
        Filter of the series.
    nexp : int
        Number of exposures.
    exptime : float
        Exposure time [s].
    cadence : float
        Time between exposure starts [s] (at least ``exptime`` + read-out).
    """

    filter: str = "r"
    nexp: int = 40
    exptime: float = 120.0
    cadence: float = 180.0


@dataclass(frozen=True)
class Target:
    """One science (or standard) field of the night.

    Parameters
    ----------
    name : str
        OBJECT keyword.
    ra, dec : float or None
        Field centre [deg, ICRS].  ``ra=None`` puts the field on the meridian in the
        middle of its block; ``dec=None`` uses the site latitude - 10 deg.
    filters : tuple of str or None
        Filters of the dithered exposures; None uses the night's ``filters``.
    nexp : int or None
        Dithered exposures per filter; None uses ``nexp_per_filter``.
    exptime : float or mapping
        Exposure time [s], or a mapping filter -> exposure time.
    dither : float
        Amplitude of the dither pattern [px] (offsets of tens of pixels).
    series : Series or None
        Optional staring time series taken after the dithered exposures.
    variable : Transit or None
        Plant a transiting variable star in this field.
    program : str
        PROGRAM keyword.
    """

    name: str
    ra: float | None = None
    dec: float | None = None
    filters: tuple[str, ...] | None = None
    nexp: int | None = None
    exptime: float | Mapping[str, float] = 120.0
    dither: float = 30.0
    series: Series | None = None
    variable: Transit | None = None
    program: str = "P001"

    def exptime_for(self, filt: str) -> float:
        if isinstance(self.exptime, Mapping):
            return float(self.exptime.get(filt, next(iter(self.exptime.values()))))
        return float(self.exptime)


def default_targets() -> tuple[Target, ...]:
    """The default science targets: a dithered field and a transit time series.

    Returns
    -------
    tuple of Target
        ``DEMO-FIELD`` (dithered, 120 s, ``nexp_per_filter`` per filter) and
        ``DEMO-TRANSIT`` (3 dithered 60 s exposures per filter, then a 40 x 120 s
        staring r-band series at a 180 s cadence containing a 3 %, 1 h transit).
    """
    return (
        Target("DEMO-FIELD", dec=20.0, exptime=120.0, dither=30.0),
        Target("DEMO-TRANSIT", dec=30.0, exptime=60.0, nexp=3, dither=20.0,
               series=Series("r", 40, 120.0, 180.0), variable=Transit()),
    )


# --------------------------------------------------------------------------- result
@dataclass
class SimulatedNight:
    """What :func:`make_night` wrote.

    Attributes
    ----------
    raw_dir : Path
        Folder of the raw frames.
    files : list of Path
        Raw frames in time order.
    truth_path : Path
        ``truth.json``.
    truth : dict
        Its content (see the module docstring).
    catalog_path : Path
        Reference catalogue (ECSV).
    truth_dir : Path
        Folder of the truth files.
    """

    raw_dir: Path
    files: list[Path]
    truth_path: Path
    truth: dict
    catalog_path: Path
    truth_dir: Path

    def frames(self, type: str | None = None, *, subtype: str | None = None,
               filter: str | None = None, object: str | None = None) -> list[dict]:
        """Truth entries of the frames matching all given criteria."""
        out = []
        for fr in self.truth["frames"]:
            if type is not None and fr["type"] != type:
                continue
            if subtype is not None and fr["subtype"] != subtype:
                continue
            if filter is not None and fr["filter"] != filter:
                continue
            if object is not None and fr["object"] != object:
                continue
            out.append(fr)
        return out

    def path(self, frame: Mapping | str) -> Path:
        """Path of the raw file of a truth frame entry (or file name)."""
        name = frame if isinstance(frame, str) else frame["file"]
        return self.raw_dir / name

    def frame(self, file: str | os.PathLike) -> dict:
        """Truth entry of a raw file (path or name)."""
        name = Path(file).name
        for fr in self.truth["frames"]:
            if fr["file"] == name:
                return fr
        raise KeyError(name)

    def cr_mask(self, file: str | os.PathLike, detector: str) -> np.ndarray:
        """Cosmic-ray truth mask (bool, raw shape) of one detector of one frame."""
        fr = self.frame(file)
        with np.load(self.truth_dir / fr["detectors"][detector]["cosmic_rays"]["file"]) as z:
            return z[f"mask_{detector}"]

    def calib_image(self, kind: str, detector: str, filter: str | None = None) -> np.ndarray:
        """A truth calibration image of the data region.

        Parameters
        ----------
        kind : {'bias_pattern', 'dark_rate', 'flat_response'}
            ``P`` [ADU], ``D`` [e-/s] or ``R_f`` (needs ``filter``).
        detector : str
            Detector name.
        """
        from astropy.io import fits

        if kind == "flat_response":
            rel = self.truth["filters"][filter]["flat_response"]
        else:
            rel = self.truth["detectors"][detector][kind]
        with fits.open(self.truth_dir / rel) as hdul:
            return np.asarray(hdul[detector].data, dtype=np.float64)

    def true_wcs(self, file: str | os.PathLike | Mapping, detector: str):
        """The true :class:`astropy.wcs.WCS` of one detector of one frame."""
        from astropy.io import fits
        from astropy.wcs import WCS

        fr = file if isinstance(file, Mapping) else self.frame(file)
        return WCS(fits.Header(fr["detectors"][detector]["wcs"]))


def load_truth(path: str | os.PathLike) -> dict:
    """Read a ``truth.json`` (or the ``truth.json`` inside a truth folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "truth.json"
    return json.loads(p.read_text())


# --------------------------------------------------------------------------- helpers
def _rng(seed: int, *keys: Any) -> np.random.Generator:
    """Independent generator for one purpose: same (seed, keys) -> same stream."""
    ints = [int(seed)] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(ints))


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A compressed ``.npz`` with fixed timestamps (``np.savez_compressed`` stamps now)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, arr in arrays.items():
            b = io.BytesIO()
            np.lib.format.write_array(b, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, b.getvalue())
    return buf.getvalue()


def _fits_bytes(hdul) -> bytes:
    buf = io.BytesIO()
    hdul.writeto(buf)
    return buf.getvalue()


def _json_text(obj: Any, level: int = 0) -> str:
    """Indented JSON with lists of scalars kept on one line."""
    pad, pad1 = " " * level, " " * (level + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad1}{json.dumps(str(k))}: {_json_text(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return json.dumps(list(obj), separators=(",", ":"), allow_nan=False)
        return "[\n" + ",\n".join(pad1 + _json_text(v, level + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def _json_bytes(obj: Any) -> bytes:
    return (_json_text(obj) + "\n").encode()


def _iso(t: float) -> str:
    """Unix time [s] -> ISO-8601 UTC with milliseconds (no zone suffix)."""
    d = _EPOCH + dt.timedelta(milliseconds=round(t * 1000.0))
    return d.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def _mjd(t):
    return np.asarray(t, dtype=np.float64) / 86400.0 + 40587.0


def _r(x, nd=6):
    """Round floats (scalars or arrays) for the JSON truth."""
    if isinstance(x, np.ndarray):
        return [round(float(v), nd) for v in x.ravel()]
    return round(float(x), nd)


def _sexa_ra(ra_deg: float) -> str:
    ms = round((ra_deg % 360.0) / 15.0 * 3600.0 * 100.0)  # hundredths of a second
    ms %= 24 * 3600 * 100
    h, rem = divmod(ms, 3600 * 100)
    m, rem = divmod(rem, 60 * 100)
    return f"{h:02d}:{m:02d}:{rem // 100:02d}.{rem % 100:02d}"


def _sexa_dec(dec_deg: float) -> str:
    sign = "-" if dec_deg < 0 else "+"
    ds = round(abs(dec_deg) * 3600.0 * 10.0)  # tenths of an arcsecond
    d, rem = divmod(ds, 3600 * 10)
    m, rem = divmod(rem, 60 * 10)
    return f"{sign}{d:02d}:{m:02d}:{rem // 10:02d}.{rem % 10:01d}"


def _parse_section(sec: str) -> tuple[int, int, int, int]:
    m = re.fullmatch(r"\[(\d+):(\d+),(\d+):(\d+)\]", sec.replace(" ", ""))
    if not m:
        raise ValueError(f"bad section {sec!r}")
    return tuple(int(v) for v in m.groups())  # x1, x2, y1, y2


@contextmanager
def _offline_astropy():
    """No IERS downloads; silence 'dubious year' / degraded-IERS warnings."""
    from astropy.utils import iers

    with iers.conf.set_temp("auto_download", False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- sky geometry
def _tan_project(ra, dec, ra0, dec0):
    """Gnomonic projection [deg] -> standard coordinates xi (east), eta (north) [deg]."""
    a, d = np.radians(ra), np.radians(dec)
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cosc = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return np.degrees(xi), np.degrees(eta)


def _tan_deproject(xi, eta, ra0, dec0):
    """Inverse of :func:`_tan_project` [deg]."""
    x, y = np.radians(xi), np.radians(eta)
    a0, d0 = math.radians(ra0), math.radians(dec0)
    den = math.cos(d0) - y * math.sin(d0)
    a = a0 + np.arctan2(x, den)
    d = np.arctan2((math.sin(d0) + y * math.cos(d0)) * np.cos(a - a0), den)
    return np.degrees(a) % 360.0, np.degrees(d)


def _cd_matrix(scale_arcsec: float, rot_deg: float, flip_x: bool) -> np.ndarray:
    """CD matrix [deg/px]; rotation = position angle of +y, east of north."""
    s = scale_arcsec / 3600.0
    c, n = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    if flip_x:  # +x points west at rotation 0 (east left)
        return s * np.array([[-c, n], [n, c]])
    return s * np.array([[c, n], [-n, c]])


# --------------------------------------------------------------------------- instrument
@dataclass(frozen=True)
class _Det:
    name: str
    hdu: str
    gain: float
    rdnoise: float
    saturate: float
    offset: tuple[float, float]


@dataclass(frozen=True)
class _Geom:
    ny: int
    nx: int
    nd: int
    ntr: int
    nov: int

    @property
    def datasec(self) -> str:
        return f"[1:{self.nd},1:{self.ny}]"

    @property
    def biassec(self) -> str:
        return f"[{self.nd + self.ntr + 1}:{self.nx},1:{self.ny}]"


def _load_profile(name: str = "demo") -> dict:
    from .resources import instruments_dir

    with open(instruments_dir() / f"{name}.toml", "rb") as fh:
        return tomllib.load(fh)


def _instrument(profile: dict, shape: tuple[int, int]):
    dets0 = profile["detectors"]
    dx1, dx2, dy1, dy2 = _parse_section(dets0[0]["datasec"])
    bx1, bx2, by1, by2 = _parse_section(dets0[0]["biassec"])
    if dx1 != 1 or dy1 != 1:
        raise ValueError("the simulator needs DATASEC starting at pixel (1, 1)")
    nd0, ny0 = dx2, dy2
    ntr, nov = bx1 - dx2 - 1, bx2 - bx1 + 1
    ny, nx = int(shape[0]), int(shape[1])
    nd = nx - ntr - nov
    if ny < 32 or nd < 32:
        raise ValueError(f"shape {shape} too small: need >= 32 rows and >= {ntr + nov + 32} columns")
    geom = _Geom(ny, nx, nd, ntr, nov)
    offs = profile.get("wcs", {}).get("offsets", {})
    dets = []
    for d in dets0:
        ox, oy = offs.get(d["name"], [0.0, 0.0])
        dets.append(_Det(d["name"], d.get("hdu", d["name"]), float(d["gain"]),
                         float(d["rdnoise"]), float(d["saturate"]),
                         (float(ox) * nd / nd0, float(oy) * ny / ny0)))
    return geom, dets


# --------------------------------------------------------------------------- catalogues
def _band_mags(r: np.ndarray, gr: np.ndarray, rng: np.random.Generator,
               bands: Sequence[str]) -> dict[str, np.ndarray]:
    ri = 0.42 * gr - 0.03 + rng.normal(0.0, 0.04, r.size)
    iz = 0.45 * ri + rng.normal(0.0, 0.03, r.size)
    ug = 1.25 * gr + 0.55 + rng.normal(0.0, 0.10, r.size)
    g = r + gr
    i = r - ri
    mags = {"u": g + ug, "g": g, "r": r, "i": i, "z": i - iz}
    extra = {  # Jester et al. (2005)-like transformations for Johnson-Cousins names
        "B": g + 0.31 * gr + 0.22, "V": g - 0.59 * gr - 0.01,
        "R": r - 0.15 * gr - 0.15, "I": i - 0.38,
    }
    out = {}
    for b in bands:
        out[b] = mags.get(b, extra.get(b, r))
    return out


def _lf_mags(rng: np.random.Generator, n: int, m1: float = 10.0, m2: float = 21.5,
             slope: float = 0.28) -> np.ndarray:
    """Magnitudes from dN/dm ~ 10**(slope m) between m1 and m2."""
    u = rng.random(n)
    a, b = 10 ** (slope * m1), 10 ** (slope * m2)
    return np.log10(a + u * (b - a)) / slope


# --------------------------------------------------------------------------- rendering
def _render_stars(ny: int, nx: int, x, y, flux, fwhm_px: float, beta: float,
                  sub: int = 5, core: int = 6, edge_e: float = 0.5) -> np.ndarray:
    """Moffat stars [e-] on a (ny, nx) image; x, y zero-based pixel coordinates.

    Each star is drawn on a square stamp whose half-size is where the profile falls
    to ``edge_e`` [e-/px] (at most 40 px); pixels within ``core`` px of the stamp
    centre are integrated over the pixel with ``sub`` x ``sub`` samples, the others
    take the value at the pixel centre.
    """
    img = np.zeros(ny * nx)
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    flux = np.asarray(flux, float)
    if x.size == 0:
        return img.reshape(ny, nx)
    alpha = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    ia2 = 1.0 / alpha ** 2
    norm = (beta - 1.0) / (math.pi * alpha ** 2)
    need = alpha * np.sqrt(np.maximum((flux * norm / edge_e) ** (1.0 / beta) - 1.0, 0.0))
    ridx = np.minimum(np.searchsorted(_STAMP_RADII, need), len(_STAMP_RADII) - 1)
    s = (np.arange(sub) + 0.5) / sub - 0.5
    for k, rad in enumerate(_STAMP_RADII):
        sel = ridx == k
        if not sel.any():
            continue
        xs, ys, fs = x[sel], y[sel], flux[sel]
        ix, iy = np.rint(xs).astype(int), np.rint(ys).astype(int)
        g = np.arange(-rad, rad + 1)
        dx = (ix[:, None] + g[None, :]) - xs[:, None]  # (n, K)
        dy = (iy[:, None] + g[None, :]) - ys[:, None]
        r2 = dx[:, None, :] ** 2 + dy[:, :, None] ** 2  # (n, Ky, Kx)
        val = np.exp(-beta * np.log1p(r2 * ia2))
        c = min(core, rad)
        sl = slice(rad - c, rad + c + 1)
        cdx = dx[:, sl][:, :, None] + s  # (n, C, sub)
        cdy = dy[:, sl][:, :, None] + s
        cr2 = cdx[:, None, :, None, :] ** 2 + cdy[:, :, None, :, None] ** 2
        val[:, sl, sl] = np.exp(-beta * np.log1p(cr2 * ia2)).mean(axis=(3, 4))
        val *= (norm * fs)[:, None, None]
        cols = ix[:, None] + g
        rows = iy[:, None] + g
        ok = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
        idx = rows[:, :, None] * nx + cols[:, None, :]
        img += np.bincount(idx[ok], weights=val[ok], minlength=ny * nx)
    return img.reshape(ny, nx)


def _bilinear(ny, nx, x, y, w):
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    idx, wt = [], []
    for ddx, ddy, ww in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                         (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xx, yy = x0 + ddx, y0 + ddy
        ok = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
        idx.append(yy[ok] * nx + xx[ok])
        wt.append((w * ww)[ok])
    return np.concatenate(idx), np.concatenate(wt)


def _cosmic_rays(rng: np.random.Generator, ny: int, nx: int, n: int) -> np.ndarray:
    """Cosmic-ray deposit [e-] of ``n`` events: spots/blobs and straight tracks."""
    from scipy.special import erf

    idx_all, w_all = [], []
    for _ in range(n):
        cx, cy = rng.uniform(-0.5, nx - 0.5), rng.uniform(-0.5, ny - 0.5)
        if rng.random() < 0.6:  # spot / blob
            sig = rng.uniform(0.25, 0.9)
            etot = math.exp(rng.uniform(math.log(300.0), math.log(8000.0)))
            ii = np.arange(-3, 4)
            px, py = np.rint(cx).astype(int) + ii, np.rint(cy).astype(int) + ii
            fx = 0.5 * (erf((px + 0.5 - cx) / (sig * 2 ** 0.5)) - erf((px - 0.5 - cx) / (sig * 2 ** 0.5)))
            fy = 0.5 * (erf((py + 0.5 - cy) / (sig * 2 ** 0.5)) - erf((py - 0.5 - cy) / (sig * 2 ** 0.5)))
            w = etot * fy[:, None] * fx[None, :]
            ok = ((py >= 0) & (py < ny))[:, None] & ((px >= 0) & (px < nx))[None, :]
            idx_all.append((py[:, None] * nx + px[None, :])[ok])
            w_all.append(w[ok])
        else:  # track
            length = min(1.5 + rng.exponential(6.0), 40.0)
            ang = rng.uniform(0.0, math.pi)
            dedx = math.exp(rng.uniform(math.log(150.0), math.log(2500.0)))
            npt = max(int(length / 0.2), 2)
            tt = np.linspace(-0.5, 0.5, npt) * length
            idx, w = _bilinear(ny, nx, cx + tt * math.cos(ang), cy + tt * math.sin(ang),
                               np.full(npt, dedx * length / npt))
            idx_all.append(idx)
            w_all.append(w)
    if not idx_all:
        return np.zeros((ny, nx))
    return np.bincount(np.concatenate(idx_all), weights=np.concatenate(w_all),
                       minlength=ny * nx).reshape(ny, nx)


# --------------------------------------------------------------------------- fixed detector maps
def _fringe_pattern(seed: int, filt: str, xf: np.ndarray, yf: np.ndarray) -> np.ndarray:
    """Fringe pattern of a filter at focal-plane pixels (xf, yf): six plane waves of
    15-50 px wavelength in random directions, scaled to rms 1 (own random stream)."""
    rng = _rng(seed, "fringe", filt)
    out = np.zeros(np.broadcast_shapes(xf.shape, yf.shape))
    for _ in range(6):
        lam, ang, ph = rng.uniform(15.0, 50.0), rng.uniform(0.0, math.pi), rng.uniform(0.0, 2 * math.pi)
        out += np.cos(2 * math.pi * (xf * math.cos(ang) + yf * math.sin(ang)) / lam + ph)
    return out / math.sqrt(3.0)          # six unit cosines: variance 6 / 2 = 3


def _detector_maps(seed: int, geom: _Geom, det: _Det, det_index: int, filters: Sequence[str],
                   focal_center: tuple[float, float], opt_center: tuple[float, float],
                   rho_max: float) -> dict:
    ny, nd = geom.ny, geom.nd
    area = ny * nd / (512.0 * 1024.0)
    rng = _rng(seed, "detector", det.name)
    x = np.arange(nd)
    y = np.arange(ny)
    # --- bias
    level = 1000.0 * (det_index + 1) + rng.normal(0.0, 30.0)
    col = rng.normal(0.0, 1.2, nd)
    col = np.convolve(np.pad(col, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
    nbadcol = max(1, round(nd / 256))
    badcols = rng.choice(nd, nbadcol, replace=False)
    col[badcols] += rng.uniform(5.0, 15.0, nbadcol)
    gx, gy = rng.normal(0.0, 3.0), rng.normal(0.0, 2.0)
    glow_amp, glow_len = rng.uniform(4.0, 10.0), rng.uniform(20.0, 50.0)
    offset = rng.normal(3.0, 1.0)
    dist = np.hypot((nd - 1 - x)[None, :], y[:, None])
    pattern = (offset + col[None, :] + gx * (x / nd - 0.5)[None, :]
               + gy * (y / ny - 0.5)[:, None] + glow_amp * np.exp(-dist / glow_len))
    # --- dark current
    base = rng.uniform(0.008, 0.015)
    dark = np.full((ny, nd), base)
    nhot = max(5, round(300 * area))
    hot = rng.choice(ny * nd, nhot, replace=False)
    hot_rate = np.exp(rng.uniform(math.log(1.0), math.log(50.0), nhot))
    dark.flat[hot] += hot_rate
    # --- flat response: PRNU (filter-scaled), dead/weak pixels, a weak partial column
    prnu = rng.normal(0.0, 0.01, (ny, nd))
    ndead = max(3, round(20 * area))
    dead = rng.choice(ny * nd, ndead, replace=False)
    dead_resp = np.where(rng.random(ndead) < 0.3, 0.02, rng.uniform(0.3, 0.8, ndead))
    bad_column = None
    if det_index == 1:
        c = int(rng.integers(nd // 4, 3 * nd // 4))
        r1 = int(rng.integers(0, ny // 3))
        r2 = int(rng.integers(ny // 2, ny))
        bad_column = {"x": c, "y1": r1, "y2": r2, "response": 0.85}
    fxy_x = (x + det.offset[0])[None, :] - opt_center[0]
    fxy_y = (y + det.offset[1])[:, None] - opt_center[1]
    rho2 = (fxy_x ** 2 + fxy_y ** 2) / rho_max ** 2
    responses = {}
    for f in filters:
        fp = _FILTERS.get(f, _DEFAULT_FILTER)
        frng = _rng(seed, "prnu-filter", det.name, f)
        vig = 1.0 - fp["vig"] * rho2 - 0.3 * fp["vig"] * rho2 ** 2
        resp = vig * (1.0 + fp["prnu"] * prnu + 0.001 * frng.standard_normal((ny, nd)))
        resp.flat[dead] = dead_resp
        if bad_column is not None:
            resp[bad_column["y1"]:bad_column["y2"], bad_column["x"]] *= bad_column["response"]
        responses[f] = resp
    hy, hx = np.divmod(hot, nd)
    dy_, dx_ = np.divmod(dead, nd)
    return {
        "level": level, "pattern": pattern, "dark": dark, "dark_base": base,
        "hot": (hx, hy, hot_rate), "dead": (dx_, dy_, dead_resp), "bad_column": bad_column,
        "responses": responses, "prnu": prnu,
    }


# --------------------------------------------------------------------------- schedule
@dataclass
class _Frame:
    label: str
    kind: str                   # bias dark flat arc standard science
    subtype: str | None
    imagetyp: str
    obj: str
    filt: str
    exptime: float
    t0: float                   # unix start
    program: str
    field: str | None = None    # catalogue field
    target: Target | None = None
    dither: tuple[float, float] = (0.0, 0.0)
    in_series: bool = False
    extra: dict = _dc_field(default_factory=dict)


class _SunTable:
    def __init__(self, t_start: float, t_end: float, loc):
        from astropy.coordinates import AltAz, get_sun
        from astropy.time import Time

        self.t = np.arange(t_start, t_end + 120.0, 120.0)
        with _offline_astropy():
            tt = Time(_mjd(self.t), format="mjd", scale="utc")
            self.alt = get_sun(tt).transform_to(AltAz(obstime=tt, location=loc)).alt.deg

    def at(self, t):
        return np.interp(t, self.t, self.alt)

    def crossing(self, alt: float, rising: bool) -> float:
        a = self.alt - alt
        if rising:
            i = np.nonzero((a[:-1] < 0) & (a[1:] >= 0))[0]
        else:
            i = np.nonzero((a[:-1] > 0) & (a[1:] <= 0))[0]
        if i.size == 0:
            raise ValueError(f"the Sun does not cross {alt} deg on this night")
        k = i[-1] if rising else i[0]
        return float(self.t[k] + (self.t[k + 1] - self.t[k]) * (0 - a[k]) / (a[k + 1] - a[k]))


def _night_window(utdate: str, lon: float, tz: str):
    d = dt.datetime.strptime(utdate, "%Y%m%d").replace(tzinfo=dt.timezone.utc)
    midnight = d + dt.timedelta(hours=(-lon / 15.0) % 24.0)
    zone = ZoneInfo(tz)
    evening = (midnight - dt.timedelta(hours=12)).astimezone(zone).date()
    start = dt.datetime(evening.year, evening.month, evening.day, 12, tzinfo=zone)
    nxt = evening + dt.timedelta(days=1)
    end = dt.datetime(nxt.year, nxt.month, nxt.day, 12, tzinfo=zone)
    return start.timestamp(), end.timestamp(), midnight.timestamp()


# --------------------------------------------------------------------------- main entry
def make_night(
    path: str | os.PathLike,
    seed: int = 0,
    *,
    utdate: str = "20261120",
    nbias: int = 5,
    ndark: int = 3,
    dark_exptime: float = 300.0,
    filters: Sequence[str] = ("g", "r"),
    nflat: int = 3,
    flat_kind: str = "dome",
    targets: Sequence[Target] | None = None,
    nexp_per_filter: int = 4,
    standard: bool = True,
    standard_nexp: int = 2,
    shape: tuple[int, int] = (1024, 544),
    include_arcs: bool = False,
    narc: int = 3,
    cosmic_rays: bool = True,
    cr_rate: float = 0.05,
    stars_per_field: int = 500,
    flat_level: float = 25000.0,
    bad_bias: str | None = None,
    bias_level_shift: float | None = None,
    bad_bias_index: int | None = None,
    bad_flat: str | None = None,
    truth_dir: str | os.PathLike | None = None,
    catalog_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    instrument: str = "demo",
    fringe: Mapping[str, float] | None = None,
    dome_illumination: float = 0.0,
) -> SimulatedNight:
    """Write a seeded synthetic raw night of the demo camera plus its truth.

    Parameters
    ----------
    path : path-like
        Raw folder (created).  Only the FITS frames are written here.
    seed : int
        Non-negative seed; the same arguments and seed give byte-identical output.
    utdate : str
        ``YYYYMMDD``, the UT date of mean solar midnight at the site.  Frames fall
        between local noon before and local noon after that midnight.
    nbias, ndark : int
        Number of biases (afternoon) and darks (morning).
    dark_exptime : float
        Dark exposure time [s].
    filters : sequence of str
        Filters of the night (flats and, by default, science).
    nflat : int
        Flats per filter and kind.
    flat_kind : {'dome', 'sky', 'both'}
        Afternoon dome flats, evening twilight flats, or both.
    targets : sequence of Target or None
        Science fields in observing order; None uses :func:`default_targets`.
    nexp_per_filter : int
        Dithered exposures per filter for targets with ``nexp=None``.
    standard : bool
        Observe a Landolt-like standard field (OBJECT 'SA nn', the one nearest the
        meridian) at the start of the night.
    standard_nexp : int
        Standard exposures per filter.
    shape : (int, int)
        Raw (rows, columns) per detector; the last 32 columns are transition + overscan.
    include_arcs : bool
        Add ``narc`` ArNe arc frames (vertical emission lines) in the afternoon.
    cosmic_rays : bool
        Add cosmic rays.
    cr_rate : float
        Cosmic-ray events [cm^-2 s^-1] (15 um pixels).
    stars_per_field : int
        Catalogue stars per field at the default shape (scaled with the footprint).
    flat_level : float
        Mean flat level aimed at [ADU above bias].
    bad_bias : {None, 'light_leak', 'level_shift', 'data_jump'}
        Plant one bad bias: a gradient of 40-120 ADU on the data of both detectors,
        the whole read-out (data and overscan) shifted by ``bias_level_shift`` ADU,
        or the data alone shifted by ``bias_level_shift`` ADU.
    bias_level_shift : float or None
        Shift [ADU] for ``'level_shift'`` / ``'data_jump'`` (default 40); given alone
        it implies ``bad_bias='level_shift'``.
    bad_bias_index : int or None
        Which bias (0-based) is bad; default the middle one.
    bad_flat : {None, 'saturated', 'low'}
        Plant one bad dome (or sky) flat of the first filter: lamp 2.6x too bright
        (clipped at SATURATE) or 10x too faint.
    truth_dir : path-like or None
        Truth folder; default ``<path>/../truth``.
    catalog_path : path-like or None
        Reference catalogue; default ``<path>/../refcat.ecsv``.
    overwrite : bool
        Replace existing ``demo_<utdate>_*.fits`` in ``path`` (stale ones of the same
        pattern are removed); otherwise raise :class:`FileExistsError`.
    instrument : str
        Profile name (only ``demo`` is meaningful).
    fringe : mapping of str to float, optional
        Fringes: filter -> amplitude as a fraction of the sky.  The night sky of that
        filter becomes ``sky_rate * t * (1 + amplitude * F(x, y))`` with ``F`` a fixed
        interference-like pattern of rms 1 in the focal plane (a sum of plane waves of
        15-50 px wavelength); ``F`` is written to ``truth/calib/fringe_<f>.fits``.
    dome_illumination : float
        Dome-lamp illumination error: dome flats see ``1 + dome_illumination * u`` with
        ``u`` the focal-plane x from -1 (left edge) to +1 (right edge), so flat-fielded
        science frames carry the inverse gradient (what a master sky corrects).

    Returns
    -------
    SimulatedNight
        Files written, truth path and content.
    """
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.io import fits
    from astropy.table import Table
    from astropy.time import Time
    import astropy.units as u

    seed = int(seed)
    if bias_level_shift is not None and bad_bias is None:
        bad_bias = "level_shift"
    bias_level_shift = 40.0 if bias_level_shift is None else float(bias_level_shift)
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if flat_kind not in ("dome", "sky", "both"):
        raise ValueError("flat_kind must be 'dome', 'sky' or 'both'")
    if bad_bias not in (None, "light_leak", "level_shift", "data_jump"):
        raise ValueError(f"unknown bad_bias {bad_bias!r}")
    if bad_flat not in (None, "saturated", "low"):
        raise ValueError(f"unknown bad_flat {bad_flat!r}")
    if not re.fullmatch(r"\d{8}", utdate):
        raise ValueError("utdate must be YYYYMMDD")
    for nm, v in (("nbias", nbias), ("ndark", ndark), ("nflat", nflat), ("narc", narc)):
        if int(v) < 0:
            raise ValueError(f"{nm} must be >= 0")
    filters = tuple(filters)
    if not filters:
        raise ValueError("need at least one filter")
    targets = tuple(default_targets() if targets is None else targets)
    raw_dir = Path(path)
    truth_dir = Path(truth_dir) if truth_dir is not None else raw_dir.parent / "truth"
    catalog_path = Path(catalog_path) if catalog_path is not None else raw_dir.parent / "refcat.ecsv"
    if raw_dir.resolve() == truth_dir.resolve():
        raise ValueError("truth_dir must differ from the raw folder")

    parameters = {
        "seed": seed, "utdate": utdate, "nbias": nbias, "ndark": ndark,
        "dark_exptime": dark_exptime, "filters": list(filters), "nflat": nflat,
        "flat_kind": flat_kind, "nexp_per_filter": nexp_per_filter, "standard": standard,
        "standard_nexp": standard_nexp, "shape": [int(v) for v in shape], "include_arcs": include_arcs,
        "narc": narc, "cosmic_rays": cosmic_rays, "cr_rate": cr_rate,
        "stars_per_field": stars_per_field, "flat_level": flat_level, "bad_bias": bad_bias,
        "bias_level_shift": bias_level_shift, "bad_bias_index": bad_bias_index,
        "bad_flat": bad_flat, "instrument": instrument,
        "targets": [_target_dict(t) for t in targets],
    }
    # the options added later appear only when used (older truth files stay identical)
    if fringe:
        parameters["fringe"] = {str(k): float(v) for k, v in fringe.items()}
    if dome_illumination:
        parameters["dome_illumination"] = float(dome_illumination)

    profile = _load_profile(instrument)
    geom, dets = _instrument(profile, shape)
    site = profile["site"]
    lon, lat, height = float(site["longitude"]), float(site["latitude"]), float(site["height"])
    loc = EarthLocation.from_geodetic(lon * u.deg, lat * u.deg, height * u.m)
    wcs_prof = profile.get("wcs", {})
    scale_nom = float(wcs_prof.get("pixel_scale", 0.6))
    rot_nom = float(wcs_prof.get("rotation", 0.0))
    flip_x = bool(wcs_prof.get("flip_x", True))

    # focal plane: detectors' data areas, centre, optical centre for vignetting
    fx1 = min(d.offset[0] for d in dets)
    fx2 = max(d.offset[0] + geom.nd - 1 for d in dets)
    fy1 = min(d.offset[1] for d in dets)
    fy2 = max(d.offset[1] + geom.ny - 1 for d in dets)
    fcen = ((fx1 + fx2) / 2.0, (fy1 + fy2) / 2.0)
    nrng = _rng(seed, "night")
    opt_cen = (fcen[0] + nrng.normal(0, 0.02) * (fx2 - fx1), fcen[1] + nrng.normal(0, 0.02) * (fy2 - fy1))
    rho_max = math.hypot((fx2 - fx1) / 2.0, (fy2 - fy1) / 2.0)
    half_w, half_h = (fx2 - fx1) / 2.0, (fy2 - fy1) / 2.0

    # true WCS errors (night-constant) and pointing error
    scale_true = scale_nom * (1.0 + nrng.normal(0.0, 0.002))
    rot_true = rot_nom + float(np.clip(nrng.normal(0.0, 0.15), -0.4, 0.4))
    perr = nrng.normal(0.0, 3.5, 2)
    perr *= min(1.0, 7.0 / max(float(np.hypot(*perr)), 1e-9))
    cd_nom = _cd_matrix(scale_nom, rot_nom, flip_x)

    # ------------------------------------------------------------------ night & schedule
    noon0, noon1, midnight = _night_window(utdate, lon, site.get("timezone", "UTC"))
    sun = _SunTable(noon0, noon1, loc)
    sunset = sun.crossing(-0.833, rising=False)
    sunrise = sun.crossing(-0.833, rising=True)
    eve12 = sun.crossing(-12.0, rising=False)
    morn12 = sun.crossing(-12.0, rising=True)
    srng = _rng(seed, "schedule")

    def jitter() -> float:
        return float(srng.uniform(0.0, 3.0))

    flat_filters = list(dict.fromkeys(
        list(filters)
        + [f for t in targets for f in (t.filters or filters)]
        + [t.series.filter for t in targets if t.series is not None]))
    frames: list[_Frame] = []

    # afternoon: biases, dome flats, arcs -- ending 20 min before sunset
    aft: list[tuple] = []
    for k in range(nbias):
        aft.append(("bias", None, "BIAS", "Bias", "OPEN", 0.0, f"bias/{k}"))
    if flat_kind in ("dome", "both"):
        for f in flat_filters:
            fp = _FILTERS.get(f, _DEFAULT_FILTER)
            for k in range(nflat):
                aft.append(("flat", "dome", "FLAT", "Dome flat", f, fp["dome_t"], f"dome/{f}/{k}"))
    if include_arcs:
        for k in range(narc):
            aft.append(("arc", None, "ARC", "ArNe", "OPEN", 5.0, f"arc/{k}"))
    dur = sum(a[5] + READOUT_S + 3.0 + (10.0 if i and a[4] != aft[i - 1][4] else 0.0)
              for i, a in enumerate(aft))
    t = sunset - 1200.0 - dur
    if aft and t < noon0 + 1800.0:
        raise ValueError("afternoon calibrations do not fit between local noon and sunset")
    prev_f = None
    for a in aft:
        if prev_f is not None and a[4] != prev_f:
            t += 10.0
        frames.append(_Frame(a[6], a[0], a[1], a[2], a[3], a[4], a[5], round(t, 3), "CAL"))
        t += a[5] + READOUT_S + jitter()
        prev_f = a[4]

    # evening twilight flats
    tw_level_e = flat_level * float(np.mean([d.gain for d in dets]))

    def twilight_rate(tt, f):  # e-/s/px at response 1 (twilight + dark sky)
        fp = _FILTERS.get(f, _DEFAULT_FILTER)
        alt = sun.at(tt)
        mu = 15.5 + 0.75 * (-6.0 - alt) + fp["tw"]
        pixarea = scale_nom ** 2
        return pixarea * (10 ** (-0.4 * (mu - fp["zp"])) + 10 ** (-0.4 * (fp["sky"] - fp["zp"])))

    skyflat_field = None
    if flat_kind in ("sky", "both") and nflat > 0:
        # start when the first filter needs ~3 s; the sky then fades ~0.13 mag/min
        tgrid = np.arange(sunset, eve12, 10.0)
        need = tw_level_e / np.array([twilight_rate(tt, flat_filters[0]) for tt in tgrid])
        t = float(tgrid[min(int(np.searchsorted(need, 3.0)), tgrid.size - 1)])
        with _offline_astropy():
            lst = Time(_mjd(t), format="mjd", scale="utc").sidereal_time("mean", longitude=lon * u.deg).deg
        skyflat_field = (float(lst + srng.uniform(-5, 5)), float(np.clip(lat + srng.uniform(-5, 5), -89, 89)))
        for f in flat_filters:
            for k in range(nflat):
                target_e = tw_level_e * srng.uniform(0.85, 1.15)
                texp = float(np.clip(round(target_e / twilight_rate(t, f), 1), 2.0, 60.0))
                ang = srng.uniform(0, 2 * math.pi)
                fr = _Frame(f"sky/{f}/{k}", "flat", "sky", "SKYFLAT", "Sky flat", f, texp,
                            round(t, 3), "CAL", field="SKYFLAT",
                            dither=(60.0 * math.cos(ang) * k, 60.0 * math.sin(ang) * k))
                frames.append(fr)
                t += texp + READOUT_S + 5.0 + jitter()
            t += 10.0

    # science: standard block, then the targets in order
    t = max(t, eve12) + 120.0
    blocks: list[tuple[Target, list[_Frame]]] = []
    std = None
    if standard and standard_nexp > 0:
        std = Target("STANDARD", exptime={f: (15.0 if f in ("u", "g") else 10.0) for f in filters},
                     nexp=standard_nexp, dither=0.0, program="STD")
        blocks.append((std, []))
    for tg in targets:
        blocks.append((tg, []))
    block_dur = [_block_duration(tg, filters, nexp_per_filter) for tg, _ in blocks]
    gap = max(0.0, (morn12 - 600.0 - t - sum(block_dur)) / max(len(blocks), 1))
    with _offline_astropy():
        lst_ref = float(Time(_mjd(t), format="mjd", scale="utc").sidereal_time(
            "mean", longitude=lon * u.deg).deg)
    t_ref = t
    for bi, (tg, lst_frames) in enumerate(blocks):
        if bi and tg.ra is None:
            t += gap
        if tg.ra is not None:  # centre the block on the target's meridian passage if possible
            dt_s = ((float(tg.ra) - lst_ref) % 360.0) / 360.98565 * 86400.0
            mid = t_ref + dt_s if t_ref + dt_s <= morn12 else t_ref + dt_s - 86164.09
            latest = morn12 - 600.0 - sum(block_dur[bi:])
            t = max(t, min(mid - block_dur[bi] / 2.0, latest))
        t += 120.0 + jitter()  # slew
        kind = "standard" if tg is std else "science"
        for f in (tg.filters or filters):
            t += 15.0
            n = tg.nexp if tg.nexp is not None else nexp_per_filter
            for k in range(n):
                dpx = _dither_offset(k, tg.dither, srng)
                lst_frames.append(_Frame(f"{kind}/{tg.name}/{f}/{k}", kind, None, "OBJECT",
                                         tg.name, f, tg.exptime_for(f), round(t, 3),
                                         tg.program, target=tg, dither=dpx))
                t += tg.exptime_for(f) + READOUT_S + (10.0 if tg.dither else 0.0) + jitter()
        if tg.series is not None:
            s = tg.series
            cad = max(s.cadence, s.exptime + READOUT_S)
            t += 15.0
            t0s = t
            for k in range(s.nexp):
                lst_frames.append(_Frame(f"{kind}/{tg.name}/series/{s.filter}/{k}", kind, None,
                                         "OBJECT", tg.name, s.filter, s.exptime,
                                         round(t0s + k * cad + float(srng.uniform(0, 2.0)), 3),
                                         tg.program, target=tg,
                                         dither=tuple(srng.normal(0.0, 1.0, 2)), in_series=True))
            t = t0s + s.nexp * cad
        frames.extend(lst_frames)
    science_end = t
    if science_end > morn12:
        raise ValueError(
            f"the science programme ends at {_iso(science_end)}, after morning twilight "
            f"({_iso(morn12)}): fewer exposures or shorter exposure times")

    # morning darks
    t = max(science_end + 600.0, morn12 + 300.0)
    for k in range(ndark):
        frames.append(_Frame(f"dark/{k}", "dark", None, "DARK", "Dark", "OPEN",
                             float(dark_exptime), round(t, 3), "CAL"))
        t += dark_exptime + READOUT_S + jitter()
    if t > noon1:
        raise ValueError("morning calibrations run past local noon")

    frames.sort(key=lambda f: f.t0)

    # ------------------------------------------------------------------ fields & pointing
    tmid_all = np.array([f.t0 + f.exptime / 2.0 for f in frames])
    with _offline_astropy():
        lst_all = Time(_mjd(tmid_all), format="mjd", scale="utc").sidereal_time(
            "mean", longitude=lon * u.deg).deg
    lst_of = dict(zip([f.label for f in frames], lst_all))
    field_centres: dict[str, tuple[float, float]] = {}
    target_info = []
    for tg, fl in blocks:
        if not fl:
            continue
        mid_lst = float(np.degrees(np.angle(np.mean(np.exp(1j * np.radians(
            [lst_of[f.label] for f in fl]))))) % 360.0)
        if tg is std:
            nm, ra, dec = min(_STANDARD_FIELDS,
                              key=lambda s: abs((s[1] - mid_lst + 180.0) % 360.0 - 180.0))
            fname = nm
            for f in fl:
                f.obj = nm
        else:
            ra = float(tg.ra) if tg.ra is not None else round(mid_lst, 4)
            dec = float(tg.dec) if tg.dec is not None else round(lat - 10.0, 4)
            fname = tg.name
        field_centres[fname] = (ra, dec)
        for f in fl:
            f.field = fname
        target_info.append({"name": fname, "kind": "standard" if tg is std else "science",
                            "ra": _r(ra), "dec": _r(dec), "field": fname,
                            "variable": tg.variable is not None})
    if skyflat_field is not None:
        field_centres["SKYFLAT"] = skyflat_field

    # header (nominal) and true pointing for every frame
    pointing_h, pointing_t = [], []
    for f in frames:
        if f.field is None:  # parked at the zenith / dome screen
            ra0, dec0 = float(lst_of[f.label]), lat
            pointing_h.append((ra0, dec0))
            pointing_t.append((ra0, dec0))
            continue
        ra0, dec0 = field_centres[f.field]
        xi, eta = cd_nom @ np.asarray(f.dither, float)
        hra, hdec = _tan_deproject(xi, eta, ra0, dec0)
        prng = _rng(seed, "pointing", f.label)
        jit = prng.normal(0.0, 1.0, 2)
        dxi, deta = (perr + jit) / 3600.0
        tra, tdec = _tan_deproject(dxi, deta, float(hra), float(hdec))
        pointing_h.append((float(hra), float(hdec)))
        pointing_t.append((float(tra), float(tdec)))
    ph = np.array(pointing_h)
    pt = np.array(pointing_t)
    t_start = np.array([f.t0 for f in frames])
    onsky = np.array([f.field is not None for f in frames])
    with _offline_astropy():
        tt0 = Time(_mjd(t_start), format="mjd", scale="utc")
        ttm = Time(_mjd(tmid_all), format="mjd", scale="utc")
        aa0 = SkyCoord(ph[:, 0] * u.deg, ph[:, 1] * u.deg).transform_to(AltAz(obstime=tt0, location=loc))
        aam = SkyCoord(pt[:, 0] * u.deg, pt[:, 1] * u.deg).transform_to(AltAz(obstime=ttm, location=loc))
        alt_mid = np.asarray(aam.alt.deg)
        secz0 = np.where(onsky, np.asarray(aa0.secz), 1.0)
        seczm = np.where(onsky, np.asarray(aam.secz), 1.0)
    low = onsky & (alt_mid < 20.0) & np.array([f.kind in ("science", "standard") for f in frames])
    if (onsky & (np.minimum(alt_mid, np.asarray(aa0.alt.deg)) < 5.0)).any():
        bad = [(frames[i].obj, _iso(frames[i].t0), round(float(alt_mid[i]), 1))
               for i in np.nonzero(onsky & (alt_mid < 5.0))[0]][:3]
        raise ValueError(f"targets below 5 deg altitude at their scheduled times {bad}: "
                         "use ra=None (on the meridian) or another utdate")
    if low.any():
        names = sorted({frames[i].obj for i in np.nonzero(low)[0]})
        warnings.warn(f"targets below 20 deg altitude during their exposures: {names}", stacklevel=2)

    # ------------------------------------------------------------------ catalogues
    all_bands = list(dict.fromkeys(list(_BASE_BANDS) + flat_filters))
    area_scale = ((fx2 - fx1 + 1) * (fy2 - fy1 + 1)) / (1032.0 * 1024.0)
    # empty seeds so a night without targets (calibrations only) writes an empty catalogue
    cat_rows = {"id": [np.zeros(0, np.int64)], "field": [np.zeros(0, str)],
                "ra": [np.zeros(0)], "dec": [np.zeros(0)], **{b: [np.zeros(0)] for b in all_bands}}
    field_stars: dict[str, dict] = {}
    variable_info = None
    next_id = 1
    for fi, (fname, (ra0, dec0)) in enumerate(field_centres.items()):
        crng = _rng(seed, "catalog", fname)
        max_dither = max([abs(c) for f in frames if f.field == fname for c in f.dither] + [0.0])
        margin = max_dither + 40.0
        hw, hh = (half_w + margin) * 1.1, (half_h + margin) * 1.1  # px
        density = stars_per_field / ((1032.0 * 1.2) * (1024.0 * 1.2))
        nstar = max(30, int(round(density * (2 * hw) * (2 * hh) * (1.0 if fname != "SKYFLAT" else 0.5))))
        px = crng.uniform(-hw, hw, nstar)
        py = crng.uniform(-hh, hh, nstar)
        rmag = _lf_mags(crng, nstar)
        # a few bright (saturating) stars well inside the footprint
        nb = 3 if fname != "SKYFLAT" else 0
        bx, by = _inside_points(crng, nb, dets, geom, fcen, margin=max_dither + 30.0)
        px = np.concatenate([px, bx])
        py = np.concatenate([py, by])
        rmag = np.concatenate([rmag, crng.uniform(10.0, 12.0, nb)])
        var_index = None
        tg = next((t for t, fl in blocks if fl and fl[0].field == fname), None)
        if tg is not None and tg.variable is not None:
            # variable: on the first detector near its centre, isolated
            d0 = dets[0]
            vx = d0.offset[0] + 0.45 * geom.nd - fcen[0]
            vy = d0.offset[1] + 0.55 * geom.ny - fcen[1]
            keep = ~(np.hypot(px - vx, py - vy) < 15.0)
            keep &= ~((np.hypot(px - vx, py - vy) < 60.0) & (rmag < tg.variable.mag_r - 1.0))
            px, py, rmag = px[keep], py[keep], rmag[keep]
            px = np.append(px, vx)
            py = np.append(py, vy)
            rmag = np.append(rmag, tg.variable.mag_r)
            var_index = px.size - 1
        gr = np.clip(crng.normal(0.65, 0.3, px.size), -0.2, 1.6)
        mags = _band_mags(rmag, gr, crng, all_bands)
        xi, eta = cd_nom @ np.vstack([px, py])
        sra, sdec = _tan_deproject(xi, eta, ra0, dec0)
        ids = np.arange(next_id, next_id + px.size)
        next_id += px.size + (1000 - (px.size % 1000))  # fields start at round ids
        field_stars[fname] = {"id": ids, "ra": sra, "dec": sdec, "mags": mags}
        if fname != "SKYFLAT":
            cat_rows["id"].append(ids)
            cat_rows["field"].append(np.full(ids.size, fname))
            cat_rows["ra"].append(sra)
            cat_rows["dec"].append(sdec)
            for b in all_bands:
                cat_rows[b].append(mags[b])
        if var_index is not None:
            v = tg.variable
            series_frames = [f for f in frames if f.field == fname and f.in_series]
            ref = series_frames or [f for f in frames if f.field == fname]
            tmid_ser = 0.5 * (ref[0].t0 + ref[-1].t0 + ref[-1].exptime)
            off = v.t0_offset if v.t0_offset is not None else float(crng.uniform(-600.0, 600.0))
            t0 = tmid_ser + off
            variable_info = {
                "id": int(ids[var_index]), "target": fname, "ra": _r(sra[var_index], 8),
                "dec": _r(sdec[var_index], 8), "model": "trapezoid",
                "t0": _iso(t0), "t0_mjd": _r(_mjd(t0), 8), "t0_unix": round(t0, 3),
                "depth": v.depth, "duration_s": v.duration, "ingress_s": v.ingress,
                "filter": series_frames[0].filt if series_frames else None,
                "mags": {b: _r(mags[b][var_index], 4) for b in all_bands},
            }

    # ------------------------------------------------------------------ detector maps
    maps = {d.name: _detector_maps(seed, geom, d, i, flat_filters, fcen, opt_cen, rho_max)
            for i, d in enumerate(dets)}
    for d in dets:
        m = maps[d.name]
        xf = np.arange(geom.nd)[None, :] + d.offset[0]
        yf = np.arange(geom.ny)[:, None] + d.offset[1]
        m["fringe"] = {f: _fringe_pattern(seed, f, xf, yf) for f in (fringe or {})}
        m["dome_illum"] = np.broadcast_to(
            1.0 + float(dome_illumination) * (2.0 * (xf - fx1) / (fx2 - fx1) - 1.0),
            (geom.ny, geom.nd)) if dome_illumination else None
    # normalise each filter's response to median 1 over both detectors
    for f in flat_filters:
        med = float(np.median(np.concatenate([maps[d.name]["responses"][f].ravel() for d in dets])))
        for d in dets:
            maps[d.name]["responses"][f] /= med

    # ------------------------------------------------------------------ seeing, sky, transparency
    wrng = _rng(seed, "weather")
    ph1, ph2 = wrng.uniform(0, 2 * math.pi, 2)
    see0 = wrng.uniform(1.3, 1.6)
    skyph = wrng.uniform(0, 2 * math.pi)

    def seeing(tt, secz, r):
        h = (tt - noon0) / 3600.0
        v = see0 + 0.22 * math.sin(2 * math.pi * h / 5.0 + ph1) + 0.10 * math.sin(2 * math.pi * h / 1.3 + ph2)
        v = v * secz ** 0.6 / 1.1 ** 0.6 + r.normal(0.0, 0.04)
        return float(np.clip(v, 1.0, 2.0))

    # ------------------------------------------------------------------ planted
    planted = []
    bias_frames = [f for f in frames if f.kind == "bias"]
    if bad_bias is not None and bias_frames:
        bi = bad_bias_index if bad_bias_index is not None else len(bias_frames) // 2
        fb = bias_frames[bi]
        fb.extra["bad"] = bad_bias
        if bad_bias == "light_leak":
            fb.extra["amp"] = float(_rng(seed, "planted").uniform(40.0, 120.0))
        else:
            fb.extra["amp"] = float(bias_level_shift)
    if bad_flat is not None:
        cand = [f for f in frames if f.kind == "flat" and f.filt == flat_filters[0]]
        if cand:
            ff = cand[len(cand) // 2]
            ff.extra["bad"] = bad_flat
            ff.extra["factor"] = 2.6 if bad_flat == "saturated" else 0.1

    # ------------------------------------------------------------------ render & write
    raw_dir.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"{re.escape(instrument)}_{utdate}_\d{{4}}\.fits")
    existing = [p for p in raw_dir.iterdir() if pattern.fullmatch(p.name)]
    if existing and not overwrite:
        raise FileExistsError(f"{raw_dir} already has {len(existing)} {instrument}_{utdate}_*.fits "
                              "files (use overwrite=True)")
    (truth_dir / "cr").mkdir(parents=True, exist_ok=True)
    (truth_dir / "calib").mkdir(parents=True, exist_ok=True)

    area_cm2 = geom.nd * geom.ny * (PIXEL_SIZE_UM * 1e-4) ** 2
    arc_lines = None
    if include_arcs:
        arng = _rng(seed, "arc-lines")
        nl = max(5, round(25 * (fx2 - fx1 + 1) / 1032.0))
        arc_lines = {"focal_x": np.sort(arng.uniform(fx1 + 4, fx2 - 4, nl)),
                     "sigma": arng.uniform(0.9, 1.4, nl),
                     "rate": np.exp(arng.uniform(math.log(300.0), math.log(7000.0), nl))}
    ccd_temp = -110.0
    files: list[Path] = []
    frame_truth: list[dict] = []
    for seq, (f, (hra, hdec), (tra, tdec), s0, sm, tmid) in enumerate(
            zip(frames, ph, pt, secz0, seczm, tmid_all), start=1):
        name = f"{instrument}_{utdate}_{seq:04d}.fits"
        frng = _rng(seed, "frame", utdate, f.label)
        fp = _FILTERS.get(f.filt, _DEFAULT_FILTER)
        entry: dict[str, Any] = {
            "file": name, "seq": seq, "type": f.kind, "subtype": f.subtype,
            "imagetyp": f.imagetyp, "object": f.obj, "filter": f.filt, "exptime": f.exptime,
            "date_obs": _iso(f.t0), "mjd_start": _r(_mjd(f.t0), 8), "mjd_mid": _r(_mjd(tmid), 8),
            "airmass": _r(sm, 5), "airmass_header": round(float(s0), 4),
            "sun_alt": _r(sun.at(tmid), 3),
            "header_pointing": {"ra": _r(hra, 8), "dec": _r(hdec, 8)},
            "true_pointing": {"ra": _r(tra, 8), "dec": _r(tdec, 8)},
            "dither_px": [_r(c, 3) for c in f.dither],
        }
        on_sky = f.field is not None
        texp = f.exptime
        sky_rate = 0.0
        stars_xy = None
        if on_sky:
            fwhm = seeing(tmid, float(sm), frng)
            beta = float(np.clip(frng.normal(3.0, 0.15), 2.6, 3.5))
            transp = float(1.0 - min(abs(frng.normal(0.0, 0.02)), 0.08)) if f.kind != "flat" else 1.0
            scale_f = scale_true * (1.0 + frng.normal(0.0, 2e-5))
            rot_f = rot_true + frng.normal(0.0, 0.003)
            cd_t = _cd_matrix(scale_f, rot_f, flip_x)
            cd_inv = np.linalg.inv(cd_t)
            cat = field_stars[f.field]
            sxi, seta = _tan_project(cat["ra"], cat["dec"], tra, tdec)
            dfx, dfy = cd_inv @ np.vstack([sxi, seta])
            focal_x, focal_y = fcen[0] + dfx, fcen[1] + dfy
            mag = cat["mags"].get(f.filt, cat["mags"]["r"])
            if f.subtype == "sky":
                rate = float(np.mean([twilight_rate(f.t0 + q * texp, f.filt)
                                      for q in np.linspace(0, 1, 11)]))
                sky_rate = rate
                flux_scale = texp * 10 ** (-0.4 * (fp["k"] * sm - fp["zp"]))
            else:
                dark_sky = scale_nom ** 2 * 10 ** (-0.4 * (fp["sky"] - fp["zp"]))
                drift = 1.0 + 0.08 * math.sin(2 * math.pi * (tmid - noon0) / (6 * 3600.0) + skyph)
                sky_rate = dark_sky * (1.0 + 0.3 * (sm - 1.0)) * drift
                sky_rate += float(np.mean([twilight_rate(tmid + q * texp, f.filt)
                                           for q in (-0.5, 0.0, 0.5)])) - dark_sky
                flux_scale = texp * transp * 10 ** (-0.4 * (fp["k"] * sm - fp["zp"]))
            flux = flux_scale * 10 ** (-0.4 * mag)
            var_factor = None
            if variable_info is not None and f.field == variable_info["target"]:
                ts = f.t0 + np.linspace(0.0, texp, 16)
                lc = 1.0 - variable_info["depth"] * np.clip(
                    (variable_info["duration_s"] / 2.0 - np.abs(ts - variable_info["t0_unix"]))
                    / variable_info["ingress_s"], 0.0, 1.0)
                var_factor = float(lc.mean())
                flux = flux.copy()
                flux[cat["id"] == variable_info["id"]] *= var_factor
            stars_xy = (focal_x, focal_y, flux, mag)
            entry.update({
                "fwhm": _r(fwhm, 4), "fwhm_px": _r(fwhm / scale_f, 4), "beta": _r(beta, 4),
                "transparency": _r(transp, 5), "zeropoint": fp["zp"], "extinction": fp["k"],
                "sky_rate": _r(sky_rate, 4), "sky_e": _r(sky_rate * texp, 3),
                "variable_factor": None if var_factor is None else _r(var_factor, 7),
            })
        lamp_rate = None
        if f.kind == "flat" and f.subtype == "dome":
            lamp_rate = flat_level * float(np.mean([d.gain for d in dets])) / texp
            lamp_rate *= 1.0 + frng.normal(0.0, 0.01)
        if "factor" in f.extra:
            if lamp_rate is not None:
                lamp_rate *= f.extra["factor"]
            else:
                sky_rate *= f.extra["factor"]
                entry["sky_rate"] = _r(sky_rate, 4)
                entry["sky_e"] = _r(sky_rate * texp, 3)
        if lamp_rate is not None:
            entry["lamp_rate"] = _r(lamp_rate, 4)
        if f.kind == "arc":
            entry["arc_lines"] = {"focal_x": _r(arc_lines["focal_x"], 3),
                                  "sigma": _r(arc_lines["sigma"], 4),
                                  "rate": _r(arc_lines["rate"], 3)}

        hdus = [fits.PrimaryHDU(header=_primary_header(
            f, name, hra, hdec, s0, ccd_temp + frng.normal(0.0, 0.05), profile))]
        cr_arrays: dict[str, np.ndarray] = {}
        entry["detectors"] = {}
        for di, d in enumerate(dets):
            m = maps[d.name]
            drng = _rng(seed, "frame", utdate, f.label, d.name)
            ny, nd = geom.ny, geom.nd
            resp = m["responses"].get(f.filt)
            e = m["dark"] * texp
            det_truth: dict[str, Any] = {}
            if on_sky:
                x0 = stars_xy[0] - d.offset[0]
                y0 = stars_xy[1] - d.offset[1]
                near = (x0 > -60) & (x0 < nd + 60) & (y0 > -60) & (y0 < ny + 60)
                skyimg = sky_rate * texp
                if f.filt in m["fringe"] and f.kind != "flat":
                    skyimg = skyimg * (1.0 + float(fringe[f.filt]) * m["fringe"][f.filt])
                light = _render_stars(ny, nd, x0[near], y0[near], stars_xy[2][near],
                                      fwhm / scale_f, beta) + skyimg
                e = e + light * resp
                crpix = (fcen[0] - d.offset[0] + 1.0, fcen[1] - d.offset[1] + 1.0)
                det_truth["wcs"] = {
                    "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg", "CUNIT2": "deg",
                    "RADESYS": "ICRS", "CRVAL1": float(tra), "CRVAL2": float(tdec),
                    "CRPIX1": float(crpix[0]), "CRPIX2": float(crpix[1]),
                    "CD1_1": float(cd_t[0, 0]), "CD1_2": float(cd_t[0, 1]),
                    "CD2_1": float(cd_t[1, 0]), "CD2_2": float(cd_t[1, 1]),
                }
                on = (x0 >= -0.5) & (x0 < nd - 0.5) & (y0 >= -0.5) & (y0 < ny - 0.5)
                star_sel = np.nonzero(on)[0]
            elif lamp_rate is not None:
                lamp = lamp_rate * texp * resp
                if m["dome_illum"] is not None and f.subtype == "dome":
                    lamp = lamp * m["dome_illum"]
                e = e + lamp
            elif f.kind == "arc":
                from scipy.special import erf
                lx = arc_lines["focal_x"] - d.offset[0]
                ok = (lx > -5) & (lx < nd + 5)
                cols = np.arange(nd)[None, :]
                sg = arc_lines["sigma"][ok, None] * 2 ** 0.5
                prof = 0.5 * (erf((cols + 0.5 - lx[ok, None]) / sg) - erf((cols - 0.5 - lx[ok, None]) / sg))
                line = (prof * arc_lines["rate"][ok, None]).sum(axis=0) * texp
                e = e + line[None, :] * (1.0 + m["prnu"])
            counts = drng.poisson(e).astype(np.float64)
            if cosmic_rays:
                ncr = int(drng.poisson(cr_rate * area_cm2 * (texp + _CR_READOUT_S)))
                crd = _cosmic_rays(drng, ny, nd, ncr)
                counts += crd
            else:
                ncr, crd = 0, np.zeros((ny, nd))
            rn_adu = d.rdnoise / d.gain
            ovr = {"offset": drng.normal(0.0, 2.0), "amplitude": drng.uniform(0.5, 3.0),
                   "period": drng.uniform(0.6, 2.5) * ny, "phase": drng.uniform(0.0, 2 * math.pi),
                   "slope": drng.normal(0.0, 1.5)}
            rows = np.arange(ny)
            drift = (ovr["offset"] + ovr["amplitude"] * np.sin(2 * math.pi * rows / ovr["period"] + ovr["phase"])
                     + ovr["slope"] * (rows / (ny - 1) - 0.5))
            level = m["level"]
            sig_adu = counts / d.gain
            data = sig_adu + level + m["pattern"] + drift[:, None]
            bad = f.extra.get("bad")
            if bad == "light_leak":
                xx = np.arange(nd)[None, :] / nd
                yy = rows[:, None] / ny
                data = data + f.extra["amp"] * (0.5 * xx + 0.5 * yy) ** 2
            elif bad == "data_jump":
                data = data + f.extra["amp"]
            full = np.empty((ny, geom.nx))
            full[:, :nd] = data
            base = level + drift[:, None]
            if bad == "level_shift":
                full[:, :nd] += f.extra["amp"]
                base = base + f.extra["amp"]
            full[:, nd:] = base
            if geom.ntr >= 1:
                full[:, nd] += 0.01 * sig_adu[:, -1]
            if geom.ntr >= 2:
                full[:, nd + 1] += 0.002 * sig_adu[:, -1]
            full += rn_adu * drng.standard_normal((ny, geom.nx))
            full[:, :nd] = np.minimum(full[:, :nd], d.saturate)
            raw = np.clip(np.rint(full), 0, 65535).astype(np.uint16)
            ovr["mean"] = float(drift.mean()) + (f.extra["amp"] if bad == "level_shift" else 0.0)
            det_truth["overscan"] = {k: _r(v, 6) for k, v in ovr.items()}
            crmask = np.zeros((ny, geom.nx), bool)
            crmask[:, :nd] = crd >= CR_MASK_E
            yy_, xx_ = np.nonzero(crd > 0.5)
            cr_arrays[f"mask_{d.name}"] = crmask
            cr_arrays[f"y_{d.name}"] = yy_.astype(np.int32)
            cr_arrays[f"x_{d.name}"] = xx_.astype(np.int32)
            cr_arrays[f"e_{d.name}"] = crd[yy_, xx_].astype(np.float32)
            det_truth["cosmic_rays"] = {"file": f"cr/{Path(name).stem}.npz", "n_events": ncr,
                                        "n_pixels": int(crmask.sum())}
            if on_sky:
                sx = stars_xy[0][star_sel] - d.offset[0]
                sy = stars_xy[1][star_sel] - d.offset[1]
                ix = np.clip(np.rint(sx).astype(int), 0, nd - 1)
                iy = np.clip(np.rint(sy).astype(int), 0, ny - 1)
                det_truth["stars"] = {
                    "id": [int(v) for v in field_stars[f.field]["id"][star_sel]],
                    "x": _r(sx, 4), "y": _r(sy, 4),
                    "flux": _r(stars_xy[2][star_sel], 2),
                    "mag": _r(stars_xy[3][star_sel], 4),
                    "saturated": [bool(v) for v in raw[iy, ix] >= d.saturate],
                }
            entry["detectors"][d.name] = det_truth
            hdus.append(fits.ImageHDU(data=raw, header=_ext_header(d, geom, di, dets, profile)))
        if f.extra.get("bad"):
            p = {"file": name, "type": f.kind, "kind": f.extra["bad"]}
            p.update({k: _r(v, 4) for k, v in f.extra.items() if k != "bad"})
            planted.append(p)
            entry["planted"] = f.extra["bad"]
        _atomic_write(raw_dir / name, _fits_bytes(fits.HDUList(hdus)))
        _atomic_write(truth_dir / "cr" / f"{Path(name).stem}.npz", _npz_bytes(cr_arrays))
        files.append(raw_dir / name)
        frame_truth.append(entry)

    if overwrite:
        keep = {p.name for p in files}
        for p in existing:
            if p.name not in keep:
                p.unlink()

    # ------------------------------------------------------------------ truth images
    def det_fits(arrs: dict[str, np.ndarray], bunit: str) -> bytes:
        hl = [fits.PrimaryHDU()]
        for d in dets:
            h = fits.ImageHDU(np.asarray(arrs[d.name], np.float32), name=d.name)
            h.header["BUNIT"] = bunit
            hl.append(h)
        return _fits_bytes(fits.HDUList(hl))

    _atomic_write(truth_dir / "calib" / "bias_pattern.fits",
                  det_fits({d.name: maps[d.name]["pattern"] for d in dets}, "adu"))
    _atomic_write(truth_dir / "calib" / "dark_rate.fits",
                  det_fits({d.name: maps[d.name]["dark"] for d in dets}, "electron/s"))
    for f in (fringe or {}):
        _atomic_write(truth_dir / "calib" / f"fringe_{f}.fits",
                      det_fits({d.name: maps[d.name]["fringe"][f] for d in dets}, ""))
    filt_truth = {}
    for f in flat_filters:
        rel = f"calib/flat_response_{f}.fits"
        _atomic_write(truth_dir / rel, det_fits({d.name: maps[d.name]["responses"][f] for d in dets}, ""))
        fp = _FILTERS.get(f, _DEFAULT_FILTER)
        filt_truth[f] = {"zeropoint": fp["zp"], "extinction": fp["k"], "sky_dark": fp["sky"],
                         "flat_response": rel}
    det_truth_all = {}
    for di, d in enumerate(dets):
        m = maps[d.name]
        hx, hy, hr = m["hot"]
        dx_, dy_, dr = m["dead"]
        det_truth_all[d.name] = {
            "gain": d.gain, "rdnoise": d.rdnoise, "saturate": d.saturate,
            "bias_level": _r(m["level"], 6), "bias_pattern_mean": _r(m["pattern"].mean(), 6),
            "bias_pattern": "calib/bias_pattern.fits", "dark_rate_base": _r(m["dark_base"], 6),
            "dark_rate": "calib/dark_rate.fits",
            "hot_pixels": {"x": [int(v) for v in hx], "y": [int(v) for v in hy], "rate": _r(hr, 4)},
            "dead_pixels": {"x": [int(v) for v in dx_], "y": [int(v) for v in dy_], "response": _r(dr, 4)},
            "bad_column": m["bad_column"], "prnu_rms": 0.01, "offset": [_r(v) for v in d.offset],
        }

    # ------------------------------------------------------------------ catalogue & truth
    tab = Table()
    tab["id"] = np.concatenate(cat_rows["id"]).astype(np.int64)
    tab["field"] = np.concatenate(cat_rows["field"]).astype(str)
    tab["ra"] = np.round(np.concatenate(cat_rows["ra"]), 8)
    tab["ra"].unit = "deg"
    tab["dec"] = np.round(np.concatenate(cat_rows["dec"]), 8)
    tab["dec"].unit = "deg"
    for b in all_bands:
        tab[f"mag_{b}"] = np.round(np.concatenate(cat_rows[b]), 4)
        tab[f"mag_{b}"].unit = "mag"
    tab.meta["description"] = "reducer synthetic reference catalogue (exact magnitudes)"
    tab.meta["seed"] = seed
    sbuf = io.StringIO()
    tab.write(sbuf, format="ascii.ecsv")
    _atomic_write(catalog_path, sbuf.getvalue().encode())

    if variable_info is not None:
        variable_info.pop("t0_unix")
    truth = {
        "format": TRUTH_FORMAT, "version": TRUTH_VERSION, "seed": seed, "utdate": utdate,
        "instrument": instrument, "parameters": parameters,
        "site": {"longitude": lon, "latitude": lat, "height": height,
                 "timezone": site.get("timezone", "UTC")},
        "night": {"local_noon_start": _iso(noon0), "local_noon_end": _iso(noon1),
                  "mean_solar_midnight": _iso(midnight), "sunset": _iso(sunset),
                  "sunrise": _iso(sunrise), "evening_twilight_12": _iso(eve12),
                  "morning_twilight_12": _iso(morn12)},
        "geometry": {"shape": [geom.ny, geom.nx], "data_columns": geom.nd,
                     "transition_columns": geom.ntr, "overscan_columns": geom.nov,
                     "datasec": geom.datasec, "trimsec": geom.datasec, "biassec": geom.biassec,
                     "focal_center": [_r(fcen[0]), _r(fcen[1])],
                     "optical_center": [_r(opt_cen[0], 3), _r(opt_cen[1], 3)],
                     "pixel_size_um": PIXEL_SIZE_UM},
        "wcs_model": {"nominal_scale": scale_nom, "true_scale": _r(scale_true, 8),
                      "nominal_rotation": rot_nom, "true_rotation": _r(rot_true, 6),
                      "flip_x": flip_x, "pointing_error_arcsec": _r(perr, 4),
                      "pointing_jitter_arcsec": 1.0},
        "filters": filt_truth,
        "detectors": det_truth_all,
        "targets": target_info,
        "variable": variable_info,
        "planted": planted,
        "cr_mask_threshold_e": CR_MASK_E,
        "catalog": os.path.relpath(catalog_path.resolve(), truth_dir.resolve()),
        "frames": frame_truth,
    }
    truth_path = truth_dir / "truth.json"
    _atomic_write(truth_path, _json_bytes(truth))
    return SimulatedNight(raw_dir=raw_dir, files=files, truth_path=truth_path,
                          truth=json.loads(truth_path.read_text()), catalog_path=catalog_path,
                          truth_dir=truth_dir)


def _target_dict(t: Target) -> dict:
    d = {"name": t.name, "ra": t.ra, "dec": t.dec,
         "filters": list(t.filters) if t.filters else None, "nexp": t.nexp,
         "exptime": dict(t.exptime) if isinstance(t.exptime, Mapping) else t.exptime,
         "dither": t.dither, "program": t.program, "series": None, "variable": None}
    if t.series is not None:
        d["series"] = {"filter": t.series.filter, "nexp": t.series.nexp,
                       "exptime": t.series.exptime, "cadence": t.series.cadence}
    if t.variable is not None:
        v = t.variable
        d["variable"] = {"depth": v.depth, "duration": v.duration, "ingress": v.ingress,
                         "mag_r": v.mag_r, "t0_offset": v.t0_offset}
    return d


def _block_duration(tg: Target, filters: Sequence[str], nexp_per_filter: int) -> float:
    """Approximate duration of a target's block [s] (for spreading blocks over the night)."""
    d = 120.0
    for f in (tg.filters or filters):
        n = tg.nexp if tg.nexp is not None else nexp_per_filter
        d += 15.0 + n * (tg.exptime_for(f) + READOUT_S + (10.0 if tg.dither else 0.0) + 1.5)
    if tg.series is not None:
        d += 15.0 + tg.series.nexp * max(tg.series.cadence, tg.series.exptime + READOUT_S)
    return d


def _dither_offset(k: int, amp: float, rng: np.random.Generator) -> tuple[float, float]:
    """Dither pattern [px]: centre, then the corners of a square, then a smaller one."""
    if amp <= 0:
        return (0.0, 0.0)
    pat = [(0, 0), (1, 1), (-1, 1), (-1, -1), (1, -1), (0.5, 0), (0, 0.5), (-0.5, 0), (0, -0.5)]
    px, py = pat[k % len(pat)]
    j = rng.normal(0.0, 2.0, 2)
    return (float(amp * px + j[0]), float(amp * py + j[1]))


def _inside_points(rng, n, dets, geom, fcen, margin):
    """n random focal-plane offsets from the centre that land well inside a detector."""
    xs, ys = [], []
    for _ in range(n):
        d = dets[int(rng.integers(len(dets)))]
        mx = min(margin, 0.3 * geom.nd)
        my = min(margin, 0.3 * geom.ny)
        xs.append(d.offset[0] + rng.uniform(mx, geom.nd - 1 - mx) - fcen[0])
        ys.append(d.offset[1] + rng.uniform(my, geom.ny - 1 - my) - fcen[1])
    return np.array(xs), np.array(ys)


def _primary_header(f: _Frame, name: str, ra: float, dec: float, airmass: float,
                    ccdtemp: float, profile: dict):
    from astropy.io import fits

    h = fits.Header()
    h["IMAGETYP"] = (f.imagetyp, "frame type")
    h["OBJECT"] = (f.obj, "object name")
    h["FILTER"] = (f.filt, "filter")
    h["EXPTIME"] = (round(float(f.exptime), 3), "[s] exposure time")
    h["DATE-OBS"] = (_iso(f.t0), "UTC start of exposure")
    h["MJD-OBS"] = (round(float(_mjd(f.t0)), 8), "[d] MJD (UTC) start of exposure")
    h["TIMESYS"] = ("UTC", "time scale")
    h["RA"] = (_sexa_ra(ra), "telescope pointing RA (ICRS)")
    h["DEC"] = (_sexa_dec(dec), "telescope pointing Dec (ICRS)")
    h["EQUINOX"] = (2000.0, "equinox of RA/DEC")
    h["AIRMASS"] = (round(float(airmass), 4), "airmass at start")
    h["XBINNING"] = (1, "binning in x")
    h["YBINNING"] = (1, "binning in y")
    h["CCD-TEMP"] = (round(float(ccdtemp), 2), "[C] detector temperature")
    h["READOUTM"] = ("normal", "readout mode")
    h["PROGRAM"] = (f.program, "programme")
    h["OBSERVER"] = ("Demo Observer", "observer")
    h["INSTRUME"] = ("demo", "instrument")
    h["TELESCOP"] = ("Demo 1.0m", "telescope")
    h["OBSERVAT"] = (profile.get("site", {}).get("name", "Demo Observatory"), "observatory")
    h["FILENAME"] = (name, "original file name")
    h["NEXTEND"] = (len(profile["detectors"]), "number of extensions")
    return h


def _ext_header(d: _Det, geom: _Geom, di: int, dets, profile):
    from astropy.io import fits

    h = fits.Header()
    h["EXTNAME"] = (d.hdu, "extension name")
    h["CCDNAME"] = (d.name, "detector")
    h["BIASSEC"] = (geom.biassec, "overscan section")
    h["DATASEC"] = (geom.datasec, "data section")
    h["TRIMSEC"] = (geom.datasec, "trim section")
    x1 = int(round(d.offset[0])) + 1
    y1 = int(round(d.offset[1])) + 1
    h["DETSEC"] = (f"[{x1}:{x1 + geom.nd - 1},{y1}:{y1 + geom.ny - 1}]", "mosaic section")
    h["CCDSUM"] = ("1 1", "binning")
    h["GAIN"] = (d.gain, "[e-/ADU] gain")
    h["RDNOISE"] = (d.rdnoise, "[e-] read noise")
    h["SATURATE"] = (d.saturate, "[ADU] saturation level")
    return h


# --------------------------------------------------------------------------- CLI
def simulate_main(argv: Sequence[str] | None = None) -> int:
    """``reducer simulate DIR [--seed N] ...``: write a synthetic night into DIR.

    Returns
    -------
    int
        Exit status (0 on success).
    """
    ap = argparse.ArgumentParser(prog="reducer simulate",
                                 description="Write a seeded synthetic raw night of the demo camera "
                                             "(truth in DIR/../truth, catalogue in DIR/../refcat.ecsv).")
    ap.add_argument("dir", help="raw folder to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--utdate", default="20261120", help="YYYYMMDD (UT date of local midnight)")
    ap.add_argument("--filters", default="g,r", help="comma-separated filters (default g,r)")
    ap.add_argument("--flat-kind", choices=("dome", "sky", "both"), default="dome")
    ap.add_argument("--nbias", type=int, default=5)
    ap.add_argument("--ndark", type=int, default=3)
    ap.add_argument("--nflat", type=int, default=3)
    ap.add_argument("--nexp", type=int, default=4, help="dithered exposures per filter")
    ap.add_argument("--shape", default=None, help="ROWSxCOLS per detector (default 1024x544)")
    ap.add_argument("--arcs", action="store_true", help="add ArNe arc frames")
    ap.add_argument("--no-cosmic-rays", action="store_true")
    ap.add_argument("--no-standard", action="store_true")
    ap.add_argument("--bad-bias", choices=("light_leak", "level_shift", "data_jump"))
    ap.add_argument("--bad-flat", choices=("saturated", "low"))
    ap.add_argument("--truth-dir", default=None)
    ap.add_argument("--catalog", default=None)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    kw: dict[str, Any] = {}
    if a.shape:
        try:
            ny, nx = (int(v) for v in a.shape.lower().split("x"))
        except ValueError:
            ap.error("--shape must look like 1024x544")
        kw["shape"] = (ny, nx)
    t0 = time.perf_counter()
    try:
        night = make_night(
            a.dir, a.seed, utdate=a.utdate, filters=tuple(s for s in a.filters.split(",") if s),
            flat_kind=a.flat_kind, nbias=a.nbias, ndark=a.ndark, nflat=a.nflat,
            nexp_per_filter=a.nexp, include_arcs=a.arcs, cosmic_rays=not a.no_cosmic_rays,
            standard=not a.no_standard, bad_bias=a.bad_bias, bad_flat=a.bad_flat,
            truth_dir=a.truth_dir, catalog_path=a.catalog, overwrite=a.overwrite, **kw)
    except (ValueError, FileExistsError) as exc:
        print(f"reducer simulate: error: {exc}", file=sys.stderr)
        return 2
    if not a.quiet:
        counts: dict[str, int] = {}
        for fr in night.truth["frames"]:
            k = fr["type"] + (f"/{fr['subtype']}" if fr["subtype"] else "")
            counts[k] = counts.get(k, 0) + 1
        print(f"wrote {len(night.files)} frames to {night.raw_dir} in {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{v} {k}" for k, v in counts.items()))
        print(f"truth: {night.truth_path}")
        print(f"catalogue: {night.catalog_path}")
    return 0


main = simulate_main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(simulate_main())
