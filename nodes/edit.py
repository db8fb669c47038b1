"""Edit Params: change a portrait's light, head pose, expression and face shape (parameters only).

The edited portrait keeps the source's camera, albedo and alignment, so Buffer Render draws the
edited face where the source face was and Rig Sample can paste the result back into the photo.
"""
from __future__ import annotations

import dataclasses

import torch
from comfy_api.latest import io

from . import comfy_glue as glue
from . import types as t

KEEP, FROM_TARGET = "keep", "from target"
LIGHT_MODES = [KEEP, FROM_TARGET, "direction"]
POSE_MODES = [KEEP, FROM_TARGET]
EXPRESSION_MODES = [KEEP, FROM_TARGET, "values"]
SHAPE_MODES = [KEEP, "personal model mean", "FLAME mean"]


def _float(name: str, default: float, lo: float, hi: float, step: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=lo, max=hi, step=step, tooltip=tooltip)


class EditParams(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionRigEditParams",
            display_name="DiffusionRig Edit Params",
            category=f"{t.CATEGORY}/edit",
            description="Edits a portrait's face parameters: lighting (from a target photo or a directional "
                        "light), head rotation, expression and jaw (from a target or by value), and shape.",
            inputs=[
                t.Portrait.Input("portrait", tooltip="The source portrait from DECA Extract."),
                t.Portrait.Input("target", optional=True,
                                 tooltip="A reference portrait (DECA Extract of another photo) for the "
                                         "'from target' modes; its first face is used for every source."),
                t.Model.Input("personal_model", optional=True,
                              tooltip="A personal (Stage 2) model whose album mean shape 'personal model "
                                      "mean' uses, as the official inference does."),
                io.Combo.Input("light_mode", options=LIGHT_MODES, default=KEEP,
                               tooltip="keep: the source's lighting; from target: the target photo's; "
                                       "direction: a directional light set by the values below."),
                _float("light_x", 0.0, -1.0, 1.0, 0.05, "Direction toward the light ('direction' mode), camera "
                       "frame: + = from the right side of the image."),
                _float("light_y", 0.0, -1.0, 1.0, 0.05, "Direction toward the light: + = from above."),
                _float("light_z", 1.0, -1.0, 1.0, 0.05, "Direction toward the light: + = from the camera side."),
                _float("light_intensity", 1.0, 0.0, 4.0, 0.05, "Brightness of the light (1 = unchanged)."),
                _float("light_r", 1.0, 0.0, 2.0, 0.05, "Red gain of the light colour (1 = white)."),
                _float("light_g", 1.0, 0.0, 2.0, 0.05, "Green gain of the light colour (1 = white)."),
                _float("light_b", 1.0, 0.0, 2.0, 0.05, "Blue gain of the light colour (1 = white)."),
                io.Combo.Input("pose_mode", options=POSE_MODES, default=KEEP,
                               tooltip="keep: the source's head rotation; from target: the target's. "
                                       "yaw/pitch/roll are added on top either way."),
                _float("yaw", 0.0, -90.0, 90.0, 1.0, "Turn the head left/right, degrees, relative."),
                _float("pitch", 0.0, -90.0, 90.0, 1.0, "Tilt the head up/down, degrees, relative."),
                _float("roll", 0.0, -90.0, 90.0, 1.0, "Roll the head toward a shoulder, degrees, relative."),
                io.Combo.Input("expression_mode", options=EXPRESSION_MODES, default=KEEP,
                               tooltip="keep: the source's expression; from target: the target's expression "
                                       "and jaw; values: the source's expression scaled by strength, jaw set "
                                       "by jaw_open."),
                _float("jaw_open", 0.0, 0.0, 45.0, 0.5, "How far the mouth opens, degrees ('values' mode)."),
                _float("expression_strength", 1.0, 0.0, 2.0, 0.05,
                       "Scales the expression ('from target' and 'values' modes): 0 = neutral, 1 = as is."),
                io.Combo.Input("shape_mode", options=SHAPE_MODES, default=KEEP,
                               tooltip="keep: the source's face shape; personal model mean: the album mean "
                                       "shape of the connected personal model; FLAME mean: the average face."),
            ],
            outputs=[t.Portrait.Output("portrait", display_name="portrait",
                                       tooltip="The portrait with edited parameters, for Buffer Render.")],
        )

    @classmethod
    def validate_inputs(cls, light_mode, pose_mode, expression_mode, shape_mode) -> bool | str:
        return glue.first_error(
            glue.check_choice("light_mode", light_mode, LIGHT_MODES),
            glue.check_choice("pose_mode", pose_mode, POSE_MODES),
            glue.check_choice("expression_mode", expression_mode, EXPRESSION_MODES),
            glue.check_choice("shape_mode", shape_mode, SHAPE_MODES),
        )

    @classmethod
    def execute(cls, portrait, light_mode, light_x, light_y, light_z, light_intensity, light_r, light_g,
                light_b, pose_mode, yaw, pitch, roll, expression_mode, jaw_open, expression_strength,
                shape_mode, target=None, personal_model=None) -> io.NodeOutput:
        edit = build_edit(target=target, personal_model=personal_model, light_mode=light_mode,
                          light_direction=(light_x, light_y, light_z), light_intensity=light_intensity,
                          light_color=(light_r, light_g, light_b), pose_mode=pose_mode, yaw=yaw, pitch=pitch,
                          roll=roll, expression_mode=expression_mode, jaw_open=jaw_open,
                          expression_strength=expression_strength, shape_mode=shape_mode)
        params, center = glue.core().apply_edit(portrait, edit)
        return io.NodeOutput(dataclasses.replace(portrait, params=params, center=center))


def build_edit(*, target, personal_model, light_mode, light_direction, light_intensity, light_color,
               pose_mode, yaw, pitch, roll, expression_mode, jaw_open, expression_strength, shape_mode):
    """The widgets -> one core ``Edit``; says which input to connect when a mode needs one."""
    core, errors = glue.core(), glue.errors()
    needs_target = [m for m in (light_mode, pose_mode, expression_mode) if m == FROM_TARGET]
    if needs_target and target is None:
        raise errors.InputError(
            "Edit Params: a mode is set to 'from target' but no target portrait is connected; connect "
            "DECA Extract of the reference photo to 'target', or set the mode to 'keep'")
    if target is not None:
        target = target[0:1]
    kw = dict(light_intensity=float(light_intensity), light_color=tuple(float(c) for c in light_color),
              yaw=float(yaw), pitch=float(pitch), roll=float(roll))
    if light_mode == FROM_TARGET:
        kw["light_from"] = target
    elif light_mode == "direction":
        kw["light_direction"] = tuple(float(c) for c in light_direction)
    if pose_mode == FROM_TARGET:
        kw["pose_from"] = target
    if expression_mode == FROM_TARGET:
        kw.update(expression_from=target, expression_strength=float(expression_strength))
    elif expression_mode == "values":
        kw.update(jaw_open=float(jaw_open), expression_strength=float(expression_strength))
    if shape_mode == "personal model mean":
        mean = getattr(personal_model, "mean_shape", None)
        if mean is None:
            raise errors.InputError(
                "Edit Params: shape_mode 'personal model mean' needs a personal (Stage 2) model with an album "
                "mean shape connected to 'personal_model'"
                + ("" if personal_model is None else "; the connected model has none (a Stage 1 model?)")
                + ". Connect a model made by Stage 2 Finetune, or set shape_mode to 'keep'")
        kw["mean_shape"] = mean.detach().reshape(-1)
    elif shape_mode == "FLAME mean":
        kw["mean_shape"] = torch.zeros(100)
    return core.Edit(**kw)
