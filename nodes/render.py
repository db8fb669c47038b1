"""Buffer Render: face parameters -> the physical buffers the model is conditioned on, plus previews."""
from __future__ import annotations

from comfy_api.latest import io

from . import comfy_glue as glue
from . import types as t


class BufferRender(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionRigBufferRender",
            display_name="DiffusionRig Buffer Render",
            category=f"{t.CATEGORY}/face",
            description="Renders the (edited) face parameters into DiffusionRig's physical buffers: "
                        "shaded render, surface normals and albedo, placed where the source face was.",
            inputs=[
                t.Rig.Input("rig", tooltip="The face rig from DiffusionRig Face Rig Loader."),
                t.Portrait.Input("portrait", tooltip="Face parameters from DECA Extract or Edit Params."),
            ],
            outputs=[
                t.Buffers.Output("buffers", display_name="buffers",
                                 tooltip="(B,9,S,S) rendered | normal | albedo, for Rig Sample."),
                io.Image.Output("normal", display_name="normal", tooltip="Surface normals, for display."),
                io.Image.Output("albedo", display_name="albedo", tooltip="Albedo (skin colour), for display."),
                io.Image.Output("shading", display_name="shading", tooltip="The lighting alone, for display."),
                io.Image.Output("rendered", display_name="rendered",
                                tooltip="The shaded render (albedo x shading), for display."),
            ],
        )

    @classmethod
    def execute(cls, rig, portrait) -> io.NodeOutput:
        core = glue.core()
        buffers = core.render(rig, portrait)
        previews = core.render_previews(rig, portrait)
        return io.NodeOutput(
            buffers.detach().to(glue.output_device()),
            *(glue.bhwc_to_image(previews[k]) for k in ("normal", "albedo", "shading", "rendered")),
        )
