from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.rundir import StageError, read_stage, run_stage


@dataclass(frozen=True)
class Cfg:
    x: int = 1


def test_stage_is_atomic_and_rerun_is_noop(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(out: Path) -> dict[str, int]:
        calls.append(out)
        (out / "data.txt").write_text("hello")
        return {"rows": 1}

    first = run_stage(tmp_path, "demo", config=Cfg(), inputs={}, build=build)
    again = run_stage(tmp_path, "demo", config=Cfg(), inputs={}, build=build)
    assert len(calls) == 1 and again.reused and again.key == first.key
    assert (tmp_path / "demo" / "data.txt").read_text() == "hello"
    assert read_stage(tmp_path, "demo").report == {"rows": 1}
    changed = run_stage(tmp_path, "demo", config=Cfg(x=2), inputs={}, build=build)
    assert len(calls) == 2 and changed.key != first.key and not changed.reused


def test_failed_stage_leaves_nothing(tmp_path: Path) -> None:
    def build(out: Path) -> dict[str, int]:
        (out / "partial.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "demo", config=Cfg(), inputs={}, build=build)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StageError, match="run `pinsage demo`"):
        read_stage(tmp_path, "demo")


def test_upstream_change_invalidates(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("a")
    up = run_stage(tmp_path / "r", "up", config=Cfg(), inputs={"csv": src}, build=lambda out: {})
    down = run_stage(tmp_path / "r", "down", config=Cfg(), inputs={"up": up}, build=lambda out: {})
    src.write_text("bb")
    up2 = run_stage(tmp_path / "r", "up", config=Cfg(), inputs={"csv": src}, build=lambda out: {})
    down2 = run_stage(tmp_path / "r", "down", config=Cfg(), inputs={"up": up2}, build=lambda out: {})
    assert up2.key != up.key and down2.key != down.key and not down2.reused
