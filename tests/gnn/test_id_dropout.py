"""Id dropout of the input encoder (``ModelConfig.id_dropout``): rows lose their id vector only in training, at
about the configured rate, the rest is untouched, evaluation sees every id, and bad rates are refused."""

from __future__ import annotations

import pytest
import torch

from gnn.features import ItemInputEncoder, hash_ids
from gnn.models import ModelConfig, build_model


def encoder(p: float) -> ItemInputEncoder:
    torch.manual_seed(0)
    return ItemInputEncoder(n_categories=3, category_dim=4, id_buckets=50, id_dim=8, n_numeric=2, out_dim=16,
                            id_dropout=p)


def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(n, dtype=torch.int64)
    rows = torch.stack([ids % 3, torch.log1p(ids.float()), torch.ones(n)], dim=1).float()  # category, 2 numeric
    return ids, rows


def without_ids(enc: ItemInputEncoder, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The encoder's output with every id vector zeroed (a hand computation of a dropped row)."""
    assert enc.item_id is not None
    cat = enc.category(torch.remainder(rows[:, 0].long(), 3))
    zeros = torch.zeros(ids.shape[0], enc.item_id.embedding_dim)
    return torch.relu(enc.proj(torch.cat([cat, zeros, rows[:, 1:]], dim=1)))


def test_training_drops_whole_id_vectors_at_the_rate_and_keeps_the_rest() -> None:
    enc = encoder(0.5)
    ids, rows = inputs(2000)
    with torch.no_grad():
        full = enc.eval()(ids, rows)
        dropped = without_ids(enc, ids, rows)
        torch.manual_seed(1)
        out = enc.train()(ids, rows)
    is_full = torch.isclose(out, full, atol=1e-6).all(1)
    is_dropped = torch.isclose(out, dropped, atol=1e-6).all(1)
    assert bool((is_full | is_dropped).all())  # each row either kept its whole id vector or lost all of it
    assert not bool((is_full & is_dropped).any())  # the id vectors change every row's output, so they tell apart
    assert 900 < int(is_dropped.sum()) < 1100  # about half of 2000 (binomial sd 22)


def test_evaluation_and_rate_zero_see_every_id() -> None:
    ids, rows = inputs(200)
    enc = encoder(0.5)
    plain = encoder(0.0)
    with torch.no_grad():
        assert torch.equal(enc.eval()(ids, rows), plain.eval()(ids, rows))  # same seed: same weights
        assert torch.equal(plain.train()(ids, rows), plain.eval()(ids, rows))


def test_dropped_rows_get_no_id_gradient() -> None:
    enc = encoder(0.5).train()
    ids, rows = inputs(40)
    torch.manual_seed(2)
    keep = (torch.rand(40, 1) >= 0.5).flatten()  # the draw the forward makes next from the same seed
    torch.manual_seed(2)
    enc(ids, rows).sum().backward()
    assert enc.item_id is not None and enc.item_id.weight.grad is not None
    got = torch.nonzero(enc.item_id.weight.grad.abs().sum(1) > 0).flatten()
    assert torch.equal(got, torch.unique(hash_ids(ids[keep], 50)))  # exactly the buckets of the kept rows


def test_config_carries_the_rate_to_the_encoder_and_refuses_bad_rates() -> None:
    model = build_model(ModelConfig(id_buckets=32, id_dropout=0.25), seed=0)
    assert model.input.id_dropout == 0.25 and "id_dropout=0.25" in repr(model.input)
    assert ModelConfig.from_dict(ModelConfig(id_dropout=0.25).to_dict()).id_dropout == 0.25
    assert ModelConfig.from_dict({k: v for k, v in ModelConfig().to_dict().items() if k != "id_dropout"}) \
        .id_dropout == 0.0  # checkpoints written before the field existed
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"id_dropout=.*probability in \[0, 1\)"):
            ModelConfig(id_dropout=bad)
        with pytest.raises(ValueError, match=r"id_dropout=.*probability in \[0, 1\)"):
            encoder(bad)
