"""The synthetic face world: FLAME-format assets, made-up people and their photos with true parameters.

    from diffusionrig_core import synthetic
    paths = synthetic.write_synthetic_assets("world/assets")       # generic_model.pkl, head_template.obj, ...
    rig = synthetic.synthetic_rig("world/assets")                  # a FaceRig on them (no DECA needed)
    person = synthetic.sample_people(1, seed=0)[0]
    synthetic.write_album("world/person_000", person, n=8, size=128, rig=rig)   # PNG + .params.json + .txt
    params, tform, landmarks = synthetic.load_sidecar("world/person_000/photo_000.png")

Names are loaded on first use (importing the package is cheap).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "write_synthetic_assets": "assets", "RESOLUTIONS": "assets", "FILE_NAMES": "assets",
    "Person": "people", "sample_people": "people", "sample_person": "people",
    "sample_photo_params": "people", "EXPRESSIONS": "people", "BACKGROUNDS": "people",
    "PhotoOptions": "photos", "ALL_OFF": "photos", "synthetic_rig": "photos", "default_rig": "photos",
    "frame_photo": "photos", "render_photo": "photos", "save_photo": "photos", "write_album": "photos",
    "write_heldout": "photos", "write_world": "photos", "load_world": "photos", "photo_paths": "photos",
    "load_sidecar": "photos", "Sidecar": "photos", "edited_params": "photos", "EDIT_MODES": "photos",
    "demo_model_paths": "demo", "demo_model_path": "demo", "demo_available": "demo", "demo_world": "demo",
    "demo_person": "demo", "write_demo_samples": "demo", "build_demo": "demo", "DemoBuildConfig": "demo",
    "demo_edit_defaults": "demo", "write_demo_album": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusionrig_core.synthetic' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
