"""Reading raw frames' headers robustly and turning keyword values into canonical fields.

Nothing here writes anything. Every problem becomes a :class:`FrameError` whose message is
one line naming the problem (the caller adds the file name), or, for a file still being
written, a :class:`FrameIncomplete` so the frame is left for the next run.

Parsing rules for malformed values (each parsed only where unambiguous):

- numbers with a decimal comma (``'6,4E-05'``: one comma, no dot) are read as ``6.4e-05``;
- dates: ISO 8601 (``2019-05-01T06:11:30.5``, optional ``Z`` or a UTC offset such as
  ``+02:00``, converted to UTC); a date alone plus a time keyword (``UT``, ``UTSTART``...);
  the old FITS form ``DD/MM/YY`` and its four-digit-year variant ``DD/MM/YYYY`` (day first,
  as the FITS standard defined it; a profile may declare ``date_order = "mdy"``); two-digit
  years are 19YY (the old form was retired in 1999).
- RA/Dec: sexagesimal strings (RA in hours unless the profile says degrees) or decimal degrees.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

FITS_BLOCK = 2880
#: a file modified less than this many seconds ago and not yet whole is "still arriving"
SETTLE_SECONDS = 30.0


class FrameError(ValueError):
    """A raw frame cannot be used; the message is a one-line reason."""


class FrameIncomplete(FrameError):
    """A raw frame is still being written; try again on the next run."""


_MAGIC = {
    b"SIMPLE  =": "fits",
    b"\x1f\x8b": "gzip",
    b"\x1f\x9d": "lzw",
    b"BZh": "bzip2",
    b"PK\x03\x04": "zip",
}


def sniff(path: Path) -> str:
    """Return the container kind of a file from its first bytes.

    Raises
    ------
    FrameError
        Empty or unreadable files, and files that are not FITS nor a compression of one.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise FrameError(f"cannot read: {exc.strerror}") from None
    if not head:
        raise FrameError("empty file (0 bytes)")
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    raise FrameError(f"not a FITS file (starts with {head[:9]!r})")


def lzw_available() -> bool:
    """True when the optional ``uncompresspy`` package (LZW ``.Z`` support) is importable."""
    import importlib.util
    return importlib.util.find_spec("uncompresspy") is not None


def check_complete(path: Path, kind: str, now: float | None = None) -> None:
    """Reject truncated uncompressed FITS files, or flag them as still arriving.

    A FITS file is a whole number of 2880-byte blocks. One that is not, and was modified in
    the last :data:`SETTLE_SECONDS`, is being written (:class:`FrameIncomplete`); an older
    one is truncated (:class:`FrameError`).
    """
    st = path.stat()
    if kind != "fits" or st.st_size % FITS_BLOCK == 0:
        return
    age = (now or time.time()) - st.st_mtime
    if age < SETTLE_SECONDS:
        raise FrameIncomplete(f"still being written ({st.st_size} bytes, modified {age:.0f} s ago)")
    raise FrameError(f"truncated: {st.st_size} bytes is not a whole number of 2880-byte FITS blocks")


@dataclass
class RawHeaders:
    """Headers of a raw frame: the primary one and each HDU's, with image shapes."""

    path: Path
    kind: str
    headers: list           # astropy Header per HDU
    names: list             # EXTNAME (or '') per HDU
    shapes: list            # (ny, nx) or None per HDU
    bad_cards: dict         # KEY -> raw value text of cards astropy could not parse

    def hdu_index(self, ref) -> int:
        """Index of an HDU given by name (case-insensitive), index, or ``'*'`` (first image)."""
        if ref == "*":
            imgs = self.image_hdus()
            if not imgs:
                raise FrameError("holds no image HDU")
            return imgs[0]
        if isinstance(ref, int):
            if ref >= len(self.headers):
                raise FrameError(f"has no HDU {ref} (only {len(self.headers)})")
            return ref
        for i, n in enumerate(self.names):
            if n.upper() == str(ref).upper():
                return i
        raise FrameError(f"has no HDU named {ref!r} (HDUs: {', '.join(n or '?' for n in self.names)})")

    def image_hdus(self) -> list[int]:
        """Indices of HDUs holding a 2-D image."""
        return [i for i, s in enumerate(self.shapes) if s is not None]


def _card_value(header, key):
    """Header value, or the raw text of a card astropy cannot parse."""
    import warnings
    from astropy.io.fits.verify import VerifyError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return header.get(key)
    except (VerifyError, ValueError):
        card = header.cards[key]
        text = card.image[10:]
        if "/" in text and not text.lstrip().startswith("'"):
            text = text.split("/", 1)[0]
        return text.strip().strip("'").strip()


def read_headers(path: Path) -> RawHeaders:
    """Read every header of a raw frame without reading its pixels.

    Raises
    ------
    FrameError
        With a one-line reason for empty, non-FITS, truncated, corrupt files and
        compression astropy cannot read here.
    FrameIncomplete
        For a file still being written.
    """
    from astropy.io import fits
    import warnings

    path = Path(path)
    kind = sniff(path)
    if kind == "zip":
        raise FrameError("zip archives are not read; unzip the frame first")
    if kind == "lzw" and not lzw_available():
        raise FrameError("LZW-compressed (.Z) frame: install the 'uncompresspy' package "
                         "(pip install uncompresspy) to read it")
    check_complete(path, kind)
    headers, names, shapes = [], [], []
    bad: dict = {}
    compressed = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                for hdu in hdul:
                    h = hdu.header
                    compressed = compressed or isinstance(hdu, fits.CompImageHDU)
                    headers.append(h)
                    names.append(str(h.get("EXTNAME", "PRIMARY" if not names else "")).strip())
                    naxis = h.get("NAXIS", 0)
                    is_table = h.get("XTENSION", "").strip().upper() in ("BINTABLE", "TABLE")
                    if naxis >= 2 and not is_table and h.get("NAXIS1", 0) > 0 and h.get("NAXIS2", 0) > 0:
                        shapes.append((int(h["NAXIS2"]), int(h["NAXIS1"])))
                    elif is_table and h.get("ZIMAGE", False):
                        shapes.append((int(h["ZNAXIS2"]), int(h["ZNAXIS1"])))
                    else:
                        shapes.append(None)
    except (OSError, EOFError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in msg.lower() or isinstance(exc, EOFError):
            raise FrameError(f"truncated or corrupt ({msg})") from None
        raise FrameError(f"unreadable FITS ({msg})") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise FrameError(f"corrupt FITS header ({str(exc).splitlines()[0]})") from None
    if not headers:
        raise FrameError("no HDU found")
    from astropy.io.fits.verify import VerifyError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for h in headers:
            for card in h.cards:
                try:
                    card.value
                except (VerifyError, ValueError):
                    bad[card.keyword] = card.image
    if kind == "fits" and not compressed:
        # a truncated data section: the header promises more bytes than the file has
        expected = _expected_size(headers)
        size = path.stat().st_size
        if expected and size < expected:
            age = time.time() - path.stat().st_mtime
            if age < SETTLE_SECONDS:
                raise FrameIncomplete(f"still being written ({size} of {expected} bytes)")
            raise FrameError(f"truncated: {size} bytes, the headers promise {expected}")
    return RawHeaders(path, kind, headers, names, shapes, bad)


def _expected_size(headers) -> int:
    total = 0
    for h in headers:
        ncards = len(h.cards) + 1  # END
        total += -(-ncards * 80 // FITS_BLOCK) * FITS_BLOCK
        naxis = int(h.get("NAXIS", 0))
        if naxis == 0:
            continue
        n = abs(int(h.get("BITPIX", 8))) // 8
        for i in range(1, naxis + 1):
            n *= int(h.get(f"NAXIS{i}", 0))
        n = int(h.get("GCOUNT", 1)) * (int(h.get("PCOUNT", 0)) + n)
        total += -(-n // FITS_BLOCK) * FITS_BLOCK
    return total


# --------------------------------------------------------------------------- values
_NUM_COMMA = re.compile(r"^[+-]?\d+,\d*([eE][+-]?\d+)?$")


def parse_number(value, what: str) -> float | None:
    """A header value as a float; decimal commas accepted when unambiguous.

    Returns ``None`` for empty values. Raises :class:`FrameError` otherwise.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise FrameError(f"{what} is a logical value ({value}), not a number")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    if _NUM_COMMA.match(text):
        return float(text.replace(",", "."))
    raise FrameError(f"{what} value {text!r} is not a number")


_ISO = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2}(?:\.\d*)?))?)?\s*"
    r"(Z|[+-]\d{2}:?\d{2})?$")
_SLASH = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{2}|\d{4})$")
_TIME = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}(?:\.\d*)?))?$")


def _hms(text: str) -> timedelta:
    m = _TIME.match(text.strip())
    if not m:
        raise FrameError(f"time value {text!r} is not hh:mm[:ss]")
    h, mi, s = int(m.group(1)), int(m.group(2)), float(m.group(3) or 0)
    if h > 23 or mi > 59 or s >= 61:
        raise FrameError(f"time value {text!r} is out of range")
    return timedelta(hours=h, minutes=mi, seconds=s)


def parse_datetime(date_value, time_value=None, date_order: str = "dmy") -> datetime:
    """Parse an observation start time to an aware UTC :class:`datetime`.

    Parameters
    ----------
    date_value : str
        DATE-OBS (or the profile's keyword).
    time_value : str, optional
        A separate time-of-day keyword (``UT``, ``UTSTART``, ``TIME-OBS``) used when the
        date carries no time.
    date_order : {'dmy', 'mdy'}
        Order of slash dates.

    Raises
    ------
    FrameError
        When the value is missing or cannot be read unambiguously.
    """
    if date_value is None or not str(date_value).strip():
        raise FrameError("no observation date (DATE-OBS missing or empty)")
    text = str(date_value).strip()
    m = _ISO.match(text)
    if m:
        y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
        try:
            base = datetime(y, mo, d, tzinfo=timezone.utc)
        except ValueError:
            raise FrameError(f"DATE-OBS {text!r} is not a valid date") from None
        if m.group(4) is not None:
            hh, mm = int(m.group(4)), int(m.group(5))
            ss = float(m.group(6) or 0)
            if hh > 23 or mm > 59 or ss >= 61:
                raise FrameError(f"DATE-OBS {text!r} has an impossible time")
            dt = base + timedelta(hours=hh, minutes=mm, seconds=ss)
            tz = m.group(7)
            if tz and tz != "Z":
                sign = 1 if tz[0] == "+" else -1
                digits = tz[1:].replace(":", "")
                offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
                dt = dt - sign * offset   # local time with an offset -> UTC
            return dt
        if time_value is None or not str(time_value).strip():
            raise FrameError(f"DATE-OBS {text!r} has no time of day and no time keyword is set")
        return base + _hms(str(time_value))
    m = _SLASH.match(text)
    if m:
        a, b, yy = int(m.group(1)), int(m.group(2)), m.group(3)
        d, mo = (a, b) if date_order == "dmy" else (b, a)
        y = int(yy) + (1900 if len(yy) == 2 else 0)
        try:
            base = datetime(y, mo, d, tzinfo=timezone.utc)
        except ValueError:
            raise FrameError(f"DATE-OBS {text!r} is not a valid {date_order} date") from None
        if time_value is None or not str(time_value).strip():
            raise FrameError(f"DATE-OBS {text!r} has no time of day and no time keyword is set")
        return base + _hms(str(time_value))
    raise FrameError(f"DATE-OBS {text!r} is not a date reducer can read unambiguously")


def parse_angle(value, kind: str, unit: str | None = None) -> float | None:
    """RA or Dec header value in degrees (``None`` when absent).

    Sexagesimal RA is in hours unless ``unit='deg'``; numbers are degrees unless
    ``unit='hourangle'``.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        return v * 15.0 if (kind == "ra" and unit == "hourangle") else v
    text = str(value).strip()
    try:
        v = float(text)
        return v * 15.0 if (kind == "ra" and unit == "hourangle") else v
    except ValueError:
        pass
    parts = re.split(r"[:\s]+", text)
    if len(parts) not in (2, 3):
        raise FrameError(f"{kind.upper()} value {text!r} is not an angle")
    try:
        sign = -1.0 if parts[0].startswith("-") else 1.0
        nums = [abs(float(parts[0]))] + [float(p) for p in parts[1:]]
    except ValueError:
        raise FrameError(f"{kind.upper()} value {text!r} is not an angle") from None
    v = sign * (nums[0] + nums[1] / 60 + (nums[2] / 3600 if len(nums) > 2 else 0))
    if kind == "ra" and unit != "deg":
        v *= 15.0
    return v
