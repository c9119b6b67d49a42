"""Backend selection ``auto | cpu | gpu`` (ARCHITECTURE.md, decision 1), decided once per run.

GPU when CUDA is visible *and* the RAPIDS packages (cudf, dask_cudf, cugraph, dask_cuda) import, else CPU.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Literal

log = logging.getLogger(__name__)

Backend = Literal["cpu", "gpu"]
RAPIDS_MODULES = ("cudf", "dask_cudf", "cugraph", "dask_cuda")


def gpu_unavailable_reason() -> str | None:
    """None when the GPU stack is usable, else a one-line reason (used by ``gpu`` test skips too)."""
    missing = [m for m in RAPIDS_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return f"RAPIDS packages not installed ({', '.join(missing)}): pip install '.[gpu]' or use environment.yml"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device visible to torch"
    except ImportError:
        return "torch is not installed"
    return None


def resolve_backend(requested: str) -> Backend:
    """Map ``auto|cpu|gpu`` to the backend to use; ``gpu`` without a usable GPU is a clear error."""
    if requested not in ("auto", "cpu", "gpu"):
        raise ValueError(f"backend={requested!r}: must be one of auto, cpu, gpu")
    if requested == "cpu":
        return "cpu"
    reason = gpu_unavailable_reason()
    if requested == "gpu":
        if reason is not None:
            raise ValueError(f"backend='gpu' was requested but {reason}; use --backend cpu or auto")
        return "gpu"
    if reason is None:
        log.info("backend auto: using the GPU (CUDA and RAPIDS found)")
        return "gpu"
    log.info("backend auto: using the CPU (%s)", reason)
    return "cpu"
