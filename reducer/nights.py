"""Observing nights at a site.

A night runs from local civil noon to the next local noon (the site's IANA time zone, so
daylight-saving changes are honoured). It is labelled by a UT date, ``YYYYMMDD``: the UT
date of the night's mean solar midnight (local noon + 12 h of mean solar time at the site's
longitude). West of Greenwich that is the UT date of the morning half of the night (Apache
Point: evening of 30 April local -> ``20190501``); at La Palma it is the UT date after
midnight; in Japan the UT date of the evening. Either way one night has one label and every
frame of it gets the same one.
"""
from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo


def _evening_date(t: datetime, tz: ZoneInfo) -> date:
    local = t.astimezone(tz)
    d = local.date()
    return d - timedelta(days=1) if local.hour < 12 else d


def _label_for_evening(evening: date, longitude: float) -> str:
    # mean solar midnight at the site, in UT
    midnight = datetime.combine(evening + timedelta(days=1), time(0), tzinfo=timezone.utc)
    midnight -= timedelta(hours=longitude / 15.0)
    return midnight.strftime("%Y%m%d")


def night_of(t: datetime, site) -> str:
    """UTDATE label of the observing night containing UTC time ``t``.

    Parameters
    ----------
    t : datetime
        Aware UTC time (e.g. DATE-OBS).
    site : reducer.instruments.Site
        Supplies ``longitude`` (deg, east positive) and ``timezone``.
    """
    lon = site.longitude if site.longitude <= 180 else site.longitude - 360
    return _label_for_evening(_evening_date(t, ZoneInfo(site.timezone)), lon)


def night_bounds(utdate: str, site) -> tuple[datetime, datetime]:
    """UTC start and end (local noon to next local noon) of the night labelled ``utdate``.

    Raises
    ------
    ValueError
        When ``utdate`` is not ``YYYYMMDD``.
    """
    try:
        d = datetime.strptime(utdate, "%Y%m%d").date()
    except (TypeError, ValueError):
        raise ValueError(f"night {utdate!r} is not a UT date YYYYMMDD") from None
    lon = site.longitude if site.longitude <= 180 else site.longitude - 360
    tz = ZoneInfo(site.timezone)
    for evening in (d - timedelta(days=1), d, d - timedelta(days=2), d + timedelta(days=1)):
        if _label_for_evening(evening, lon) == utdate:
            start = datetime.combine(evening, time(12), tzinfo=tz)
            end = datetime.combine(evening + timedelta(days=1), time(12), tzinfo=tz)
            return start.astimezone(timezone.utc), end.astimezone(timezone.utc)
    raise ValueError(f"no night is labelled {utdate} at longitude {site.longitude}")


def current_night(site, now: datetime | None = None) -> str:
    """Label of the observing night in progress (or of the one just ended, before noon)."""
    return night_of(now or datetime.now(timezone.utc), site)
