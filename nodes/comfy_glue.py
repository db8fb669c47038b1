"""What every DiffusionRig node needs from its host: the core API, devices, progress, images.

Kept apart from the node classes so each node module reads as "convert inputs, one core call,
convert outputs". ComfyUI modules (``comfy.*``) are imported inside functions: they exist only in a
running ComfyUI (or the test shim), and importing this module must stay cheap.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch


def core():
    """The editing API (``diffusionrig_core.pipeline``), imported on first use, not at ComfyUI start-up."""
    from ..diffusionrig_core import pipeline

    return pipeline


def errors():
    from ..diffusionrig_core import errors as _errors

    return _errors


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------
def compute_device() -> torch.device:
    import comfy.model_management as mm

    return mm.get_torch_device()


def output_device() -> torch.device:
    import comfy.model_management as mm

    return mm.intermediate_device()


def check_interrupt() -> None:
    """Raises ComfyUI's InterruptProcessingException (a BaseException) when the user pressed Cancel."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


def free_cache() -> None:
    import comfy.model_management as mm

    mm.soft_empty_cache()


@contextlib.contextmanager
def autograd_on():
    """ComfyUI runs every node under ``torch.inference_mode()``; training needs autograd back.

    Tensors made inside inference mode can never join a backward pass, so the fine-tune works on
    weights it loads itself (the core re-reads the base model from a file).
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def progress_callback(total: int, trust_total: bool = True) -> Callable[[int, float], None]:
    """A core ``callback(done, total)`` that moves ComfyUI's progress bar and honours Cancel.

    The interrupt check runs inside the callback, i.e. between two sampling or training steps, so
    Cancel stops long work within one step. Its exception derives from BaseException and must
    travel up untouched: nothing on the way may catch it. With ``trust_total=False`` the second
    argument is ignored (training reports ``(step, loss)``) and ``total`` stays the bar's length.
    """
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(int(total), 1))

    def callback(done: int, total_now: float = None) -> None:
        check_interrupt()
        new_total = int(total_now) if trust_total and total_now else None
        bar.update_absolute(int(done), new_total)

    return callback


# ---------------------------------------------------------------------------------------------
# IMAGE <-> core conversions (ComfyUI IMAGE: float32 [B,H,W,C] in 0..1)
# ---------------------------------------------------------------------------------------------
def check_image(image: torch.Tensor, what: str) -> None:
    errors_ = errors()
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise errors_.InputError(
            f"{what} must be a ComfyUI IMAGE batch [B,H,W,C] with 1, 3 or 4 channels, got {shape}; "
            "connect the IMAGE output of a Load Image node")
    if image.shape[0] == 0:
        raise errors_.InputError(f"{what} is an empty batch (0 images); connect at least one image")


def image_to_uint8_list(image: torch.Tensor) -> list[np.ndarray]:
    """IMAGE batch -> one RGB uint8 HxWx3 array per image (grey repeated, alpha dropped)."""
    rgb = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    arr = (rgb.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    return [np.ascontiguousarray(a) for a in arr]


def image_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,C] -> a new (B,3,H,W) float tensor in [0,1] (the input is never modified)."""
    rgb = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    return rgb.detach().float().permute(0, 3, 1, 2).contiguous().clone()


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> IMAGE [B,H,W,3] float32 on ComfyUI's intermediate device."""
    return x.detach().float().clamp(0, 1).permute(0, 2, 3, 1).contiguous().to(output_device())


def bhwc_to_image(x: torch.Tensor) -> torch.Tensor:
    """(B,H,W,3) float in [0,1] -> IMAGE on ComfyUI's intermediate device."""
    return x.detach().float().clamp(0, 1).contiguous().to(output_device())


def uint8_list_to_image(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """Equal-sized RGB uint8 arrays -> one IMAGE batch."""
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise errors().InputError(
            f"these images have different sizes {sorted(sizes)} and cannot share one IMAGE batch; "
            "process the photos one at a time (one Load Image per photo)")
    stacked = np.stack([np.asarray(a, dtype=np.uint8)[..., :3] for a in arrays])
    return torch.from_numpy(stacked).float().div(255.0).to(output_device())


# ---------------------------------------------------------------------------------------------
# Combo values: ComfyUI only checks a combo that the node's validate_inputs does not take over,
# so every node that declares validate_inputs checks its combos here, with a message that lists
# the allowed values.
# ---------------------------------------------------------------------------------------------
def check_choice(name: str, value, options: Sequence[str]) -> bool | str:
    if value is None:  # linked input: its value is only known when the node runs
        return True
    if value in options:
        return True
    return f"{name} = {value!r} is not one of {list(options)}"


def first_error(*results: bool | str) -> bool | str:
    for r in results:
        if r is not True:
            return r
    return True
