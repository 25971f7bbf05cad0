"""``python -m training ...`` from the pack folder: runs training/cli.py as part of the pack (see atelier.py)."""
import sys

from atelier.training.cli import main

sys.exit(main())
