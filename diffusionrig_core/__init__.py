"""DiffusionRig: personalised priors for editing a portrait's lighting, expression and pose.

Importing the package is cheap; the public names below are loaded on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "DiffusionRigError": "errors", "CheckpointError": "errors", "AssetError": "errors",
    "NoFaceError": "errors", "ImageError": "errors", "InputError": "errors", "TrainingError": "errors",
    "ModelConfig": "model", "DiffusionRig": "model",
    "load_model": "checkpoint", "save_model": "checkpoint", "infer_config": "checkpoint",
    "convert_checkpoint": "checkpoint",
    "Diffusion": "diffusion", "space_timesteps": "diffusion",
    "ddim_sample": "sampling", "ddpm_sample": "sampling", "ddim_invert": "sampling",
    "load_image": "image_io",
    "FaceRig": "rig", "Fit": "rig",
    "edit": "pipeline", "Edit": "pipeline",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusionrig_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
