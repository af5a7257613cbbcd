"""Remove the intermediate products of finished targets (``reducer prune``).

A frame's chain leaves one product per step (``p``, ``fp``, ``sfp``, ``zsfp``, ``azsfp``,
``tazsfp``); only the last one feeds the stacks, light curves and reports. Pruning deletes
the others for targets whose work is done, without making the next ``doit science``
rebuild them:

1. A target is *finished* when doit itself finds every task it needs up to date: the
   inventory, every master, and everything ``science:TARGET`` depends on (each frame's
   chain, its stacks and light curves) -- the tasks are made by the night's own task
   generators and checked with doit's ``Dependency.get_status`` on the night's ``.doit.db``.
   A target with any task pending is never touched.
2. For each frame of a finished target, ``<night>/<TARGET>/.pruned.json`` records the
   frame's *chain digest* (:func:`chain_digest`: the steps, each step's settings digest,
   and size and modification time of the raw frame and the masters and defects map the
   chain uses), the final product and the files removed.
3. The task generator (:func:`reducer.tasks.science.frame_tasks`) then yields, for a frame
   in the manifest, one task in place of its chain: same name as the chain's last task
   (``zeropoint:<stem>``), same target (the final product), ``file_dep`` on the raw frame
   and masters only, ``uptodate`` comparing the chain digest with the one the final
   product was made with (:class:`ChainUnchanged`; kept in doit's values of the task, as
   each step keeps its settings digest, so parallel rebuilds never write one file). When
   the digest changes (a setting of any step, a new master, a touched raw frame), its
   action :func:`run_pruned_chain` rebuilds the whole chain in a scratch folder and keeps
   only the final product: the frame stays pruned.
4. doit would run a task whose ``file_dep`` list changed, so pruning records the new task's
   state in ``.doit.db`` exactly as ``doit reset-dep`` does (``Dependency.save_success``
   with the task's previous values plus the chain digest), and forgets the intermediate
   steps' tasks. ``report.txt``, made from final products only, stays up to date.

A frame whose intermediate another task reads (the reference frame of a target without a
catalogue: :mod:`reducer.fieldref`) keeps its chain. ``doit redo:TARGET`` removes the
target's folder, manifest included: every prefix comes back.

Order of the writes (a crash at any point leaves a night ``doit science`` completes
correctly): manifest, then doit's database, then the deletions. Running prune again is
harmless: pruned frames are skipped and left-over intermediates of them removed.
Sizes are reported in MB (10^6 bytes).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = ".pruned.json"
SCRATCH_PREFIX = ".rebuild-"


class PruneError(ValueError):
    """Pruning cannot start (unknown target, no doit state, unsupported doit backend)."""


# --------------------------------------------------------------------------- manifest
_MANIFESTS: dict = {}


def manifest_path(night_dir, target: str) -> Path:
    return Path(night_dir) / target / MANIFEST


def read_manifest(path: Path) -> dict:
    """The frames recorded in a manifest, ``{stem: entry}`` (``{}`` when there is none).

    Cached by size and modification time: the task generator asks once per frame. A manifest
    that cannot be read counts as none (the frames' full chains come back, which is safe).
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    key = (st.st_size, st.st_mtime_ns)
    hit = _MANIFESTS.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        frames = json.loads(path.read_text()).get("frames", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        frames = {}
    _MANIFESTS[path] = (key, frames)
    return frames


def pruned_entry(night, target: str, stem: str) -> dict | None:
    """The manifest entry of one frame, or ``None`` when it is not pruned."""
    return read_manifest(manifest_path(night.dir, target)).get(stem)


def _write_manifest(path: Path, frames: dict) -> None:
    from . import __version__
    from .fitsio import atomic_write_text
    atomic_write_text(path, json.dumps({"reducer": __version__, "frames": frames},
                                       indent=2, sort_keys=True))


# --------------------------------------------------------------------------- the pruned task
def chain_digest(night, steps: list, deps: list) -> str:
    """Digest of everything a frame's final product depends on.

    Parameters
    ----------
    night : reducer.night.Night
    steps : list of str
        The chain's task basenames in order (``['prepare', 'flatten', ...]``).
    deps : list of str
        Files the chain reads besides its own products: raw frame, masters, defects map.

    Returns
    -------
    str
        16 hex digits over the steps, each step's settings digest
        (:func:`reducer.stepconfig.step_digest`) and each file's size and modification time (ns).
    """
    from .stepconfig import step_digest
    files = []
    for d in sorted(deps):
        try:
            st = os.stat(d)
            files.append([d, st.st_size, st.st_mtime_ns])
        except FileNotFoundError:
            files.append([d, None, None])
    payload = json.dumps([list(steps), [step_digest(night, s) for s in steps], files])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ChainUnchanged:
    """doit ``uptodate`` of a pruned frame: the final product was made with this chain digest."""

    def __init__(self, digest: str):
        self.digest = digest

    def __call__(self, task, values):
        return values.get("chain") == self.digest


def external_deps(chain_tasks: list) -> list:
    """The files a frame's chain reads that it does not make itself (raw, masters, defects,
    field references), without the other frames' products beside its own (the z step's
    companions: pruned with it, so a pruned chain rebuilt later does without them)."""
    made = {t for task in chain_tasks for t in task["targets"]}
    folder = os.path.dirname(chain_tasks[-1]["targets"][0])
    out = []
    for task in chain_tasks:
        for d in task["file_dep"]:
            if d in made or d in out or (d.endswith(".fits") and os.path.dirname(d) == folder):
                continue
            out.append(d)
    return out


def pruned_chain_task(night, frame, chain_tasks: list) -> dict:
    """The one task standing for a pruned frame's chain (see the module docstring).

    Parameters
    ----------
    night : reducer.night.Night
    frame : reducer.inventory.Frame
    chain_tasks : list of dict
        The frame's full chain as :func:`reducer.tasks.science.frame_tasks` makes it.
    """
    last = chain_tasks[-1]
    steps = [t["basename"] for t in chain_tasks]
    deps = external_deps(chain_tasks)
    digest = chain_digest(night, steps, deps)
    out = last["targets"][0]
    products = {t["targets"][0] for t in chain_tasks}
    # the chain's own actions, with its products named for the scratch folder
    plan = []
    for t in chain_tasks:
        (fn, args), = t["actions"]
        plan.append((fn, [{"product": Path(a).name} if isinstance(a, str) and a in products else a
                          for a in args]))
    return {
        "basename": last["basename"], "name": last["name"],
        "actions": [(run_pruned_chain, [str(night.dir), frame.file, plan, out, digest])],
        "file_dep": deps, "targets": [out], "uptodate": [ChainUnchanged(digest)],
        "clean": True,
        "doc": f"{last['basename']} {frame.file} (pruned: the chain is rebuilt in a scratch "
               f"folder when it must run)",
    }


def run_pruned_chain(night_dir: str, filename: str, plan: list, out: str, digest: str) -> dict:
    """doit action of a pruned frame: run its chain's actions in a scratch folder next to
    ``out`` and keep only the final product (moved over ``out`` atomically).

    Each step runs exactly as in the full chain (a failing step leaves its failure record,
    which the later steps pass on), so the final product is the one the full chain makes.
    The values returned are the last step's, plus the chain digest.
    """
    import shutil
    from .products import raw_stem
    out = Path(out)
    scratch = out.parent / f"{SCRATCH_PREFIX}{raw_stem(filename)}"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    values = {}
    try:
        for fn, args in plan:
            values = fn(*[str(scratch / a["product"]) if isinstance(a, dict) else a for a in args])
            if values is False:          # a doit failure, as in the full chain: stop here
                return False
        os.replace(scratch / out.name, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{filename}: pruned chain rebuilt in a scratch folder ({len(plan)} steps), "
          f"kept {out.name}")
    return {**(values if isinstance(values, dict) else {}), "chain": digest}


# --------------------------------------------------------------------------- finished?
def _load_tasks(night) -> tuple[dict, dict]:
    """The night's inventory, calib and science tasks as the night's generators make them:
    doit ``Task`` objects by name, and the science tasks' dicts by name (as yielded)."""
    from doit.loader import generate_tasks
    from .tasks import night_tasks
    gens = night_tasks(night.dir / "dodo.py")
    tasks, dicts = {}, {}

    def keep(gen):
        for d in gen:
            if isinstance(d, dict) and d.get("name"):
                dicts[f"{d.get('basename')}:{d['name']}"] = dict(d)
            yield d
    for key in ("task_inventory", "task_calib", "task_science"):
        fn = gens[key]
        made = fn()
        if key == "task_science":
            made = keep(made)
        for t in generate_tasks(key[len("task_"):], made, fn.__doc__):
            tasks[t.name] = t
    return tasks, dicts


def _dependency(night):
    """doit's dependency manager on the night's database (as ``doit`` itself opens it)."""
    from doit.dependency import CHECKERS, Dependency, SqliteDB
    from .tasks import doit_config
    cfg = doit_config(night)
    if cfg["backend"] != "sqlite3":
        raise PruneError(f"doit backend {cfg['backend']!r} is not supported by prune")
    db = Path(cfg["dep_file"])
    if not db.is_file():
        raise PruneError(f"{night.dir}: no doit state ({db.name}): nothing has been built yet")
    return Dependency(SqliteDB, str(db), checker_cls=CHECKERS[cfg["check_file_uptodate"]])


def _closure(tasks: dict, root: str) -> list:
    """Names of the tasks ``root`` needs, itself included (task_dep and file_dep producers)."""
    producer = {tg: t.name for t in tasks.values() for tg in t.targets}
    seen, todo = [], [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in tasks:
            continue
        seen.append(name)
        t = tasks[name]
        todo.extend(t.task_dep)
        todo.extend(producer[d] for d in t.file_dep if d in producer)
    return seen


#: doit's reasons for running a task, in words
_WHY = {"missing_target": "not built", "missing_file_dep": "inputs not built",
        "checker_changed": "inputs changed", "changed_file_dep": "inputs changed",
        "uptodate_false": "settings changed",
        "added_file_dep": "inputs changed", "removed_file_dep": "inputs changed",
        "has_no_dependencies": "always runs"}
_ORDER = ("inventory", "calib", "prepare", "flatten", "sky", "cosmics", "astrometry",
          "zeropoint", "stack", "lightcurve")


def _pending(dep, tasks: dict, names) -> list:
    """The tasks among ``names`` (with actions) that doit would run: [(name, reason)], in
    chain order."""
    out = []
    for n in names:
        t = tasks[n]
        if not t.actions:
            continue
        st = dep.get_status(t, tasks, get_log=True)
        if st.status != "up-to-date":
            # the first reason that applies (a task never built also has no recorded state)
            why = next((w for r, w in _WHY.items() if r in st.reasons), st.status)
            out.append((n, why))
    return sorted(out, key=lambda x: (_ORDER.index(x[0].split(":")[0])
                                      if x[0].split(":")[0] in _ORDER else len(_ORDER), x[0]))


# --------------------------------------------------------------------------- prune
@dataclass
class TargetPrune:
    """What pruning did (or would do) to one target."""

    target: str
    status: str                      # 'pruned', 'already', 'pending'
    frames: int = 0                  # frames pruned now
    nbytes: int = 0                  # bytes freed (or to be freed)
    removed: list = field(default_factory=list)
    pending: list = field(default_factory=list)    # [(task, reason)]
    kept: list = field(default_factory=list)       # [(raw file, why its chain is kept)]

    def line(self, dry_run: bool) -> str:
        mb = self.nbytes / 1e6
        if self.status == "pending":
            first = ", ".join(f"{n} ({why})" for n, why in self.pending[:3])
            more = f" and {len(self.pending) - 3} more" if len(self.pending) > 3 else ""
            return (f"{self.target}: not finished, {len(self.pending)} task(s) pending: "
                    f"{first}{more}; left alone")
        verb = "would free" if dry_run else "freed"
        kept = "".join(f"; kept the chain of {f} ({why})" for f, why in self.kept)
        if self.status == "already" and not self.nbytes:
            return f"{self.target}: nothing to prune (already pruned); {verb} 0.0 MB{kept}"
        return f"{self.target}: {self.frames} frame(s) pruned, {verb} {mb:.1f} MB{kept}"


def prune_night(night_dir, targets=(), dry_run: bool = False) -> list:
    """Prune the intermediate products of the finished targets of a night.

    Parameters
    ----------
    night_dir : path-like
        The night directory.
    targets : sequence of str
        Target names (as in ``doit list``); empty: every target.
    dry_run : bool
        Say what would be freed, change nothing.

    Returns
    -------
    list of TargetPrune
        One per target considered, in name order.

    Raises
    ------
    PruneError
        An unknown target name, or a night where nothing has been built yet.
    reducer.runlock.RunLocked
        A doit run (or another prune) is working in the night now.
    """
    from .night import Night
    from .runlock import hold
    night = Night(night_dir)
    if dry_run:
        return _prune(night, targets, dry_run)
    # no doit run may build or record anything while prune rewrites the night's state
    with hold(night.dir, "reducer prune"):
        return _prune(night, targets, dry_run)


def _prune(night, targets, dry_run: bool) -> list:
    from .products import STEP_NAMES, raw_stem
    from .tasks.calib import _load_sets
    from .tasks.science import science_frames
    dep = _dependency(night)
    try:
        tasks, dicts = _load_tasks(night)
        frames, _ = _load_sets(night)
        users: dict = {}            # file -> tasks reading it
        for t in tasks.values():
            for d in t.file_dep:
                users.setdefault(d, set()).add(t.name)
        by_target: dict = {}
        for fr in science_frames(frames):
            by_target.setdefault(fr.target, []).append(fr)
        known = sorted(t for t in by_target if f"science:{t}" in tasks)
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise PruneError(f"no target {', '.join(unknown)} in {night.dir} "
                             f"(targets: {', '.join(known) or 'none'})")
        chosen = list(targets) or known
        # a night whose inventory or masters are not up to date may still change any target
        night_wide = _pending(dep, tasks, [n for n in tasks
                                           if n == "inventory" or n.startswith("calib:")])
        results, to_save, to_forget, to_delete, manifests = [], [], [], [], {}
        keep = _kept_chains(tasks, dicts, by_target, users)
        for target in sorted(chosen):
            pending = night_wide + _pending(dep, tasks, _closure(tasks, f"science:{target}"))
            if pending:
                results.append(TargetPrune(target, "pending", pending=pending))
                continue
            res = TargetPrune(target, "already")
            mpath = manifest_path(night.dir, target)
            entries = dict(read_manifest(mpath))
            for fr in by_target.get(target, []):
                stem = raw_stem(fr.file)
                # the frame's chain exactly as the generator made it (pruned: one task)
                chain_tasks = [dicts[n] for n in (f"{b}:{stem}" for b in STEP_NAMES.values())
                               if n in dicts]
                if not chain_tasks:
                    continue
                last = Path(chain_tasks[-1]["targets"][0])
                if stem in entries and len(chain_tasks) == 1:
                    # pruned before: remove what a crash may have left behind
                    for name in entries[stem].get("removed", []):
                        p = last.parent / name
                        if p.is_file():
                            res.nbytes += p.stat().st_size
                            res.removed.append(p)
                    continue
                inter = [Path(t["targets"][0]) for t in chain_tasks[:-1]]
                if not inter:
                    continue       # a one-step chain has nothing to prune
                own = {f"{t['basename']}:{t['name']}" for t in chain_tasks}
                others = sorted({u for p in inter for u in users.get(str(p), ())} - own)
                if others and stem not in keep:
                    others = []        # read only by chains pruned with it (z companions)
                if others:
                    # e.g. a field reference made from this frame's zsfp: keep its chain
                    res.kept.append((fr.file, f"read by {', '.join(others)}"))
                    continue
                present = [p for p in inter if p.is_file()]
                pt = pruned_chain_task(night, fr, chain_tasks)
                entries[stem] = {
                    "file": fr.file, "final": last.name, "steps": [t["basename"] for t in chain_tasks],
                    "digest": pt["uptodate"][0].digest, "depends_on": pt["file_dep"],
                    "removed": [p.name for p in inter],
                    "bytes": sum(p.stat().st_size for p in present),
                }
                res.frames += 1
                res.nbytes += entries[stem]["bytes"]
                res.removed += present
                to_save.append(pt)
                to_forget += [f"{t['basename']}:{t['name']}" for t in chain_tasks[:-1]]
            if res.frames:
                res.status = "pruned"
                manifests[mpath] = entries
            to_delete += res.removed
            results.append(res)
        if dry_run:
            return results
        # before anything is written: the manifest changes the target folder's time
        report_fresh = _report_fresh(night)
        from datetime import datetime, timezone
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for mpath, entries in manifests.items():
            for e in entries.values():
                e.setdefault("pruned_at", stamp)
            _write_manifest(mpath, entries)
        _record_pruned_tasks(dep, to_save, to_forget)
    finally:
        dep.close()
    for p in to_delete:
        p.unlink(missing_ok=True)
    if report_fresh and (to_delete or manifests):
        _refresh_report_signature(night)
    return results


def _kept_chains(tasks: dict, dicts: dict, by_target: dict, users: dict) -> set:
    """Stems of the frames whose chains must be kept whole: an intermediate of theirs is
    read by a task that is not a chain step of the same target (a field reference), or by
    the chain of a frame kept itself (the z step's companions), to a fixed point."""
    from .products import STEP_NAMES, raw_stem
    chain_of, target_of, inter_of = {}, {}, {}
    for target, frames in by_target.items():
        for fr in frames:
            stem = raw_stem(fr.file)
            names = [n for n in (f"{b}:{stem}" for b in STEP_NAMES.values()) if n in dicts]
            if len(names) < 2:
                continue
            for n in names:
                chain_of[n] = stem
            target_of[stem] = target
            inter_of[stem] = [dicts[n]["targets"][0] for n in names[:-1]]
    readers = {stem: {u for p in paths for u in users.get(str(p), ())} for stem, paths in inter_of.items()}
    keep = {stem for stem, rd in readers.items()
            if any(chain_of.get(u) is None or target_of.get(chain_of[u]) != target_of[stem]
                   for u in rd if chain_of.get(u) != stem)}
    while True:
        more = {stem for stem, rd in readers.items() if stem not in keep
                and any(chain_of.get(u) in keep for u in rd if chain_of.get(u) != stem)}
        if not more:
            return keep
        keep |= more


def _report_fresh(night) -> bool:
    """True when ``report.txt`` is up to date (its doit ``uptodate`` check holds)."""
    from .tasks.reports import ReportUnchanged
    return bool(ReportUnchanged(str(night.dir))(None, {}))


def _refresh_report_signature(night) -> None:
    """``report.txt`` is made from each frame's last product, the stacks and sidecars, never
    from intermediates: a report up to date before pruning is up to date after it. Its
    signature (which sees the target folders change) is recorded again so ``doit science``
    does not rewrite it for nothing."""
    from .fitsio import atomic_write_text
    from .tasks.reports import SIGNATURE_FILE, report_signature
    atomic_write_text(night.dir / SIGNATURE_FILE, report_signature(night.dir) + "\n")


def _record_pruned_tasks(dep, task_dicts: list, forget: list) -> None:
    """Make doit's database hold the pruned tasks as up to date (as ``doit reset-dep`` does:
    the file_dep states of the new task, its previous values plus the chain digest), and
    forget the intermediate steps' tasks."""
    from doit.task import dict_to_task
    for d in task_dicts:
        d = dict(d)
        name = f"{d.pop('basename')}:{d['name']}"
        d["name"] = name
        task = dict_to_task(d)
        values = dep.get_values(name)
        result = dep.get_result(name)
        task.values = {**values, "chain": d["uptodate"][0].digest}
        dep.save_success(task, result_hash=result)
    for name in forget:
        dep.remove(name)
