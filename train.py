"""Train one model with one optimizer of the core: ``python train.py optimizer=amsbound optimizer.lr=3e-4``.

Composes ``conf/`` with Hydra (``python train.py --help`` lists the groups and their choices) and returns the
objective value so that studies can optimize it. User mistakes end with a one-paragraph error and exit code 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from optstudy.errors import OptstudyError


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from optstudy.train import train, write_result

    try:
        result = train(cfg)
    except OptstudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))  # 2: a mistake in the input; 3: the training diverged
    if cfg.get("result_file"):  # a study that started this process reads the outcome here
        write_result(result, cfg.result_file)
    return result.value


if __name__ == "__main__":
    main()
