"""Stage 2 Finetune: an album of one person's photos + a base model -> that person's model, saved."""
from __future__ import annotations

import re

from comfy_api.latest import io

from . import comfy_glue as glue
from . import paths
from . import types as t

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def _check_name(name: str | None) -> bool | str:
    if name is None:
        return True
    if not NAME_RE.match(name) or name.endswith(".safetensors") or ".." in name:
        return (f"name = {name!r}: use 1-100 letters, digits, '_', '-' or '.', starting with a letter or digit, "
                "without a folder or the .safetensors extension (it is added)")
    return True


class Stage2Finetune(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionRigStage2Finetune",
            display_name="DiffusionRig Stage 2 Finetune",
            category=f"{t.CATEGORY}/train",
            description="Fine-tunes a base (Stage 1) model on about 20 photos of one person, as in the paper's "
                        "Stage 2, and saves the personal model to ComfyUI/models/diffusionrig/NAME.safetensors. "
                        "Cancel stops training between two steps.",
            # The album may come as one IMAGE batch or as a list of differently sized photos
            # (e.g. Load Image (from Folder)), so the node takes its inputs as lists.
            is_input_list=True,
            is_output_node=True,
            inputs=[
                t.Rig.Input("rig", tooltip="The face rig (fits FLAME parameters to the album photos)."),
                t.Model.Input("base_model", tooltip="The Stage 1 model to start from."),
                io.Image.Input("album", tooltip="Photos of one person: an IMAGE batch or a list of images "
                                                "(about 20, varied light, pose and expression)."),
                io.Int.Input("steps", default=5000, min=1, max=100000,
                             tooltip="Training steps (the paper: 5000, about 30 min on a V100)."),
                io.Boolean.Input("align", default=True,
                                 tooltip="FFHQ-align each photo around its face first. Turn off only for an "
                                         "album of already FFHQ-aligned crops."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Photos per training step (the paper: 4); at most the number of album "
                                     "photos with a face."),
                io.String.Input("name", default="personal",
                                tooltip="File name of the personal model in ComfyUI/models/diffusionrig "
                                        "(.safetensors is added); the Model Loader lists it after a refresh."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing model of the same name."),
            ],
            outputs=[t.Model.Output("model", display_name="model",
                                    tooltip="The personal model (also saved to the models folder).")],
        )

    @classmethod
    def validate_inputs(cls, name) -> bool | str:
        # with is_input_list every value arrives as a list
        names = name if isinstance(name, list) else [name]
        return glue.first_error(*(_check_name(n) for n in names))

    @classmethod
    def execute(cls, rig, base_model, album, steps, align, batch_size, name, overwrite) -> io.NodeOutput:
        rig, base_model, steps, batch_size = rig[0], base_model[0], int(steps[0]), int(batch_size[0])
        align = bool(align[0])
        name, overwrite = name[0], overwrite[0]
        errors = glue.errors()
        ok = _check_name(name)
        if ok is not True:
            raise errors.InputError(ok)
        photos = []
        for batch in album:
            glue.check_image(batch, "Stage 2 Finetune's album")
            photos += glue.image_to_uint8_list(batch)
        if len(photos) < batch_size:
            raise errors.InputError(
                f"the album has {len(photos)} photo(s) but batch_size is {batch_size}; lower batch_size to "
                f"{len(photos)} or add photos (about 20 work best)")
        out = paths.save_path(name)
        if out.exists() and not overwrite:
            raise errors.InputError(
                f"a model named {name!r} already exists at {out}; choose another name or turn on overwrite")
        out.parent.mkdir(parents=True, exist_ok=True)
        with glue.autograd_on():
            model = glue.core().finetune(base_model, photos, rig, steps=steps, out_path=out, align=align,
                                         batch_size=batch_size, device=glue.compute_device(),
                                         callback=glue.progress_callback(steps))
        glue.free_cache()
        return io.NodeOutput(model, ui={"text": [f"saved {out.name} ({len(photos)} photos, {steps} steps)"]})
