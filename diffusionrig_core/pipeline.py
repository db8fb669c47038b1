"""The editing API: fit a photo, edit its face parameters, render buffers, encode, sample, paste back.

The command line, the ComfyUI nodes and the Gradio app call only these functions, so none of them
holds editing logic of its own. Each step is usable alone; ``edit`` chains them the way the official
``scripts/inference.py`` does (spec section 7), plus what users need around it: a seed per image,
DDIM inversion of the source, and the edited crop pasted back into the full photo.

SKELETON: signatures are final (the contract other modules code against); bodies land next.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import InputError

PathLike = str | Path


# ---------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------
@dataclass
class Portrait:
    """One or more fitted source photos (batched), everything an edit needs."""

    original: list[np.ndarray]          # full-resolution RGB uint8 HxWx3, EXIF applied
    aligned: torch.Tensor               # (B,3,S,S) float in [0,1]: what the model sees
    alignment: list[Any]                # AlignResult (quad in original pixels) or None if already aligned
    params: dict[str, torch.Tensor]     # shape, tex, exp, pose, cam, light (batched)
    tform: torch.Tensor                 # (B,3,3) official crop transform, S x S frame -> 224 crop
    center: torch.Tensor                # (B,3) official ffhq_center from the source's own shape
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.aligned.shape[0])

    @property
    def size(self) -> int:
        return int(self.aligned.shape[-1])

    def __getitem__(self, index: int | slice) -> "Portrait":
        raise NotImplementedError

    @classmethod
    def cat(cls, portraits: Sequence["Portrait"]) -> "Portrait":
        raise NotImplementedError


@dataclass
class Edit:
    """One edit of a portrait. Every field is optional: None (or the neutral default) keeps the source's."""

    light_from: Portrait | None = None
    light_sh: torch.Tensor | None = None                       # (9,3) SH coefficients
    light_direction: tuple[float, float, float] | None = None   # toward the light, camera frame, y up
    light_intensity: float = 1.0
    light_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    expression_from: Portrait | None = None
    expression: torch.Tensor | None = None                      # (50,) FLAME expression code
    jaw: tuple[float, float, float] | None = None               # jaw axis-angle (radians)
    jaw_open: float | None = None                               # degrees, alternative to ``jaw``
    expression_strength: float = 1.0
    pose_from: Portrait | None = None
    yaw: float = 0.0                                            # degrees, relative to the source
    pitch: float = 0.0
    roll: float = 0.0
    mean_shape: torch.Tensor | None = None                      # (100,); default: the model's
    latent_from: Portrait | torch.Tensor | None = None          # mix-and-match
    model: Any = None                                           # identity swap: another personal model

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Edit":
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class EditResult:
    image: np.ndarray                   # (S,S,3) uint8, the edited aligned crop
    pasted: np.ndarray | None           # full-resolution photo with the edit pasted back
    buffers: torch.Tensor               # (9,S,S) rendered | normal | albedo
    params: dict[str, torch.Tensor]
    seed: int
    edit: Edit


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    raise NotImplementedError


def load_rig(assets_dir: PathLike | None = None, device: torch.device | str | None = None):
    raise NotImplementedError


def load_model(path: PathLike, device: torch.device | str | None = None):
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def fit(rig, images: Sequence[Any], size: int, face_index: int = 0, align: bool = True,
        progress: Callable[[int, int], None] | None = None) -> Portrait:
    raise NotImplementedError


def apply_edit(portrait: Portrait, edit: Edit) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    raise NotImplementedError


def render(rig, portrait: Portrait, params: dict[str, torch.Tensor] | None = None,
           size: int | None = None) -> torch.Tensor:
    raise NotImplementedError


def render_previews(rig, portrait: Portrait, params: dict[str, torch.Tensor] | None = None,
                    size: int | None = None) -> dict[str, torch.Tensor]:
    raise NotImplementedError


def encode(model, images: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError


def sample(model, buffers: torch.Tensor, latent: torch.Tensor, seeds: list[int] | int | None = None,
           steps: str | int = "ddim20", eta: float = 0.0, noise: torch.Tensor | None = None,
           callback: Callable[[int, int], None] | None = None, fast: bool = False) -> torch.Tensor:
    raise NotImplementedError


def invert(model, images: torch.Tensor, buffers: torch.Tensor, latent: torch.Tensor,
           steps: str | int = "ddim20", callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    raise NotImplementedError


def paste_back(portrait: Portrait, images, feather: float = 0.03, rig=None) -> list[np.ndarray]:
    raise NotImplementedError


def edit(model, portrait: Portrait, edits: Edit | list[Edit], rig, seed: int | None = None,
         steps: str | int = "ddim20", eta: float = 0.0, invert: bool = False, paste: bool = True,
         shared_noise: bool = True, callback: Callable[[int, int], None] | None = None) -> list[EditResult]:
    raise NotImplementedError


def contact_sheet(portrait: Portrait, results: Sequence[EditResult], rig=None):
    raise NotImplementedError


def finetune(base_model_or_path, images, rig, steps: int = 5000, out_path: PathLike | None = None,
             callback: Callable[[int, int], None] | None = None, **kwargs: Any):
    raise NotImplementedError


def bench_edit(device: torch.device | str, size: int, n_edits: int) -> dict[str, float]:
    raise NotImplementedError


__all__ = [
    "Portrait", "Edit", "EditResult", "default_device", "load_rig", "load_model", "fit", "apply_edit",
    "render", "render_previews", "encode", "sample", "invert", "paste_back", "edit", "contact_sheet",
    "finetune", "bench_edit", "InputError",
]
