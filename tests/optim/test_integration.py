"""The optimizers work where a torch optimizer works: DDP (2 CPU processes, gloo), Lightning, and they converge."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import optstudy.optim as o


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, name, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on every rank
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                                                          torch.nn.Linear(16, 1)))
    opt = o.build(name, model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(10):
        x = torch.randn(32, 8, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out[rank] = torch.cat([p.detach().flatten() for p in model.parameters()])
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["momentum", "adam", "amsbound"])
def test_ddp_ranks_end_with_identical_parameters(name):
    torch.set_default_dtype(torch.float32)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), name, out), nprocs=2, join=True)
        a, b = out[0], out[1]
    assert torch.equal(a, b)
    torch.manual_seed(0)
    init = torch.cat([p.detach().flatten() for p in torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                                                        torch.nn.Linear(16, 1)).parameters()])
    assert not torch.equal(a, init)


def test_lightning_fit_with_a_scheduler():
    import pytorch_lightning as pl

    torch.set_default_dtype(torch.float32)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = o.build("amsbound", self.parameters(), lr=0.2, final_lr=0.2)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    module = Module()
    before = torch.nn.functional.mse_loss(module.net(x), y).item()
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.125)
    assert opt.state[module.net.weight]["step"] == 24
    assert torch.nn.functional.mse_loss(module.net(x), y).item() < before / 10


# learning rates at which each optimizer reduces a badly conditioned quadratic 100-fold within 300 steps
CONVERGE_LR = dict(sgd=0.05, momentum=0.01, nesterov=0.01, adagrad=0.5, adadelta=10.0, rmsprop=0.01, adam=0.05,
                   adamax=0.05, nadam=0.05, amsgrad=0.05, adabound=0.05, amsbound=0.05)


@pytest.mark.parametrize("name", o.NAMES)
def test_converges_on_a_quadratic(name):
    scales = torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64)
    theta = torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64, requires_grad=True)
    kw = {"final_lr": 0.05} if "bound" in name else {}
    opt = o.build(name, [theta], lr=CONVERGE_LR[name], **kw)
    f0 = (scales * theta.detach() ** 2).sum().item()
    for _ in range(300):
        opt.zero_grad()
        (scales * theta**2).sum().backward()
        opt.step()
    assert (scales * theta.detach() ** 2).sum().item() < 1e-2 * f0
