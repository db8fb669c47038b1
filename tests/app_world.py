"""A tiny synthetic world for the app's tests: face-rig assets, two people's photos, two tiny models.

Everything is made by the project's own code (``diffusionrig_core.synthetic`` and
``ModelConfig.tiny()``), at 64 px, so an edit takes well under a second on one CPU core.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SIZE = 64


def make_world(root: Path, n_models: int = 2):
    """Write the world under ``root`` and return the app's ``DemoWorld`` for it (skips if the
    synthetic people are not available in this checkout)."""
    from gradio_app.app import DemoWorld
    from diffusionrig_core import synthetic
    from diffusionrig_core.checkpoint import save_model
    from diffusionrig_core.model import DiffusionRig, ModelConfig

    if not hasattr(synthetic, "write_album") or not hasattr(synthetic, "sample_people"):
        pytest.skip("diffusionrig_core.synthetic has no synthetic people yet (write_album / sample_people)")
    root.mkdir(parents=True, exist_ok=True)
    assets = root / "assets"
    rig = synthetic.synthetic_rig(assets, resolution="tiny")  # photos must be used with the rig that drew them
    photos: dict[str, Path] = {}
    for i, person in enumerate(synthetic.sample_people(2, seed=0)):
        album = synthetic.write_album(root / "photos" / f"person{i + 1}", person, n=2, size=SIZE, rig=rig)
        for j, path in enumerate(album):
            photos[f"Person {i + 1} · {j + 1}"] = Path(path)
    models = {}
    for k, label in enumerate(("demo: tiny A", "demo: tiny B")[:n_models]):
        torch.manual_seed(k)
        models[label] = save_model(DiffusionRig(ModelConfig.tiny()), root / f"tiny_{k}.safetensors")
    return DemoWorld(assets, photos, {k: Path(v) for k, v in models.items()})


def write_bad_files(root: Path) -> dict[str, Path]:
    """A text file named .png, a face-less image, and a valid PNG of many pixels."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    bad = {"not_image": root / "notes.png", "no_face": root / "wall.png", "huge": root / "huge.png"}
    bad["not_image"].write_text("this is a shopping list, not a photo")
    Image.fromarray(np.full((160, 160, 3), 128, np.uint8)).save(bad["no_face"])
    Image.new("RGB", (3000, 2000), (90, 90, 90)).save(bad["huge"], compress_level=1)  # small file, 6 megapixels
    return bad
