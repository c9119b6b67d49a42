"""Flags and settings shared by every ``pinsage`` subcommand: run directory, config file, cluster."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.cluster import ClusterConfig
from pipeline.config import add_arguments, from_sources, load_toml

DEFAULT_RUN_DIR = Path("runs") / "default"


def add_common_arguments(parser: argparse.ArgumentParser, *, cluster: bool = True) -> None:
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                        help=f"run directory holding every stage's output (default: {DEFAULT_RUN_DIR})")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML settings file; one [section] per stage, CLI flags override it")
    parser.add_argument("--force", action="store_true", help="re-run the stage even if its output is current")
    if cluster:
        g = parser.add_argument_group("cluster")
        g.add_argument("--scheduler", default=None,
                       help="address of an existing Dask scheduler (tcp://host:8786); default: a new LocalCluster")
        g.add_argument("--workers", type=int, default=None, help="workers of a new LocalCluster (default 2)")
        g.add_argument("--threads-per-worker", type=int, default=None, help="threads per worker (default 1)")
        g.add_argument("--backend", choices=("auto", "cpu", "gpu"), default=None,
                       help="auto: GPU when CUDA and RAPIDS import, else CPU (default auto)")
        g.add_argument("--dashboard-address", default=None, help="dashboard bind address (default 127.0.0.1:8787)")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TOML settings named by ``--config`` (empty when none)."""
    return load_toml(args.config) if getattr(args, "config", None) else {}


def cluster_config(args: argparse.Namespace, toml: dict[str, Any]) -> ClusterConfig:
    return from_sources(
        ClusterConfig,
        toml=toml,
        section="cluster",
        scheduler=getattr(args, "scheduler", None),
        n_workers=getattr(args, "workers", None),
        threads_per_worker=getattr(args, "threads_per_worker", None),
        backend=getattr(args, "backend", None),
        dashboard_address=getattr(args, "dashboard_address", None),
    )


__all__ = ["DEFAULT_RUN_DIR", "add_arguments", "add_common_arguments", "cluster_config", "from_sources", "settings"]
