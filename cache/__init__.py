"""Remote-vertex cache: policies, statistics, the fetch interface. Never imports dask, pipeline/ or gnn/."""

from __future__ import annotations
