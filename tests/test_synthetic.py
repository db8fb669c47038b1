"""The synthetic face world: assets in the real formats, people, photos and their true parameters."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusionrig_core import synthetic
from diffusionrig_core.assets import load_flame_model, load_landmark_embedding, load_obj, load_texture_space
from diffusionrig_core.deca import crop_tform
from diffusionrig_core.flame import FLAME
from diffusionrig_core.synthetic.photos import ALL_OFF, PhotoOptions, project_landmarks, to_uint8

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="session")
def world_assets(tmp_path_factory) -> dict[str, Path]:
    return synthetic.write_synthetic_assets(tmp_path_factory.mktemp("synthetic") / "assets", seed=0,
                                            resolution="tiny")


@pytest.fixture(scope="session")
def rig(world_assets, tmp_path_factory):
    # keep the FLAME safetensors cache out of the user's home folder
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return synthetic.synthetic_rig(world_assets["flame"].parent)
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def person():
    return synthetic.sample_people(2, seed=0)[1]


@pytest.fixture(scope="session")
def flame_arrays(world_assets):
    return load_flame_model(world_assets["flame"], cache=False)


def _digests(paths: dict[str, Path]) -> dict[str, str]:
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in paths.items()}


def _zero_params(b: int = 1) -> dict[str, torch.Tensor]:
    return {"shape": torch.zeros(b, 100), "exp": torch.zeros(b, 50), "pose": torch.zeros(b, 6)}


# ------------------------------------------------------------------------------------------------
# assets in the real formats


def test_generated_assets_load_through_the_real_loaders_without_chumpy_or_scipy(world_assets, monkeypatch):
    # make every import of chumpy or scipy fail, even of submodules loaded by earlier tests
    for name in [m for m in sys.modules if m.split(".")[0] in ("chumpy", "scipy")] + ["chumpy", "scipy"]:
        monkeypatch.setitem(sys.modules, name, None)
    flame = load_flame_model(world_assets["flame"], cache=False)
    faces, uv, uvf = load_obj(world_assets["template"])
    emb = load_landmark_embedding(world_assets["landmarks"])
    tex = load_texture_space(world_assets["texture"])
    assert (faces == flame["f"]).all() and uvf.shape == faces.shape
    v = flame["v_template"].shape[0]
    assert flame["shapedirs"].shape == (v, 3, 400) and flame["J_regressor"].shape == (5, v)
    np.testing.assert_allclose(flame["J_regressor"].sum(1), 1.0, atol=1e-6)
    assert emb["dynamic_lmk_faces_idx"].shape == (79, 17) and int(emb["static_lmk_faces_idx"].max()) < len(faces)
    assert tex["mean"].shape[:2] == tex["basis"].shape[:2]


def test_flame_pickle_is_a_python2_pickle_with_chumpy_and_old_scipy_globals(world_assets):
    raw = world_assets["flame"].read_bytes()
    ops = list(pickletools.genops(raw))
    assert ops[0][0].name == "PROTO" and ops[0][1] == 2
    globals_ = {arg for op, arg, _ in ops if op.name == "GLOBAL"}
    assert {"chumpy.ch Ch", "scipy.sparse.csc csc_matrix", "numpy.core.multiarray _reconstruct",
            "__builtin__ set"} <= globals_
    names = {op.name for op, _, _ in ops}
    assert "BINSTRING" in names and "BINUNICODE" not in names and "BINBYTES" not in names
    # like the real file it needs encoding='latin1': the default ASCII decoding fails
    with pytest.raises(UnicodeDecodeError):
        _StubUnpickler(io.BytesIO(raw)).load()
    d = _StubUnpickler(io.BytesIO(raw), encoding="latin1").load()
    assert list(d) == ["f", "J_regressor", "kintree_table", "J", "bs_style", "weights", "posedirs",
                       "v_template", "shapedirs", "bs_type"]
    v = d["v_template"].shape[0]
    assert d["f"].dtype == np.uint32 and d["f"].shape[1] == 3
    assert d["kintree_table"].tolist() == [[2 ** 32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]
    assert d["J"].shape == (5, 3) and d["bs_style"] == "lbs" and d["bs_type"] == "lrotmin"
    assert d["weights"].shape == (v, 5) and d["posedirs"].shape == (v, 3, 36)
    assert type(d["shapedirs"]).__name__ == "Ch"
    assert set(d["shapedirs"].state) == {"_dirty_vars", "_itr", "_make_dense", "_make_sparse",
                                         "_depends_on_deps", "x"}
    x = d["shapedirs"].state["x"]
    assert x.shape == (v, 3, 400) and x.dtype == np.float64
    csc = d["J_regressor"].state
    assert csc["_shape"] == (5, v) and csc["data"].dtype == np.float64
    assert len(csc["indptr"]) == v + 1 and csc["indices"].dtype == np.int32
    np.testing.assert_allclose(csc["data"].sum(), 5.0)  # five joints, each an average of vertices
    np.testing.assert_allclose(d["weights"].sum(1), 1.0, atol=1e-12)


class _StubUnpickler(pickle.Unpickler):
    """Reads the FLAME pickle keeping chumpy/scipy objects as raw state (for format checks)."""

    def find_class(self, module, name):
        if module.startswith("chumpy") or module.startswith("scipy"):
            return type(name, (), {"__setstate__": lambda self, st: setattr(self, "state", st)})
        return super().find_class(module, name)


def test_landmark_embedding_has_the_real_keys_dtypes_and_torch_tensors(world_assets):
    d = np.load(world_assets["landmarks"], allow_pickle=True, encoding="latin1")[()]
    assert d["static_lmk_faces_idx"].shape == (51,) and d["static_lmk_faces_idx"].dtype == np.int64
    assert d["static_lmk_bary_coords"].shape == (51, 3) and d["static_lmk_bary_coords"].dtype == np.float64
    assert isinstance(d["dynamic_lmk_faces_idx"], torch.Tensor) and d["dynamic_lmk_faces_idx"].dtype == torch.int64
    assert tuple(d["dynamic_lmk_faces_idx"].shape) == (79, 17)
    assert isinstance(d["dynamic_lmk_bary_coords"], torch.Tensor)
    assert d["dynamic_lmk_bary_coords"].dtype == torch.float32 and tuple(d["dynamic_lmk_bary_coords"].shape) == (79, 17, 3)
    assert d["full_lmk_faces_idx"].shape == (1, 68) and d["full_lmk_bary_coords"].dtype == np.float32
    raw = world_assets["landmarks"].read_bytes()
    start = raw.index(b"\n") + 1
    assert raw[start:start + 2] == b"\x80\x03"  # pickle protocol 3, as np.save wrote the real file
    np.testing.assert_allclose(d["static_lmk_bary_coords"].sum(1), 1.0, atol=1e-9)


def test_texture_space_is_bgr_in_0_255_with_200_directions(world_assets):
    with np.load(world_assets["texture"]) as z:
        assert set(z.files) == {"mean", "tex_dir", "vt", "ft"}
        mean, tex_dir = z["mean"], z["tex_dir"]
    h, w, _ = mean.shape
    assert tex_dir.shape == (h, w, 3, 200) and mean.dtype == np.float32
    assert 0 <= mean.min() and mean.max() <= 255 and mean.max() > 150
    # skin is red-dominant: in BGR storage the last channel is the largest on average
    assert mean[..., 2].mean() > mean[..., 1].mean() > mean[..., 0].mean()
    space = load_texture_space(world_assets["texture"])
    assert space["basis"].shape == (h, w, 3, 50)


def test_head_template_obj_has_blender_layout_and_matches_the_pickle(world_assets, flame_arrays):
    lines = world_assets["template"].read_text().splitlines()
    tags = [ln.split()[0] for ln in lines]
    assert tags[0] == "#" and "mtllib" in tags
    order = [t for i, t in enumerate(tags) if i == 0 or t != tags[i - 1]]
    assert order == ["#", "mtllib", "v", "usemtl", "vt", "s", "f"]
    assert "s off" in lines
    assert all(len(ln.split()) == 4 and ln.split()[1].count("/") == 1 for ln in lines if ln.startswith("f "))
    faces, uv, uvf = load_obj(world_assets["template"])
    assert (faces == flame_arrays["f"]).all()
    assert uv.shape[0] > flame_arrays["v_template"].shape[0]  # UV seam: more UV vertices than vertices
    assert (uv >= 0).all() and (uv <= 1).all()


def test_same_seed_gives_identical_bytes_and_another_seed_other_bases(world_assets, tmp_path):
    again = synthetic.write_synthetic_assets(tmp_path / "a", seed=0, resolution="tiny")
    assert _digests(again) == _digests(world_assets)
    other = synthetic.write_synthetic_assets(tmp_path / "b", seed=1, resolution="tiny")
    assert _digests(other)["flame"] != _digests(world_assets)["flame"]
    assert _digests(other)["template"] == _digests(world_assets)["template"]  # the mesh is not random


# ------------------------------------------------------------------------------------------------
# the head model


def test_zero_parameters_give_the_template(world_assets, flame_arrays):
    flame = FLAME(flame_arrays, load_landmark_embedding(world_assets["landmarks"]))
    verts, _, _ = flame(**_zero_params())
    np.testing.assert_allclose(verts[0].numpy(), flame_arrays["v_template"], atol=1e-6)


def test_landmarks_sit_in_their_ibug_regions(rig):
    _, lm, lm3d = rig.flame_forward(_zero_params())
    p = lm[0].numpy()
    x, y = p[:, 0], p[:, 1]
    brows, eyes, nose, mouth, contour = (slice(17, 27), slice(36, 48), slice(27, 36), slice(48, 68), slice(0, 17))
    assert y[brows].min() > y[eyes].max() > y[30] > y[mouth].max()  # brows over eyes over nose tip over mouth
    assert y[mouth].min() > y[8] and y[8] == y[contour].min()  # the chin is the lowest point
    assert x[0] < x[36] < x[39] < x[42] < x[45] < x[16]  # contour, right eye, left eye (image left to right)
    assert x[48] < x[51] < x[54] and y[51] > y[57]  # mouth corners, top lip above bottom lip
    assert abs(x[8]) < 0.01 and abs(x[30]) < 0.01 and abs(x[27]) < 0.01  # chin and nose on the midline
    assert (p[:, 2] > 0).all()  # all on the front of the head
    np.testing.assert_allclose(lm3d[0].numpy(), p, atol=1e-6)  # at yaw 0 the full set is the same points


def test_jaw_rotation_opens_the_mouth(rig):
    closed = rig.flame_forward(_zero_params())[1][0]
    params = _zero_params()
    params["pose"][0, 3] = 0.25
    opened = rig.flame_forward(params)[1][0]
    assert float(opened[57, 1] - closed[57, 1]) < -0.01  # bottom lip goes down by more than 1 cm
    assert float(opened[8, 1] - closed[8, 1]) < -0.01  # so does the chin
    assert abs(float(opened[51, 1] - closed[51, 1])) < 1e-3  # the top lip stays
    assert abs(float(opened[36, 1] - closed[36, 1])) < 2e-4  # the eyes stay (up to the small pose correctives)


def test_dynamic_contour_slides_to_the_silhouette_when_the_head_turns(rig):
    emb = rig.flame
    assert len({tuple(r.tolist()) for r in emb.dynamic_lmk_faces_idx}) > 10  # rows really differ
    params = _zero_params()
    yaw = 30.0
    params["pose"][0, 1] = np.radians(yaw)
    verts, lm, _ = rig.flame_forward(params)
    assert int(emb.dynamic_rows(emb.full_pose(params["pose"]))[0]) == 30
    x = lm[0, :, 0]
    # the far side (image right, turning away) lies on the head's outline: nothing of the face region
    # at that height sticks out further
    v = verts[0]
    for k in (11, 12, 13):
        band = (v[:, 1] - lm[0, k, 1]).abs() < 0.004
        assert float(x[k]) > float(v[band, 0].max()) - 0.006
    # and further out than the frontal contour point carried along with the head
    front = rig.flame_forward(_zero_params())[1][0]
    rot = torch.tensor([[np.cos(np.radians(yaw)), 0, np.sin(np.radians(yaw))], [0, 1, 0],
                        [-np.sin(np.radians(yaw)), 0, np.cos(np.radians(yaw))]], dtype=torch.float32)
    carried = front @ rot.T
    assert (x[11:15] >= carried[11:15, 0] - 1e-6).all()


# ------------------------------------------------------------------------------------------------
# people and photos


def test_people_do_not_depend_on_how_many_are_sampled():
    few = synthetic.sample_people(2, seed=3)
    many = synthetic.sample_people(5, seed=3)
    assert [p.to_dict() for p in few] == [p.to_dict() for p in many[:2]]
    assert few[0].to_dict() != few[1].to_dict()
    back = synthetic.Person.from_dict(json.loads(json.dumps(few[0].to_dict())))
    assert back.to_dict() == few[0].to_dict()


def test_photo_params_are_in_range(person):
    rng = np.random.default_rng(0)
    for _ in range(20):
        prm = synthetic.sample_photo_params(person, rng)
        assert prm["shape"].shape == (1, 100) and prm["exp"].shape == (1, 50) and prm["light"].shape == (1, 9, 3)
        assert float(prm["pose"][0, :3].norm()) < np.radians(40)
        assert 0 <= float(prm["pose"][0, 3]) < 0.35


def test_photo_buffers_equal_the_renderers(rig, person, tmp_path):
    path = synthetic.write_album(tmp_path, person, n=1, seed=0, size=SIZE, rig=rig)[0]
    side = synthetic.load_sidecar(path)
    params, tform, _ = side
    buffers = rig.render_all(params, tform, SIZE)
    from PIL import Image
    photo = np.asarray(Image.open(path))
    # the photo's face mask is the buffers' alpha: re-render the same photo and compare its mask
    again, info = synthetic.render_photo(rig, person, side.photo_params(), SIZE, tform=tform)
    assert np.array_equal(again, photo)
    assert np.array_equal(info["alpha"], buffers["alpha"][0, 0].numpy() > 0)
    for k in ("rendered", "normal", "albedo"):
        assert torch.equal(info["buffers"][k], buffers[k])
    assert torch.equal(rig.render(params, tform, SIZE),
                       torch.cat([buffers["rendered"], buffers["normal"], buffers["albedo"]], 1))
    # background pixels are not the face: the photo there is the background, not black
    bg = ~info["alpha"]
    assert bg.any() and photo[bg].mean() > 5


def test_photo_without_extras_is_the_clamped_rendered_buffer(rig, person):
    prm = synthetic.sample_photo_params(person, np.random.default_rng(5))
    img, info = synthetic.render_photo(rig, person, prm, SIZE, ALL_OFF)
    rendered = info["buffers"]["rendered"][0].permute(1, 2, 0).numpy()
    assert np.array_equal(img, to_uint8(rendered))
    full, _ = synthetic.render_photo(rig, person, prm, SIZE)
    face = info["alpha"]
    # the full photo shows more than the buffers: detail, highlights, hair on the face pixels
    assert np.abs(full[face].astype(int) - img[face].astype(int)).mean() > 2


def test_sidecar_tform_is_the_official_crop_of_the_txt_landmarks(rig, person, tmp_path):
    paths = synthetic.write_album(tmp_path, person, n=2, seed=1, size=SIZE, rig=rig)
    for path in paths:
        params, tform, lm = synthetic.load_sidecar(path)
        txt = np.loadtxt(path.with_suffix(".txt"))
        assert txt.shape == (68, 2) and np.array_equal(txt, lm)
        assert np.array_equal(crop_tform(txt, (SIZE, SIZE)).astype(np.float32), tform[0].numpy())
        _, lm_world, _ = rig.flame_forward(params)
        reproj = project_landmarks(lm_world, params["cam"], tform)[0]
        assert np.abs(reproj - lm).max() < 1e-3  # camera + official way back put landmarks where the photo has them
        record = json.loads(path.with_name(path.stem + ".params.json").read_text())
        assert record["format"] == "diffusionrig-synthetic-photo-v1" and record["person"] == person.id
        assert record["image"] == path.name and record["size"] == SIZE


def test_face_is_framed_like_an_ffhq_portrait(rig, person):
    prm = synthetic.sample_photo_params(person, np.random.default_rng(2))
    _, _, lm = synthetic.frame_photo(rig, prm, 256)
    eyes = lm[36:48].mean(0)
    assert 90 < eyes[1] < 140 and 100 < eyes[0] < 156  # eyes a little above the centre
    assert lm[8, 1] < 250 and lm[:, 0].min() > 10 and lm[:, 0].max() < 246  # the whole face is inside


def test_album_is_deterministic(rig, person, tmp_path):
    a = synthetic.write_album(tmp_path / "a", person, n=2, seed=4, size=SIZE, rig=rig)
    b = synthetic.write_album(tmp_path / "b", person, n=2, seed=4, size=SIZE, rig=rig)
    for pa, pb in zip(a, b):
        for suffix in (".png", ".txt"):
            assert pa.with_suffix(suffix).read_bytes() == pb.with_suffix(suffix).read_bytes()
        assert (pa.with_name(pa.stem + ".params.json").read_bytes()
                == pb.with_name(pb.stem + ".params.json").read_bytes())


def test_heldout_ground_truths_change_only_what_the_edit_changes(rig, person, tmp_path):
    case = synthetic.write_heldout(tmp_path, person, n_cases=1, seed=0, size=SIZE, rig=rig)[0]
    src, src_tform, _ = synthetic.load_sidecar(tmp_path / case["source"])
    tgt, _, _ = synthetic.load_sidecar(tmp_path / case["target"])
    for mode in synthetic.EDIT_MODES:
        truth, tform, _ = synthetic.load_sidecar(tmp_path / case[mode])
        record = synthetic.load_sidecar(tmp_path / case[mode]).record
        assert record["edit"]["mode"] == mode and record["align_center"] is not None
        assert torch.equal(tform, src_tform) and torch.equal(truth["cam"], src["cam"])
        assert not (tmp_path / case[mode]).with_suffix(".txt").exists()
        expected = synthetic.edited_params(src, tgt, mode)
        for k in ("shape", "tex", "exp", "pose", "light"):
            assert torch.equal(truth[k], expected[k]), (mode, k)
    # the light truth keeps the geometry: same face mask as the source
    a = rig.render_all(src, src_tform, SIZE)["alpha"]
    light = synthetic.load_sidecar(tmp_path / case["light"])
    centre = torch.tensor(light.record["align_center"])[None]
    b = rig.render_all(light.params, light.tform, SIZE, centre)["alpha"]
    assert (a != b).float().mean() < 0.002


def test_load_sidecar_explains_a_missing_or_foreign_file(tmp_path):
    from diffusionrig_core.errors import InputError
    with pytest.raises(InputError, match="sidecar"):
        synthetic.load_sidecar(tmp_path / "nothing.png")
    (tmp_path / "x.params.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InputError, match="not a synthetic-photo sidecar"):
        synthetic.load_sidecar(tmp_path / "x.png")
