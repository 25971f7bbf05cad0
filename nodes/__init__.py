"""The node layer: ComfyUI node classes over the pack's cores, talking to ComfyUI only through ``host/``.

Every module in this package defines ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``; this file
merges them and registers the pack's model folders. The node classes import (and their schemas can be
checked) without ComfyUI.
"""
import importlib
import pkgutil

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}


def _gather():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f".{info.name}", __name__)
        for node_id, cls in getattr(module, "NODE_CLASS_MAPPINGS", {}).items():
            if node_id in NODE_CLASS_MAPPINGS:
                raise RuntimeError(f"Atelier: node id {node_id!r} is defined twice (second time in nodes/{info.name}.py)")
            NODE_CLASS_MAPPINGS[node_id] = cls
        NODE_DISPLAY_NAME_MAPPINGS.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}))


_gather()

from ..host.folders import register_model_folders  # noqa: E402

register_model_folders()  # a no-op outside ComfyUI
