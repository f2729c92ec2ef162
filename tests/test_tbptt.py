"""Truncated BPTT (issue 11): the training split walked in chunks with the state carried, detached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gatecast.training.config import build_config
from gatecast.training.data import DataError
from gatecast.training.model import Forecaster, ModelConfig
from gatecast.training.train import StreamSource, fit, tbptt_chunk, train
from tests.conftest import tiny_config


def _model(**kw: object) -> Forecaster:
    torch.manual_seed(0)
    model = Forecaster(ModelConfig(cell="lstm", hidden_size=6, horizon=3, **kw))  # type: ignore[arg-type]
    for p in model.parameters():  # the lookback form starts with a zero head, deaf to the state
        torch.nn.init.uniform_(p, -0.5, 0.5)
    return model


@pytest.mark.parametrize("form", [{}, {"lookback": 5}])
def test_the_state_is_carried_but_the_gradient_stops_at_the_chunk_boundary(form: dict[str, int]) -> None:
    model = _model(**form)
    g = torch.Generator().manual_seed(1)
    first = torch.randn(4, 10, 1, generator=g, requires_grad=True)
    second, y = torch.randn(4, 2, 1, generator=g), torch.randn(4, 3, 1, generator=g)
    _, state = tbptt_chunk(model, model.zero_state(4), first, y, "mse")
    assert all(t is None or not t.requires_grad for t in state)  # detached
    loss, _ = tbptt_chunk(model, state, second, y, "mse")
    loss.backward()
    assert first.grad is None  # nothing flows back into the first chunk
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # ... yet the second chunk's loss depends on the first chunk's inputs, through the carried state
    _, other = tbptt_chunk(model, model.zero_state(4), first.detach() + 1.0, y, "mse")
    with torch.no_grad():
        again, _ = tbptt_chunk(model, other, second, y, "mse")
        carried, moved = model(second, *state).y, model(second, *other).y
    assert float(again) != float(loss.detach())
    assert float((carried - moved).abs().max()) > 1e-3
    # and a chunk from the carried state equals one call over both chunks from zero (what a session does)
    with torch.no_grad():
        whole = model(torch.cat([first, second], dim=1).detach(), *model.zero_state(4)).y
    torch.testing.assert_close(carried, whole, atol=1e-5, rtol=0)


def test_streams_walk_consecutive_chunks_inside_the_split() -> None:
    values = np.arange(200, dtype=np.float32)[:, None]
    src = StreamSource(values, end=150, chunk=10, horizon=4, n_targets=1, streams=3)
    assert src.stretch == (150 - 4 - 10) // 3 and src.chunks == src.stretch // 10
    chunks = list(src.epoch(torch.Generator().manual_seed(5)))
    assert len(chunks) == src.chunks
    for k, (x, y) in enumerate(chunks):
        assert x.shape == (3, 10, 1) and y.shape == (3, 4, 1)
        np.testing.assert_array_equal(np.diff(x[:, :, 0].numpy(), axis=1), 1.0)  # consecutive rows
        np.testing.assert_array_equal(y[:, 0, 0].numpy(), x[:, -1, 0].numpy() + 1)  # the target follows
        np.testing.assert_array_equal(np.diff(x[:, 0, 0].numpy()), src.stretch)  # streams start stretch apart
        if k:
            np.testing.assert_array_equal(x[:, 0, 0].numpy(), chunks[k - 1][0][:, -1, 0].numpy() + 1)
        assert float(y.max()) < 150  # nothing from past the training split
    with pytest.raises(DataError, match="tbptt 50 with 3 streams needs at least 204 training rows"):
        StreamSource(values, end=150, chunk=50, horizon=4, n_targets=1, streams=3)


def test_training_with_tbptt_learns_and_is_refused_for_the_global_model(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, cell="lstm", tbptt=48, tbptt_streams=8, max_epochs=2, context=48)
    plain = train(cfg.model_copy(update={"tbptt": 0}))
    result = train(cfg)
    assert result.epochs == 2 and all(np.isfinite(v) for pair in result.history for v in pair)
    assert result.best_val < result.initial_val  # it learned
    assert result.history != plain.history  # a different training, not the windows under another name
    with pytest.raises(DataError, match="tbptt"):
        build_config(None, {"tbptt": -1, "horizon": 4})
    values = np.random.default_rng(0).standard_normal((400, 1)).astype(np.float32)
    at = np.arange(48, 300)
    with pytest.raises(DataError, match="global model"):
        fit(cfg, _model(), values, at, np.arange(300, 390), 1, train_unit=np.ones((at.size, 1)))
