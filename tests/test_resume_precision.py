"""Resuming at ``trainer.precision=64-true`` continues in float64: Lightning restores a checkpoint's weights into the
module before its precision plugin converts the module, which rounded a float64 run's weights to float32 there."""

from __future__ import annotations

import torch

from optstudy.config import compose
from optstudy.train import train

COMMON = ["optimizer=adam", "optimizer.lr=0.01", "trainer.precision=64-true", "logger=none"]


def _weights(result) -> list[torch.Tensor]:
    saved = torch.load(result.output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return [v for k, v in saved["state_dict"].items() if k.startswith("model.")]


def test_a_resumed_float64_run_equals_the_run_that_never_stopped(tmp_path):
    straight = train(compose([*COMMON, "trainer.max_epochs=3", f"checkpoint.dir={tmp_path / 'a'}"]))
    first = train(compose([*COMMON, "trainer.max_epochs=2", f"checkpoint.dir={tmp_path / 'b'}"]))
    ckpt = first.output_dir / "checkpoints" / "last.ckpt"
    saved = _weights(first)
    assert all(w.dtype == torch.float64 for w in saved)
    assert any(not torch.equal(w, w.float().double()) for w in saved)  # float32 cannot hold them: a rounding shows
    resumed = train(compose([*COMMON, "trainer.max_epochs=3", f"checkpoint.dir={tmp_path / 'c'}",
                             f"ckpt_path={ckpt}"]))
    assert resumed.value == straight.value
    for a, b in zip(_weights(resumed), _weights(straight), strict=True):
        assert a.dtype == torch.float64 and torch.equal(a, b)
