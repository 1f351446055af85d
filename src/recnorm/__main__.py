"""``python -m recnorm``: the command line (see :mod:`recnorm.cli`)."""

import sys

from recnorm.cli import main

if __name__ == "__main__":
    sys.exit(main())
