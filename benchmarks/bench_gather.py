"""The softmax's cross-rank candidate gather (gnn.comm.gather.CandidateGather), side by side in one run: three
collectives forward (counts, ids, rows) against one packed all-gather padded to ``PairBatcher.max_candidates``.

Two gloo ranks, each pinned to its own core when the machine has two or more, time forward + backward of the gather
on random candidate rows of the training stage's shape (embed_dim 64; ~1100 distinct items of a 512-pair batch
with 256 shared negatives, bound 1280; and a batch with hard negatives: ~3500 items, bound 4352), ``--reps`` calls
per round, the best of ``--rounds`` rounds per setting, settings alternated round by round.
Run: ``PYTHONPATH=$PWD python benchmarks/bench_gather.py [--out results/gather.json]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gnn.comm.gather import CandidateGather  # noqa: E402
from gnn.comm.launch import run_gloo  # noqa: E402
from pipeline.rundir import write_json_atomic  # noqa: E402

# (label, candidate rows on rank 0, bound): the stage's defaults (batch 512, 256 negatives, hard_cap 0) and with
# hard negatives (hard_cap 6: bound 512 * 8 + 256)
SHAPES = [("batch512_no_hard", 1100, 1280), ("batch512_hard6", 3500, 4352)]


def worker(rank: int, world: int, dim: int, reps: int, rounds: int) -> dict[str, Any]:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= world:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank]})
    gen = torch.Generator().manual_seed(rank)
    best: dict[str, float] = {}
    for _ in range(rounds):
        for label, rows, bound in SHAPES:
            for mode, max_rows in (("three_collectives", None), ("packed", bound)):
                gather = CandidateGather(max_rows=max_rows)
                n = rows + 7 * rank  # unequal counts, as between real batches
                cands = [torch.randn(n, dim, generator=gen).requires_grad_() for _ in range(reps + 2)]
                ids = [torch.randint(0, 16_000, (n,), generator=gen) for _ in range(reps + 2)]
                for c, i in zip(cands[:2], ids[:2], strict=True):  # warm-up
                    gather(c, i)[0].sum().backward()
                dist.barrier()
                start = time.perf_counter()
                for c, i in zip(cands[2:], ids[2:], strict=True):
                    gather(c, i)[0].sum().backward()
                ms = (time.perf_counter() - start) / reps * 1e3
                key = f"{label}/{mode}"
                best[key] = min(best.get(key, float("inf")), ms)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gather.json")
    args = parser.parse_args()
    per_rank = run_gloo(worker, world_size=2, args=(args.dim, args.reps, args.rounds))
    ms = {k: round(max(r[k] for r in per_rank), 3) for k in per_rank[0]}  # a step waits for the slower rank
    out = {
        "command": "PYTHONPATH=$PWD python " + " ".join(sys.argv),
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "what": "forward + backward of one candidate gather, ms per call (best round, slower rank), 2 gloo ranks",
        "shapes": [{"label": label, "rows": rows, "max_rows": bound, "dim": args.dim} for label, rows, bound in SHAPES],
        "ms_per_call": ms,
        "packed_speedup": {label: round(ms[f"{label}/three_collectives"] / ms[f"{label}/packed"], 3)
                           for label, _, _ in SHAPES},
    }
    write_json_atomic(args.out, out)
    print(out["ms_per_call"], out["packed_speedup"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
