"""The DiffusionRig ComfyUI nodes (V3 API). Each node converts its inputs, makes one call into
``diffusionrig_core.pipeline`` and converts the result; no editing logic lives here.

Node ids and socket types are stored in saved workflows: never rename them.
"""
from __future__ import annotations

from .demo import DemoPhoto
from .edit import EditParams
from .encode import GlobalEncode
from .extract import DecaExtract
from .finetune import Stage2Finetune
from .loaders import FaceRigLoader, ModelLoader
from .render import BufferRender
from .sample import RigSample

NODES = [ModelLoader, FaceRigLoader, DecaExtract, BufferRender, EditParams, GlobalEncode, RigSample,
         Stage2Finetune, DemoPhoto]

__all__ = ["NODES"] + [n.__name__ for n in NODES]
