"""PNG plots of the final report (matplotlib, Agg backend; imported inside each function).

Every function writes one PNG atomically and returns its path; images are small (a night
report is mailed) and readable on a laptop screen.
"""
from __future__ import annotations

import math
from pathlib import Path

#: colours per filter (common names first; others take the next free colour)
FILTER_COLOURS = {"u": "#7b3294", "U": "#7b3294", "B": "#2166ac", "g": "#1a9850", "V": "#66a61e",
                  "r": "#d73027", "R": "#d73027", "i": "#8c510a", "I": "#8c510a", "z": "#404040",
                  "Ha": "#e7298a", "ha": "#e7298a"}
_SPARE = ["#1f78b4", "#ff7f00", "#6a3d9a", "#b15928", "#33a02c", "#e31a1c", "#a6cee3", "#fb9a99"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path, dpi: int = 90) -> Path:
    from .fitsio import atomic_path
    out = Path(out)
    with atomic_path(out, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    _pyplot().close(fig)
    return out


def filter_colours(filters) -> dict:
    """A colour per filter name (stable: the usual filters always get the same colour)."""
    out, spare = {}, iter(_SPARE * 4)
    for f in sorted(set(filters)):
        out[f] = FILTER_COLOURS.get(f) or next(spare)
    return out


def _ut(date_obs: str):
    from datetime import datetime, timezone
    try:
        t = datetime.fromisoformat(date_obs.replace("Z", ""))
    except ValueError:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t


def night_trends(frames, out: Path, *, title: str = "") -> Path | None:
    """FWHM, sky, zero point and airmass of every frame through the night (vs UT).

    Parameters
    ----------
    frames : list of reducer.nightsummary.FrameSummary
        Science and standard frames. Standards are drawn as stars, science frames as dots,
        frames rejected by the quality limits hollow; frames that failed appear (as x) in
        the airmass panel only.
    out : Path
        PNG to write.

    Returns
    -------
    Path or None
        ``None`` when no frame has a time.
    """
    pts = [(f, _ut(f.date_obs)) for f in frames]
    pts = [(f, t) for f, t in pts if t is not None]
    if not pts:
        return None
    plt = _pyplot()
    import matplotlib.dates as mdates
    colours = filter_colours(f.filter for f, _ in pts)
    relative = any(f.relative for f, _ in pts) and not any(
        _finite_zp(f) and not f.relative for f, _ in pts)
    panels = [("fwhm", 'FWHM (")'), ("sky_rate", "sky (e-/s/px)"),
              ("zp", "relative zero point (mag)" if relative else "zero point (mag)"),
              ("airmass", "airmass")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 8.5), sharex=True)
    for ax, (attr, label) in zip(axes, panels):
        for kind, marker, size in (("science", "o", 22), ("standard", "*", 80)):
            for filt, col in colours.items():
                for status, face in (("ok", col), ("rejected", "none"), ("pending", col)):
                    sel = [(t, getattr(f, attr)) for f, t in pts
                           if f.kind == kind and f.filter == filt and f.status == status
                           and isinstance(getattr(f, attr), float) and math.isfinite(getattr(f, attr))]
                    if sel:
                        ax.scatter([s[0] for s in sel], [s[1] for s in sel], s=size, marker=marker,
                                   facecolors=face, edgecolors=col, linewidths=1.0)
        if attr == "airmass":
            bad = [(t, f.airmass) for f, t in pts if f.status == "failed" and math.isfinite(f.airmass)]
            if bad:
                ax.scatter([b[0] for b in bad], [b[1] for b in bad], marker="x", s=40, c="k",
                           linewidths=1.2)
        vals = [getattr(f, attr) for f, _ in pts if isinstance(getattr(f, attr), float)
                and math.isfinite(getattr(f, attr))]
        _set_range(ax, vals, MIN_SPAN.get(attr, 0.0), floor=1.0 if attr == "airmass" else None)
        if attr == "airmass":
            ax.invert_yaxis()
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    # legend: filters by colour, kinds by marker
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], ls="", marker="o", color=c, label=f) for f, c in colours.items()]
    handles += [Line2D([], [], ls="", marker="*", color="0.3", markersize=10, label="standard"),
                Line2D([], [], ls="", marker="o", mfc="none", color="0.3", label="rejected"),
                Line2D([], [], ls="", marker="x", color="k", label="failed")]
    axes[0].legend(handles=handles, ncol=min(len(handles), 8), fontsize=8, loc="lower left",
                   bbox_to_anchor=(0, 1.02), frameon=False)
    times = [t for _, t in pts]
    t0, t1 = min(times), max(times)
    if (t1 - t0).total_seconds() < 3600:          # at least an hour shown: readable UT ticks
        from datetime import timedelta
        mid = t0 + (t1 - t0) / 2
        axes[-1].set_xlim(mid - timedelta(minutes=30), mid + timedelta(minutes=30))
    axes[-1].xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
    axes[-1].set_xlabel("UT")
    if title:
        fig.suptitle(title, y=0.995, fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


#: smallest y range of a trend panel, so that noise on a steady night does not look like drama
def _finite_zp(f) -> bool:
    import math
    return isinstance(f.zp, float) and math.isfinite(f.zp)


MIN_SPAN = {"fwhm": 0.3, "zp": 0.1, "airmass": 0.1}


def _set_range(ax, values, span: float, floor: float | None = None) -> None:
    """y range of a panel: the values with a margin, at least ``span`` wide (or 10 % of the
    value when ``span`` is 0), never below ``floor``."""
    if not values:
        return
    lo, hi = min(values), max(values)
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    want = span or 0.1 * max(abs(hi), abs(lo), 1e-6)
    if hi - lo < want:
        mid = 0.5 * (lo + hi)
        lo, hi = mid - want / 2, mid + want / 2
    if floor is not None and lo < floor:           # shift up, keeping the width
        lo, hi = floor, hi + (floor - lo)
    ax.set_ylim(lo, hi)


def _downsample(img, max_px: int):
    import numpy as np
    k = max(1, int(math.ceil(max(img.shape) / max_px)))
    if k == 1:
        return img
    ny, nx = (img.shape[0] // k) * k, (img.shape[1] // k) * k
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(img[:ny, :nx].reshape(ny // k, k, nx // k, k), axis=(1, 3))


def mosaic(arrays, gap: int = 4):
    """Detectors side by side (bottom-aligned, NaN between), for a preview."""
    import numpy as np
    arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    ny = max(a.shape[0] for a in arrays)
    nx = sum(a.shape[1] for a in arrays) + gap * (len(arrays) - 1)
    out = np.full((ny, nx), np.nan, np.float32)
    x = 0
    for a in arrays:
        out[: a.shape[0], x: x + a.shape[1]] = a
        x += a.shape[1] + gap
    return out


def stretch_limits(img, method: str = "percentile", lo: float = 1.0, hi: float = 99.0) -> tuple:
    """Display limits of an image: ``percentile`` (lo/hi percentiles) or ``zscale`` (IRAF)."""
    import numpy as np
    v = np.asarray(img, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    if method == "zscale":
        from astropy.visualization import ZScaleInterval
        a, b = ZScaleInterval().get_limits(v[:: max(1, v.size // 200000)])
    else:
        a, b = np.percentile(v, [lo, hi])
    if not b > a:
        b = a + 1.0
    return float(a), float(b)


def image_preview(arrays, out: Path, *, title: str = "", method: str = "percentile",
                  max_px: int = 500, unit: str = "", cmap: str = "gray", marks=()) -> Path:
    """A thumbnail of one or more detector images (side by side) with a colour bar.

    Parameters
    ----------
    arrays : list of 2-D arrays
        Detector images (any units).
    out : Path
        PNG to write.
    title : str
    method : {'percentile', 'zscale'}
        Stretch: 1-99 percentiles (masters) or IRAF zscale (sky images).
    max_px : int
        Longest side of the preview after block averaging [px].
    unit : str
        Colour-bar label.
    marks : sequence of (x, y)
        Zero-based pixel positions (of the first array) to circle, e.g. the target.

    Pixels without a value (off the detectors, between them) are shown light blue-grey.
    """
    plt = _pyplot()
    full = mosaic(arrays)
    img = _downsample(full, max_px)
    k = full.shape[1] / img.shape[1]
    vmin, vmax = stretch_limits(img, method)
    ny, nx = img.shape
    w = 5.6
    h = max(2.2, min(6.0, w * ny / nx * 0.85 + 0.7))
    fig, ax = plt.subplots(figsize=(w, h))
    cm = plt.get_cmap(cmap).with_extremes(bad="#c8d4e3")
    im = ax.imshow(img, origin="lower", cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
    for x, y in marks:
        ax.scatter([(x + 0.5) / k - 0.5], [(y + 0.5) / k - 0.5], s=260, facecolors="none",
                   edgecolors="#ff3b30", linewidths=1.4)
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=7)
    if unit:
        cb.set_label(unit, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)
