"""Global Encode: aligned face crops -> DiffusionRig's global code (what the buffers do not describe)."""
from __future__ import annotations

from comfy_api.latest import io

from . import comfy_glue as glue
from . import types as t


def model_size(model) -> int:
    return int(model.config.image_size)


class GlobalEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionRigGlobalEncode",
            display_name="DiffusionRig Global Encode",
            category=f"{t.CATEGORY}/sample",
            description="Encodes aligned face crops into the model's global code: hair, background, "
                        "identity details. Encode another photo to mix and match.",
            inputs=[
                t.Model.Input("model", tooltip="The DiffusionRig model whose encoder to use."),
                io.Image.Input("image", tooltip="Aligned crops from DECA Extract's 'aligned' output, at the "
                                                "model's resolution."),
            ],
            outputs=[t.Latent.Output("latent", display_name="latent",
                                     tooltip="(B, latent_dim) global code, for Rig Sample.")],
        )

    @classmethod
    def execute(cls, model, image) -> io.NodeOutput:
        glue.check_image(image, "Global Encode's image")
        size = model_size(model)
        if tuple(image.shape[1:3]) != (size, size):
            raise glue.errors().InputError(
                f"Global Encode got {image.shape[2]}x{image.shape[1]} images but this model works at "
                f"{size}x{size}; connect DECA Extract's 'aligned' output with DECA Extract's size set to {size}")
        latent = glue.core().encode(model, glue.image_to_bchw(image).to(glue.compute_device()))
        return io.NodeOutput(latent.detach().to(glue.output_device()))
