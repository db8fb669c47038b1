"""The custom socket types of the pack.

Their names are stored in every saved workflow, so they can never change once published.
ComfyUI links two sockets when the type strings are equal; nothing else is registered.

| type          | Python value                                                           |
|---------------|------------------------------------------------------------------------|
| DRIG_MODEL    | ``diffusionrig_core.model.DiffusionRig`` (UNet + global encoder)       |
| DRIG_RIG      | ``diffusionrig_core.rig.FaceRig`` (FLAME, DECA, renderer)              |
| DRIG_PORTRAIT | ``diffusionrig_core.pipeline.Portrait``: face parameters + alignment   |
| DRIG_BUFFERS  | ``torch.Tensor`` (B, 9, S, S): rendered, normal, albedo                |
| DRIG_LATENT   | ``torch.Tensor`` (B, latent_dim): the global code                      |
"""
from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "DiffusionRig"

Model = io.Custom("DRIG_MODEL")
Rig = io.Custom("DRIG_RIG")
Portrait = io.Custom("DRIG_PORTRAIT")
Buffers = io.Custom("DRIG_BUFFERS")
Latent = io.Custom("DRIG_LATENT")
