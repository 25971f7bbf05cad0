"""``python -m metrics ...`` from the pack folder: runs metrics/cli.py as part of the pack (see atelier.py)."""
import sys

from atelier.metrics.cli import main

sys.exit(main())
