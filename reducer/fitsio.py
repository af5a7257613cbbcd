"""The only place reducer writes files: atomic writes and provenance headers.

Every product is written to a temporary file in the destination folder, flushed to disk and
renamed over the target (``os.replace``), so a reader (or a ``kill -9``) never sees half a
file. Raw data are never opened for writing.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def astropy_offline() -> None:
    """Astropy never tries the network: no IERS download (the ``astropy-iers-data`` package
    supplies the tables), no remote data. Called wherever reducer uses time scales."""
    from astropy.utils import iers
    from astropy.utils.data import conf as data_conf
    iers.conf.auto_download = False
    iers.conf.auto_max_age = None
    data_conf.allow_internet = False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_fits(hdul, path: Path, checksum: bool = True) -> None:
    """Write an :class:`astropy.io.fits.HDUList` atomically, with CHECKSUM/DATASUM cards."""
    with atomic_path(path, ".fits") as tmp:
        hdul.writeto(tmp, overwrite=True, checksum=checksum)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def add_provenance(header, *, inputs=(), masters=(), digest: str = "", step: str = "") -> None:
    """Record what went into a product: inputs, masters, settings digest, reducer version.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Primary header of the product (modified in place; it is the product being built).
    inputs : iterable of (name, checksum)
        Input files and their SHA-256 (or ``''``).
    masters : iterable of (role, name, origin)
        Masters used, e.g. ``('bias', 'demo_20261120_master_bias.fits', 'tonight')``.
    digest : str
        Digest of the settings that produced the product.
    step : str
        Step name (``'bias'``, ``'p'`` ...).
    """
    from . import __version__
    header["REDVER"] = (__version__, "reducer version")
    if step:
        header["REDSTEP"] = (step, "reducer step that wrote this product")
    if digest:
        header["CFGDIGST"] = (digest, "digest of the settings used")
    for i, (name, checksum) in enumerate(inputs, 1):
        _set(header, f"INPUT{i:03d}", str(name), "input file")
        if checksum:
            _set(header, f"INSUM{i:03d}", checksum, "sha256")
    for role, name, origin in masters:
        key = f"M{role[:6].upper()}"
        _set(header, key, str(name), f"master {role}")
        _set(header, f"{key[:6]}OR", str(origin), "origin")


def _set(header, key: str, value: str, comment: str) -> None:
    """Set a string card, dropping the comment (never the value) when the card is too long."""
    room = 68 - len(value)
    header[key] = (value, comment) if room >= len(comment) + 3 else value[-68:]
