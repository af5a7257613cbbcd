"""Step 2 of a night: master bias, dark, flat (per filter) and arc (per OBJECT).

Recipes (seed 000, KPF), per detector, with the clipped-mean engine of
:mod:`reducer.ops.combine`:

- **bias**: bias frames with EXPTIME <= ``bias_exptime_max``; overscan-subtracted and trimmed
  where the profile has sections; clip 2.1. Unit ADU.
- **dark**: dark frames with EXPTIME >= ``dark_exptime_min``; minus the master bias, divided
  by the exposure time; clip 2.2. Unit ADU/s (a rate).
- **flat**: flat frames with EXPTIME <= ``flat_exptime_max``, dome and sky kept apart; minus
  the bias and the dark rate x EXPTIME; dome flats divided by EXPTIME, sky flats each by its
  own median; clip 2.3; then normalised: ``scalar`` (by one clipped median of gain x flat over
  the illuminated area of all detectors, so relative detector sensitivities are kept) or
  ``smooth`` (KPF: divided by a Gaussian-blurred copy, sigma 2, each region of an optional mask
  by its mode; pixels outside the regions or under 50 ADU before smoothing set to 1).
  Unit: none (normalised response).
- **arc**: arc frames of one OBJECT; minus bias and dark, divided by EXPTIME and by the flat
  (when one exists); clip 2.4. Unit ADU/s.

A set is keyed by what the profile declares must match (``[calib] set_keys``); frames of
different shape are never combined. A set with fewer frames than ``min_frames`` (default 3)
is not built; a profile may allow fewer (down to 1); a master of 1 or 2 frames is flagged
``FEWFRAME = T``. With fewer than :data:`SMALL_N` (5) frames the estimator is the plain mean
(``CLIPSIG = 0`` in the header): a robust sigma from the 16-84 percentiles of 2-4 values is
meaningless (with 3 frames the KPF clip rejects the farthest value about half the time,
which made the mean 1.7x noisier than the mean of 3 on simulated flats), and the
uncertainty plane is propagated from each frame's noise model (Poisson + read noise,
through the same scales) instead of the survivors' scatter, which underestimated it 3x on
simulated darks.

The output is one FITS file per set: per detector an image HDU named after the detector, plus
``<DET>_UNC`` and ``<DET>_CNT``; the primary header carries IMTYPE, NFRAMES, MINMJD, MAXMJD,
INFOBITS, CLIPSIG, the inputs with checksums, the masters used, the settings digest and the
reducer version.

Memory
------
:func:`build_master` never holds a whole input frame: everything it allocates stays within
``[combine] mem_limit_mb`` (default 256 MiB; the interpreter and libraries, ~80 MiB, come on
top) whatever the number of frames. Each (frame, detector) is a :class:`CalibratedSource`
that reads only the raw rows a strip needs (:mod:`reducer.fitsio_strips`; gzip, bzip2 and
LZW files are first decompressed once per frame, through a 1 MiB buffer, to a private
temporary folder, tile-compressed HDUs by blocks) and returns them overscan-subtracted,
trimmed and calibrated, with the saturation mask and the noise model, to the strip engine
:func:`reducer.ops.combine.combine`. The rows are computed with the arithmetic of the
in-memory recipe, in the same order and precision, so a master is bit-identical to the one
built from whole frames when the bound lets the pre-pass below be exact (it does for the
simulator's frames and the real test sets at 256 MiB). Per frame and detector:

1. *Overscan model*: one pass over the bias section by strips of rows (per-row levels are
   independent; ``axis = 'rows'`` gathers the overscan rows, a small block), then the model
   along the lines, as :func:`reducer.ops.overscan.subtract_overscan` does.
2. *Pre-pass*, only where a number needs the whole frame, by strips:

   - input screening (biases when there are >= 3, flats when the detector has a
     saturation level) runs :func:`screen_inputs` on b x b block-median images, b the
     smallest power of two for which they and the screening's work arrays fit in half the
     budget. b = 1 is the frames themselves (exactly the in-memory screening); for larger
     frames b is 4-8 (e.g. b = 8 for 20 frames of 2048 x 4096 at 256 MiB). Thresholds keep
     their meaning: the level is the median of the block medians (the same level to a
     small fraction of the read noise), the gradient test fits the same 8 x 8 grid of
     block medians and takes its pixel noise from the block-median image (about 1.25x
     more conservative than at full resolution; for frames this large the 2 x RN floor
     decides anyway). A flat's saturated fraction is always counted on every pixel, the
     block medians serve only its median tests;
   - the sky-flat scale: the clipped median of the calibrated illuminated area, on every
     k-th row, k the smallest for which the sample fits a quarter of the budget but with at
     least :data:`SAMPLE_MIN_VALUES` (131072) values: within 0.1 % of the whole-area value
     (tests/test_masters_memory.py measures a few 1e-5 on a vignetted dusty flat); k = 1
     (exact) whenever it fits.

3. *Bias pair difference* for the NOISE verification (:attr:`BuiltMaster.pair_diffs`):
   frame 1 - frame 2 on every k-th row, at most :data:`PAIR_DIFF_MAX_ROWS` rows and
   :data:`PAIR_DIFF_MAX_VALUES` values (the whole difference when the frames are smaller:
   1 Mi values give the single-frame noise to 0.07 %).

The outputs of the detectors done are kept for the flat normalisation and the file; when
they would squeeze the next detector's combine they are moved to memory-mapped files in the
temporary folder. The ``scalar`` normalisation takes its clipped median on every k-th row of
the illuminated areas (k = 1 whenever they fit), ``smooth`` runs by strips of rows
(bit-identical to :func:`smooth_normalise`); the file is written without copies. A bound too
small for one detector's outputs and one row of every frame is a :class:`MasterError` that
says so. :meth:`RawDetector.load` (whole frame) stays for the science steps.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# calibration sets (no pixels) live in reducer.calsets, cheap to import for the task
# generators; imported here for the recipes and for callers of reducer.masters
from .calsets import (DEFAULT_CLIP, DEFAULT_MIN_FRAMES, DEFAULT_SET_KEYS, IMTYPE,  # noqa: F401
                      CalSet, buildable, calib_settings, calibration_sets, frame_key,
                      matching_set)

BUNIT = {"bias": "adu", "dark": "adu/s", "flat": "", "arc": "adu/s"}
#: INFOBITS: bit i set when >= 1 % of detector i's pixels have fewer samples than this
INFOBITS_MIN_SAMPLES = {"bias": 10, "dark": 10, "flat": 10, "arc": 5}
FLAT_LOW_DN = 50.0
#: with fewer frames than this, a master's UNC is propagated from each frame's noise model
#: (Poisson + read noise) instead of the survivors' scatter
SMALL_N = 5
NO_CLIP = 1e9   # a clip half-width that keeps every value (the plain mean)
FLAT_SMOOTH_SIGMA = 2.0


class MasterError(ValueError):
    """A master cannot be built; the message says which set and why."""


# --------------------------------------------------------------------------- pixels
@dataclass
class RawDetector:
    """Pixels of one detector of a raw frame, overscan-subtracted and trimmed on demand."""

    path: Path
    hdu: int
    sections: dict
    overscan: dict
    saturate: float | None

    def load(self, with_level: bool = False):
        """Trimmed, overscan-subtracted float32 image (ADU) and its saturation mask; with
        ``with_level`` also the overscan level subtracted (ADU, the median of its model over
        the lines; 0.0 without an overscan section), e.g. to put the raw saturation level
        on the scale of the image."""
        from astropy.io import fits
        from .ops.overscan import subtract_overscan
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(self.path, memmap=False) as hdul:
                raw = np.asarray(hdul[self.hdu].data)
        trim = self.sections["trimsec"]
        img, lv = subtract_overscan(raw, self.sections["biassec"], trim, **self.overscan)
        mask = None
        if self.saturate is not None:
            mask = raw[trim] >= self.saturate
        if with_level:
            return img, mask, (float(np.median(lv)) if lv is not None else 0.0)
        return img, mask


def noise_model(signal_adu: np.ndarray, gain: float, rdnoise_e: float) -> np.ndarray:
    """1-sigma noise of a frame (ADU): Poisson on the signal plus read noise."""
    g = gain or 1.0
    return np.sqrt(np.clip(signal_adu, 0, None) / g + (rdnoise_e / g) ** 2).astype(np.float32)


def detector_inputs(profile, raw_dir: Path, frame, settings: dict) -> list[RawDetector]:
    """One :class:`RawDetector` per profile detector of a night-log row."""
    from .headers import read_headers
    from .instruments import detector_sections
    path = Path(raw_dir) / frame.file
    raw = read_headers(path)
    ov = settings.get("overscan", {})
    ov = {"axis": ov.get("axis", "columns"), "method": ov.get("method", "median"),
          "fit": ov.get("fit", "smooth"), "smooth_rows": int(ov.get("smooth_rows", 15))}
    out = []
    for det in profile.detectors:
        i = raw.hdu_index(det.hdu)
        secs = detector_sections(det, raw.headers[i], raw.shapes[i])
        out.append(RawDetector(path, i, secs, ov, det.saturate))
    return out


def clipped_median(values: np.ndarray) -> float:
    """3-sigma clipped median of the finite values."""
    from astropy.stats import sigma_clipped_stats
    v = values[np.isfinite(values)]
    if v.size == 0:
        raise MasterError("no finite pixel to normalise by")
    _, med, _ = sigma_clipped_stats(v, sigma=3.0, maxiters=5)
    return float(med)


def illuminated(shape, fraction: float = 0.8):
    """Central ``fraction`` of an image (the area used to normalise flats)."""
    ny, nx = shape
    dy, dx = int(ny * (1 - fraction) / 2), int(nx * (1 - fraction) / 2)
    return slice(dy, ny - dy), slice(dx, nx - dx)


def smooth_normalise(flat: np.ndarray, unc: np.ndarray, regions: np.ndarray | None = None,
                     sigma: float = FLAT_SMOOTH_SIGMA, low: float = FLAT_LOW_DN):
    """KPF flat normalisation (see the module docstring); returns (norm, unc) float32."""
    from scipy.ndimage import gaussian_filter
    f = np.where(np.isfinite(flat), flat, 0.0).astype(np.float64)
    w = np.isfinite(flat).astype(np.float64)
    blur = gaussian_filter(f, sigma) / np.maximum(gaussian_filter(w, sigma), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = f / blur
        runc = unc / blur
    out = np.ones_like(ratio)
    ounc = np.zeros_like(ratio)
    labels = np.ones(flat.shape, int) if regions is None else regions.astype(int)
    for lab in np.unique(labels[labels > 0]):
        sel = (labels == lab) & np.isfinite(ratio) & (flat >= low)
        if not sel.any():
            continue
        hist, edges = np.histogram(ratio[sel], bins=200, range=(0.5, 1.5))
        mode = 0.5 * (edges[hist.argmax()] + edges[hist.argmax() + 1])
        out[sel] = ratio[sel] / mode
        ounc[sel] = runc[sel] / mode
    return out.astype(np.float32), ounc.astype(np.float32)


# --------------------------------------------------------------------------- streaming
#: bias pair difference kept for NOISE verification: at most this many rows ...
PAIR_DIFF_MAX_ROWS = 2048
#: ... and this many values (every k-th row when the frame is larger; 1 Mi values give the
#: single-frame noise to 0.07 %)
PAIR_DIFF_MAX_VALUES = 2**20
#: smallest subsample (values) for the sky-flat median and the scalar flat normalisation
#: when the whole illuminated area does not fit the budget (>= 1e5 values: the clipped
#: median of a flat to better than 0.1 %, see tests/test_masters_memory.py)
SAMPLE_MIN_VALUES = 2**17
# measured peaks (tracemalloc), bytes per value, of what the pre-pass and the
# normalisation call on in-memory arrays
_SCREEN_BIAS_BYTES = (14, 56)   # per downsampled pixel: x N frames (held, stacked, median) + fixed
_SCREEN_FLAT_BYTES = 28         # per downsampled pixel (one frame at a time)
_CLIPPED_MEDIAN_BYTES = 32      # per sampled value (the sample + sigma_clipped_stats)
_SMOOTH_BYTES = 128             # per pixel of a smooth-normalisation strip (float64 work arrays)
_SOURCE_STATE_BYTES = 16384     # per open frame source: objects, descriptors (estimate)
_STRIP_CAP_BYTES = 16 * 2**20   # pre-pass strips are not made larger than this


class _Scratch:
    """A private temporary folder: uncompressed copies of compressed raw frames and
    spilled outputs; removed on exit."""

    def __init__(self):
        self._dir: Path | None = None
        self._plain: dict = {}
        self._n = 0

    def dir(self) -> Path:
        if self._dir is None:
            import tempfile
            self._dir = Path(tempfile.mkdtemp(prefix="reducer-master-"))
        return self._dir

    def plain(self, path) -> Path:
        """``path`` itself, or for a gzip/bzip2/LZW stream an uncompressed copy (made once,
        through a 1 MiB buffer) that every detector of the frame reads."""
        path = Path(path)
        if path not in self._plain:
            with open(path, "rb") as fh:
                head = fh.read(3)
            opener = None
            if head[:2] == b"\x1f\x8b":
                import gzip
                opener = gzip.open
            elif head[:3] == b"BZh":
                import bz2
                opener = bz2.open
            elif head[:2] == b"\x1f\x9d":
                import uncompresspy
                opener = uncompresspy.LZWFile
            out = path
            if opener is not None:
                import shutil
                from contextlib import closing
                self._n += 1
                out = self.dir() / f"raw{self._n:05d}.fits"
                with closing(opener(path, mode="rb")) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            self._plain[path] = out
        return self._plain[path]

    def spill(self, arr: np.ndarray) -> np.ndarray:
        """A file-backed (``.npy`` memory map) copy of ``arr``, written strip by strip."""
        self._n += 1
        mm = np.lib.format.open_memmap(self.dir() / f"out{self._n:05d}.npy", mode="w+",
                                       dtype=arr.dtype, shape=arr.shape)
        step = max(1, (4 << 20) // max(1, arr[0].nbytes))
        for y in range(0, arr.shape[0], step):
            mm[y:y + step] = arr[y:y + step]
        return mm

    def close(self) -> None:
        if self._dir is not None:
            import shutil
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _MasterRows:
    """Rows of one detector of a master (float32); the last strip read is kept, so the
    frames of a combine, read one after the other for the same rows, share one read."""

    def __init__(self, path, det: str):
        from .fitsio_strips import open_strip_source
        self.path = Path(path)
        self.src = open_strip_source(self.path, det)
        self.shape = tuple(self.src.shape)
        self._key = None
        self._rows = None

    def rows(self, y0: int, y1: int) -> np.ndarray:
        if self._key != (y0, y1):
            self._key, self._rows = None, None
            out = np.empty((y1 - y0, self.shape[1]), np.float32)
            self.src.read_into(y0, y1, out)
            self._key, self._rows = (y0, y1), out
        return self._rows

    def transient_bytes(self, nrows: int) -> int:
        return 4 * int(nrows) * self.shape[1] + int(self.src.transient_bytes(nrows))

    def close(self) -> None:
        self._key, self._rows = None, None
        self.src.close()


class CalibratedSource:
    """One detector of one raw frame as a strip source (:class:`reducer.ops.combine.StripSource`)
    of trimmed, calibrated rows, read without loading the frame.

    ``read_into(y0, y1, out)`` (rows of the *trimmed* image) reads only the raw rows it needs
    through :func:`reducer.fitsio_strips.open_strip_source`, subtracts the overscan level
    (modelled once per frame, on the first read, from the bias section read strip by strip
    with :func:`reducer.ops.overscan.line_levels` and ``model_levels``: the same numbers as
    :meth:`RawDetector.load`), trims, subtracts the rows of the master bias and of the dark
    rate x EXPTIME, divides by the rows of the flat, and returns the saturation mask (raw
    value >= SATURATE) or None.  ``read_unc`` gives the rows of :func:`noise_model` of the
    bias-subtracted signal (divided by ``|flat|`` when a flat divides the data), computed by
    the same read and kept for that one call.  All arithmetic is the one of the in-memory
    recipe, in the same order and precision, so the rows are bit-identical to it.

    Parameters
    ----------
    raw : RawDetector
    name : str
        Frame name (error messages).
    exptime : float
        Exposure time, s (scales the dark rate).
    gain, rdnoise : float
        e-/ADU and e- of the noise model.
    bias, dark, flat : _MasterRows, optional
        Masters to apply (bias subtracted; dark rate x ``exptime`` subtracted; flat divided).
    path : Path, optional
        File to read instead of ``raw.path`` (an uncompressed copy).
    prepare_rows : int
        Rows per read of the overscan pass.
    block_bytes : int
        Tile-compressed input: decompression block (see
        :class:`reducer.fitsio_strips.CompressedFitsSource`).
    """

    thread_safe = False
    has_unc = True

    def __init__(self, raw: RawDetector, *, name: str, exptime: float = 0.0, gain: float = 1.0,
                 rdnoise: float = 0.0, bias=None, dark=None, flat=None, path=None,
                 prepare_rows: int = 256, block_bytes: int = 16 * 2**20):
        from .fitsio_strips import open_strip_source
        self.raw = raw
        self.name = name
        trim = raw.sections["trimsec"]
        self._trim = trim
        self.shape = (trim[0].stop - trim[0].start, trim[1].stop - trim[1].start)
        self._src = open_strip_source(Path(path or raw.path), raw.hdu, block_bytes=block_bytes)
        nyr, nxr = self._src.shape
        self._full_width = trim[1].start == 0 and trim[1].stop == nxr
        self.has_mask = raw.saturate is not None
        self._sat = None if raw.saturate is None else np.float64(raw.saturate)
        self._gain, self._rdnoise = gain, rdnoise
        self._exptime = np.float32(exptime)
        self._bias, self._dark, self._flat = bias, dark, flat
        for m in (bias, dark, flat):
            if m is not None and m.shape != self.shape:
                self.close()
                raise MasterError(f"{name}: trimmed shape {self.shape} differs from master "
                                  f"{m.path.name} {m.shape}")
        self._axis = raw.overscan.get("axis", "columns")
        self.prepare_rows = max(1, int(prepare_rows))
        self._level = None
        self._prepared = False
        self._unc = None

    # -- overscan ------------------------------------------------------------------------
    def prepare(self) -> None:
        """Model the overscan level (one bounded pass over the bias section); idempotent."""
        if not self._prepared:
            self._level = self._overscan_levels()
            self._prepared = True

    def _overscan_levels(self):
        from .ops.overscan import line_levels, model_levels
        bs = self.raw.sections["biassec"]
        if bs is None:
            return None
        ov = self.raw.overscan
        method = ov.get("method", "median")
        raw_shape = tuple(self._src.shape)
        r0, r1 = bs[0].start, bs[0].stop
        h = self.prepare_rows
        if self._axis == "columns":
            # one level per row: the rows are independent, read them by strips
            levels = np.empty(r1 - r0)
            for a in range(r0, r1, h):
                b = min(r1, a + h)
                buf = np.empty((b - a, raw_shape[1]), np.float32)
                self._src.read_into(a, b, buf)
                levels[a - r0:b - r0] = line_levels(buf[:, bs[1]], "columns", method)
                del buf
        else:
            # one level per column over the overscan rows: gather that block (its rows x
            # columns, float32), then the same reduction as in memory
            region = np.empty((r1 - r0, bs[1].stop - bs[1].start), np.float32)
            for a in range(r0, r1, h):
                b = min(r1, a + h)
                buf = np.empty((b - a, raw_shape[1]), np.float32)
                self._src.read_into(a, b, buf)
                region[a - r0:b - r0] = buf[:, bs[1]]
                del buf
            levels = line_levels(region, "rows", method)
            del region
        model = model_levels(levels, ov.get("fit", "smooth"), int(ov.get("smooth_rows", 15)))
        ax = 0 if self._axis == "columns" else 1
        lines = range(raw_shape[ax])[bs[ax]]
        full = np.interp(np.arange(raw_shape[ax]), np.asarray(lines, float), model)
        return full[self._trim[ax]].astype(np.float32)

    def state_bytes(self) -> int:
        """Memory kept between reads (bytes): the level model and the objects."""
        return 4 * max(self.shape) + _SOURCE_STATE_BYTES

    def prepare_bytes(self) -> int:
        """Peak memory (bytes) of :meth:`prepare`."""
        bs = self.raw.sections["biassec"]
        if bs is None:
            return 0
        h = self.prepare_rows
        nos = bs[1].stop - bs[1].start
        strip = 4 * h * self._src.shape[1] + int(self._src.transient_bytes(h))
        if self._axis == "columns":
            return strip + 24 * h * nos + 8 * (bs[0].stop - bs[0].start)
        return strip + 20 * (bs[0].stop - bs[0].start) * nos + 16 * self._src.shape[1]

    # -- reading -------------------------------------------------------------------------
    def _check(self, y0, y1):
        y0, y1 = int(y0), int(y1)
        if not 0 <= y0 < y1 <= self.shape[0]:
            raise ValueError(f"{self.name}: row range {y0}:{y1} is not inside 0:{self.shape[0]}")
        return y0, y1

    def read_trimmed_into(self, y0: int, y1: int, out: np.ndarray):
        """Overscan-subtracted, trimmed rows ``y0:y1`` (ADU, what :meth:`RawDetector.load`
        gives) into float32 ``out``; returns the saturation mask rows or None."""
        y0, y1 = self._check(y0, y1)
        self.prepare()
        r0, r1 = self._trim[0].start + y0, self._trim[0].start + y1
        if self._full_width:
            self._src.read_into(r0, r1, out)
            view = out
        else:
            buf = np.empty((y1 - y0, self._src.shape[1]), np.float32)
            self._src.read_into(r0, r1, buf)
            view = buf[:, self._trim[1]]
        mask = None if self._sat is None else view >= self._sat
        lv = self._level
        if lv is None:
            if view is not out:
                np.copyto(out, view)
        elif self._axis == "columns":
            np.subtract(view, lv[y0:y1, None], out=out)
        else:
            np.subtract(view, lv[None, :], out=out)
        return mask

    def _calibrate(self, y0: int, y1: int, img: np.ndarray, want_unc: bool):
        """Apply the masters to ``img`` (rows y0:y1) in place; the UNC rows if asked."""
        mb = self._bias.rows(y0, y1) if self._bias is not None else None
        unc = None
        if want_unc:
            unc = noise_model(img - mb if mb is not None else img, self._gain, self._rdnoise)
        if mb is not None:
            np.subtract(img, mb, out=img)
        if self._dark is not None:
            np.subtract(img, self._dark.rows(y0, y1) * self._exptime, out=img)
        if self._flat is not None:
            mf = self._flat.rows(y0, y1)
            with np.errstate(divide="ignore", invalid="ignore"):
                np.divide(img, mf, out=img)
                if unc is not None:
                    np.divide(unc, np.abs(mf), out=unc)
        return unc

    def read_calibrated_into(self, y0: int, y1: int, out: np.ndarray):
        """Calibrated rows without the uncertainty; returns the mask rows or None."""
        mask = self.read_trimmed_into(y0, y1, out)
        self._calibrate(y0, y1, out, False)
        return mask

    def read_into(self, y0: int, y1: int, out: np.ndarray):
        """Calibrated rows ``y0:y1`` into float32 ``out``; returns the mask rows or None."""
        self._unc = None
        mask = self.read_trimmed_into(y0, y1, out)
        self._unc = (y0, y1, self._calibrate(y0, y1, out, True))
        return mask

    def read(self, y0: int, y1: int):
        """Calibrated rows as a new array, or ``(data, mask)`` with a saturation level."""
        y0, y1 = self._check(y0, y1)
        out = np.empty((y1 - y0, self.shape[1]), np.float32)
        mask = self.read_into(y0, y1, out)
        return out if mask is None else (out, mask)

    def read_unc(self, y0: int, y1: int) -> np.ndarray:
        """1-sigma uncertainty rows (ADU, or ADU / flat), :func:`noise_model`."""
        y0, y1 = self._check(y0, y1)
        if self._unc is None or self._unc[:2] != (y0, y1):
            self.read_into(y0, y1, np.empty((y1 - y0, self.shape[1]), np.float32))
        unc = self._unc[2]
        self._unc = None
        return unc

    def transient_bytes(self, nrows: int) -> int:
        """Peak memory (bytes) a read of ``nrows`` rows allocates besides ``out``: the raw
        rows and their reader's transient, the mask, the masters' rows, the noise model's
        temporaries (float64 at worst) and the UNC rows kept for :meth:`read_unc`."""
        nrows = int(nrows)
        px = nrows * self.shape[1]
        t = int(self._src.transient_bytes(nrows))
        if not self._full_width:
            t += 4 * nrows * self._src.shape[1]
        if self.has_mask:
            t += px
        for m in (self._bias, self._dark, self._flat):
            if m is not None:
                t += m.transient_bytes(nrows)
        return t + 28 * px

    def close(self) -> None:
        """Close the raw file (the masters belong to the caller)."""
        self._unc = None
        src = getattr(self, "_src", None)
        if src is not None:
            src.close()

    def __repr__(self) -> str:
        return f"CalibratedSource({self.name!r}, hdu={self.raw.hdu}, shape={self.shape})"


def _block_median_into(buf: np.ndarray, y0: int, b: int, small: np.ndarray) -> None:
    """Medians of the b x b blocks of the rows ``buf`` (starting at image row ``y0``, a
    multiple of b) into ``small``; rows and columns beyond whole blocks are left out."""
    if b == 1:
        small[y0:y0 + buf.shape[0]] = buf
        return
    nb = min(buf.shape[0] // b, small.shape[0] - y0 // b)
    if nb <= 0:
        return
    wb = small.shape[1]
    # a copy (the transpose is not contiguous), sorted in place: numpy's vectorised sort of
    # short rows is ~6x faster than the partition of np.median, with the same result (the
    # mean of the two middle values; NaN when the block has a NaN)
    blocks = buf[:nb * b, :wb * b].reshape(nb, b, wb, b).transpose(0, 2, 1, 3).reshape(nb, wb, b * b)
    blocks.sort(axis=-1)
    m = b * b // 2
    out = small[y0 // b:y0 // b + nb]
    np.add(blocks[..., m - 1], blocks[..., m], out=out)
    out *= np.float32(0.5)
    out[np.isnan(blocks[..., -1])] = np.nan


def _too_small(cs, det, what: str, need: float, mem: int):
    return MasterError(f"{cs.name}: mem_limit {mem / 2**20:.0f} MiB is too small to {what} on "
                       f"{det.name} (needs about {need / 2**20:.1f} MiB more); raise "
                       f"[combine] mem_limit_mb")


# --------------------------------------------------------------------------- building
@dataclass
class BuiltMaster:
    """What :func:`build_master` produced (for the report and the registry)."""

    path: Path
    imtype: str
    nframes: int
    infobits: int
    fewframes: bool
    rejected: list = field(default_factory=list)   # (file, reason) of inputs screened out
    pair_diffs: dict = field(default_factory=dict)  # bias: detector -> frame1 - frame2 (ADU), every k-th row


def build_master(cs: CalSet, *, night, out_path: Path, bias: Path | None = None,
                 dark: Path | None = None, flat: Path | None = None,
                 masters_info=(), mem_limit: int | None = None) -> BuiltMaster:
    """Build one master FITS file from its calibration set (reads raw frames, writes one file).

    Frames are read strip by strip (:class:`CalibratedSource`); everything allocated here
    stays within the memory bound (module docstring, "Memory").

    Parameters
    ----------
    cs : CalSet
    night : reducer.night.Night
    out_path : Path
        Where to write (atomically).
    bias, dark, flat : Path, optional
        Masters to apply (per the recipe of ``cs.imtype``).
    masters_info : iterable of (role, name, origin)
        Provenance of those masters, for the header.
    mem_limit : int, optional
        Memory bound, bytes (default ``[combine] mem_limit_mb``, 256 MiB).

    Raises
    ------
    MasterError
        The set cannot be built (every frame screened out, EXPTIME, shapes, a sky flat
        without signal, a memory bound too small for the frames).
    """
    from astropy.io import fits
    from .fitsio import add_provenance, sha256_file, write_fits
    settings = night.settings
    c = calib_settings(settings)
    nsigma = float(c["clip"][cs.imtype])
    mem = int(mem_limit or settings.get("combine", {}).get("mem_limit_mb", 256) * 2**20)
    profile = night.profile
    frames = sorted(cs.frames, key=lambda f: f.mjd)
    inputs = [detector_inputs(profile, night.raw_dir, f, settings) for f in frames]
    prim = fits.Header()
    hdus = [None]
    infobits = 0
    det_results = {}
    rejected: list = []
    pair_diffs: dict = {}
    with _Scratch() as scratch:
        held = 0            # bytes kept in memory from one detector to the next
        in_memory = []      # detectors whose outputs are in memory (not spilled)
        for d, det in enumerate(profile.detectors):
            trim = inputs[0][d].sections["trimsec"]
            out_bytes = 10 * (trim[0].stop - trim[0].start) * (trim[1].stop - trim[1].start)
            if in_memory and mem - held < 3 * out_bytes:
                # the outputs of the detectors done would squeeze this one: to disk
                for name in in_memory:
                    res = det_results[name]
                    held -= res.data.nbytes + res.unc.nbytes + res.cnt.nbytes
                    res.data, res.unc, res.cnt = (scratch.spill(res.data), scratch.spill(res.unc),
                                                  scratch.spill(res.cnt))
                in_memory = []
            res, bad, diff = _build_detector(cs, det, [dets[d] for dets in inputs], frames,
                                             nsigma=nsigma, budget=mem - held, mem=mem,
                                             scratch=scratch, bias=bias, dark=dark, flat=flat)
            for f, reason in bad.items():
                rejected.append((f, f"{det.name}: {reason}"))
            if diff is not None:
                pair_diffs[det.name] = diff
                held += diff.nbytes
            det_results[det.name] = res
            in_memory.append(det.name)
            held += res.data.nbytes + res.unc.nbytes + res.cnt.nbytes
            need = INFOBITS_MIN_SAMPLES[cs.imtype]
            nlow = 0
            step = max(1, (4 << 20) // max(1, res.cnt[0].nbytes))
            for y in range(0, res.cnt.shape[0], step):
                nlow += int(np.count_nonzero(res.cnt[y:y + step] < need))
            if nlow / res.cnt.size >= 0.01:
                infobits |= 1 << d
        if cs.imtype == "flat":
            _normalise_flats(det_results, profile, c, budget=mem - held)
        for det in profile.detectors:
            res = det_results[det.name]
            h = fits.Header()
            h["BUNIT"] = BUNIT[cs.imtype]
            # no copies: astropy byte-swaps writable arrays in place to write them
            cnt = res.cnt if res.cnt.dtype == np.int16 else res.cnt.astype(np.int16)
            hdus.append(fits.ImageHDU(np.asarray(res.data, np.float32), header=h, name=det.name))
            hdus.append(fits.ImageHDU(np.asarray(res.unc, np.float32), name=f"{det.name}_UNC"))
            hdus.append(fits.ImageHDU(cnt, name=f"{det.name}_CNT"))
        n = len(frames)
        prim["IMTYPE"] = (IMTYPE[cs.imtype], "master calibration type")
        prim["INSTRUME"] = (profile.name, "reducer instrument profile")
        prim["NIGHT"] = (night.utdate, "observing night (UT date)")
        prim["NFRAMES"] = (n, "number of input frames")
        prim["MINMJD"] = (round(min(f.mjd for f in frames), 8), "earliest input MJD (UTC)")
        prim["MAXMJD"] = (round(max(f.mjd for f in frames), 8), "latest input MJD (UTC)")
        prim["INFOBITS"] = (infobits, f"bit i: 1% of det i px <{INFOBITS_MIN_SAMPLES[cs.imtype]} samples")
        prim["CLIPSIG"] = (nsigma if n >= SMALL_N else 0.0,
                           "clip, robust sigmas (P84-P16)/2; 0 none")
        few = n < DEFAULT_MIN_FRAMES
        prim["FEWFRAME"] = (few, f"fewer than {DEFAULT_MIN_FRAMES} frames")
        prim["ESTIMATR"] = ("clipped mean" if n >= SMALL_N else (f"mean of {n}" if n > 1 else "single frame"),
                            "combine estimator")
        for k, v in cs.key.items():
            if v:
                prim[f"SET{k[:5].upper()}"] = (str(v)[:60], f"calibration set key {k}")
        if cs.imtype == "flat":
            prim["FLATNORM"] = (c["flat_normalise"], "flat normalisation method")
        add_provenance(prim, inputs=[(f.file, sha256_file(night.raw_dir / f.file)) for f in frames],
                       masters=masters_info, digest=night.digest("calib"), step=f"master {cs.imtype}")
        hdus[0] = fits.PrimaryHDU(header=prim)
        write_fits(fits.HDUList(hdus), out_path)
        del hdus, det_results
    return BuiltMaster(Path(out_path), cs.imtype, n, infobits, few, rejected, pair_diffs)


def _build_detector(cs: CalSet, det, raws: list, frames: list, *, nsigma: float, budget: int,
                    mem: int, scratch: _Scratch, bias, dark, flat):
    """Screen and combine one detector of a set within ``budget`` bytes.

    Returns (CombineResult, {file: reason} of screened-out frames, bias pair difference or None).
    """
    from .ops.combine import combine
    imtype = cs.imtype
    masters: list = []
    sources: list = []
    try:
        def master(path):
            m = _MasterRows(path, det.name)
            masters.append(m)
            return m

        mb = master(bias) if bias else None
        md = master(dark) if dark and imtype in ("flat", "arc") else None
        mf = master(flat) if flat and imtype == "arc" else None
        for f, rd in zip(frames, raws):
            sources.append(CalibratedSource(rd, name=f.file, exptime=f.exptime,
                                            gain=det.gain or 1.0, rdnoise=det.rdnoise or 0.0,
                                            bias=mb, dark=md, flat=mf,
                                            path=scratch.plain(rd.path),
                                            block_bytes=int(min(16 * 2**20,
                                                                max(2**20, budget // 32)))))
        ny, nx = sources[0].shape
        avail = budget - sum(s.state_bytes() for s in sources)
        # overscan pass: rows per read so that one pass takes at most a quarter of the budget
        s0 = sources[0]
        bs = s0.raw.sections["biassec"]
        if bs is not None:
            nxr = s0._src.shape[1]
            per = 4 * nxr + (s0._src.transient_bytes(2) - s0._src.transient_bytes(1)) \
                + 24 * (bs[1].stop - bs[1].start)
            rows = int(max(1, min(1024, (avail // 4) // max(per, 1))))
            for s in sources:
                s.prepare_rows = rows
            if s0.prepare_bytes() > avail:
                raise _too_small(cs, det, "model the overscan", s0.prepare_bytes() - avail, mem)
        for s in sources:       # now, one frame at a time, not inside the combine's budget
            s.prepare()

        bad, sky = _prepass(cs, det, frames, sources, avail, mem)

        kept = [(f, s) for f, s in zip(frames, sources) if f.file not in bad]
        for f, s in zip(frames, sources):
            if f.file in bad:
                s.close()
        if not kept:
            raise MasterError(f"{cs.name}: every input frame was screened out on {det.name}: "
                              + "; ".join(f"{f}: {r}" for f, r in bad.items()))
        scales = []
        for f, s in kept:
            if imtype in ("dark", "arc") or (imtype == "flat" and cs.key.get("subtype") != "sky"):
                if not f.exptime > 0:
                    raise MasterError(f"{f.file}: EXPTIME {f.exptime} s: cannot make a rate")
                scales.append(1.0 / f.exptime)
            elif imtype == "flat":
                med = sky[f.file]
                if not med > 0:
                    raise MasterError(f"{f.file}: sky flat median {med:.1f} ADU is not positive")
                scales.append(1.0 / med)
            else:
                scales.append(1.0)
        diff = None
        if imtype == "bias" and len(kept) >= 2:
            # the difference of two frames: their noise without the fixed pattern
            diff = _pair_diff(kept[0][1], kept[1][1], avail)
            avail -= diff.nbytes
        srcs = [s for _, s in kept]
        # below SMALL_N frames the percentile sigma of 2-4 values says nothing (with 3 frames
        # the farthest is clipped half the time, which inflates the noise of the mean by ~1.7x
        # and its scatter-based UNC underestimates it 3x): plain mean, UNC from the frames'
        # noise model
        small = len(srcs) < SMALL_N
        try:
            res = combine(srcs, NO_CLIP if small else nsigma, mem_limit=max(avail, 0),
                          scales=scales, unc_from="input" if small else "scatter")
        except ValueError as exc:
            if "mem_limit" not in str(exc):
                raise
            raise MasterError(f"{cs.name}: {det.name}: {exc}; raise [combine] mem_limit_mb") from None
        return res, bad, diff
    finally:
        for s in sources:
            s.close()
        for m in masters:
            m.close()


def _prepass(cs: CalSet, det, frames, sources, avail: int, mem: int):
    """The per-frame numbers that need a whole frame, from one bounded pass per frame.

    Returns ({file: reason} of screened-out frames, {file: sky-flat clipped median}).

    - Screening (biases when there are >= 3, flats when the detector has a saturation
      level) works on each frame's b x b block-median image, b the smallest power of two
      for which those images and :func:`screen_inputs` fit in half the budget (b = 1, the
      frames themselves, whenever they fit: then screening is exactly the in-memory one).
      Flats' saturated fraction is always counted on every pixel.
    - Sky flats: the clipped median of the calibrated illuminated area, on every k-th row
      of it, k the smallest that fits a quarter of the budget, with at least
      :data:`SAMPLE_MIN_VALUES` values (k = 1, exact, whenever it fits).
    """
    imtype = cs.imtype
    n = len(sources)
    ny, nx = sources[0].shape
    need_bias = imtype == "bias" and n >= 3
    need_flat = imtype == "flat" and bool(det.saturate)
    need_sky = imtype == "flat" and cs.key.get("subtype") == "sky"
    if not (need_bias or need_flat or need_sky):
        return {}, {}
    b, screen = 1, 0
    if need_bias or need_flat:
        per, fixed = _SCREEN_BIAS_BYTES if need_bias else (0, _SCREEN_FLAT_BYTES)
        while True:
            screen = (per * n + fixed) * (ny // b) * (nx // b)
            if screen <= avail // 2:
                break
            if min(ny, nx) // (2 * b) < 16:
                raise _too_small(cs, det, "screen the input frames", screen - avail // 2, mem)
            b *= 2
    ys, xs = illuminated((ny, nx))
    sample_rows = np.arange(0)
    sample_bytes = 0
    if need_sky:
        width = xs.stop - xs.start
        smax = max(SAMPLE_MIN_VALUES, (avail // 4) // _CLIPPED_MEDIAN_BYTES)
        k = max(1, -(-((ys.stop - ys.start) * width) // smax))
        sample_rows = np.arange(ys.start, ys.stop, k)
        sample_bytes = _CLIPPED_MEDIAN_BYTES * sample_rows.size * width
    s0 = sources[0]
    per_row = nx * (4 + 8) + s0.transient_bytes(1) - s0.transient_bytes(0)
    free = avail - screen - sample_bytes - s0.transient_bytes(0)
    h = min(free // per_row, max(1, _STRIP_CAP_BYTES // (4 * nx)), ny + b)
    h = h // b * b
    if h < b:
        raise _too_small(cs, det, "read the input frames", b * per_row - free, mem)

    smalls, sky, bad = [], {}, {}
    sat = None if det.saturate is None else np.float64(det.saturate)
    for f, s in zip(frames, sources):
        small = np.empty((ny // b, nx // b), np.float32) if (need_bias or need_flat) else None
        sample = np.empty((sample_rows.size, xs.stop - xs.start), np.float32) if need_sky else None
        nsat = nfin = 0
        for y0 in range(0, ny, h):
            y1 = min(ny, y0 + h)
            buf = np.empty((y1 - y0, nx), np.float32)
            s.read_trimmed_into(y0, y1, buf)
            if small is not None:
                _block_median_into(buf, y0, b, small)
            if need_flat and b > 1:
                nsat += int(np.count_nonzero(buf >= sat))
                nfin += int(np.count_nonzero(np.isfinite(buf)))
            if need_sky:
                lo, hi = np.searchsorted(sample_rows, [y0, y1])
                if hi > lo:
                    s._calibrate(y0, y1, buf, False)
                    sample[lo:hi] = buf[sample_rows[lo:hi] - y0, xs]
            del buf
        if need_sky:
            sky[f.file] = clipped_median(sample)
            del sample
        if need_bias:
            smalls.append((f, small, None))
        elif need_flat:
            bad.update(screen_inputs("flat", [(f, small, None)], det,
                                     saturated={f.file: (nsat, nfin)} if b > 1 else None))
        del small
    if need_bias:
        bad = screen_inputs("bias", smalls, det)
    return bad, sky


def _pair_diff(s1: CalibratedSource, s2: CalibratedSource, avail: int) -> np.ndarray:
    """frame 1 - frame 2 (calibrated, ADU) on every k-th row: the whole frames when they have
    at most :data:`PAIR_DIFF_MAX_ROWS` rows and :data:`PAIR_DIFF_MAX_VALUES` values."""
    ny, nx = s1.shape
    k = max(1, -(-ny // PAIR_DIFF_MAX_ROWS), -(-ny * nx // PAIR_DIFF_MAX_VALUES),
            -(-4 * ny * nx // max(avail // 16, 1)))
    rows = range(0, ny, k)
    out = np.empty((len(rows), nx), np.float32)
    if k == 1:
        h = max(1, min(ny, (avail // 4) // max(1, 8 * nx + s1.transient_bytes(1)), 256))
        for y0 in range(0, ny, h):
            y1 = min(ny, y0 + h)
            a = np.empty((y1 - y0, nx), np.float32)
            s1.read_calibrated_into(y0, y1, a)
            b = np.empty((y1 - y0, nx), np.float32)
            s2.read_calibrated_into(y0, y1, b)
            np.subtract(a, b, out=out[y0:y1])
            del a, b
        return out
    a = np.empty((1, nx), np.float32)
    b = np.empty((1, nx), np.float32)
    for j, y in enumerate(rows):
        s1.read_calibrated_into(y, y + 1, a)
        s2.read_calibrated_into(y, y + 1, b)
        np.subtract(a[0], b[0], out=out[j])
    return out


def screen_inputs(imtype: str, loaded, det, *, saturated: dict | None = None) -> dict:
    """Input frames of one detector that must not go into the master: {file: reason}.

    Biases: a light leak or a level far from the other frames'; flats: saturated or too
    faint (see :mod:`reducer.verify`). Darks and arcs are not screened here.

    Parameters
    ----------
    imtype : str
    loaded : list of (frame, image, mask)
        The overscan-subtracted trimmed images (ADU), or block-median images of them
        (:func:`build_master` passes those when the frames do not fit the memory bound).
    det : Detector
    saturated : dict, optional
        ``{file: (n_saturated, n_finite)}`` counted on every pixel of each flat; when
        given, the saturated-fraction test uses these counts instead of ``image`` (whose
        block medians would hide scattered saturated pixels) and ``image`` serves the
        median tests only.
    """
    from . import verify as V
    bad = {}
    if imtype == "bias" and len(loaded) >= 3:
        levels = [float(np.nanmedian(img)) for _, img, _ in loaded]
        expected = float(np.median(levels))
        rn = (det.rdnoise or 0.0) / (det.gain or 1.0) or 1.0
        # the detector's own fixed pattern is in every frame: judge each frame against the
        # median of the stack, so only what one frame has and the others lack counts
        reference = np.median(np.stack([img for _, img, _ in loaded]), axis=0)
        for (f, img, _), lv in zip(loaded, levels):
            r = V.screen_bias_frame(img, expected_level=expected, read_noise_adu=rn,
                                    reference=reference)
            if r:
                bad[f.file] = r
    elif imtype == "flat" and det.saturate:
        fmax = V.DEFAULTS["screen_flat_sat_frac_max"]
        for f, img, _ in loaded:
            counts = None if saturated is None else saturated.get(f.file)
            if counts is None:
                r = V.screen_flat_frame(img, saturate_adu=det.saturate)
            elif counts[1] == 0:
                r = "no finite pixels"
            elif counts[0] / counts[1] > fmax:
                frac = counts[0] / counts[1]
                r = (f"saturated: {frac * 100:.3g} % of pixels at or above saturation "
                     f"{float(det.saturate):.6g} ADU (limit {fmax * 100:.3g} %)")
            else:
                r = V.screen_flat_frame(img, saturate_adu=det.saturate,
                                        thresholds={"screen_flat_sat_frac_max": 1.0})
            if r:
                bad[f.file] = r
    return bad


def _normalise_flats(results: dict, profile, c: dict, budget: int | None = None) -> None:
    """Normalise the combined flats in place (module docstring); bounded by ``budget``
    bytes: ``scalar`` takes its clipped median on every k-th row of the illuminated areas
    (k = 1, exact, whenever they fit), ``smooth`` works by strips of rows."""
    budget = int(budget if budget is not None else 2**62)
    method = c["flat_normalise"]
    if method == "smooth":
        regions = None
        try:
            if c.get("flat_regions"):
                from .fitsio_strips import open_strip_source
                regions = open_strip_source(c["flat_regions"])
            for name, res in results.items():
                if regions is not None and tuple(regions.shape) != res.data.shape:
                    raise MasterError(f"flat_regions {c['flat_regions']}: shape {regions.shape} "
                                      f"differs from detector {name} {res.data.shape}")
                _smooth_normalise_inplace(res.data, res.unc, regions,
                                          float(c.get("flat_smooth_sigma", FLAT_SMOOTH_SIGMA)),
                                          float(c.get("flat_low_dn", FLAT_LOW_DN)), budget)
        finally:
            if regions is not None:
                regions.close()
        return
    gains = {d.name: (d.gain or 1.0) for d in profile.detectors}
    areas = {n: illuminated(res.data.shape) for n, res in results.items()}
    total = sum((a[0].stop - a[0].start) * (a[1].stop - a[1].start) for a in areas.values())
    smax = max(SAMPLE_MIN_VALUES, (budget // 2) // (_CLIPPED_MEDIAN_BYTES + 8))
    k = max(1, -(-total // smax))
    vals = np.concatenate([(res.data[areas[n][0]][::k, areas[n][1]] * gains[n]).ravel()
                           for n, res in results.items()])
    norm = clipped_median(vals)
    del vals
    if not norm > 0:
        raise MasterError(f"flat level {norm} is not positive")
    for n, res in results.items():
        f = np.float32(gains[n] / norm)
        step = max(1, (4 << 20) // max(1, res.data[0].nbytes))
        for y in range(0, res.data.shape[0], step):
            res.data[y:y + step] *= f
            res.unc[y:y + step] *= f


def _smooth_normalise_inplace(data: np.ndarray, unc: np.ndarray, regions, sigma: float,
                              low: float, budget: int) -> None:
    """:func:`smooth_normalise` of (``data``, ``unc``) by strips of rows, written back into
    them; bit-identical to it (each strip is blurred with the rows of the Gaussian's
    radius on either side, the modes come from histograms summed over the strips).
    ``regions``: None or a strip source of the region map."""
    from scipy.ndimage import gaussian_filter
    ny, nx = data.shape
    r = int(4.0 * float(sigma) + 0.5)        # scipy's radius for truncate=4
    h = int(max(r, 1, min(ny, budget // (_SMOOTH_BYTES * nx) - 2 * r)))
    nbins, rng = 200, (0.5, 1.5)
    edges = np.histogram_bin_edges(np.zeros(0), bins=nbins, range=rng)

    def labels_of(y0, y1):
        if regions is None:
            return np.ones((y1 - y0, nx), int)
        lab = np.empty((y1 - y0, nx), np.float32)
        regions.read_into(y0, y1, lab)
        return lab.astype(int)

    def strip(y0, y1, above):
        """(ratio, runc, own flat rows) of rows y0:y1; ``above``: the original rows
        just above y0 (None: read them from ``data``)."""
        a0, a1 = max(0, y0 - r), min(ny, y1 + r)
        raw = np.empty((a1 - a0, nx), np.float32)
        if above is not None:
            raw[:y0 - a0] = above
            raw[y0 - a0:] = data[y0:a1]
        else:
            raw[:] = data[a0:a1]
        good = np.isfinite(raw)
        f = np.where(good, raw, 0.0).astype(np.float64)
        w = good.astype(np.float64)
        del good
        blur = gaussian_filter(f, sigma) / np.maximum(gaussian_filter(w, sigma), 1e-12)
        del w
        s = slice(y0 - a0, y1 - a0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = f[s] / blur[s]
            runc = unc[y0:y1] / blur[s]
        return ratio, runc, raw[s]

    hist: dict = {}
    for y0 in range(0, ny, h):
        y1 = min(ny, y0 + h)
        ratio, _, flat = strip(y0, y1, None)
        labels = labels_of(y0, y1)
        ok = np.isfinite(ratio) & (flat >= low)
        for lab in np.unique(labels[labels > 0]):
            sel = (labels == lab) & ok
            if sel.any():
                cnt = np.histogram(ratio[sel], bins=nbins, range=rng)[0]
                hist[lab] = hist[lab] + cnt if lab in hist else cnt
    modes = {}
    for lab in sorted(hist):
        i = int(hist[lab].argmax())
        modes[lab] = 0.5 * (edges[i] + edges[i + 1])
    above = None
    for y0 in range(0, ny, h):
        y1 = min(ny, y0 + h)
        ratio, runc, flat = strip(y0, y1, above)
        labels = labels_of(y0, y1)
        ok = np.isfinite(ratio) & (flat >= low)
        out = np.ones_like(ratio)
        ounc = np.zeros_like(ratio)
        for lab, mode in modes.items():
            sel = (labels == lab) & ok
            out[sel] = ratio[sel] / mode
            ounc[sel] = runc[sel] / mode
        above = np.array(data[max(0, y1 - r):y1])    # originals the next strip blurs with
        data[y0:y1] = out.astype(np.float32)
        unc[y0:y1] = ounc.astype(np.float32)


def write_sidecar(path: Path, payload: dict) -> None:
    """The master's JSON sidecar (verification, inputs, choices), written atomically."""
    from .fitsio import atomic_write_text
    atomic_write_text(Path(path), json.dumps(payload, indent=2, sort_keys=True, default=str))
