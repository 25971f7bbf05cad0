"""``python -m prompt_ext ...`` from the pack folder: runs prompt_ext/cli.py as part of the pack (see atelier.py)."""
import sys

from atelier.prompt_ext.cli import main

sys.exit(main())
