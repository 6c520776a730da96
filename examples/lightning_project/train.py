"""Trains the user's ``mymodel.Net`` with an optstudy optimizer, logging effective learning rates to MLflow.

    python train.py                                    # AdaBound, lr 1e-3, final_lr 0.1, 10 epochs
    python train.py --optimizer adam --lr 3e-3 --epochs 5 --tracking-uri sqlite:////tmp/mlflow.db

Lightning's own ``MLFlowLogger`` gets the training curves, ``eff_lr/g0/p50`` and the other quantiles, and at the end
the artifacts ``eff_lr_histograms.npz`` and ``eff_lr_heatmap.png`` (``optstudy.callbacks.EffectiveLR``).
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from mymodel import DigitsData, Net, mlflow_logger

from optstudy.callbacks import EffectiveLR


def main(argv: list[str] | None = None) -> None:
    """Parses the command line, trains, and prints the MLflow run and the last validation loss."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="adabound", help="one of optstudy.optim.NAMES")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--final-lr", type=float, default=0.1, help="AdaBound/AMSBound only")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--every", type=int, default=10, help="optimizer steps between effective-lr records")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: one thread is faster, and much faster on a busy machine
    pl.seed_everything(0, verbose=False)
    extra = {"final_lr": args.final_lr} if args.optimizer in ("adabound", "amsbound") else {}
    model = Net(args.optimizer, args.lr, extra)
    logger = mlflow_logger("mymodel", f"{args.optimizer} lr={args.lr:g}", args.tracking_uri)
    trainer = pl.Trainer(max_epochs=args.epochs, logger=logger, callbacks=[EffectiveLR(every=args.every)],
                         log_every_n_steps=10, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, DigitsData())
    print(f"MLflow run {logger.run_id}: val_loss = {float(trainer.callback_metrics['val_loss']):.4f}; "
          f"open it with: mlflow ui --backend-store-uri {logger.experiment.tracking_uri}")


if __name__ == "__main__":
    main()
