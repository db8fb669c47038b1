import os
import stat

import numpy as np
import pytest
import torch

from diffusionrig_core.files import PieceDigest, atomic_save_safetensors, atomic_write_bytes, piece_digest, sha256_file


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


def _tensors_of_every_kind(device: str = "cpu") -> dict[str, torch.Tensor]:
    return {
        "conv": torch.randn(4, 3, 3, 3, device=device).to(memory_format=torch.channels_last),
        "scalar": torch.tensor(5000.0, device=device),
        "empty": torch.zeros(0, device=device),
        "half": torch.randn(7, device=device).bfloat16(),
        "bytes": torch.arange(5, dtype=torch.uint8, device=device),
        "flags": torch.tensor([True, False, True], device=device),
        "index": torch.arange(3, dtype=torch.int64, device=device),
        "slice": torch.randn(6, 6, device=device)[:, 1:4],
    }


def _streamed_file_reads_back(tmp_path, tensors):
    from safetensors import safe_open

    from diffusionrig_core.files import atomic_save_safetensors

    target = tmp_path / "t.safetensors"
    written = atomic_save_safetensors(tensors, target, {"k": "v"})
    assert written.size == target.stat().st_size and written.digest == piece_digest(target)
    with safe_open(str(target), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        back = {k: f.get_tensor(k) for k in f.keys()}
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t.cpu()), name


def test_a_streamed_safetensors_file_is_read_by_the_library_and_its_digest_is_the_files(tmp_path):
    _streamed_file_reads_back(tmp_path, _tensors_of_every_kind())


def test_numpy_arrays_are_streamed_to_safetensors_too(tmp_path):
    from safetensors.numpy import load_file as load_numpy

    from diffusionrig_core.files import atomic_save_safetensors

    arrays = {"reversed": np.arange(12.0).reshape(3, 4)[:, ::-1], "faces": np.arange(6, dtype=np.int32).reshape(2, 3)}
    atomic_save_safetensors(arrays, tmp_path / "a.safetensors")
    back = load_numpy(str(tmp_path / "a.safetensors"))
    assert all(np.array_equal(back[k], v) for k, v in arrays.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU tensors are staged through pinned memory)")
def test_gpu_tensors_are_streamed_to_safetensors_through_pinned_memory(tmp_path):
    _streamed_file_reads_back(tmp_path, _tensors_of_every_kind("cuda"))


def test_the_piece_digest_is_sha256_over_the_sha256_of_each_piece_however_the_bytes_arrive(tmp_path, monkeypatch):
    import hashlib

    from diffusionrig_core import files

    monkeypatch.setattr(files, "PIECE", 1000)
    data = os.urandom(4500)
    pieces = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    expected = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in pieces)).hexdigest()
    streamed = PieceDigest()
    for lo, hi in ((0, 7), (7, 1999), (1999, 2000), (2000, 4500)):
        streamed.update(data[lo:hi])
    (tmp_path / "f").write_bytes(data)
    assert streamed.hexdigest() == expected == piece_digest(tmp_path / "f")
    (tmp_path / "f").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert piece_digest(tmp_path / "f") != expected
    (tmp_path / "empty").write_bytes(b"")
    assert piece_digest(tmp_path / "empty") == PieceDigest().hexdigest()
