"""PinSage++ pipeline: the Dask side (stages, orchestration, CLI).

Run ``pinsage --help`` (or ``python -m pipeline --help``) for the stages.
"""

from __future__ import annotations

__version__ = "0.1.0"
