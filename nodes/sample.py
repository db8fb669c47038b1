"""Rig Sample: buffers + global code -> the edited face, optionally pasted back into the photo."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from . import comfy_glue as glue
from . import types as t
from .encode import model_size

SEED_MAX = 0xFFFFFFFFFFFFFFFF


def _broadcast(buffers: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One code for many buffers (a sweep) or one buffer for many codes; otherwise sizes must match."""
    nb, nl = buffers.shape[0], latent.shape[0]
    if nb == nl:
        return buffers, latent
    if nl == 1:
        return buffers, latent.expand(nb, -1)
    if nb == 1:
        return buffers.expand(nl, -1, -1, -1), latent
    raise glue.errors().InputError(
        f"Rig Sample got {nb} buffers but {nl} global codes; give as many codes as buffers, or one code "
        "(or one buffer) for all")


class RigSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionRigRigSample",
            display_name="DiffusionRig Rig Sample",
            category=f"{t.CATEGORY}/sample",
            description="Samples the face from its physical buffers and global code with DDIM. Connect the "
                        "source portrait to also get the result pasted back into the original photo.",
            inputs=[
                t.Model.Input("model", tooltip="A DiffusionRig model; a personal (Stage 2) model keeps the "
                                               "person's identity, another person's model swaps identity."),
                t.Buffers.Input("buffers", tooltip="Physical buffers from Buffer Render."),
                t.Latent.Input("latent", tooltip="Global code from Global Encode (of the source photo, or "
                                                 "of another photo to mix and match)."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Seed of the starting noise; image i of a batch uses its own seed derived "
                                     "from this one, so results do not depend on the batch size."),
                io.Int.Input("steps", default=20, min=1, max=1000,
                             tooltip="DDIM steps (the paper uses 20)."),
                io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="DDIM eta: 0 = deterministic (paper), 1 = as random as DDPM."),
                t.Portrait.Input("portrait", optional=True,
                                 tooltip="The source portrait (DECA Extract); when connected, 'pasted' is the "
                                         "original photo with the new face blended in."),
            ],
            outputs=[
                io.Image.Output("image", display_name="image", tooltip="The sampled aligned face crops."),
                io.Image.Output("pasted", display_name="pasted",
                                tooltip="The crops pasted back into the original photos (the crops themselves "
                                        "when no portrait is connected)."),
            ],
        )

    @classmethod
    def execute(cls, model, buffers, latent, seed, steps, eta, portrait=None) -> io.NodeOutput:
        core, errors = glue.core(), glue.errors()
        size = model_size(model)
        if tuple(buffers.shape[-2:]) != (size, size):
            raise errors.InputError(
                f"Rig Sample: the buffers are {buffers.shape[-1]}x{buffers.shape[-2]} but the model works at "
                f"{size}x{size}; set DECA Extract's size to {size}, or load a model made for "
                f"{buffers.shape[-1]}x{buffers.shape[-2]}")
        buffers, latent = _broadcast(buffers, latent)
        n = buffers.shape[0]
        if portrait is not None and len(portrait) not in (1, n):
            raise errors.InputError(
                f"Rig Sample: {len(portrait)} portraits for {n} samples; connect the portrait the buffers "
                "were made from")
        device = glue.compute_device()
        # image i uses seed + i (as the core does), wrapped so the widget's whole range stays valid
        seeds = [(int(seed) + i) % (SEED_MAX + 1) for i in range(n)]
        samples = core.sample(model, buffers.to(device), latent.to(device), seeds=seeds, steps=int(steps),
                              eta=float(eta), callback=glue.progress_callback(steps))
        image = glue.bchw_to_image(samples)
        pasted = image
        if portrait is not None:
            indices = [0] * n if len(portrait) == 1 else list(range(n))
            pasted = glue.uint8_list_to_image(
                core.paste_back(portrait, image.cpu(), indices=indices, masks=_paste_masks(portrait, buffers, indices)))
        glue.free_cache()
        return io.NodeOutput(image, pasted)


def _paste_masks(portrait, buffers: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """Paste where the face was and where it is now (a turned head covers other pixels).

    The normal buffer is exactly zero off the face, which gives the new face's coverage.
    """
    new = (buffers[:, 3:6].detach().abs().sum(1) > 0).float().cpu()
    if portrait.face_mask is None:
        return list(new)
    old = portrait.face_mask.detach().float().cpu()
    return [torch.maximum(old[i], new[k]) for k, i in enumerate(indices)]
