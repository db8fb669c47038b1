"""Test stand-in for ComfyUI's ``comfy`` package (only what the DiffusionRig nodes import)."""
