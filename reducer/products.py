"""Science products: names, layout, reading and writing.

A frame's products are named with cumulative photopipe prefixes of its raw file's stem
(``p``, ``fp``, ``sfp``, ``zsfp``, ``azsfp``, ``tazsfp``; a step the profile does not apply
adds no letter) and live in the target's folder of the night directory::

    redux/20261120/M_81/pM 81_sdss_r_20190501_061120.fits

Each product holds an empty primary HDU (provenance and frame keywords) and, per detector,
three image HDUs: ``<DET>`` (data, e-), ``<DET>_UNC`` (1-sigma, e-) and ``<DET>_MASK``
(uint16 bits of :mod:`reducer.ops.bits`); the ``s`` product also keeps the sky model it
subtracted as ``<DET>_SKY`` (e-), which the ``z`` step gives astroscrappy as its background.
Files carry CHECKSUM/DATASUM and are written atomically.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:          # numpy only where pixels are read or written: the task
    import numpy as np     # generators import this module for the names

#: chain steps in order, with their one-letter prefix and task basename
STEPS = ("p", "f", "s", "z", "a", "t")
STEP_NAMES = {"p": "prepare", "f": "flatten", "s": "sky", "z": "cosmics", "a": "astrometry",
              "t": "zeropoint"}
COMPRESSED = (".gz", ".fz", ".bz2", ".z", ".Z")


@lru_cache(maxsize=4096)
def raw_stem(filename: str) -> str:
    """The stem of a raw file name: ``'r2701242.fit.gz'`` -> ``'r2701242'``.

    Cached: the task generators ask several times per frame at every doit start."""
    name = Path(filename).name
    for suf in COMPRESSED:
        if name.endswith(suf):
            name = name[: -len(suf)]
            break
    for suf in (".fits", ".fit", ".fts", ".FITS", ".FIT", ".FTS"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def chain(steps_applied) -> list[str]:
    """Cumulative prefixes of the steps applied, in order: ``['p', 'fp', 'sfp', ...]``."""
    out, pre = [], ""
    for s in STEPS:
        if s in steps_applied:
            pre = s + pre
            out.append(pre)
    return out


@dataclass
class Detector:
    """One detector's planes in a product."""

    data: np.ndarray
    unc: np.ndarray
    mask: np.ndarray
    header: object = None     # astropy Header (WCS, sky level ...) or None
    sky: np.ndarray | None = None   # the sky model the s step subtracted (e-), kept in sfp


@dataclass
class Product:
    """A science product: primary header and detectors by name."""

    header: object
    detectors: dict = field(default_factory=dict)


def read_product(path: Path) -> Product:
    """Read a product written by :func:`write_product`."""
    import numpy as np
    from astropy.io import fits
    with fits.open(path, memmap=False) as h:
        prim = h[0].header.copy()
        dets = {}
        names = [x.name for x in h[1:] if not x.name.endswith(("_UNC", "_MASK", "_SKY"))]
        for n in names:
            dets[n] = Detector(h[n].data.astype(np.float32), h[f"{n}_UNC"].data.astype(np.float32),
                               h[f"{n}_MASK"].data.astype(np.uint16), h[n].header.copy())
            if f"{n}_SKY" in h:
                dets[n].sky = h[f"{n}_SKY"].data.astype(np.float32)
    return Product(prim, dets)


def write_product(product: Product, path: Path) -> None:
    """Write a product atomically, with checksums."""
    import numpy as np
    from astropy.io import fits
    from .fitsio import write_fits
    from .ops.bits import header_cards
    hdus = [fits.PrimaryHDU(header=product.header)]
    for name, d in product.detectors.items():
        h = fits.Header() if d.header is None else d.header.copy()
        for k in ("EXTNAME", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT",
                  "GCOUNT", "BZERO", "BSCALE", "CHECKSUM", "DATASUM"):
            h.remove(k, ignore_missing=True, remove_all=True)
        h["BUNIT"] = "electron"
        hdus.append(fits.ImageHDU(d.data.astype(np.float32), header=h, name=name))
        hu = fits.Header()
        hu["BUNIT"] = "electron"
        hdus.append(fits.ImageHDU(d.unc.astype(np.float32), header=hu, name=f"{name}_UNC"))
        hm = fits.Header()
        for key, val, com in header_cards():
            hm[key] = (val, com)
        hdus.append(fits.ImageHDU(d.mask.astype(np.uint16), header=hm, name=f"{name}_MASK"))
        if d.sky is not None:
            hs = fits.Header()
            hs["BUNIT"] = "electron"
            hs["COMMENT"] = "sky model subtracted by the s step (used by z as its background)"
            hdus.append(fits.ImageHDU(d.sky.astype(np.float32), header=hs, name=f"{name}_SKY"))
    write_fits(fits.HDUList(hdus), path)
