"""``python -m optstudy ...`` is the ``optstudy`` command (the study worker starts multi-device trials this way)."""

import sys

from optstudy.cli import main

if __name__ == "__main__":
    sys.exit(main())
