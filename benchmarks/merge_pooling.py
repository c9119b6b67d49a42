"""Merge several ``bench_pooling.py --out`` files of one setting into one record of results/quality_pooling.json.

A setting's seeds are often trained in several runs (two seeds side by side on the two cores, a model added to a
seed later): each run is deterministic per seed and model (walk seed = training seed, training seeded per model),
so the runs of one setting pair up seed by seed. This script checks that the files share a setting (dataset,
generator and every override), takes the union of their models per seed (a seed and model given twice is an
error), pairs PinSage against every other model on the seeds that have both (``bench_pooling.paired``, with its
95 % interval), compares every model with the seed-independent baselines (``baselines_same_split`` of one file,
or of ``--baselines-from``, which must be on the same split), and stores the record under ``--name`` in
``--into`` with every run's command, seconds and machine.

``--extend`` adds the seeds of FILES to the record already stored under ``--name`` (whose runs' files may be gone):
that record is read as the first input, and its commands, machines, borrowed walk-free rows and (without
``--note-file``) its note are kept.

``--walk-free-from FILE`` adds the rows of the models that never read the walks (GraphSAGE, either draw, while the
hard-negative curriculum is off: ``hard_cap`` 0) from runs of a setting that differs only in ``walk_overrides`` and
PinSage's ``n_neighbors`` (T): a new walk setting or T then needs only PinSage retrained. A seed and model present
in both must agree to the last digit (it is the same training), which the merge checks.

Run: ``PYTHONPATH=$PWD python benchmarks/merge_pooling.py --name content32_ids_qid_tuned
--into results/quality_pooling.json --note-file note.txt --baselines-from base.json s0.json s1.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_pooling import ci95, model_means, paired
from gnn.trainer import TrainConfig
from pipeline.rundir import write_json_atomic

REFERENCE = "pinsage"
ORDER = ("pinsage", "pinsage_mean", "graphsage", "graphsage_distinct")
SETTING = ("dataset", "generate", "generate_overrides", "model_overrides", "train_overrides", "walk_overrides",
           "split", "items", "users")
WALK_FREE = ("graphsage", "graphsage_distinct")  # models whose training reads no walk output (with hard_cap 0)
PINSAGE_ONLY = ("n_neighbors",)  # model fields only PinSage's walk sampler reads (T): may differ for WALK_FREE rows


def setting_mismatch(run: dict[str, Any], first: dict[str, Any]) -> str | None:
    """The first ``SETTING`` key on which a walk-free source differs from ``first``, ignoring ``walk_overrides``
    and the ``PINSAGE_ONLY`` model fields (tests/benchmarks/test_bench_pooling.py checks that GraphSAGE's
    embeddings do not depend on them); None when none does."""
    for key in SETTING:
        a, b = run.get(key), first.get(key)
        if key == "model_overrides":
            a, b = ({k: v for k, v in (d or {}).items() if k not in PINSAGE_ONLY} for d in (a, b))
        if key != "walk_overrides" and a != b:
            return key
    return None


def walk_free_rows(first: dict[str, Any], first_name: str, runs: list[dict[str, Any]], names: list[str]
                   ) -> dict[int, dict[str, Any]]:
    """``{seed: {"training": ..., "metrics": ...}}`` of the walk-free models (``WALK_FREE``) of ``runs``, which
    must share ``first``'s setting except ``walk_overrides``."""
    hard_cap = first.get("train_overrides", {}).get("hard_cap", TrainConfig.hard_cap)
    if hard_cap:
        raise SystemExit(f"--walk-free-from: hard_cap={hard_cap} in {first_name}: GraphSAGE then trains on the "
                         "walks' hard negatives; retrain it with the new walk setting instead")
    out: dict[int, dict[str, Any]] = {}
    for name, run in zip(names, runs, strict=True):
        key = setting_mismatch(run, first)
        if key is not None:
            raise SystemExit(f"--walk-free-from {name}: {key} differs from {first_name} ({run.get(key)!r} vs "
                             f"{first.get(key)!r}); only walk_overrides and the model's {', '.join(PINSAGE_ONLY)} "
                             "may differ")
        for row in run.get("per_seed", []):
            entry = out.setdefault(row["seed"], {"training": {}, "metrics": {}})
            for model in WALK_FREE:
                if model in row["metrics"]:
                    if model in entry["metrics"]:
                        raise SystemExit(f"--walk-free-from {name}: seed {row['seed']} of {model!r} is also in an "
                                         "earlier file; give each seed and model once")
                    entry["metrics"][model] = row["metrics"][model]
                    entry["training"][model] = row["training"].get(model)
    return out


def merge(runs: list[dict[str, Any]], names: list[str], baselines: dict[str, Any] | None,
          baselines_command: str | None, walk_free: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One record from bench_pooling results ``runs`` (read from files ``names``) of the same setting, with the
    rows of ``walk_free`` (:func:`walk_free_rows`) added where a seed lacks them and checked where it has them."""
    first = runs[0]
    for name, run in zip(names[1:], runs[1:], strict=True):
        for key in SETTING:
            if run.get(key) != first.get(key):
                raise SystemExit(f"{name}: {key} differs from {names[0]} ({run.get(key)!r} vs {first.get(key)!r});"
                                 " merge only runs of one setting")
    by_seed: dict[int, dict[str, Any]] = {}
    for name, run in zip(names, runs, strict=True):
        if not run.get("per_seed"):
            raise SystemExit(f"{name}: no finished seed (per_seed is empty); leave it out or let it finish")
        for row in run["per_seed"]:
            entry = by_seed.setdefault(row["seed"], {"seed": row["seed"], "training": {}, "metrics": {}})
            twice = sorted(set(entry["metrics"]) & set(row["metrics"]))
            if twice:
                raise SystemExit(f"{name}: seed {row['seed']} of {twice} is also in an earlier file; "
                                 "give each seed and model once")
            entry["training"].update(row["training"])
            entry["metrics"].update(row["metrics"])
    borrowed: list[str] = []
    for seed, extra in sorted((walk_free or {}).items()):
        if seed not in by_seed:
            continue  # a seed PinSage was not trained on pairs with nothing
        entry = by_seed[seed]
        for model, values in extra["metrics"].items():
            if model in entry["metrics"]:
                if entry["metrics"][model] != values:
                    raise SystemExit(f"--walk-free-from: seed {seed} of {model!r} differs between the walk "
                                     "settings, so its training reads the walks; retrain it instead")
            else:
                entry["metrics"][model] = values
                entry["training"][model] = extra["training"][model]
                borrowed.append(f"{model} seed {seed}")
    per_seed = [by_seed[s] for s in sorted(by_seed)]
    present = {m for row in per_seed for m in row["metrics"]}
    models = [m for m in ORDER if m in present] + sorted(present - set(ORDER))
    if REFERENCE not in present:
        raise SystemExit(f"no {REFERENCE} row in {names}: the paired differences are taken against it")
    metrics = list(next(r for r in per_seed if REFERENCE in r["metrics"])["metrics"][REFERENCE])
    out: dict[str, Any] = {key: first[key] for key in SETTING if key in first}
    out.update(models=models, seeds=[r["seed"] for r in per_seed], per_seed=per_seed)
    out["paired"] = {}
    for other in models:
        if other == REFERENCE:
            continue
        both = [r for r in per_seed if REFERENCE in r["metrics"] and other in r["metrics"]]
        if both:
            pair = paired([r["metrics"] for r in both], [REFERENCE, other])
            pair[f"{REFERENCE} - {other}"]["seeds"] = [r["seed"] for r in both]
            out["paired"].update(pair)
    out["mean"] = model_means(per_seed, models)
    if baselines is not None:
        out["baselines_same_split"] = baselines
        out["baselines_note"] = f"scored by the run {baselines_command} on the same split"
        vs: dict[str, Any] = {}
        for m in models:
            rows = [r for r in per_seed if m in r["metrics"]]
            for base in ("itemcf", "cooccurrence"):
                vs[f"{m} - {base}"] = {}
                for k in metrics:
                    d = np.array([r["metrics"][m][k] - baselines[base][k] for r in rows])
                    vs[f"{m} - {base}"][k] = {"per_seed": [round(float(x), 5) for x in d],
                                              "seeds": [r["seed"] for r in rows], "mean": round(float(d.mean()), 5),
                                              "ci95": ci95(d), "n_positive": int((d > 0).sum())}
        out["vs_baselines"] = vs
    if borrowed:
        out["walk_free_borrowed"] = borrowed
    out["command"], out["seconds"], out["machine"] = [], [], []
    for name, run in zip(names, runs, strict=True):  # a stored record (--extend) holds a list of each
        for key, default in (("command", f"(unfinished run: {name})"), ("seconds", None), ("machine", None)):
            value = run.get(key, default)
            out[key].extend(value if run.get("stored_record") else [value])
    return out


def stored_run(into: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """The record ``runs[name]`` of ``into`` (read from ``path``) as a merge input: its setting, seeds, commands,
    seconds and machines (lists, flagged ``stored_record``), walk-free rows and baselines."""
    record = into.get("runs", {}).get(name)
    if not isinstance(record, dict) or not record.get("per_seed"):
        raise SystemExit(f"--extend: {path} holds no record runs.{name} with seeds to extend; drop --extend to "
                         "write a new record, or name the stored one")
    return {**{k: record[k] for k in SETTING if k in record}, "per_seed": record["per_seed"],
            "stored_record": True, **{k: record.get(k, []) for k in ("command", "seconds", "machine")},
            **{k: record[k] for k in ("baselines_same_split", "baselines_note", "walk_free_borrowed",
                                     "walk_free_commands", "note") if k in record}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", type=Path, nargs="+", help="bench_pooling --out files (whole-file runs)")
    ap.add_argument("--name", required=True, help="key of the record under runs in --into")
    ap.add_argument("--into", type=Path, default=Path("results") / "quality_pooling.json")
    ap.add_argument("--note-file", type=Path, default=None, help="text stored as the record's note")
    ap.add_argument("--baselines-from", type=Path, default=None,
                    help="a bench_pooling --baselines result on the same split (default: the first input that has "
                         "baselines_same_split)")
    ap.add_argument("--walk-free-from", type=Path, action="append", default=[],
                    help="bench_pooling results of the same setting except walk_overrides and n_neighbors: their "
                         "GraphSAGE rows (which read neither) are added, and checked where the files have them too")
    ap.add_argument("--extend", action="store_true",
                    help="add the files' seeds to the record already stored under --name in --into (its runs' "
                         "files need not exist any more)")
    args = ap.parse_args(argv)

    def read(path: Path, option: str = "") -> dict[str, Any]:
        try:
            result: dict[str, Any] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            ap.error(f"{option}{path}: not a readable bench_pooling result ({err})")
        return result

    runs = [read(path) for path in args.files]
    names = [str(p) for p in args.files]
    if args.extend:
        if not args.into.is_file():
            ap.error(f"--extend: {args.into} does not exist; drop --extend to write a new record")
        runs.insert(0, stored_run(read(args.into, "--into "), args.name, args.into))
        names.insert(0, f"{args.into} (runs.{args.name})")
    source = [(name, r) for name, r in zip(names, runs, strict=True) if "baselines_same_split" in r]
    if args.baselines_from is not None:
        base_run = read(args.baselines_from, "--baselines-from ")
        if "baselines_same_split" not in base_run:
            ap.error(f"--baselines-from {args.baselines_from}: no baselines_same_split (run bench_pooling with "
                     "--baselines)")
        if base_run.get("split") != runs[0].get("split"):
            ap.error(f"--baselines-from {args.baselines_from}: its split differs from {args.files[0]}'s")
        source = [(str(args.baselines_from), base_run)]
    baselines = source[0][1]["baselines_same_split"] if source else None
    command = (source[0][1].get("command") or source[0][0]) if source else None
    extra = [read(path, "--walk-free-from ") for path in args.walk_free_from]
    walk_free = walk_free_rows(runs[0], names[0], extra, [str(p) for p in args.walk_free_from]) if extra else None
    record = merge(runs, names, baselines, command, walk_free)
    if baselines is not None and source[0][1].get("stored_record"):
        record["baselines_note"] = source[0][1].get("baselines_note", record["baselines_note"])  # its own source
    if extra:
        record["walk_free_commands"] = [r.get("command", str(p)) for p, r in zip(args.walk_free_from, extra,
                                                                                strict=True)]
    stored = runs[0] if args.extend else {}
    for key in ("walk_free_borrowed", "walk_free_commands"):  # the stored record's, then this merge's new ones
        kept = list(stored.get(key, []))
        kept += [x for x in record.get(key, []) if x not in kept]
        if kept:
            record[key] = kept
    if args.note_file is not None:
        record["note"] = args.note_file.read_text().strip()
    elif "note" in stored:
        record["note"] = stored["note"]  # kept until a --note-file restates it for the added seeds
    into = json.loads(args.into.read_text()) if args.into.is_file() else {}
    into.setdefault("runs", {})[args.name] = record
    write_json_atomic(args.into, into, sort_keys=False)
    print(f"runs.{args.name}: seeds {record['seeds']}, models {record['models']} -> {args.into}")
    for pair, rows in record["paired"].items():
        print(f"{pair} (seeds {rows['seeds']})")
        for metric, r in rows.items():
            if metric != "seeds":
                print(f"  {metric:32s} {r['mean']:+.4f}  {r['ci95']}  {r['n_positive']}/{len(r['per_seed'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
