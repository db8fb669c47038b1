"""DECA Extract: photos -> fitted face parameters (a DRIG_PORTRAIT) and the aligned crops."""
from __future__ import annotations

from comfy_api.latest import io

from . import comfy_glue as glue
from . import types as t

NO_FACE_CHOICES = ["error", "skip"]


class DecaExtract(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionRigDECAExtract",
            display_name="DiffusionRig DECA Extract",
            category=f"{t.CATEGORY}/face",
            description="Finds the face in each photo, aligns it the FFHQ way and fits FLAME parameters "
                        "(shape, expression, pose, camera, lighting, albedo) with DECA.",
            inputs=[
                t.Rig.Input("rig", tooltip="The face rig from DiffusionRig Face Rig Loader."),
                io.Image.Input("image", tooltip="One photo or a batch of photos of a face (any size)."),
                io.Int.Input("size", default=256, min=64, max=1024, step=64,
                             tooltip="Side of the aligned crop in pixels. Must equal the model's resolution "
                                     "(256 for the official models)."),
                io.Boolean.Input("align", default=True,
                                 tooltip="FFHQ-align the photo around the detected face. Turn off only for "
                                         "photos that are already FFHQ-aligned crops."),
                io.Int.Input("face_index", default=0, min=0, max=64,
                             tooltip="Which face to use when a photo shows several (0 = the largest)."),
                io.Combo.Input("on_no_face", options=NO_FACE_CHOICES, default="error",
                               tooltip="'error' stops and names the photo without a face; 'skip' leaves such "
                                       "photos out of the batch (an error only if no photo has a face)."),
            ],
            outputs=[
                t.Portrait.Output("portrait", display_name="portrait",
                                  tooltip="Face parameters and alignment of each photo with a face."),
                io.Image.Output("aligned", display_name="aligned",
                                tooltip="The aligned size x size crops the model sees (one per portrait)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, on_no_face) -> bool | str:
        return glue.check_choice("on_no_face", on_no_face, NO_FACE_CHOICES)

    @classmethod
    def execute(cls, rig, image, size, align, face_index, on_no_face) -> io.NodeOutput:
        glue.check_image(image, "DECA Extract's image")
        core, errors = glue.core(), glue.errors()
        if getattr(rig, "encoder", None) is None:
            raise errors.AssetError(
                "this face rig has no DECA weights (deca_model.tar), so DECA Extract cannot fit photos. Put "
                "deca_model.tar (from DECA's README, https://github.com/yfeng95/DECA) in "
                "ComfyUI/models/diffusionrig_assets and set the Face Rig Loader to 'diffusionrig_assets'. "
                "The 'synthetic demo' rig has no DECA: it renders given parameters but cannot fit photos.")
        photos = glue.image_to_uint8_list(image)
        progress = glue.progress_callback(len(photos))
        # One photo per call so a photo without a face can be named, or skipped, on its own.
        fitted = []
        for i, photo in enumerate(photos):
            glue.check_interrupt()
            try:
                fitted.append(core.fit(rig, [photo], size=size, face_index=face_index, align=align))
            except errors.NoFaceError as e:
                if on_no_face != "skip":
                    raise errors.NoFaceError(
                        f"no face found in image {i + 1} of {len(photos)} given to DECA Extract. Use a photo "
                        "where one face is clearly visible, roughly frontal and at least ~100 pixels wide, "
                        "or set on_no_face to 'skip' to leave such photos out.") from e
            progress(i + 1, len(photos))
        if not fitted:
            raise errors.NoFaceError(
                f"no face found in any of the {len(photos)} image(s) given to DECA Extract; "
                "use photos where a face is clearly visible")
        portrait = fitted[0] if len(fitted) == 1 else core.Portrait.cat(fitted)
        return io.NodeOutput(portrait, glue.bchw_to_image(portrait.aligned))
