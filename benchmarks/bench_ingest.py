"""Ingest speed and peak memory, side by side with a raw pyarrow parse and a plain pandas script.

    python benchmarks/bench_ingest.py                      # 1M and 10M rows -> results/ingest.json
    python benchmarks/bench_ingest.py --e2e 100000000      # generate + ingest 100M -> results/ingest_100m.json

Each contender runs in its own subprocess; the parent samples the resident memory of the whole process tree
(the subprocess plus, for ours, the Dask scheduler and worker processes) every 50 ms. Generated files go to
``data/`` (gitignored).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
RESULTS = REPO / "results"
WINDOW = (1511539200, 1512316800)


# ------------------------------------------------------------------ contenders (run in a subprocess)


def run_pyarrow(path: str) -> dict[str, Any]:
    import pyarrow.csv as pcsv

    t = time.perf_counter()
    table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(
        column_names=["user_id", "item_id", "category_id", "behavior_type", "timestamp"]))
    return {"seconds": time.perf_counter() - t, "rows": table.num_rows}


def run_pandas(path: str, out: str) -> dict[str, Any]:
    """The same work as ours in one process: read, validate, dedupe, factorise (sorted), sort, write."""
    import numpy as np
    import pandas as pd

    t = time.perf_counter()
    df = pd.read_csv(path, header=None, names=["user", "item", "category", "behavior", "ts"],
                     dtype={"user": "int64", "item": "int64", "category": "int64", "behavior": "str",
                            "ts": "int64"}, on_bad_lines="skip")
    df["line"] = np.arange(1, len(df) + 1, dtype=np.int64)   # only right when no line was skipped
    codes = {"pv": 0, "fav": 1, "cart": 2, "buy": 3}
    ok = df.behavior.isin(list(codes)) & df.ts.between(WINDOW[0], WINDOW[1] - 1)
    df = df[ok]
    df = df[~df.duplicated(["user", "item", "category", "behavior", "ts"])]
    df["behavior"] = df.behavior.map(codes).astype("int8")
    for col in ("user", "item", "category"):
        codes_, uniques = pd.factorize(df[col], sort=True)
        df[col] = codes_.astype("int64")
        pd.DataFrame({col: np.arange(len(uniques)), f"raw_{col}": uniques}).to_parquet(f"{out}.{col}.parquet")
    df = df.sort_values(["user", "ts", "line"], kind="stable")
    df.to_parquet(f"{out}.interactions.parquet", index=False)
    return {"seconds": time.perf_counter() - t, "rows": len(df)}


def run_ours(path: str, run_dir: str, blocksize: str) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    from pipeline.ingest import IngestConfig, ingest

    t0 = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        # Workers of a pipeline live across stages: import the stage's modules before the clock starts
        # (start-up and imports are in seconds_with_cluster_start).
        from pipeline.ingest import warm_up

        client.run(warm_up)
        started = time.perf_counter()
        out = ingest(run_dir, path, IngestConfig(blocksize=blocksize), client, force=True)
        seconds = time.perf_counter() - started
    report = out.report
    return {"seconds": seconds, "seconds_with_cluster_start": time.perf_counter() - t0,
            "rows": report["rows_kept"], "report": {k: v for k, v in report.items() if k != "first_rejects"}}


def run_generate(path: str, rows: int, seed: int) -> dict[str, Any]:
    from pipeline.generate import GenerateConfig, generate

    report = generate(path, GenerateConfig(rows=rows, seed=seed))
    return {"seconds": report["seconds"], "rows": rows, "bytes": report["bytes"], "users": report["users"],
            "items": report["items"]}


# ------------------------------------------------------------------ measurement


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def measure(args: list[str]) -> dict[str, Any]:
    """Run ``bench_ingest.py --one ...`` in a subprocess; its JSON result plus the tree's peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--one", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    ps = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.is_set():
            with contextlib.suppress(psutil.Error):
                peak = max(peak, _tree_rss(ps))
            time.sleep(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = round(peak / 2**20, 1)
    result["seconds"] = round(result["seconds"], 3)
    if result.get("rows") and result["seconds"]:
        result["rows_per_s"] = round(result["rows"] / result["seconds"])
    return result


def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "loadavg": os.getloadavg(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def ensure_file(rows: int, seed: int) -> tuple[Path, dict[str, Any] | None]:
    path = DATA / f"bench-{rows}.csv"
    if path.is_file():
        return path, None
    DATA.mkdir(exist_ok=True)
    return path, measure(["generate", str(path), str(rows), str(seed)])


def bench(sizes: list[int], repeats: int, blocksize: str) -> dict[str, Any]:
    results: dict[str, Any] = {"command": " ".join([sys.executable, *sys.argv]), "machine_before": machine(),
                               "blocksize": blocksize, "sizes": {}}
    for rows in sizes:
        path, gen = ensure_file(rows, seed=0)
        entry: dict[str, Any] = {"file": str(path.relative_to(REPO)), "bytes": path.stat().st_size,
                                 "command": results["command"], "loadavg_before": os.getloadavg()}
        if gen:
            entry["generate"] = gen
        for name, args in (("pyarrow_read_csv", ["pyarrow", str(path)]),
                           ("pandas_script", ["pandas", str(path), str(DATA / f"pandas-{rows}")]),
                           ("ours", ["ours", str(path), str(DATA / f"run-{rows}"), blocksize])):
            runs = [measure(args) for _ in range(repeats)]
            best = min(runs, key=lambda r: r["seconds"])
            best["all_seconds"] = [r["seconds"] for r in runs]
            entry[name] = best
            print(f"{rows:>11,} rows  {name:<18} {best['seconds']:7.2f}s  {best.get('rows_per_s', 0):>12,} rows/s  "
                  f"peak {best['peak_rss_mb']:8.1f} MB", flush=True)
        entry["ours_vs_pyarrow"] = round(entry["ours"]["seconds"] / entry["pyarrow_read_csv"]["seconds"], 2)
        entry["pandas_vs_ours"] = round(entry["pandas_script"]["seconds"] / entry["ours"]["seconds"], 2)
        entry["loadavg_after"] = os.getloadavg()
        results["sizes"][str(rows)] = entry
    results["machine_after"] = machine()
    return results


def e2e(rows: int, blocksize: str) -> dict[str, Any]:
    path = DATA / f"bench-{rows}.csv"
    DATA.mkdir(exist_ok=True)
    result: dict[str, Any] = {"command": " ".join([sys.executable, *sys.argv]), "machine_before": machine(),
                              "rows": rows, "blocksize": blocksize}
    result["generate"] = measure(["generate", str(path), str(rows), "0"])
    result["bytes"] = path.stat().st_size
    result["ingest"] = measure(["ours", str(path), str(DATA / f"run-{rows}"), blocksize])
    result["total_seconds"] = round(result["generate"]["seconds"] + result["ingest"]["seconds"], 2)
    smaller = RESULTS / "ingest.json"
    if smaller.is_file():   # peak memory as the file grows: the 1M / 10M runs of the side-by-side benchmark
        sizes = json.loads(smaller.read_text())["sizes"]
        result["peak_rss_mb_by_rows"] = {**{k: v["ours"]["peak_rss_mb"] for k, v in sizes.items()},
                                         str(rows): result["ingest"]["peak_rss_mb"]}
    result["machine_after"] = machine()
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=1, default=str))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="1000000,10000000", help="rows of the generated files (comma-separated)")
    p.add_argument("--repeats", type=int, default=2, help="runs per contender; the fastest is kept")
    p.add_argument("--blocksize", default="16 MiB", help="ingest block size")
    p.add_argument("--e2e", type=int, default=0, help="generate + ingest this many rows instead")
    p.add_argument("--out", default=None, help="result JSON (default results/ingest.json or ingest_<n>.json)")
    args = p.parse_args()
    if args.one:
        kind, *rest = args.one
        fns: dict[str, Callable[..., dict[str, Any]]] = {
            "pyarrow": run_pyarrow, "pandas": run_pandas, "ours": run_ours,
            "generate": lambda path, rows, seed: run_generate(path, int(rows), int(seed))}
        fn = fns[kind]
        print(json.dumps(fn(*rest), default=str))
        return
    RESULTS.mkdir(exist_ok=True)
    if args.e2e:
        result = e2e(args.e2e, args.blocksize)
        name = args.out or RESULTS / f"ingest_{args.e2e // 1_000_000}m.json"
    else:
        result = bench([int(s) for s in args.sizes.split(",")], args.repeats, args.blocksize)
        name = args.out or RESULTS / "ingest.json"
        if Path(name).is_file():   # keep the other sizes of an earlier run (each size records its command)
            earlier = json.loads(Path(name).read_text())
            for rows, entry in earlier.get("sizes", {}).items():
                entry.setdefault("command", earlier.get("command"))
                result["sizes"].setdefault(rows, entry)
    from pipeline.rundir import write_json_atomic  # the parent process only (the children measure bare pandas)

    write_json_atomic(Path(name), result, sort_keys=False)
    print(f"wrote {name}")


if __name__ == "__main__":
    main()
