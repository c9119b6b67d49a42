"""Atomic, resumable stage outputs inside a run directory (ARCHITECTURE.md, decision 9).

A stage writes into ``<run>/.<stage>.tmp-<id>/`` and the directory is renamed to ``<run>/<stage>/`` only
after its ``manifest.json`` is written, so a killed stage leaves nothing a later stage could read. The
manifest records a *key*: a digest of the stage name, its resolved config and its inputs' keys (or, for
raw files, their path, size and modification time). Re-running a stage with the same key is a no-op.

Usage::

    out = run_stage(run_dir, "ingest", config=cfg, inputs={"csv": path}, build=lambda tmp: {...})
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import to_dict

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONFIG = "config.json"
FORMAT_VERSION = 1


class StageError(RuntimeError):
    """A stage's input is missing or stale; the message names the stage and what to run first."""


def write_json_atomic(path: Path, payload: Any, *, sort_keys: bool = True) -> None:
    """Write JSON through a temporary file in the same folder, fsync, then rename over ``path``
    (``sort_keys=False`` keeps the payload's key order, as result files written by benchmarks do)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with tmp.open("w") as f:
        json.dump(payload, f, indent=2, sort_keys=sort_keys, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Cheap identity of a raw input file: resolved path, size and mtime (ns)."""
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def stage_key(stage: str, config: Mapping[str, Any], inputs: Mapping[str, Any]) -> str:
    blob = json.dumps({"stage": stage, "config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class StageOutput:
    """A finished stage's directory and manifest."""

    stage: str
    path: Path
    key: str
    manifest: dict[str, Any]
    reused: bool

    @property
    def report(self) -> dict[str, Any]:
        return dict(self.manifest.get("report", {}))


def read_stage(run_dir: str | Path, stage: str) -> StageOutput:
    """The finished output of ``stage`` in ``run_dir``, or a StageError saying which stage to run."""
    path = Path(run_dir) / stage
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise StageError(
            f"stage {stage!r} has no finished output in {run_dir}: run `pinsage {stage}` "
            f"(or `pinsage run`) with --run-dir {run_dir} first"
        )
    manifest = json.loads(mpath.read_text())
    return StageOutput(stage, path, manifest["key"], manifest, reused=True)


def _clean_stale(run_dir: Path, stage: str) -> None:
    for p in run_dir.glob(f".{stage}.tmp-*"):
        log.info("removing %s left by an interrupted run", p)
        shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(f".{stage}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def run_stage(
    run_dir: str | Path,
    stage: str,
    *,
    config: object,
    inputs: Mapping[str, StageOutput | str | Path],
    build: Callable[[Path], Mapping[str, Any]],
    force: bool = False,
) -> StageOutput:
    """Run ``build(tmp_dir) -> report`` atomically, unless an output with the same key exists.

    ``inputs`` maps names to upstream :class:`StageOutput` (their key is used) or to raw file paths
    (fingerprinted by size and mtime). The report returned by ``build`` goes into the manifest.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg = to_dict(config)
    fingerprints: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, StageOutput):
            fingerprints[name] = {"stage": value.stage, "key": value.key}
        else:
            fingerprints[name] = file_fingerprint(value)
    key = stage_key(stage, cfg, fingerprints)
    final = run / stage
    if not force and (final / MANIFEST).is_file():
        existing = json.loads((final / MANIFEST).read_text())
        if existing.get("key") == key:
            log.info("stage %s: up to date in %s (key %s), nothing to do", stage, final, key)
            return StageOutput(stage, final, key, existing, reused=True)
    _clean_stale(run, stage)
    tmp = run / f".{stage}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    started = time.time()
    try:
        report = dict(build(tmp))
        manifest = {
            "stage": stage,
            "key": key,
            "format_version": FORMAT_VERSION,
            "inputs": fingerprints,
            "config": cfg,
            "started": started,
            "seconds": round(time.time() - started, 3),
            "files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()),
            "report": report,
        }
        write_json_atomic(tmp / CONFIG, {"stage": stage, "config": cfg})
        write_json_atomic(tmp / MANIFEST, manifest)
        if final.exists():
            old = run / f".{stage}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("stage %s: done in %.1fs -> %s", stage, manifest["seconds"], final)
    return StageOutput(stage, final, key, manifest, reused=False)
