"""Hand-written stage outputs for testing later stages without running the earlier ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.rundir import StageOutput, run_stage

DAY = 86_400
T0 = 1_511_539_200


@dataclass(frozen=True)
class HandIngest:
    name: str = "hand"


def hand_interactions() -> pd.DataFrame:
    """4 users, 5 items (2 categories), over 3 days; behaviours 0 pv .. 3 buy."""
    rows = [
        # user, item, behavior, day, second
        (0, 0, 0, 0, 10), (0, 1, 0, 0, 20), (0, 1, 3, 1, 5), (0, 2, 0, 2, 7),
        (1, 1, 0, 0, 1), (1, 2, 2, 1, 3), (1, 3, 0, 2, 9),
        (2, 3, 0, 0, 4), (2, 4, 1, 0, 8), (2, 3, 0, 1, 2), (2, 0, 0, 1, 6), (2, 4, 3, 2, 1),
        (3, 4, 0, 1, 1),
    ]
    df = pd.DataFrame(rows, columns=["user", "item", "behavior", "day", "sec"])
    cat = {0: 0, 1: 0, 2: 1, 3: 1, 4: 1}
    return pd.DataFrame({
        "user": df["user"].astype("int64"),
        "item": df["item"].astype("int64"),
        "category": df["item"].map(cat).astype("int64"),
        "behavior": df["behavior"].astype("int8"),
        "ts": (T0 + df["day"] * DAY + df["sec"]).astype("int64"),
        "line": pd.Series(range(1, len(df) + 1), dtype="int64"),
    })


def write_hand_ingest(run_dir: Path, interactions: pd.DataFrame | None = None) -> StageOutput:
    df = hand_interactions() if interactions is None else interactions

    def build(out: Path) -> dict[str, int]:
        (out / "interactions").mkdir()
        half = len(df) // 2
        df.iloc[:half].to_parquet(out / "interactions" / "part.0.parquet", index=False)
        df.iloc[half:].to_parquet(out / "interactions" / "part.1.parquet", index=False)
        n_users, n_items = int(df["user"].max()) + 1, int(df["item"].max()) + 1
        pd.DataFrame({"user": range(n_users), "raw_user": [100 + u for u in range(n_users)]}).to_parquet(
            out / "users.parquet", index=False)
        cats = df.groupby("item")["category"].first().reindex(range(n_items), fill_value=0)
        pd.DataFrame({"item": range(n_items), "raw_item": [500 + i for i in range(n_items)],
                      "category": cats.to_numpy()}).to_parquet(out / "items.parquet", index=False)
        n_cat = int(df["category"].max()) + 1
        pd.DataFrame({"category": range(n_cat), "raw_category": range(n_cat)}).to_parquet(
            out / "categories.parquet", index=False)
        return {"kept": len(df)}

    return run_stage(run_dir, "ingest", config=HandIngest(), inputs={}, build=build)
