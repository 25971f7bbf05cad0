"""Headless workflow runner: start a real ComfyUI with this pack, convert UI workflows, run, collect.

Pure Python on the standard library (websocket-client is used for progress when installed); it never
imports ComfyUI, it talks to a ComfyUI subprocess over HTTP. ``python -m runner --help``.
"""
