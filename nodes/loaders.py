"""Loader nodes: a DiffusionRig model and the face rig (FLAME + DECA + renderer).

Both return objects that ComfyUI keeps in its output cache, so a graph loads each file once and
re-loads only when the chosen file changes on disk (``fingerprint_inputs``).
"""
from __future__ import annotations

import os
from pathlib import Path

from comfy_api.latest import io

from . import comfy_glue as glue
from . import paths
from . import types as t


class ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionRigModelLoader",
            display_name="DiffusionRig Model Loader",
            category=f"{t.CATEGORY}/loaders",
            description="Loads a DiffusionRig model (official Stage 1/Stage 2 .pt or DiffusionRig "
                        ".safetensors) from ComfyUI/models/diffusionrig.",
            inputs=[
                io.Combo.Input("model_name", options=paths.model_choices(),
                               tooltip="A file in ComfyUI/models/diffusionrig (official .pt or .safetensors), "
                                       "or a '[demo]' model shipped with the pack. A personal (Stage 2) model "
                                       "also carries its album's mean face shape."),
            ],
            outputs=[t.Model.Output("model", display_name="model",
                                    tooltip="The denoiser and global encoder, on ComfyUI's compute device.")],
        )

    @classmethod
    def validate_inputs(cls, model_name) -> bool | str:
        if model_name is None or model_name in paths.model_choices():
            return True
        return paths.missing_model_message(model_name)

    @classmethod
    def fingerprint_inputs(cls, model_name):
        try:
            st = os.stat(paths.resolve_model(model_name))
            return (model_name, st.st_mtime_ns, st.st_size)
        except (OSError, FileNotFoundError):
            return float("nan")

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        path = paths.resolve_model(model_name)
        model = glue.core().load_model(path, device=glue.compute_device())
        return io.NodeOutput(model)


def _installed_assets_dir() -> Path:
    """The first registered assets folder holding every asset file (else raise the asset report)."""
    from ..diffusionrig_core import assets

    candidates = [Path(p) for p in paths.asset_folders()] + [assets.default_assets_dir()]
    for folder in candidates:
        if all(s.found for s in assets.check_assets(folder)):
            return folder
    target = candidates[0]
    raise glue.errors().AssetError(
        "DiffusionRig face-rig files are missing. Put them in ComfyUI/models/diffusionrig_assets "
        f"({target}) and queue again (or give their folder in extra_model_paths.yaml as diffusionrig_assets).\n"
        + assets.format_asset_report(dir=target))


class FaceRigLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionRigFaceRigLoader",
            display_name="DiffusionRig Face Rig Loader",
            category=f"{t.CATEGORY}/loaders",
            description="Loads the face rig: FLAME head model, DECA encoder and the buffer renderer.",
            inputs=[
                io.Combo.Input("assets", options=paths.ASSET_CHOICES, default=paths.INSTALLED_ASSETS,
                               tooltip="'diffusionrig_assets': the FLAME/DECA files you downloaded, in "
                                       "ComfyUI/models/diffusionrig_assets (the error lists any missing file "
                                       "and where to get it). 'synthetic demo': the procedural face world of "
                                       "the pack (FLAME-format files, no DECA weights): it renders parameters "
                                       "but cannot fit photos."),
            ],
            outputs=[t.Rig.Output("rig", display_name="rig",
                                  tooltip="FLAME + DECA + renderer, used by DECA Extract, Buffer Render and "
                                          "Stage 2 Finetune.")],
        )

    @classmethod
    def validate_inputs(cls, assets) -> bool | str:
        return glue.check_choice("assets", assets, paths.ASSET_CHOICES)

    @classmethod
    def execute(cls, assets) -> io.NodeOutput:
        # "demo": the core writes the synthetic world's assets once into its cache and loads them
        folder = "demo" if assets == paths.SYNTHETIC_ASSETS else _installed_assets_dir()
        rig = glue.core().load_rig(folder, device=glue.compute_device())
        return io.NodeOutput(rig)
