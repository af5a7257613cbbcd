"""Free space in a night directory against what the night still needs.

A doit run that builds things calls :func:`check_before_run` while the night's ``dodo.py``
loads. It estimates the bytes the night still has to write (cheaply: the night log's frame
shapes and which products already exist, no pixels read) and compares them with the free
space of the night directory's file system:

- free space below ``[doit] min_free_mb`` (default 500 MB): the run is refused
  (:class:`DiskFull`, one line);
- free space below the estimate (times ``[doit] space_margin``, default 1.0; 0 turns the
  warning off) plus that floor: one line saying so, and the run goes on.

Sizes: a science product holds data and uncertainty (float32) and a mask (uint16) per
pixel, 10 bytes, and the ``s`` product also the sky model (4 more); a master data,
uncertainty and count planes (12); a stack about 1.5 frames of 12 bytes. FITS headers and
padding add a few per cent.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass

PRODUCT_BPP = 10.0       # [byte/px] data f4 + unc f4 + mask u2
SKY_BPP = 4.0            # [byte/px] the sky model kept in the s product
MASTER_BPP = 12.0        # [byte/px] data, unc, count
STACK_BPP = 18.0         # [byte/px] ~1.5 frames of data, unc, weight
OVERHEAD = 1.04          # headers and 2880-byte padding
RAW_BPP = 2.0            # [byte/px] assumed raw pixel size when there is no night log yet
DEFAULT_MIN_FREE_MB = 500.0
from .products import STEPS as _STEPS, chain as _chain   # (no numpy: products imports it lazily)


class DiskFull(RuntimeError):
    """Free space is below the hard floor; the message is one line."""


@dataclass
class Estimate:
    """What a night still has to write."""

    bytes: float
    products: int = 0
    masters: int = 0
    stacks: int = 0
    from_raw: bool = False     # no night log yet: an upper bound from the raw files' sizes

    def describe(self) -> str:
        if self.from_raw:
            return "the raw frames' products (no night log yet)"
        parts = [f"{n} {w}" for n, w in ((self.products, "frame products"),
                                        (self.masters, "masters"), (self.stacks, "stacks"))
                 if n]
        return ", ".join(parts) or "nothing"


def human(nbytes: float) -> str:
    """``1.5 GB`` style sizes (powers of 1000)."""
    for unit, f in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= f:
            return f"{nbytes / f:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _pixels(frame) -> int:
    try:
        nx, ny = (int(v) for v in frame.shape.split("x"))
    except ValueError:
        return 0
    return nx * ny * max(1, int(frame.ndet or 1))


def estimate_needed(night) -> Estimate:
    """Bytes the night still has to write (see the module docstring); no pixels are read."""
    from .inventory import read_nightlog
    from .products import raw_stem
    if not night.nightlog.is_file():
        return _estimate_from_raw(night)
    frames = read_nightlog(night.nightlog)
    steps = [s for s in night.profile.steps if s in _STEPS]
    if "p" not in steps:
        steps.insert(0, "p")
    variants = [_chain(steps)] + ([_chain([s for s in steps if s != "f"])] if "f" in steps else [])
    listing: dict = {}
    est = Estimate(0.0)
    groups: dict = {}
    calib: dict = {}
    for f in frames:
        if not f.usable:
            continue
        px = _pixels(f)
        if f.type in ("science", "standard"):
            names = listing.get(f.target)
            if names is None:
                d = night.dir / f.target
                names = listing[f.target] = {p.name for p in d.iterdir()} if d.is_dir() else set()
            stem = raw_stem(f.file)
            if any(f"{v[-1]}{stem}.fits" in names for v in variants):
                groups.setdefault((f.target, f.filter), px)
                continue       # done (intermediates may be pruned: they are not rebuilt)
            for pre in variants[0]:
                if f"{pre}{stem}.fits" not in names:
                    est.products += 1
                    est.bytes += px * (PRODUCT_BPP + (SKY_BPP if pre[0] == "s" else 0.0))
            groups.setdefault((f.target, f.filter), px)
        elif f.type in ("bias", "dark", "flat", "arc"):
            key = (f.type, f.shape, f.binning, f.filter if f.type in ("flat", "arc") else "")
            calib.setdefault(key, px)
    masters = night.dir / "masters"
    built = len(list(masters.glob("master_*.fits"))) if masters.is_dir() else 0
    if built < len(calib):
        per = sum(calib.values()) / max(1, len(calib))
        est.masters = len(calib) - built
        est.bytes += est.masters * per * MASTER_BPP
    from .inventory import safe_name
    for (target, filt), px in groups.items():
        if not (night.dir / "stacks" / f"{target}_{safe_name(filt)}.json").is_file():
            est.stacks += 1
            est.bytes += px * STACK_BPP
    est.bytes *= OVERHEAD
    return est


def _estimate_from_raw(night) -> Estimate:
    from .inventory import is_candidate
    try:
        raw = sum(p.stat().st_size for p in night.raw_dir.iterdir() if is_candidate(p))
    except OSError:
        raw = 0
    nsteps = len([s for s in night.profile.steps if s in _STEPS]) or 1
    per_px = nsteps * PRODUCT_BPP + SKY_BPP
    return Estimate(raw / RAW_BPP * per_px * OVERHEAD, from_raw=True)


def check_before_run(night, *, free: float | None = None) -> str | None:
    """Check the night directory's free space before a run that builds things.

    Parameters
    ----------
    night : reducer.night.Night
    free : float, optional
        [byte] free space (default: measured with :func:`shutil.disk_usage`).

    Returns
    -------
    str or None
        A one-line warning when the free space looks short for what the night still needs.

    Raises
    ------
    DiskFull
        Free space below ``[doit] min_free_mb``.
    """
    opts = night.settings.get("doit", {})
    floor = float(opts.get("min_free_mb", DEFAULT_MIN_FREE_MB)) * 1e6
    margin = float(opts.get("space_margin", 1.0))
    if free is None:
        free = float(shutil.disk_usage(night.dir).free)
    if free < floor:
        raise DiskFull(f"night {night.utdate}: only {human(free)} free in {night.dir}, below the "
                       f"floor of {human(floor)} ([doit] min_free_mb); not starting: free some "
                       f"space (`reducer prune` removes intermediates of finished targets)")
    if margin <= 0:
        return None
    est = estimate_needed(night)
    need = est.bytes * margin
    if need > 0 and free - need < floor:
        return (f"night {night.utdate}: disk space is short: {human(free)} free in {night.dir}, "
                f"the night still needs about {human(need)} ({est.describe()}) and "
                f"{human(floor)} must stay free; the run may stop when the disk fills "
                f"(`reducer prune` removes intermediates of finished targets)")
    return None
