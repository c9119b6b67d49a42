"""``pinsage run``: every stage end to end, on one Dask cluster, into one run directory.

With no input file it generates a Taobao-format data set first (``[run] rows``, seed), so that
``make run`` works on a fresh machine. Each stage is atomic and resumable: re-running after a crash or
with the same settings redoes only what changed. The run ends with ``<run>/report.json`` (every stage's
report) and prints where the outputs are and the dashboard link.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.backend import Backend
from pipeline.cluster import cluster_client
from pipeline.common import add_arguments, add_common_arguments, cluster_config, from_sources, settings
from pipeline.config import check, to_dict
from pipeline.rundir import StageOutput, write_json_atomic

log = logging.getLogger(__name__)

STAGES = ("ingest", "split", "graph", "walks", "partition", "train", "infer", "evaluate", "recommend")


@dataclass(frozen=True)
class RunConfig:
    """What ``pinsage run`` does. ``input`` None = generate ``rows`` rows of synthetic Taobao data."""

    input: str | None = None
    rows: int = 400_000
    seed: int = 0
    until: Literal["ingest", "split", "graph", "walks", "partition", "train", "infer", "evaluate",
                   "recommend"] = "recommend"

    def __post_init__(self) -> None:
        check(self.rows >= 1000, "run.rows", self.rows, "must be at least 1000 to make a usable graph")
        if self.input is not None and "://" not in self.input:
            check(Path(self.input).is_file(), "run.input", self.input,
                  "file does not exist; give a Taobao-format CSV, or omit it to generate data")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_pipeline(run_dir: str | Path, cfg: RunConfig, client: Any, backend: Backend, *,
                 toml: dict[str, Any] | None = None, args: argparse.Namespace | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Run the stages up to ``cfg.until``; return the run report (also written to ``<run>/report.json``)."""
    from pipeline.evaluate import EvalConfig, evaluate
    from pipeline.generate import GenerateConfig, generate
    from pipeline.graph import GraphConfig, build_graph
    from pipeline.ingest import IngestConfig, ingest
    from pipeline.split import SplitConfig, split
    from pipeline.walks import WalkConfig, run_walks

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    toml = toml or {}
    outputs: dict[str, StageOutput] = {}
    started = time.time()
    report: dict[str, Any] = {"run_dir": str(run.resolve()), "config": to_dict(cfg), "backend": backend,
                              "dashboard": client.dashboard_link, "stages": {}}

    def done(name: str, out: StageOutput) -> bool:
        outputs[name] = out
        report["stages"][name] = {"path": str(out.path), "reused": out.reused, "report": out.report}
        _say(f"[{name}] {'up to date' if out.reused else 'done'} -> {out.path}")
        return name == cfg.until

    source = cfg.input
    if source is None:
        gen_cfg = from_sources(GenerateConfig, toml=toml, section="generate", rows=cfg.rows, seed=cfg.seed)
        data = run / "data" / "UserBehavior.csv"
        marker = run / "data" / "generate.json"
        wanted = to_dict(gen_cfg)
        if not (data.is_file() and marker.is_file() and json.loads(marker.read_text()) == wanted):
            _say(f"[generate] {gen_cfg.rows} synthetic Taobao rows -> {data}")
            data.parent.mkdir(parents=True, exist_ok=True)
            generate(data, gen_cfg)
            write_json_atomic(marker, wanted)
        source = str(data)
    ingest_cfg = from_sources(IngestConfig, toml=toml, section="ingest", args=args)
    split_cfg = from_sources(SplitConfig, toml=toml, section="split", args=args)
    graph_cfg = from_sources(GraphConfig, toml=toml, section="graph", args=args)
    walk_cfg = from_sources(WalkConfig, toml=toml, section="walks", args=args)
    eval_cfg = from_sources(EvalConfig, toml=toml, section="evaluate", args=args)
    if done("ingest", ingest(run, source, ingest_cfg, client, force=force)):
        return _finish(run, report, started)
    if done("split", split(run, split_cfg, client, force=force)):
        return _finish(run, report, started)
    if done("graph", build_graph(run, graph_cfg, client, force=force)):
        return _finish(run, report, started)
    if done("walks", run_walks(run, walk_cfg, client, backend=backend, force=force)):
        return _finish(run, report, started)
    from pipeline.partition import PartitionConfig, run_partition
    from pipeline.train import TrainStageConfig, train

    # one rank per worker of the cluster unless [train] workers says otherwise
    train_cfg = from_sources(TrainStageConfig, toml=toml, section="train",
                             workers=toml.get("train", {}).get("workers") or len(client.nthreads()))
    if train_cfg.workers > 1 and done("partition", run_partition(run, from_sources(
            PartitionConfig, toml=toml, section="partition", parts=train_cfg.workers, method=train_cfg.partition,
            seed=train_cfg.seed), force=force)):
        return _finish(run, report, started)
    if done("train", train(run, train_cfg, client, backend=backend, force=force)):
        return _finish(run, report, started)
    from pipeline.infer import InferConfig, run_infer

    if done("infer", run_infer(run, from_sources(InferConfig, toml=toml, section="infer"), client, backend=backend,
                               force=force)):
        return _finish(run, report, started)
    if done("evaluate", evaluate(run, eval_cfg, force=force)):
        return _finish(run, report, started)
    from pipeline.recommend import RecommendConfig, embeddings_path, recommend

    rec_cfg = from_sources(RecommendConfig, toml=toml, section="recommend", args=args)
    try:
        embeddings_path(run, rec_cfg)
    except FileNotFoundError as e:  # no trained embeddings yet: the baselines' evaluation is the end of the run
        _say(f"[recommend] skipped: {e}")
    else:
        done("recommend", recommend(run, rec_cfg, client, force=force))
    return _finish(run, report, started)


def _finish(run: Path, report: dict[str, Any], started: float) -> dict[str, Any]:
    report["seconds"] = round(time.time() - started, 1)
    write_json_atomic(run / "report.json", report)
    return report


def _cmd(args: argparse.Namespace) -> int:
    toml = settings(args)
    cfg = from_sources(RunConfig, toml=toml, section="run", args=args)
    with cluster_client(cluster_config(args, toml)) as (client, backend):
        _say(f"Dask dashboard: {client.dashboard_link}")
        report = run_pipeline(args.run_dir, cfg, client, backend, toml=toml, force=args.force)
    if "evaluate" in report["stages"]:
        from pipeline.evaluate import format_table, read_report

        print(format_table(read_report(args.run_dir)))
    _say(f"run finished in {report['seconds']}s; outputs in {report['run_dir']}; report: "
         f"{Path(report['run_dir']) / 'report.json'}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="every stage end to end (generates data when no input is given)")
    add_common_arguments(p)
    add_arguments(p, RunConfig)
    p.set_defaults(func=_cmd)
