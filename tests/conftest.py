import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def _shared() -> Path:
    return Path(os.environ.get("DIFFUSIONRIG_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The reference material beside the repo (official fixtures); parity tests skip without it."""
    path = _shared()
    if not (path / "fixtures").is_dir():
        pytest.skip(f"official fixtures not found at {path} (set DIFFUSIONRIG_SHARED); parity test skipped")
    return path
