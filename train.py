"""Train one model with one optimizer of the core: ``python train.py optimizer=amsbound optimizer.lr=3e-4``.

The same as ``optstudy train ...`` (``optstudy.cli.train_command``): composes the configs with Hydra (``python train.py
--help`` lists the groups and their choices; ``--config-dir DIR`` adds your own) and trains one run or a population.
User mistakes end with a one-line error and exit code 2; a diverged run exits 3.
"""

import sys

from optstudy.cli import train_command

if __name__ == "__main__":
    sys.exit(train_command(sys.argv[1:]))
