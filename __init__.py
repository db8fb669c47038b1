"""DiffusionRig for ComfyUI: this repository is the custom-node folder (clone it into
ComfyUI/custom_nodes/ and install requirements.txt).

At start-up ComfyUI imports this file and calls ``comfy_entrypoint``. Importing it only registers
the two model folders (``models/diffusionrig``, ``models/diffusionrig_assets``) and defines the
node classes; the core library, models and face-rig files load when a node first runs.

Outside ComfyUI (pytest imports every ``__init__.py`` above a test, and the repository root is
one) this file does nothing: without ``comfy_api`` there is nothing to register.
"""
import importlib.util
import logging

if importlib.util.find_spec("comfy_api") is not None:
    try:
        from comfy_api.latest import ComfyExtension, io
    except ImportError:  # a ComfyUI from before the V3 node API (mid-2025)
        logging.getLogger(__name__).warning(
            "DiffusionRig's nodes need ComfyUI 0.3.48 or newer (the V3 node API, comfy_api.latest); "
            "update ComfyUI to use them")
    else:
        from .nodes import NODES
        from .nodes.paths import register_model_folders

        register_model_folders()

        class DiffusionRigExtension(ComfyExtension):
            async def get_node_list(self) -> list[type[io.ComfyNode]]:
                return list(NODES)

        async def comfy_entrypoint() -> DiffusionRigExtension:
            return DiffusionRigExtension()
