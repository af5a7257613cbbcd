"""doit tasks: the science chain per frame, and ``science`` per target.

Task basenames are the step names (``prepare``, ``flatten``, ...), subtasks are named by the
raw stem; ``science:<TARGET>`` depends on the last product of each of the target's frames,
``science`` on every target. The masters a frame uses are chosen when the tasks are made
(so doit orders them) and again, with verification results known, when the step runs.
"""
from __future__ import annotations

import os
from pathlib import Path

from doit import create_after

from ..products import STEP_NAMES, chain, raw_stem
from ..stepconfig import step_digest
from .calib import (DigestUnchanged, _defects_inputs, _load_sets, choose, choose_flat,
                    defects_key, defects_path, dependency)

#: steps whose algorithms are implemented, in chain order (the profile selects among them)
IMPLEMENTED = ("p", "f", "s", "z", "a", "t")
SCIENCE_TYPES = ("science", "standard")
STEP_DOCS = {
    "p": "p: overscan, bias, dark; electrons with uncertainty and mask (one per frame)",
    "f": "f: divide by the master flat of the frame's filter (one per frame)",
    "s": "s: subtract the sky (sources masked); level and rms in the header (one per frame)",
    "z": "z: find and repair cosmic rays with astroscrappy (one per frame)",
    "a": "a: astrometric solution against the reference catalogue (one per frame)",
    "t": "t: zero point, flux scale, FWHM and quality flag (one per frame)",
}


def frame_steps(night, sets, frame) -> list[str]:
    """The steps that apply to a frame: the profile's, minus f when no flat can be had."""
    steps = [s for s in night.profile.steps if s in IMPLEMENTED]
    if "p" not in steps:
        steps.insert(0, "p")
    if "f" in steps and choose_flat(night, sets, frame) is None:
        steps.remove("f")
    return steps


def _task_digest(night, step: str) -> str:
    """:func:`step_digest` once per step while one doit run makes its tasks (not per frame)."""
    memo = night.__dict__.setdefault("_task_digests", {})
    if step not in memo:
        memo[step] = step_digest(night, step)
    return memo[step]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and x not in (float("inf"), float("-inf"))


def _target_uptodate(night, names):
    """doit uptodate on the ``[targets]`` entries of these OBJECTs / target names: saved with
    the task, so editing one target's coordinates rebuilds only that target's tasks."""
    from doit.tools import config_changed
    from ..stepconfig import target_settings
    return config_changed(target_settings(night, names))


def product_path(night, frame, prefix: str) -> Path:
    # one path parse, not three: ~3000 calls at every doit start (frame.target has no "/")
    return Path(os.path.join(night.dir, frame.target, f"{prefix}{raw_stem(frame.file)}.fits"))


def science_frames(frames):
    return [f for f in frames if f.usable and f.type in SCIENCE_TYPES]


# The chain's doit actions. The step functions are in reducer.steps (numpy, astropy): each
# action imports it when it runs, so making the tasks at every doit start does not.
def run_prepare(night_dir: str, filename: str, out: str):
    """doit action: :func:`reducer.steps.run_prepare`."""
    from ..steps import run_prepare as run
    return run(night_dir, filename, out)


def run_flatten(night_dir: str, filename: str, src: str, out: str):
    """doit action: :func:`reducer.steps.run_flatten`."""
    from ..steps import run_flatten as run
    return run(night_dir, filename, src, out)


def run_sky(night_dir: str, filename: str, src: str, out: str, mastersky: str = "",
            mastersky_why: str = ""):
    """doit action: :func:`reducer.steps.run_sky`."""
    from ..steps import run_sky as run
    return run(night_dir, filename, src, out, mastersky, mastersky_why)


def run_cosmics(night_dir: str, filename: str, src: str, out: str, companions=()):
    """doit action: :func:`reducer.steps.run_cosmics`."""
    from ..steps import run_cosmics as run
    return run(night_dir, filename, src, out, companions)


def run_astrometry(night_dir: str, filename: str, src: str, out: str):
    """doit action: :func:`reducer.steps.run_astrometry`."""
    from ..steps import run_astrometry as run
    return run(night_dir, filename, src, out)


def run_zeropoint(night_dir: str, filename: str, src: str, out: str):
    """doit action: :func:`reducer.steps.run_zeropoint`."""
    from ..steps import run_zeropoint as run
    return run(night_dir, filename, src, out)


RUNNERS = {"s": run_sky, "z": run_cosmics, "a": run_astrometry, "t": run_zeropoint}


def frame_tasks(night, sets, frame, extra_deps=None, mastersky=None, companions=()):
    """The chain tasks of one frame, and the path of its last product.

    ``extra_deps`` maps a step letter to more files its task depends on (the field
    reference for a and t when no catalogue is configured). ``mastersky`` is the
    (master-sky path or None, reason) the s step uses (:func:`reducer.mastersky.plan`).
    """
    extra_deps = extra_deps or {}
    from ..calsets import calib_settings, frame_key
    keys = calib_settings(night.settings)["set_keys"]
    stem = raw_stem(frame.file)
    steps = frame_steps(night, sets, frame)
    prefixes = chain(steps)
    tasks = []
    prev = None
    for step, prefix in zip([s for s in ("p", "f", "s", "z", "a", "t") if s in steps], prefixes):
        out = product_path(night, frame, prefix)
        name = STEP_NAMES[step]
        if step == "p":
            deps = [str(night.raw_dir / frame.file)]
            dpath = defects_path(night, defects_key(night, frame_key(frame, keys["bias"])))
            dark, flats = _defects_inputs(night, sets, defects_key(night, frame_key(frame, keys["bias"])),
                                          frame.mjd, runtime=False)
            if dark is not None or flats:
                deps.append(str(dpath))
            for imtype in ("bias", "dark"):
                ch = choose(night, sets, imtype, frame_key(frame, keys[imtype]), frame.mjd)
                if ch is not None:
                    deps.append(dependency(ch))
            action = (run_prepare, [str(night.dir), frame.file, str(out)])
        elif step == "f":
            deps = [str(prev), dependency(choose_flat(night, sets, frame))]
            action = (run_flatten, [str(night.dir), frame.file, str(prev), str(out)])
        else:
            deps = [str(prev)]
            action = (RUNNERS[step], [str(night.dir), frame.file, str(prev), str(out)])
            if step == "s" and mastersky is not None:
                path, why = mastersky
                action = (run_sky, action[1] + [str(path) if path else "", why])
                if path:
                    deps.append(str(path))
            elif step == "z" and companions:
                action = (run_cosmics, action[1] + [[str(c) for c in companions]])
                deps += [str(c) for c in companions]
        deps = deps + [str(p) for p in extra_deps.get(step, ())]
        uptodate = [DigestUnchanged(_task_digest(night, name))]
        if step == "a" and not (_finite(frame.ra) and _finite(frame.dec)):
            # the target's coordinates in night.toml are its pointing when the header has none
            uptodate.append(_target_uptodate(night, [frame.object]))
        tasks.append({
            "basename": name, "name": stem, "actions": [action], "file_dep": deps,
            "targets": [str(out)], "uptodate": uptodate,
            "clean": True, "doc": f"{name} {frame.file}",
        })
        prev = out
    # `reducer prune` removed this frame's intermediates: one task stands for the chain
    from ..prune import pruned_chain_task, pruned_entry
    entry = pruned_entry(night, frame.target, stem)
    if entry is not None and entry.get("final") == prev.name and len(tasks) > 1:
        return [pruned_chain_task(night, frame, tasks)], prev
    return tasks, prev


def product_before(night, sets, frame, step: str) -> Path | None:
    """The product a frame's ``step`` reads (the one before it in the frame's chain)."""
    steps = frame_steps(night, sets, frame)
    if step not in steps or steps.index(step) == 0:
        return None
    done = [s for s in ("p", "f", "s", "z", "a", "t") if s in steps]
    return product_path(night, frame, chain(done)[done.index(step) - 1])


def reference_tasks(night, sets, frames):
    """Field-reference tasks (no catalogue configured: :mod:`reducer.fieldref`), and the
    extra dependencies of each frame's a and t steps on them.

    Returns
    -------
    tasks : list of dict
    extra : dict
        raw file name -> {step letter: [paths]}.
    """
    from ..fieldref import fieldref_path, reference_frames, relref_path, run_fieldref, run_relref
    from ..stepconfig import self_reference
    if not self_reference(night):
        return [], {}
    prefer = night.settings.get("astrometry", {}).get("reference_filters", [])
    by_target, by_filter = reference_frames(frames, night.dir, prefer=[prefer] if isinstance(prefer, str)
                                            else list(prefer))
    tasks, extra = [], {}
    refs = {}
    for target, fr in sorted(by_target.items()):
        src = product_before(night, sets, fr, "a")
        if src is None:
            continue
        out = fieldref_path(night.dir, target)
        refs[target] = out
        tasks.append({"basename": "fieldref", "name": target, "file_dep": [str(src)],
                      "actions": [(run_fieldref, [str(night.dir), fr.file, str(src), str(out)])],
                      "targets": [str(out), str(out.with_suffix(".json"))], "clean": True,
                      # frozen: the JSON sidecar keeps the reference frame as frames arrive
                      "uptodate": [DigestUnchanged(step_digest(night, "astrometry"))],
                      "doc": f"field reference of {target} from {fr.file} (no catalogue)"})
    rel = {}
    for (target, filt), fr in sorted(by_filter.items()):
        src = product_before(night, sets, fr, "t")
        if src is None or target not in refs:
            continue
        out = relref_path(night.dir, target, filt)
        rel[(target, filt)] = out
        tasks.append({"basename": "fieldref", "name": out.stem.replace("relref_", f"{target}_"),
                      "file_dep": [str(src), str(refs[target])],
                      "actions": [(run_relref, [str(night.dir), fr.file, str(src), str(refs[target]),
                                                str(out)])],
                      "targets": [str(out), str(out.with_suffix(".json"))], "clean": True,
                      "uptodate": [DigestUnchanged(step_digest(night, "photometry"))],
                      "doc": f"relative flux reference of {target} in {filt} from {fr.file}"})
    for f in frames:
        e = {}
        if f.target in refs:
            e["a"] = [refs[f.target]]
        if (f.target, f.filter) in rel:
            e["t"] = [rel[(f.target, f.filter)]]
        extra[f.file] = e
    return tasks, extra


def mastersky_tasks(night, sets, frames):
    """Master-sky tasks (``[sky] master``: :mod:`reducer.mastersky`), and the
    (path, reason) each frame's s step uses."""
    from ..mastersky import mastersky_name, plan, run_mastersky
    masters, use = plan(night, frames, lambda f: product_before(night, sets, f, "s"))
    tasks = []
    for path, chosen in masters.items():
        inputs = [str(src) for _, src in chosen]
        tasks.append({"basename": "mastersky", "name": mastersky_name(path),
                      "file_dep": inputs, "targets": [str(path)],
                      "actions": [(run_mastersky, [str(night.dir), inputs, str(path)])],
                      "uptodate": [DigestUnchanged(_task_digest(night, "sky"))], "clean": True,
                      "doc": f"master sky {mastersky_name(path)} from {len(chosen)} frames"})
    return tasks, use


def cosmic_companions(night, sets, frames) -> dict:
    """The other exposures each frame's z step compares with (``[cosmics] companions``,
    default 2; 0 = none): raw file name -> the products those frames' z steps read.

    Frames of the same target and filter in time order; frame ``i`` gets the ``K`` frames
    before it, and the first ``K`` frames get the first ``K + 1`` but themselves. So a
    frame's companions are frozen once ``K + 1`` frames of its group have arrived: until
    then each new frame redoes the z step of the few frames already there, after that
    new frames rebuild nothing earlier.
    """
    k = int(night.settings.get("cosmics", {}).get("companions", 2))
    if k <= 0:
        return {}
    groups: dict = {}
    for f in frames:
        src = product_before(night, sets, f, "z")
        if src is not None:
            groups.setdefault((f.target, f.filter), []).append((f.mjd, f.file, src))
    out = {}
    for members in groups.values():
        members.sort()
        for i, (_, file, _) in enumerate(members):
            pool = members[i - k:i] if i >= k else [m for m in members[:k + 1] if m[1] != file]
            out[file] = [m[2] for m in pool]
    return out


def _usable_products(paths):
    """The products among ``paths`` that went through the chain and passed the quality limits;
    and (file, reason) of the others."""
    from astropy.io import fits
    good, left = [], []
    for p in paths:
        h = fits.getheader(p)
        if h.get("FAILED"):
            left.append((Path(p).name, f"failed at {h.get('FAILSTEP')}: {h.get('FAILWHY')}"))
        elif h.get("QUALFLAG") is False:
            left.append((Path(p).name, f"quality: {h.get('QUALWHY', '')}"))
        else:
            good.append(p)
    return good, left


def remove_files(paths: list) -> None:
    """doit clean action: remove products that exist."""
    for p in paths:
        if Path(p).exists():
            Path(p).unlink()


def run_stack(night_dir: str, paths: list, out: str) -> dict:
    """doit action: stack, catalogue and target magnitude of one target and filter."""
    from ..night import Night
    from ..stack import build_stack
    night = Night(night_dir)
    good, left = _usable_products(paths)
    for f, why in left:
        print(f"stack {Path(out).stem}: leaves out {f}: {why}")
    if not good:
        print(f"stack {Path(out).stem}: no usable frame; nothing stacked")
        from ..masters import write_sidecar
        write_sidecar(Path(out).with_suffix(".json"), {"reason": "no usable frame", "left_out": left})
        return {"digest": step_digest(night, "stack")}
    tgt = build_stack(night, good, Path(out))
    if "mag" in tgt:
        mag = f"{tgt['mag']:.3f} +- {tgt['mag_err']:.3f}"
    elif "mag_inst" in tgt:
        mag = f"{tgt['mag_inst']:.3f} +- {tgt['mag_err']:.3f} (instrumental: no zero point)"
    else:
        mag = tgt.get("reason", "")
    print(f"stack {Path(out).stem}: {len(good)} frames, target {mag}")
    return {"digest": step_digest(night, "stack")}


def run_lightcurve(night_dir: str, paths: list, out: str) -> dict:
    """doit action: the light curve of one target and filter."""
    from ..night import Night
    from ..stack import build_lightcurve
    from ..masters import write_sidecar
    night = Night(night_dir)
    # the JSON is always written (its task's target): a light curve that cannot be made
    # says why there, and is not tried again until its inputs or settings change
    side = Path(out).with_suffix(".json")
    good, left = _usable_products(paths)
    if len(good) < 2:
        print(f"lightcurve {Path(out).stem}: fewer than 2 usable frames")
        write_sidecar(side, {"reason": "fewer than 2 usable frames", "left_out": left})
        return {"digest": step_digest(night, "photometry")}
    try:
        r = build_lightcurve(night, good, Path(out), Path(out).with_suffix(".png"))
    except ValueError as exc:
        print(f"lightcurve {Path(out).stem}: {exc}")
        for stale in (Path(out), Path(out).with_suffix(".png")):
            if stale.exists():
                stale.unlink()
        write_sidecar(side, {"reason": str(exc), "left_out": left})
        return {"digest": step_digest(night, "photometry")}
    print(f"lightcurve {Path(out).stem}: {r['n']} points, {r['ncomp']} comparison stars")
    write_sidecar(side, {"points": r["n"], "comparisons": r["ncomp"], "left_out": left})
    return {"digest": step_digest(night, "photometry")}


def make_task_generator(night):
    @create_after(executed="calib", creates=["science", "stack", "lightcurve", "fieldref", "mastersky",
                                             *[STEP_NAMES[s] for s in IMPLEMENTED]])
    def task_science():
        """Every science target through the chain: doit science, or doit science:TARGET."""
        frames, sets = _load_sets(night)
        for step in IMPLEMENTED:
            yield {"basename": STEP_NAMES[step], "name": None, "doc": STEP_DOCS[step]}
        yield {"basename": "science", "name": None,
               "doc": "every science target through the chain (science:TARGET for one)"}
        by_target: dict = {}
        groups: dict = {}
        objects: dict = {}
        yield {"basename": "fieldref", "name": None,
               "doc": "without a catalogue: one frame per target as its astrometric and flux reference"}
        sci = science_frames(frames)
        ref_tasks, extra = reference_tasks(night, sets, sci)
        yield from ref_tasks
        yield {"basename": "mastersky", "name": None, "doc": LIST_DOCS["mastersky"]}
        msky_tasks, msky = mastersky_tasks(night, sets, sci)
        yield from msky_tasks
        comps = cosmic_companions(night, sets, sci)
        for fr in sci:
            tasks, last = frame_tasks(night, sets, fr, extra.get(fr.file), msky.get(fr.file),
                                      comps.get(fr.file, ()))
            by_target.setdefault(fr.target, []).append(f"{tasks[-1]['basename']}:{tasks[-1]['name']}")
            if last.name.startswith("t"):
                groups.setdefault((fr.target, fr.filter), []).append(str(last))
                objects.setdefault(fr.target, set()).add(fr.object)
            yield from tasks
        yield {"basename": "stack", "name": None,
               "doc": "stack, catalogue and target magnitude per target and filter"}
        yield {"basename": "lightcurve", "name": None,
               "doc": "light curve (BJD_TDB, calibrated and differential) per target and filter"}
        nmin = int(night.settings.get("photometry", {}).get("lightcurve_min_frames", 5))
        for (target, filt), paths in sorted(groups.items()):
            from ..inventory import safe_name
            name = f"{target}_{safe_name(filt)}"
            out = night.dir / "stacks" / f"{name}.fits"
            yield {"basename": "stack", "name": name, "file_dep": paths,
                   "actions": [(run_stack, [str(night.dir), paths, str(out)])],
                   # the JSON is always written (the target's magnitude, or why nothing was
                   # stacked); the FITS and the catalogue only when frames were usable
                   "targets": [str(out.with_suffix(".json"))],
                   "uptodate": [DigestUnchanged(step_digest(night, "stack")),
                                _target_uptodate(night, [target, *objects[target]])],
                   "clean": [(remove_files, [[str(out), str(out.with_suffix(".ecsv")),
                                               str(out.with_suffix(".json"))]])],
                   "doc": f"stack of {target} in {filt} ({len(paths)} frames)"}
            by_target[target].append(f"stack:{name}")
            if len(paths) >= nmin:
                lc = night.dir / "lightcurves" / f"{name}.ecsv"
                yield {"basename": "lightcurve", "name": name, "file_dep": paths,
                       "actions": [(run_lightcurve, [str(night.dir), paths, str(lc)])],
                       "targets": [str(lc.with_suffix(".json"))],
                       "uptodate": [DigestUnchanged(step_digest(night, "photometry")),
                                    _target_uptodate(night, [target, *objects[target]])],
                       "clean": [(remove_files, [[str(lc), str(lc.with_suffix(".png")),
                                                   str(lc.with_suffix(".json"))]])],
                       "doc": f"light curve of {target} in {filt}"}
                by_target[target].append(f"lightcurve:{name}")
        for target, deps in sorted(by_target.items()):
            yield {"basename": "science", "name": target, "actions": None, "task_dep": deps,
                   "doc": f"target {target}: {len(deps)} frame(s) through the chain"}
        # report.txt again once every target is done (`doit report` writes it alone)
        from .reports import science_report_task
        yield science_report_task(night, [f"science:{t}" for t in sorted(by_target)])

    # `doit list` does not create delayed tasks: name the targets known so far in the doc
    targets = known_targets(night)
    task_science.__doc__ = ("every science target through the chain: doit science, doit science:TARGET"
                            + (f" ({', '.join(targets)})" if targets else ""))
    return task_science


#: one-line docs `doit list` shows for the delayed basenames (before they are made)
LIST_DOCS = {
    **{STEP_NAMES[s]: STEP_DOCS[s] for s in IMPLEMENTED},
    "fieldref": "without a catalogue: one frame per target as its astrometric and flux reference",
    "mastersky": "master sky per filter ([sky] master): illumination and fringe maps from dithered frames",
    "stack": "stack, catalogue and target magnitude per target and filter",
    "lightcurve": "light curve (BJD_TDB, calibrated and differential) per target and filter",
}


def make_task_generators(night) -> dict:
    """``task_science`` and, for ``doit list``, one placeholder generator per basename it
    makes (prepare, flatten, ..., stack, lightcurve), each with its own one-line doc.

    doit shows a delayed generator's docstring for every basename it ``creates``; so each
    basename gets a generator of its own. Whichever doit loads first makes every task (the
    same body), and doit then replaces the other placeholders by the real tasks, so the
    body runs once per doit run.
    """
    science = make_task_generator(night)
    out = {"task_science": science}
    for base, doc in LIST_DOCS.items():
        def gen(_science=science):
            yield from _science()
        gen.__doc__ = doc
        gen.__name__ = f"task_{base}"
        out[f"task_{base}"] = create_after(executed="calib", creates=[base])(gen)
    # task_science creates only its own basename now
    science.doit_create_after.creates = ["science"]
    return out


def known_targets(night) -> list[str]:
    """Targets in the night log as it stands (cheap: no pixels)."""
    if not night.nightlog.is_file():
        return []
    from ..inventory import read_nightlog
    return sorted({f.target for f in science_frames(read_nightlog(night.nightlog))})
