"""``python -m retrieval ...`` from the pack folder: runs retrieval/cli.py as part of the pack (see atelier.py)."""
import sys

from atelier.retrieval.cli import main

sys.exit(main())
