"""``python -m experiments --grid FILE``: run an experiment grid (see experiments/run_grid.py)."""

import sys

from experiments.run_grid import main

if __name__ == "__main__":
    sys.exit(main())
