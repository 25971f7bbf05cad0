"""The pack as the Python package ``atelier`` outside ComfyUI: in the command-line tools, tests and benchmarks.

ComfyUI imports the pack by its folder (``__init__.py``). Everywhere else, with the pack folder on
``sys.path`` (it is the current folder for ``python -m retrieval ...``), ``import atelier.retrieval`` finds the
same sub-packages through this module's ``__path__``: a module with a ``__path__`` is a package. So the code
inside the pack has one import style, relative imports, wherever it runs, and nothing edits ``sys.path``.
"""
import os

# the folder as given (not resolved): a pack linked into ComfyUI/custom_nodes/ still finds that ComfyUI
__path__ = [os.path.dirname(os.path.abspath(__file__))]
