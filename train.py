"""Train one model with one optimizer of the core: ``python train.py optimizer=amsbound optimizer.lr=3e-4``.

Composes ``conf/`` with Hydra (``python train.py --help`` lists the groups and their choices) and returns the
objective value so that studies can optimize it. User mistakes end with a one-paragraph error and exit code 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from optstudy.errors import OptstudyError


def precheck(argv: list[str]) -> None:
    """The whole config checked before Hydra runs the job: a mistake costs ~2 s and no tracking run, and a misspelled
    key gets our answer, not Hydra's advice to add it with ``+``. Skipped for Hydra's own flags (--help, -m, ...)."""
    if any(arg.startswith("-") for arg in argv):
        return
    from optstudy.config import compose, validate

    try:
        validate(compose(argv), argv)
    except OptstudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from optstudy.population import members

    if members.active(cfg):  # population.*: K members trained at once
        return _population(cfg)
    from optstudy.train import train, write_result

    try:
        result = train(cfg)
    except OptstudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))  # 2: a mistake in the input; 3: the training diverged
    if cfg.get("result_file"):  # a study that started this process reads the outcome here
        write_result(result, cfg.result_file)
    return result.value


def _population(cfg: DictConfig) -> float:
    from optstudy.population.run import report, train_population

    try:
        result = train_population(cfg)
        report(result, cfg)
    except OptstudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    return result.value


if __name__ == "__main__":
    precheck(sys.argv[1:])
    main()
