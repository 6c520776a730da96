"""The items of docs/reproductions.md, one module each, in the document's order; ``scripts/reproduce.py`` dispatches.

Each module names in its docstring the config it runs (experiment or study files) and the files it writes, and has

- ``run(args) -> dict``: the item's runs; prints its numbers, writes them to ``args.out/<item>.json`` with its
  figures, and returns them;
- ``defaults(args)``, where the item has sizes: fills the sizes the command line left unset, the document's or, with
  ``args.quick``, the tests'.

``_common`` holds what several items share (composing and running a config, the JSON, tables, figures).
"""

ITEMS = ("counterexample", "surfaces", "sensitivity", "efflr", "bias", "configs", "deepobs", "curriculum",
         "early_stopping", "staleness", "gradnoise", "batchnorm")
