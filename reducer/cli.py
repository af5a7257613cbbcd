"""The ``reducer`` command.

``reducer night [UTDATE]``     make redux/UTDATE with dodo.py, night.toml and a raw link
``reducer nights --raw DIR``   list the nights in a raw folder and make a directory for each
``reducer explain FILE``       how a frame is typed, from which keyword values
``reducer settings [DIR]``     the settings in force for a night, layer by layer
``reducer profiles``           the instrument profiles reducer knows
``reducer simulate DIR``       write a synthetic raw night (with its truth)
``reducer demo [DIR]``         simulate a night, make its directory and run doit there
``reducer calib ...``          the calibration registry (list, certify, decertify, mark-bad)
``reducer watch [UTDATE]``     reduce a night automatically as its frames arrive
``reducer prune [TARGET ...]`` remove the intermediate products of finished targets

Errors from bad settings, profiles or input are one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _site(args):
    from .config import load_site
    return load_site(getattr(args, "config", None))


def _utdate(args, site) -> str | None:
    """The UT date asked for, else the current observing night of the instrument (at its
    site); None (after saying why on stderr) when no instrument is known."""
    if args.utdate:
        return args.utdate
    from .instruments import load_profile
    from .nights import current_night
    inst = args.instrument or site.data.get("instrument")
    if not inst:
        print("reducer: no instrument: pass --instrument NAME or set 'instrument' in "
              "reducer.toml", file=sys.stderr)
        return None
    return current_night(load_profile(inst, site.profiles_dirs).site)


def cmd_night(args) -> int:
    from .night import make_night_dir
    site = _site(args)
    utdate = _utdate(args, site)
    if utdate is None:
        return 2
    res = make_night_dir(site, utdate, raw=args.raw, instrument=args.instrument)
    print(f"night {utdate}: {res.path}")
    for p in res.made:
        print(f"  made {p.name}")
    for p in res.kept:
        print(f"  kept {p.name} (already there)")
    print(f"next: cd {res.path} && doit list")
    return 0


def cmd_nights(args) -> int:
    from collections import Counter, defaultdict
    from .instruments import load_profile
    from .inventory import scan
    from .night import make_night_dir
    site = _site(args)
    inst = args.instrument or site.data.get("instrument")
    if not inst:
        print("reducer: no instrument: pass --instrument NAME", file=sys.stderr)
        return 2
    profile = load_profile(inst, site.profiles_dirs)
    res = scan(Path(args.raw), profile)
    by_night = defaultdict(Counter)
    undated = []
    for f in res.frames:
        if f.night:
            by_night[f.night][f.type if f.usable else "set aside"] += 1
        else:
            undated.append(f)
    print(f"{len(by_night)} night(s) of {profile.name} frames in {args.raw}:")
    for n in sorted(by_night):
        c = by_night[n]
        print(f"  {n}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    for f in undated:
        print(f"  (no night) {f.file}: {f.reason}")
    if not args.list:
        for n in sorted(by_night):
            r = make_night_dir(site, n, raw=Path(args.raw), instrument=inst)
            print(f"  {'made' if r.made else 'kept'} {r.path}")
    return 0


def cmd_explain(args) -> int:
    from .instruments import load_profile
    from .inventory import explain
    site = _site(args)
    inst = args.instrument or site.data.get("instrument")
    if not inst:
        from .night import Night
        inst = Night(Path.cwd())._instrument
    profile = load_profile(inst, site.profiles_dirs)
    for f in args.files:
        print(explain(Path(f), profile))
    return 0


def cmd_settings(args) -> int:
    import json
    from .night import Night
    night = Night(Path(args.night_dir))
    print(f"# settings of night {night.utdate} in {night.dir}")
    for layer, src in night.layers():
        print(f"#   {layer:10s} {src}")
    print(f"# config digest {night.config_digest}")
    print(json.dumps(night.settings, indent=2, sort_keys=True, default=str))
    return 0


def cmd_profiles(args) -> int:
    from .instruments import load_profile, profile_paths
    site = _site(args)
    for name, path in sorted(profile_paths(site.profiles_dirs).items()):
        p = load_profile(path)
        desc = p.raw["instrument"].get("description", "")
        print(f"{name:14s} {len(p.detectors)} det  {desc}")
    return 0


def cmd_simulate(args) -> int:
    from .testing import simulate_main
    return simulate_main(args.rest)


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(Path(args.dir), seed=args.seed)


def cmd_watch(args) -> int:
    from .night import NIGHT_TOML, make_night_dir
    from .watch import run_watch
    if not args.utdate and not args.raw and (Path.cwd() / NIGHT_TOML).is_file():
        return run_watch(Path.cwd())         # in a night directory: watch it
    site = _site(args)
    utdate = _utdate(args, site)
    if utdate is None:
        return 2
    res = make_night_dir(site, utdate, raw=args.raw, instrument=args.instrument)
    for p in res.made:
        print(f"night {utdate}: made {p.name} in {res.path}", flush=True)
    return run_watch(res.path)


def cmd_prune(args) -> int:
    from .prune import prune_night
    from .runlock import RunLocked
    try:
        res = prune_night(Path(args.night), args.targets, dry_run=args.dry_run)
    except RunLocked as exc:
        print(f"reducer: {exc}", file=sys.stderr)
        return 2
    total = sum(r.nbytes for r in res)
    for r in res:
        print(r.line(args.dry_run))
    print(f"{'would free' if args.dry_run else 'freed'} {total / 1e6:.1f} MB in total"
          f"{' (dry run: nothing removed)' if args.dry_run else ''}")
    # a target asked for by name and left alone is worth a non-zero status for scripts
    return 1 if args.targets and any(r.status == "pending" for r in res) else 0


def cmd_calib(args) -> int:
    from .registry_cli import run
    site = _site(args)
    return run(args, site.registry_url, store_dir=site.path("masters_store"),
               instrument=site.data.get("instrument") or None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="reducer", description="Per-night CCD reduction directories driven by doit.")
    from . import __version__
    ap.add_argument("--version", action="version", version=f"reducer {__version__}")
    ap.add_argument("--config", help="site settings file (default: $REDUCER_CONFIG, then ~/.config/reducer/reducer.toml)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("night", help="make redux/UTDATE with dodo.py, night.toml and a raw link")
    p.add_argument("utdate", nargs="?", help="UT date YYYYMMDD (default: the current observing night)")
    p.add_argument("--raw", type=Path, help="raw folder (default: the site's raw pattern)")
    p.add_argument("--instrument", help="instrument profile name")
    p.set_defaults(func=cmd_night)

    p = sub.add_parser("nights", help="list the nights in a raw folder and make a directory for each")
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--instrument")
    p.add_argument("--list", action="store_true", help="only list, make no directory")
    p.set_defaults(func=cmd_nights)

    p = sub.add_parser("explain", help="show how frames are typed")
    p.add_argument("files", nargs="+")
    p.add_argument("--instrument")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("settings", help="print the resolved settings of a night")
    p.add_argument("night_dir", nargs="?", default=".")
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("profiles", help="list the instrument profiles")
    p.set_defaults(func=cmd_profiles)

    p = sub.add_parser("simulate", help="write a synthetic raw night", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="simulate a night and reduce it")
    p.add_argument("dir", nargs="?", default="reducer-demo")
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("watch", help="reduce a night automatically as its frames arrive")
    p.add_argument("utdate", nargs="?", help="UT date YYYYMMDD (default: the night directory "
                   "you are in, else the current observing night)")
    p.add_argument("--raw", type=Path, help="raw folder (default: the site's raw pattern)")
    p.add_argument("--instrument", help="instrument profile name")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("prune", help="remove the intermediate products of finished targets")
    p.add_argument("targets", nargs="*", metavar="TARGET", help="targets (default: every finished one)")
    p.add_argument("--night", default=".", help="night directory (default: the current one)")
    p.add_argument("--dry-run", action="store_true", help="say what would be freed, remove nothing")
    p.set_defaults(func=cmd_prune)

    from .registry_cli import add_subcommands
    add_subcommands(sub).set_defaults(func=cmd_calib)
    return ap


def main(argv=None) -> int:
    from .config import SettingsError
    from .instruments import ProfileError
    from .night import NightError
    from .headers import FrameError
    from .prune import PruneError
    from .watch import WatchError
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SettingsError, ProfileError, NightError, FrameError, FileNotFoundError,
            PruneError, WatchError) as exc:
        print(f"reducer: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
