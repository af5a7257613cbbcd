"""doit task: the frame inventory (``nightlog.ecsv``)."""
from __future__ import annotations


class RawUnchanged:
    """doit ``uptodate`` check: the raw folder (names, sizes, times) and settings are as last seen."""

    def __init__(self, night_dir: str):
        self.night_dir = night_dir

    def __call__(self, task, values):
        from ..night import Night
        from ..inventory import raw_signature, scan_key
        night = Night(self.night_dir)
        last = values.get("raw_signature")
        if not last:
            return False
        key = scan_key(_cache_key(night), night.settings.get("drop", []))
        return last == raw_signature(night.raw_dir, key)


def _cache_key(night) -> str:
    from .. import __version__
    return night.digest("inventory", night.profile.raw) + night.utdate + __version__


def run_inventory(night_dir: str) -> dict:
    """doit action: scan raw/, write nightlog.ecsv, print a summary (one line per frame set aside)."""
    from collections import Counter
    from ..night import Night
    from ..inventory import scan, write_nightlog
    night = Night(night_dir)
    drop = night.settings.get("drop", [])
    res = scan(night.raw_dir, night.profile, night.utdate,
               cache_path=night.dir / ".inventory-cache.json", drop=drop,
               cache_key=_cache_key(night))
    changed = write_nightlog(res.frames, night.nightlog)
    usable = [f for f in res.frames if f.usable]
    counts = Counter(f.type for f in usable)
    summary = ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) or "no usable frames"
    print(f"inventory {night.utdate}: {len(res.frames)} frames ({summary})"
          f"{'' if changed else '; nightlog.ecsv unchanged'}")
    for f in res.frames:
        if not f.usable:
            print(f"  set aside {f.file}: {f.reason}")
    for name in res.incomplete:
        print(f"  not yet complete, left for the next run: {name}")
    if res.other_nights:
        others = ", ".join(f"{n} ({c})" for n, c in sorted(res.other_nights.items()))
        print(f"  frames of other nights in {night.raw_dir}: {others}")
    # a frame still arriving must be looked at again next time: do not record a signature
    return {"raw_signature": None if res.incomplete else res.signature}


def make_task_generator(night):
    def task_inventory():
        """Scan raw/, type every frame, write nightlog.ecsv."""
        return {
            "actions": [(run_inventory, [str(night.dir)])],
            "targets": [str(night.nightlog)],
            "uptodate": [RawUnchanged(str(night.dir))],
            "clean": True,
            "verbosity": 2,
            "doc": "scan raw/, type every frame, write nightlog.ecsv",
        }
    return task_inventory
