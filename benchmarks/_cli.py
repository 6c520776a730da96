"""The command line every benchmark shares: ``--help`` shows each flag's default and the expected run time, and a
mistyped flag is an error, never passed on as a Hydra override (overrides go after ``--``)."""

from __future__ import annotations

import argparse


def parser(doc: str, run_time: str, overrides: bool = False) -> argparse.ArgumentParser:
    """``doc``: the script's docstring (its first paragraph is the description); ``run_time``: at the defaults,
    as measured on the 2-core development VM."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=f"Expected run time: {run_time}.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)  # --epoch is a typo of --epochs, not an abbreviation
    if overrides:
        p.add_argument("overrides", nargs="*", default=[],
                       help="Hydra overrides for every training run, after --, e.g. -- trainer.max_epochs=1")
    return p
