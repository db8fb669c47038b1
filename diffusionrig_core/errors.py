"""Errors a user can act on.

Every error raised on purpose by DiffusionRig derives from ``DiffusionRigError`` and its message
says what was wrong and what to do about it. The ComfyUI nodes and the Gradio app show these
messages as they are, so write them for a person, not for a traceback.
"""
from __future__ import annotations


class DiffusionRigError(Exception):
    """Base class of every error DiffusionRig raises on purpose."""


class CheckpointError(DiffusionRigError):
    """A model file is missing, truncated, not a checkpoint, or of the wrong architecture."""


class AssetError(DiffusionRigError):
    """A face-rig asset (FLAME, DECA, texture, OBJ, landmark embedding) is missing or corrupt."""


class NoFaceError(DiffusionRigError):
    """No face was found in a photo."""


class ImageError(DiffusionRigError):
    """A file is not a readable image, or an image is unusable (too small, too large)."""


class InputError(DiffusionRigError, ValueError):
    """A value is out of range or of the wrong kind; the message names the allowed range."""


class TrainingError(DiffusionRigError):
    """A training run cannot start or resume (empty album, incompatible checkpoint, ...)."""
