"""Atelier: artist-level painting nodes for ComfyUI.

ComfyUI imports this file from ``custom_nodes/``. It only gathers the node tables from ``nodes/``;
importing it loads no model, touches no network and imports nothing heavy.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
