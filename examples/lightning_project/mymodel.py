"""A user's own Lightning project: an MLP on scikit-learn's embedded digits (8x8 images, 10 classes, no download).

Nothing here is optstudy's except ``configure_optimizers``, which builds an optimizer of its core by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optstudy import optim


def digits(seed: int = 0, channels: int | None = None) -> tuple[TensorDataset, TensorDataset]:
    """1797 digits as 64 features in [0, 1], split 80/20 by a shuffle drawn from ``seed``: (train, val) Datasets
    (a data config's ``_target_: mymodel.digits`` trains optstudy's runs on them). With ``channels`` each digit is
    an image of that many identical 8x8 channels instead, for image models (``conf/data/mydigits_rgb.yaml``)."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16  # pixel intensities are 0..16
    if channels:
        x = x.view(-1, 1, 8, 8).expand(-1, channels, -1, -1).contiguous()
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return TensorDataset(x[order[:cut]], y[order[:cut]]), TensorDataset(x[order[cut:]], y[order[cut:]])


class DigitsData(pl.LightningDataModule):
    """1797 digits as 64 features in [0, 1]; a fixed shuffle splits them 80/20 into training and validation."""

    def __init__(self, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str | None = None):
        self.train_set, self.val_set = digits(self.seed)

    def train_dataloader(self):
        return DataLoader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, 512)


class MLP(nn.Sequential):
    """The network alone, 64 -> ``hidden`` -> ``n_classes`` logits (a model config's ``_target_: mymodel.MLP``
    builds just this)."""

    def __init__(self, hidden: int = 64, n_classes: int = 10):
        super().__init__(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


class Net(pl.LightningModule):
    """A 64-``hidden``-10 MLP trained with optstudy's ``optimizer`` (any of ``optstudy.optim.NAMES``).

    ``optimizer_kwargs`` go to ``optim.build`` besides ``lr`` (``final_lr``, ``betas``, ``bound``...);
    ``decay_per_epoch`` multiplies the lr by that factor after every epoch (a Lightning scheduler config).
    """

    def __init__(self, optimizer: str = "adabound", lr: float = 1e-3, optimizer_kwargs: dict | None = None,
                 hidden: int = 64, decay_per_epoch: float | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = MLP(hidden)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        hp = self.hparams
        opt = optim.build(hp.optimizer, self.parameters(), lr=hp.lr, **(hp.optimizer_kwargs or {}))
        if hp.decay_per_epoch is None:
            return opt
        decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=hp.decay_per_epoch)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "epoch"}}


def mlflow_logger(experiment: str, run_name: str | None = None, tracking_uri: str | None = None):
    """Lightning's own ``MLFlowLogger`` on ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``.

    A SQLite file, since MLflow >= 3.13 refuses a ``./mlruns`` store; its artifacts go to ``mlartifacts/`` beside
    it (MLflow's default would be ``./mlruns`` under whichever directory the experiment was created from).
    """
    from pytorch_lightning.loggers import MLFlowLogger

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment).resolve().as_uri()
    return MLFlowLogger(experiment, run_name, tracking_uri=uri, artifact_location=artifacts)
