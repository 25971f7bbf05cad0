"""``python -m runner ...`` from the pack folder: runs runner/run.py as part of the pack (see atelier.py)."""
import sys

from atelier.runner.run import main

sys.exit(main())
