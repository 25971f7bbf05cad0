"""``python -m runner WORKFLOW [options]``: run a workflow headless through a real ComfyUI."""
import sys

from .run import main

sys.exit(main())
