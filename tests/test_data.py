"""Datasets of (image, buffers): storage, reading, building from photos, official LMDB import."""
from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionrig_core.data import (DatasetWriter, RigDataset, build_dataset, import_official_lmdb,
                                    load_official_mean_shape, load_pickled_tensor, to_model_image)
from diffusionrig_core.errors import InputError, NoFaceError


def write_random_dataset(path, n=5, size=16, seed=0, mean_shape=None, shard_size=256, buffer_dtype="float32"):
    g = torch.Generator().manual_seed(seed)
    w = DatasetWriter(path, size, shard_size=shard_size, buffer_dtype=buffer_dtype)
    images, buffers = [], []
    for i in range(n):
        images.append(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8))
        buffers.append(torch.randn(9, size, size, generator=g))
        w.add(f"photo_{i}.png", images[-1], buffers[-1])
    w.finish(mean_shape=mean_shape)
    return torch.stack(images), torch.stack(buffers)


# ---------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------
def test_dataset_round_trip_is_exact_across_shards(tmp_path):
    mean = torch.randn(1, 100)
    images, buffers = write_random_dataset(tmp_path / "ds", n=7, shard_size=3, mean_shape=mean)
    ds = RigDataset(tmp_path / "ds")
    assert len(ds) == 7 and ds.size == 16 and len(ds.index["shards"]) == 3
    assert ds.names == [f"photo_{i}.png" for i in range(7)]
    assert torch.equal(ds.mean_shape, mean)  # float32 survives the JSON index exactly
    for i in (0, 2, 3, 6, -1):
        x, b = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert torch.equal(x, to_model_image(images[i]))
        assert torch.equal(b, buffers[i])
    x_all, b_all = ds.load_all()
    assert torch.equal(b_all, buffers) and torch.equal(x_all, to_model_image(images))
    assert x_all.min() >= -1 and x_all.max() <= 1
    with pytest.raises(IndexError):
        ds[7]


def test_images_are_normalised_like_totensor_then_normalize():
    x = torch.arange(256, dtype=torch.uint8).reshape(16, 16, 1).expand(16, 16, 3)
    y = to_model_image(x)
    expected = (x.permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.equal(y, expected) and y[0, 0, 0] == -1 and y[0, -1, -1] == 1


def test_float16_buffers_halve_storage_and_read_back_as_float32(tmp_path):
    _, buffers = write_random_dataset(tmp_path / "h", n=2, buffer_dtype="float16")
    ds = RigDataset(tmp_path / "h")
    assert ds.raw(0, "buffers").dtype == torch.float16 and ds[0][1].dtype == torch.float32
    assert torch.allclose(ds[1][1], buffers[1], rtol=1e-3, atol=1e-3)


def test_dataset_reads_in_dataloader_workers(tmp_path):
    images, buffers = write_random_dataset(tmp_path / "ds", n=6, shard_size=4)
    ds = RigDataset(tmp_path / "ds")
    ds[0]  # open handles in the parent first: workers must not reuse them
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    got = torch.cat([b for _, b in loader])
    assert torch.equal(got, buffers)


def test_a_folder_without_index_is_not_a_dataset(tmp_path):
    w = DatasetWriter(tmp_path / "half", 16)
    w.add("a.png", torch.zeros(16, 16, 3, dtype=torch.uint8), torch.zeros(9, 16, 16))
    w._flush()  # shards written, index.json not yet: an interrupted build
    with pytest.raises(InputError, match="index.json"):
        RigDataset(tmp_path / "half")


def test_writer_refuses_to_overwrite_a_dataset_unless_asked(tmp_path):
    write_random_dataset(tmp_path / "ds", n=2)
    with pytest.raises(InputError, match="already holds a dataset"):
        DatasetWriter(tmp_path / "ds", 16)
    w = DatasetWriter(tmp_path / "ds", 16, overwrite=True)
    assert not (tmp_path / "ds" / "index.json").exists()
    w.add("x.png", torch.zeros(16, 16, 3, dtype=torch.uint8), torch.ones(9, 16, 16))
    w.finish()
    assert len(RigDataset(tmp_path / "ds")) == 1


def test_missing_shard_is_reported(tmp_path):
    write_random_dataset(tmp_path / "ds", n=4, shard_size=2)
    (tmp_path / "ds" / "shard-00001.safetensors").unlink()
    with pytest.raises(InputError, match="missing"):
        RigDataset(tmp_path / "ds")


# ---------------------------------------------------------------------------------------------
# building from photos (a stand-in rig: the orchestration is what is tested here)
# ---------------------------------------------------------------------------------------------
class FakeRig:
    """Duck-typed FaceRig: a black photo has no face; shape = the photo's mean colour."""

    def prepare(self, source, size=256, detector="dlib", **_):
        from diffusionrig_core.image_io import load_image

        img = load_image(source)
        if img.max() == 0:
            raise NoFaceError("no face in a black photo")
        resized = np.array(Image.fromarray(img).resize((size, size)))
        crop = torch.from_numpy(resized).permute(2, 0, 1).float() / 255
        return resized, crop, torch.eye(3), None

    def encode(self, crops):
        b = crops.shape[0]
        shape = crops.mean(dim=(1, 2, 3))[:, None].repeat(1, 100)
        return {"shape": shape, "tex": torch.zeros(b, 50), "exp": torch.zeros(b, 50), "pose": torch.zeros(b, 6),
                "cam": torch.ones(b, 3), "light": torch.zeros(b, 9, 3)}

    def render(self, params, tform, size):
        return params["shape"][:, :9, None, None].expand(-1, 9, size, size).clone()


def _photo(path, value):
    Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(path)


def test_build_dataset_skips_and_reports_failing_photos_by_name(tmp_path):
    album = tmp_path / "album"
    album.mkdir()
    _photo(album / "a.png", 40)
    _photo(album / "b.jpg", 200)
    _photo(album / "dark.png", 0)                       # no face
    (album / "broken.jpg").write_bytes(b"not an image")  # unreadable
    (album / "notes.txt").write_text("hello")             # not an image: ignored, listed
    report = build_dataset(album, tmp_path / "ds", FakeRig(), size=16, use_mean_shape=True, batch_size=2,
                           progress=False)
    failed = dict(report.failed)
    assert set(failed) == {"dark.png", "broken.jpg"}
    assert "no face" in failed["dark.png"]
    assert "not an image" in failed["broken.jpg"] or "unreadable" in failed["broken.jpg"]
    assert report.ignored == ["notes.txt"] and report.count == 2
    on_disk = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert {f["name"] for f in on_disk["failed"]} == {"dark.png", "broken.jpg"}

    ds = RigDataset(tmp_path / "ds")
    assert ds.names == ["a.png", "b.jpg"]
    # the album's mean shape is kept and every item was rendered with it
    mean = (40 + 200) / 2 / 255
    assert torch.allclose(ds.mean_shape, torch.full((1, 100), mean), atol=1e-6)
    assert torch.allclose(ds[0][1], ds[1][1]) and torch.allclose(ds[0][1], torch.tensor(mean), atol=1e-6)
    assert torch.allclose(ds.params(1)["shape"], ds.mean_shape[0])
    assert ds.raw(0).dtype == torch.uint8 and int(ds.raw(1)[0, 0, 0]) == 200


def test_build_dataset_without_mean_shape_keeps_each_photos_shape(tmp_path):
    album = tmp_path / "album"
    album.mkdir()
    _photo(album / "a.png", 40)
    _photo(album / "b.png", 200)
    build_dataset(album, tmp_path / "ds", FakeRig(), size=16, progress=False)
    ds = RigDataset(tmp_path / "ds")
    assert ds.mean_shape is None
    assert not torch.allclose(ds[0][1], ds[1][1])


def test_build_dataset_with_no_usable_photo_says_so(tmp_path):
    album = tmp_path / "album"
    album.mkdir()
    _photo(album / "dark.png", 0)
    with pytest.raises(NoFaceError, match="dark.png"):
        build_dataset(album, tmp_path / "ds", FakeRig(), size=16, progress=False)
    assert not (tmp_path / "ds" / "index.json").exists()


# ---------------------------------------------------------------------------------------------
# official create_data.py LMDB and mean_shape.pkl
# ---------------------------------------------------------------------------------------------
def test_import_official_lmdb_gives_exactly_the_stored_buffers_and_images(tmp_path, shared_dir):
    pytest.importorskip("lmdb")
    from safetensors.torch import load_file

    deca = shared_dir / "fixtures" / "deca"
    report = import_official_lmdb(deca / "album_deca.lmdb", tmp_path / "ds", progress=False)
    assert report.count == 2 and not report.failed
    ds = RigDataset(tmp_path / "ds")
    render = load_file(str(deca / "render.safetensors"))
    crop = load_file(str(deca / "crop.safetensors"))
    for i in range(2):
        expected = torch.cat([render[f"render/{k}_images"][i] for k in ("rendered", "normal", "albedo")])
        assert torch.equal(ds[i][1], expected)
        c = int(render["render/crop_index"][i])
        photo = (crop[f"crop/{c}/original_image"] * 255).to(torch.uint8).permute(1, 2, 0)
        assert torch.equal(ds.raw(i), photo)


@pytest.mark.parametrize("name", ["mean_shape_cpu.pkl", "mean_shape_cuda_emulated.pkl"])
def test_official_mean_shape_pickles_load_on_the_cpu(shared_dir, name):
    from safetensors.torch import load_file

    deca = shared_dir / "fixtures" / "deca"
    expected = load_file(str(deca / "edit_align_ffhq.safetensors"))["edit/meanshape"].reshape(1, 100)
    ms = load_official_mean_shape(deca / name)
    assert ms.device.type == "cpu" and ms.dtype == torch.float32 and torch.equal(ms, expected)


def test_import_keeps_the_albums_mean_shape(tmp_path, shared_dir):
    pytest.importorskip("lmdb")
    import shutil

    deca = shared_dir / "fixtures" / "deca"
    lmdb_copy = tmp_path / "album.lmdb"
    shutil.copytree(deca / "album_deca.lmdb", lmdb_copy)
    for f in lmdb_copy.iterdir():
        f.chmod(0o644)
    shutil.copy(deca / "mean_shape_cuda_emulated.pkl", lmdb_copy / "mean_shape.pkl")
    import_official_lmdb(lmdb_copy, tmp_path / "ds", progress=False)
    assert torch.equal(RigDataset(tmp_path / "ds").mean_shape, load_official_mean_shape(deca / "mean_shape_cpu.pkl"))


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_tensor_unpickler_refuses_anything_but_tensors(capsys):
    with pytest.raises(InputError, match="refusing"):
        load_pickled_tensor(pickle.dumps(_Evil()))
    assert "never run" not in capsys.readouterr().out
    with pytest.raises(InputError):
        load_pickled_tensor(pickle.dumps({"a": 1}))
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert torch.equal(load_pickled_tensor(pickle.dumps(t)), t)  # what create_data.py writes


def test_lmdb_import_without_the_package_says_how_to_get_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "lmdb":
            raise ImportError("no lmdb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(InputError, match="pip install lmdb"):
        import_official_lmdb(tmp_path, tmp_path / "out")


def test_synthetic_album_uses_the_true_parameters_when_the_rig_cannot_fit(tmp_path):
    """The demo world's rig has no DECA weights: its photos' sidecars stand in for the fit."""
    from diffusionrig_core import synthetic

    rig = synthetic.synthetic_rig(tmp_path / "assets")
    person = synthetic.sample_people(1, seed=0)[0]
    paths = synthetic.write_album(tmp_path / "album", person, n=3, size=32, rig=rig)
    report = build_dataset(tmp_path / "album", tmp_path / "ds", rig, size=32, use_mean_shape=True, progress=False)
    assert report.count == 3 and not report.failed and not report.ignored  # .txt/.params.json are companions
    ds = RigDataset(tmp_path / "ds")
    assert ds.settings["fit"] == "sidecar"
    truth = [synthetic.load_sidecar(p) for p in paths]
    expected_mean = torch.cat([t.params["shape"] for t in truth]).mean(0, keepdim=True)
    assert torch.allclose(ds.mean_shape, expected_mean, atol=1e-7)
    params = dict(truth[2].params, shape=ds.mean_shape)
    assert torch.allclose(ds[2][1], rig.render(params, truth[2].tform, 32)[0], atol=1e-5)
    assert torch.equal(ds.raw(2), torch.from_numpy(np.array(Image.open(paths[2]).convert("RGB"))))
