"""Column names and codes of the tables that flow between stages.

``interactions`` (ingest output and the split's train/valid/test), parquet::

    user      int64   contiguous user id (0..n_users-1), see users.parquet for the raw id
    item      int64   contiguous item id (0..n_items-1), see items.parquet
    category  int64   contiguous category id (0..n_categories-1), see categories.parquet
    behavior  int8    0 pv, 1 fav, 2 cart, 3 buy  (BEHAVIORS order; pv < fav < cart < buy)
    ts        int64   Unix seconds
    line      int64   1-based line number in the source file (stable tie-break, provenance)

Mappings: ``users.parquet`` (user, raw_user), ``items.parquet`` (item, raw_item, category),
``categories.parquet`` (category, raw_category). Ids are assigned in sorted order of the raw ids, so they
do not depend on how the input was split into blocks or workers.
"""

from __future__ import annotations

from pathlib import Path

from gnn.graphstore import BEHAVIORS

BEHAVIOR_CODES: dict[str, int] = {name: code for code, name in enumerate(BEHAVIORS)}
INTERACTION_COLUMNS = ("user", "item", "category", "behavior", "ts", "line")
TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
# The valid window of the real Taobao file: 2017-11-25 00:00 to 2017-12-04 00:00 Beijing time (UTC+8).
TAOBAO_WINDOW = (1511539200, 1512316800)

# Item embeddings as train and infer write them: (n_items, D) float32, row = item id. A model with a query head
# (gnn.models.ModelConfig.query_head) also writes its query side beside them; evaluate and recommend score
# query vectors against item vectors.
EMBEDDINGS_NPY = "embeddings.npy"
QUERY_EMBEDDINGS_NPY = "query_embeddings.npy"


def query_embeddings_beside(embeddings: Path) -> Path | None:
    """The query side written beside an ``embeddings.npy``-style file, or None where there is none."""
    path = Path(embeddings)
    beside = path.parent / QUERY_EMBEDDINGS_NPY
    return beside if path.suffix == ".npy" and beside.is_file() else None
