"""PinSage++ learning code: pure PyTorch / numpy / numba. Never imports dask or pipeline/."""

from __future__ import annotations
