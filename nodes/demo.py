"""Demo Photo: a photo of the synthetic face world with its true face parameters.

DECA Extract needs DECA's weights, which the synthetic demo does not have (they are a licensed
download). Its photos do not need them: each is drawn with known parameters. This node draws the
demo's sample photos and hands one over as a portrait, so the demo models can be tried in ComfyUI
with nothing downloaded.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from comfy_api.latest import io

from . import comfy_glue as glue
from . import types as t

SAMPLES = 9  # write_demo_samples: 3 photos each of the demo person and two strangers
_drawn: dict[int, list[Path]] = {}  # id(rig) -> sample photo files (the newest rig only)


def _samples(rig) -> list[Path]:
    if id(rig) not in _drawn:
        from ..diffusionrig_core import synthetic

        folder = Path(tempfile.mkdtemp(prefix="diffusionrig_demo_photos_"))
        _drawn.clear()
        _drawn[id(rig)] = list(synthetic.write_demo_samples(folder, rig=rig).values())
    return _drawn[id(rig)]


class DemoPhoto(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionRigDemoPhoto",
            display_name="DiffusionRig Demo Photo",
            category=f"{t.CATEGORY}/demo",
            description="A sample photo of the synthetic face world with its true face parameters, for trying "
                        "the '[demo]' models without FLAME/DECA downloads (use it instead of Load Image + DECA "
                        "Extract).",
            inputs=[
                t.Rig.Input("rig", tooltip="The Face Rig Loader set to 'synthetic demo' (the demo models were "
                                           "trained on that head model)."),
                io.Int.Input("sample", default=0, min=0, max=SAMPLES - 1,
                             tooltip="Which sample photo: 0-2 show the demo person (the one the '[demo] "
                                     "personal' model knows), 3-8 two people neither demo model saw."),
            ],
            outputs=[
                io.Image.Output("photo", display_name="photo", tooltip="The sample photo."),
                t.Portrait.Output("portrait", display_name="portrait",
                                  tooltip="Its true face parameters (no fitting needed), for Edit Params, "
                                          "Buffer Render and Rig Sample."),
                io.Image.Output("aligned", display_name="aligned",
                                tooltip="The crop the model sees, for Global Encode."),
            ],
        )

    @classmethod
    def execute(cls, rig, sample) -> io.NodeOutput:
        from ..diffusionrig_core.synthetic import demo

        path = _samples(rig)[int(sample) % SAMPLES]
        portrait = glue.core().fit(rig, [path], size=demo.demo_size())
        return io.NodeOutput(glue.uint8_list_to_image(portrait.original), portrait,
                             glue.bchw_to_image(portrait.aligned))
