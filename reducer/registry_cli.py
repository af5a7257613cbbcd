"""``reducer calib``: command-line access to the calibration registry.

Sub-commands::

    reducer calib list [--instrument NAME] [--type TYPE] [--night YYYYMMDD]
                       [--set KEY=VAL ...] [--certified] [--usable]
    reducer calib certify FILE --instrument NAME --night YYYYMMDD --type TYPE
                       [--set KEY=VAL ...] [--store DIR] [--valid-from T] [--valid-to T]
                       [--mjd MJD] [--force]
    reducer calib decertify ID
    reducer calib mark-bad ID --reason TEXT
    reducer calib unmark-bad ID

Every sub-command takes ``--registry URL`` (an SQLAlchemy URL or the path of an SQLite
file), which overrides the URL the caller passes to :func:`run` (from the site
settings).  The masters store of ``certify`` is ``--store``, else the ``store_dir``
given to :func:`run`, else ``masters/`` next to an SQLite registry file.

The main ``reducer`` command wires this in with::

    sub = parser.add_subparsers(dest="command")
    registry_cli.add_subcommands(sub)
    ...
    if args.command == "calib":
        return registry_cli.run(args, site_registry_url, store_dir=site_store_dir)

SQLAlchemy and :mod:`reducer.registry` are imported only when a sub-command runs, so
``reducer --help`` stays fast.  ``python -m reducer.registry_cli ...`` also works (its
default registry is the environment variable ``REDUCER_REGISTRY``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["add_subcommands", "run", "main", "parse_time", "format_table"]

# Same as reducer.registry.IMTYPES (not imported here to keep start-up fast).
_IMTYPES = ("bias", "dark", "flat", "arc")
_MJD_EPOCH = _dt.date(1858, 11, 17)


def parse_time(text: str, *, end_of_day: bool = False) -> float:
    """MJD from a command-line time: an MJD, or a UT date ``YYYYMMDD``.

    Parameters
    ----------
    text : str
        ``60385.2`` (an MJD) or ``20240315`` (a UT date: eight digits).
    end_of_day : bool, optional
        For a date, return the end of that UT day (the next day's 00:00 UT) instead
        of its start; used for the upper bound of a validity range.

    Returns
    -------
    float

    Raises
    ------
    argparse.ArgumentTypeError
        Neither form.
    """
    text = str(text).strip()
    if len(text) == 8 and text.isdigit():
        try:
            day = _dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid date YYYYMMDD") from None
        return float((day - _MJD_EPOCH).days + (1 if end_of_day else 0))
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an MJD nor a date YYYYMMDD") from None


def _valid_to(text: str) -> float:
    return parse_time(text, end_of_day=True)


def _key_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return name.strip(), value.strip()


def _night(text: str) -> str:
    text = str(text).strip()
    if len(text) != 8 or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a night YYYYMMDD")
    return text


def add_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``calib`` command and its sub-commands to a parser's sub-parsers.

    Parameters
    ----------
    subparsers
        The object returned by :meth:`argparse.ArgumentParser.add_subparsers`.

    Returns
    -------
    argparse.ArgumentParser
        The ``calib`` parser.  Parsed arguments carry ``calib_command`` (the
        sub-command name) for :func:`run`.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry", metavar="URL",
        help="registry database: an SQLAlchemy URL (sqlite:////path/registry.sqlite, "
        "postgresql+psycopg2://user:pass@host/db) or the path of an SQLite file; "
        "default: the site settings' registry",
    )
    calib = subparsers.add_parser(
        "calib", help="calibration registry: list, certify, withdraw master calibrations",
        description="Manage the registry of master calibration frames.",
    )
    sub = calib.add_subparsers(dest="calib_command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("list", parents=[common], help="list registered masters",
                       description="List registered masters as a table.")
    p.add_argument("--instrument", help="only this instrument")
    p.add_argument("--type", dest="imtype", choices=_IMTYPES, help="only this calibration type")
    p.add_argument("--night", type=_night, help="only this night (UTDATE YYYYMMDD)")
    p.add_argument("--set", dest="set_keys", metavar="KEY=VAL", type=_key_value, nargs="+",
                   action="extend", help="only this calibration set (all its keys)")
    p.add_argument("--certified", action="store_true", help="only certified masters")
    p.add_argument("--usable", action="store_true",
                   help="only masters nearest() may return: certified and not bad")

    p = sub.add_parser(
        "certify", parents=[common], help="copy a master into the store and certify it",
        description="Copy a master into the permanent masters store (atomically, checksum "
        "verified) as <instrument>_<UTDATE>_master_<type>[_<key>].fits and register it "
        "as certified.",
    )
    p.add_argument("file", metavar="FILE", help="the master FITS file")
    p.add_argument("--instrument", help="instrument name (default: the caller's instrument)")
    p.add_argument("--night", type=_night, required=True, help="UTDATE of the master, YYYYMMDD")
    p.add_argument("--type", dest="imtype", choices=_IMTYPES, required=True,
                   help="calibration type")
    p.add_argument("--set", dest="set_keys", metavar="KEY=VAL", type=_key_value, nargs="+",
                   action="extend", default=[], help="calibration-set keys, e.g. binning=1x1 filter=r")
    p.add_argument("--store", metavar="DIR", help="permanent masters store")
    p.add_argument("--valid-from", type=parse_time, metavar="T",
                   help="start of validity: MJD or UT date YYYYMMDD (its 00:00 UT); default open")
    p.add_argument("--valid-to", type=_valid_to, metavar="T",
                   help="end of validity: MJD or UT date YYYYMMDD (its 24:00 UT); default open")
    p.add_argument("--mjd", type=float, metavar="MJD",
                   help="mid-time of the master (default: registry row, FITS header, "
                   "else the middle of the UT date)")
    p.add_argument("--verification", choices=("PASS", "FAIL", "UNVERIFIED"),
                   help="verification status (default: the registered one, else UNVERIFIED)")
    p.add_argument("--force", action="store_true", help="certify even a master that failed verification")

    p = sub.add_parser("decertify", parents=[common], help="withdraw a certification")
    p.add_argument("id", type=int, metavar="ID", help="master id (see calib list)")

    p = sub.add_parser("mark-bad", parents=[common], help="mark a master bad")
    p.add_argument("id", type=int, metavar="ID", help="master id (see calib list)")
    p.add_argument("--reason", required=True, help="why the master must not be used")

    p = sub.add_parser("unmark-bad", parents=[common], help="clear a master's bad mark")
    p.add_argument("id", type=int, metavar="ID", help="master id (see calib list)")
    return calib


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text table; the last column is not padded.

    Parameters
    ----------
    headers : sequence of str
    rows : sequence of sequences

    Returns
    -------
    str
    """
    cells = [[str(h) for h in headers]] + [[("" if v is None else str(v)) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [v.ljust(w) for v, w in zip(r[:-1], widths[:-1])] + [r[-1]]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _fmt_mjd(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _list_rows(records: Sequence[Any]) -> list[list[str]]:
    rows = []
    for r in records:
        if r.valid_from_mjd is None and r.valid_to_mjd is None:
            valid = "open"
        else:
            lo = "open" if r.valid_from_mjd is None else f"{r.valid_from_mjd:g}"
            hi = "open" if r.valid_to_mjd is None else f"{r.valid_to_mjd:g}"
            valid = f"{lo}..{hi}"
        rows.append([
            r.id, r.instrument, r.imtype, r.night, r.set_key or "-", _fmt_mjd(r.mjd_mid),
            "-" if r.nframes is None else r.nframes, r.verification,
            "yes" if r.certified else "no", valid,
            f"BAD: {r.bad_reason}" if r.bad else "-", str(r.path),
        ])
    return rows


def _store_dir(args: argparse.Namespace, url: Any, store_dir: str | os.PathLike | None) -> str | None:
    if getattr(args, "store", None):
        return args.store
    if store_dir:
        return os.fspath(store_dir)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return os.path.join(os.path.dirname(os.path.abspath(url.database)), "masters")
    return None


def run(
    args: argparse.Namespace,
    registry_url: str | None = None,
    *,
    store_dir: str | os.PathLike | None = None,
    instrument: str | None = None,
) -> int:
    """Run a parsed ``calib`` sub-command.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed by a parser set up with :func:`add_subcommands`.
    registry_url : str, optional
        Registry URL from the site settings; ``--registry`` overrides it.
    store_dir : str or path-like, optional
        Permanent masters store from the site settings; ``--store`` overrides it.
    instrument : str, optional
        Default instrument of ``certify`` (``--instrument`` overrides it).

    Returns
    -------
    int
        Exit status: 0 on success, 1 on a registry error (printed to stderr), 2 on a
        usage error.
    """
    url_text = getattr(args, "registry", None) or registry_url
    if not url_text:
        print("reducer calib: error: no registry: give --registry URL", file=sys.stderr)
        return 2
    from sqlalchemy.exc import SQLAlchemyError

    from . import registry as reg

    command = args.calib_command
    try:
        url = reg.to_url(url_text)
        with reg.Registry(url) as db:
            if command == "list":
                set_key = dict(args.set_keys) if args.set_keys else None
                records = db.list(
                    instrument=args.instrument, imtype=args.imtype, night=args.night,
                    set_key=set_key, certified=True if (args.certified or args.usable) else None,
                    bad=False if args.usable else None,
                )
                if not records:
                    print("no masters registered" + (" matching the filters" if any(
                        (args.instrument, args.imtype, args.night, set_key, args.certified,
                         args.usable)) else ""))
                    return 0
                print(format_table(
                    ("ID", "INSTRUMENT", "TYPE", "NIGHT", "SET", "MJD_MID", "N", "VERIF",
                     "CERT", "VALID", "BAD", "PATH"),
                    _list_rows(records),
                ))
            elif command == "certify":
                inst = args.instrument or instrument
                if not inst:
                    print("reducer calib certify: error: give --instrument", file=sys.stderr)
                    return 2
                store = _store_dir(args, url, store_dir)
                if store is None:
                    print("reducer calib certify: error: give --store DIR (no masters store "
                          "in the settings)", file=sys.stderr)
                    return 2
                rec = db.certify(
                    args.file, store, instrument=inst,
                    imtype=args.imtype, set_key=dict(args.set_keys), night=args.night,
                    mjd_mid=args.mjd, verification=args.verification,
                    valid_from_mjd=args.valid_from, valid_to_mjd=args.valid_to, force=args.force,
                )
                print(f"certified master id {rec.id}: {rec.path} (sha256 {rec.checksum})")
            elif command == "decertify":
                rec = db.decertify(args.id)
                print(f"decertified master id {rec.id}: {rec.path}")
            elif command == "mark-bad":
                rec = db.mark_bad(args.id, args.reason)
                print(f"marked master id {rec.id} bad ({rec.bad_reason}): {rec.path}")
            elif command == "unmark-bad":
                rec = db.unmark_bad(args.id)
                print(f"cleared the bad mark of master id {rec.id}: {rec.path}")
            else:  # pragma: no cover - argparse restricts the choices
                print(f"reducer calib: error: unknown command {command!r}", file=sys.stderr)
                return 2
    except reg.RegistryError as exc:
        print(f"reducer calib {command}: error: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:  # e.g. the database server is down
        try:
            where = reg.to_url(url_text).render_as_string(hide_password=True)
        except SQLAlchemyError:
            where = "(unparsable URL)"
        detail = getattr(exc, "orig", None) or exc
        print(f"reducer calib {command}: error: database {where}: {detail}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m reducer.registry_cli calib list ...``.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default: ``sys.argv[1:]``); a leading ``calib`` may be left out.

    Returns
    -------
    int
        Exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "calib":
        argv.insert(0, "calib")
    parser = argparse.ArgumentParser(prog="reducer")
    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return run(args, os.environ.get("REDUCER_REGISTRY"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
