"""How much of an item's top-T walk neighbourhood is sampling noise, as a function of ``n_walks``.

PinSage keeps the T items its random walks visit most and weights them by their visit counts. With few walks the
counts are small integers: many of the T slots hold items visited once or twice, ranked among equals by the id
tie-break, and the normalised weights of those slots are mostly noise. This probe measures, on the training split
of ``bench_quality.load`` (Amazon, Taobao sample or generated data), for each ``--walks`` value:

* ``overlap_with_reference``: the mean share of an item's top-T that is also in its top-T under
  ``--reference-walks`` walks with another walk seed (an estimate of the converged neighbourhood), over the
  items with T neighbours in both;
* ``weight_l1_to_reference``: the mean L1 distance between the normalised top-T weights and the reference's
  normalised visit shares of the same neighbour ids (0: the weights are the converged ones; 2: disjoint);
* ``low_count_slot_share``: the share of top-T slots whose visit count is at most 2;
* ``seconds``: the wall time of the walks.

Findings (results/walk_convergence.json, T=10, reference 2000 walks): on Amazon video games at the default 50
walks half of the top-10 slots hold items visited at most twice and 44 % of the top-10 is in the reference top-10;
200 walks: 4.4 % and 58 %; 500 walks: 0.3 % and 65 %, for 10x the walk time (1.75 s against 0.16 s, 22k items,
idle machine). Generated data (100k rows) behaves alike (56 % low-count slots and 42 % overlap at 50 walks, 0 %
and 73 % at 500). The reference itself is not exact (1000 walks reach 69 % on Amazon): many items sit close in
visit rate at the bottom of the top-10. Trained at 500 walks, PinSage gains on every seed on Amazon
(results/quality_pooling.json ``amazon_ids_e10_w500``), not beyond seed noise on generated data with id rows
(``t10_w500``).

Run: ``PYTHONPATH=$PWD python benchmarks/probe_walk_convergence.py --dataset amazon --name amazon
--walks 50,100,200,500,1000`` (and ``--dataset generated --name generated_100k``; one ``--name`` key per data set,
merged into ``--out``; seconds are only comparable on an idle machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_pooling import save
from benchmarks.bench_quality import load, training_inputs, walk_config
from gnn.walks import compute_neighborhoods


def top_t_rows(indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray, t: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(full, ids (n_full, t), counts (n_full, t))``: the items with at least ``t`` neighbours and their first
    ``t`` neighbour ids and weights (a CSR neighbourhood ordered by visit count desc)."""
    full = np.flatnonzero(np.diff(indptr) >= t)
    pos = indptr[full][:, None] + np.arange(t)
    return full, np.asarray(indices)[pos], np.asarray(weights, np.float64)[pos]


def convergence(sample: tuple[np.ndarray, np.ndarray, np.ndarray],
                reference: tuple[np.ndarray, np.ndarray, np.ndarray], t: int) -> dict[str, float]:
    """The figures of the module docstring for one ``sample`` against one ``reference`` (both from
    :func:`top_t_rows` with the same ``t``)."""
    full, ids, counts = sample
    ref_full, ref_ids, ref_counts = reference
    both, at_s, at_r = np.intersect1d(full, ref_full, return_indices=True)
    s_ids, s_w = ids[at_s], counts[at_s] / counts[at_s].sum(axis=1, keepdims=True)
    r_ids, r_w = ref_ids[at_r], ref_counts[at_r] / ref_counts[at_r].sum(axis=1, keepdims=True)
    match = s_ids[:, :, None] == r_ids[:, None, :]  # (n, t, t): sample slot i holds reference slot j's item
    overlap = match.any(axis=2).sum(axis=1) / t
    # L1 between the two weight vectors over the union of their neighbour ids: matched ids differ by
    # |w_s - w_r|, an id in only one of the two contributes its whole weight.
    r_at_s = (match * r_w[:, None, :]).sum(axis=2)  # reference weight of each sample slot's item (0 if absent)
    s_at_r = (match * s_w[:, :, None]).sum(axis=1)  # sample weight of each reference slot's item
    l1 = np.abs(s_w - r_at_s).sum(axis=1) + (r_w * (s_at_r == 0)).sum(axis=1)
    return {"items_compared": int(both.shape[0]), "overlap_with_reference": round(float(overlap.mean()), 4),
            "weight_l1_to_reference": round(float(l1.mean()), 4),
            "low_count_slot_share": round(float((counts <= 2).mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["generated", "amazon", "taobao"], required=True)
    ap.add_argument("--data", type=Path, default=Path("..") / "shared" / "data")
    ap.add_argument("--gen-rows", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=Path("results") / "walk_convergence.json")
    ap.add_argument("--name", required=True, help="key of this data set in --out")
    ap.add_argument("--walks", default="50,200,500", help="n_walks values to measure, comma-separated")
    ap.add_argument("--reference-walks", type=int, default=2000)
    ap.add_argument("--n-neighbors", type=int, default=10, help="T, PinSage neighbours per item")
    args = ap.parse_args(argv)
    try:
        walks = [int(w) for w in args.walks.split(",")]
    except ValueError:
        ap.error(f"--walks {args.walks!r}: expected comma-separated integers, e.g. 50,200,500")
    if args.dataset != "generated" and not (args.data / ("amazon-videogames" if args.dataset == "amazon"
                                                          else "taobao")).is_dir():
        ap.error(f"--data {args.data}: no {args.dataset} data there; point --data at the shared data folder")
    tables, info = load(args.dataset, args.data, args.gen_rows)
    info.pop("item_content", None)
    _, store, _ = training_inputs(tables)
    t = args.n_neighbors

    def walked(n_walks: int, seed: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float]:
        started = time.perf_counter()
        nb = compute_neighborhoods(store, walk_config({"n_walks": n_walks}, t, seed))
        seconds = time.perf_counter() - started
        return top_t_rows(np.asarray(nb.indptr), np.asarray(nb.indices), np.asarray(nb.weights), t), seconds

    reference, ref_seconds = walked(args.reference_walks, 1)
    rows = []
    for n_walks in walks:
        sample, seconds = walked(n_walks, 0)
        row = {"n_walks": n_walks, "seconds": round(seconds, 2), **convergence(sample, reference, t)}
        print(row, flush=True)
        rows.append(row)
    result: dict[str, Any] = {
        "dataset": args.dataset, "split": info.get("split"), "items": store.n_items, "n_neighbors": t,
        "reference": {"n_walks": args.reference_walks, "seed": 1, "seconds": round(ref_seconds, 2)},
        "rows": rows, "loadavg": os.getloadavg(), "command": " ".join(["python", *sys.argv])}
    save(args.out, args.name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
