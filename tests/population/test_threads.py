"""A population takes threads by the size of its stack, whose every operation is K members': one thread for a small
stack (as for a small model), the process's share of the cores for a large one (they took one thread, half the
speed on 2 cores, because each member alone is small)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from optstudy.config import compose
from optstudy.population.run import train_population


class Threads(pl.Callback):
    def on_train_start(self, trainer, module):
        self.seen = torch.get_num_threads()


def threads_of(k: int, hidden: int) -> int:
    lrs = ",".join(str(1e-3 * (i + 1)) for i in range(k))
    cfg = compose(["model=mlp", f"model.hidden=[{hidden}]", "data=digits", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "logger=none",
                   "checkpoint.enabled=false", f"population.lr=[{lrs}]"])
    seen = Threads()
    train_population(cfg, callbacks=[seen])
    return seen.seen


def test_a_small_stack_trains_on_one_thread_a_large_one_on_the_process_share(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # a worker's share (Worker._share_cores) or torch's default on 2 cores
        assert threads_of(2, 16) == 1  # 2 x ~1.2k parameters
        torch.set_num_threads(2)
        assert threads_of(16, 1024) == 2  # 16 x ~77k parameters: over set_threads' 1M
    finally:
        torch.set_num_threads(before)
