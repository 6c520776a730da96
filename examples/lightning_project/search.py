"""Searches optimizer and learning rate for the user's ``mymodel.Net`` with Optuna, pruning hopeless trials.

    python search.py                                   # 20 trials of 10 epochs, in search.journal
    python search.py --trials 4 --epochs 3 --tracking-uri sqlite:////tmp/mlflow.db   # each trial an MLflow run

Each trial trains with ``optstudy.callbacks.OptunaPruning``: it reports ``val_loss`` after every epoch's validation
and stops the trial when the median pruner finds it worse than the finished trials' median at that epoch. The study
lives in a journal file, so several ``search.py`` processes can share it and a stopped search resumes.
"""

from __future__ import annotations

import argparse

import optuna
import pytorch_lightning as pl
import torch
from mymodel import DigitsData, Net, mlflow_logger
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from optstudy.callbacks import EffectiveLR, OptunaPruning

OPTIMIZERS = ["adam", "amsgrad", "adabound", "amsbound", "momentum"]


def objective(trial: optuna.Trial, epochs: int = 10, tracking_uri: str | None = None) -> float:
    """Trains ``Net`` with the trial's optimizer and lr; returns the last ``val_loss``. With ``tracking_uri`` the
    trial is an MLflow run (experiment ``mymodel-search``) with its effective learning rates."""
    name = trial.suggest_categorical("optimizer", OPTIMIZERS)
    lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
    callbacks = [OptunaPruning(trial, monitor="val_loss")]
    logger = False
    if tracking_uri:
        logger = mlflow_logger("mymodel-search", f"trial {trial.number}: {name} lr={lr:.3g}", tracking_uri)
        callbacks.append(EffectiveLR(every=10))
    pl.seed_everything(trial.number, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, logger=logger, callbacks=callbacks, log_every_n_steps=10,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(Net(name, lr), DigitsData(seed=0))  # one validation split for every trial: values compare
    except optuna.TrialPruned:
        if logger:  # Lightning has marked the run FAILED; a pruned trial was stopped, it did not fail
            logger.experiment.set_terminated(logger.run_id, "KILLED")
        raise
    return float(trainer.callback_metrics["val_loss"])


def main(argv: list[str] | None = None) -> None:
    """Parses the command line, runs (or resumes) the study ``mymodel`` and prints its best trial."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--journal", default="search.journal")
    p.add_argument("--tracking-uri", default=None, help="log each trial to this MLflow store (default: not logged)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: one thread is faster, and much faster on a busy machine
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="mymodel", storage=JournalStorage(JournalFileBackend(args.journal)), load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    study.optimize(lambda t: objective(t, args.epochs, args.tracking_uri), n_trials=args.trials)
    states = [t.state.name for t in study.trials]
    print(f"{len(states)} trials: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned")
    print(f"best: val_loss = {study.best_value:.4f} with {study.best_params}")


if __name__ == "__main__":
    main()
