"""Atelier: artist-level painting nodes for ComfyUI.

ComfyUI imports this file from ``custom_nodes/``. It only gathers the node tables from ``nodes/``;
importing it loads no model, touches no network and imports nothing heavy.

``WEB_DIRECTORY``: ComfyUI serves ``web/`` at ``/extensions/<pack folder>/``; the frontend's node help panel
reads each node's page there (``docs/<node id>.md``, ``docs/<node id>/<language>.md``). ComfyUI also loads every
``*.js`` under it, so it holds no script. Translations are in ``locales/`` (ComfyUI reads that folder itself).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
