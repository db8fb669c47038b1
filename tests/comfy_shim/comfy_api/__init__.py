"""Stand-in for ComfyUI's ``comfy_api`` package (the V3 node API), for tests without ComfyUI."""
