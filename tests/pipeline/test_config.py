from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from pipeline.config import ConfigError, check, from_mapping, from_sources, load_toml, to_dict


@dataclass(frozen=True)
class Demo:
    n: int = 3
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"
    dims: tuple[int, ...] = (1, 2)
    name: str | None = None

    def __post_init__(self) -> None:
        check(self.n > 0, "demo.n", self.n, "must be positive")


def test_from_mapping_coerces_and_validates() -> None:
    cfg = from_mapping(Demo, {"n": "5", "rate": 1, "mode": "b", "dims": "4,5"}, section="demo")
    assert cfg == Demo(n=5, rate=1.0, mode="b", dims=(4, 5))
    assert to_dict(cfg) == {"n": 5, "rate": 1.0, "mode": "b", "dims": [4, 5], "name": None}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"n": 0}, "demo.n=0: must be positive"),
        ({"n": "x"}, "demo.n='x': must be an integer"),
        ({"mode": "c"}, "demo.mode='c': must be one of a, b"),
        ({"bogus": 1}, "unknown setting demo.bogus"),
    ],
)
def test_bad_settings_name_the_setting(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_mapping(Demo, values, section="demo")


def test_toml_then_overrides(tmp_path: Path) -> None:
    p = tmp_path / "s.toml"
    p.write_text('[demo]\nn = 7\nmode = "b"\n')
    cfg = from_sources(Demo, toml=load_toml(p), section="demo", n=9)
    assert (cfg.n, cfg.mode) == (9, "b")


def test_bad_toml_names_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[demo\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML"):
        load_toml(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
