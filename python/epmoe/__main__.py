"""`python -m epmoe COMMAND ...`: the same as the `epmoe` command (epmoe.cli)."""

import sys

from epmoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
