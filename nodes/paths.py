"""Where DiffusionRig's files live inside ComfyUI: two folders registered with ``folder_paths``.

* ``diffusionrig`` (default ``ComfyUI/models/diffusionrig``): models, official ``.pt`` or our
  ``.safetensors``; the Model Loader lists them and Stage 2 Finetune saves into the first one.
* ``diffusionrig_assets`` (default ``ComfyUI/models/diffusionrig_assets``): the FLAME/DECA files
  of the face rig, one flat folder (``diffusionrig assets`` in a terminal lists them).

Users may point either name at other places in ``extra_model_paths.yaml``; we append our default
after theirs. Registration only edits a dict: no disk access at import.
"""
from __future__ import annotations

import os
from pathlib import Path

MODEL_FOLDER = "diffusionrig"
ASSETS_FOLDER = "diffusionrig_assets"
MODEL_EXTENSIONS = {".pt", ".pth", ".ckpt", ".safetensors"}

# The synthetic demo ships inside the pack; its combo entries carry this prefix so they can never
# clash with a file of the user's models folder.
DEMO_PREFIX = "[demo] "
SYNTHETIC_ASSETS = "synthetic demo"
INSTALLED_ASSETS = "diffusionrig_assets"
ASSET_CHOICES = [INSTALLED_ASSETS, SYNTHETIC_ASSETS]


def register_model_folders() -> None:
    import folder_paths

    for name, exts in ((MODEL_FOLDER, MODEL_EXTENSIONS), (ASSETS_FOLDER, set())):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        paths, _ = folder_paths.folder_names_and_paths[name]
        # an empty set would let every file through; the assets folder is never listed as a combo
        folder_paths.folder_names_and_paths[name] = (paths, set(exts) or {".pkl", ".npz", ".obj", ".npy", ".tar"})


def model_folders() -> list[str]:
    import folder_paths

    return folder_paths.get_folder_paths(MODEL_FOLDER)


def asset_folders() -> list[str]:
    import folder_paths

    return folder_paths.get_folder_paths(ASSETS_FOLDER)


def _demo_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "diffusionrig_core" / "demo_data"


def demo_models() -> dict[str, Path]:
    """The demo models shipped in the pack, by combo name (empty when none are shipped)."""
    root = _demo_dir()
    if not root.is_dir():
        return {}
    return {DEMO_PREFIX + p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*.safetensors"))}


def model_choices() -> list[str]:
    """Combo values of the Model Loader: the user's model files, then the shipped demo models."""
    import folder_paths

    return list(folder_paths.get_filename_list(MODEL_FOLDER)) + list(demo_models())


def resolve_model(name: str) -> Path:
    import folder_paths

    demo = demo_models().get(name)
    if demo is not None:
        return demo
    full = folder_paths.get_full_path(MODEL_FOLDER, name)
    if full is None:
        raise FileNotFoundError(missing_model_message(name))
    return Path(full)


def missing_model_message(name: str) -> str:
    where = ", ".join(model_folders()) or "ComfyUI/models/diffusionrig"
    return (f"DiffusionRig model {name!r} was not found in {where}. Put the model file (official .pt "
            "or DiffusionRig .safetensors) there and press 'Refresh' (R) in ComfyUI, or pick another model.")


def save_path(name: str) -> Path:
    """Where Stage 2 Finetune writes ``name``: the first registered models folder."""
    return Path(model_folders()[0]) / f"{name}.safetensors"
