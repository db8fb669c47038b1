import os
import stat

import pytest
import torch

from diffusionrig_core.files import atomic_save_safetensors, atomic_write_bytes, sha256_file


def test_a_failed_write_keeps_the_old_file_whole_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    atomic_write_bytes(target, b"old contents")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new contents that never land")
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_saved_files_get_the_usual_permissions_not_private_ones(tmp_path):
    target = tmp_path / "m.safetensors"
    atomic_save_safetensors({"w": torch.ones(2)}, target, {"k": "v"})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_sha256_of_a_file_matches_hashlib(tmp_path):
    import hashlib

    p = tmp_path / "x.bin"
    p.write_bytes(b"abc" * 100000)
    assert sha256_file(p) == hashlib.sha256(b"abc" * 100000).hexdigest()
