"""FaceRig end to end on tiny assets: load, fit (sidecar/given landmarks, batches), centre, render."""
import numpy as np
import pytest
import torch
from PIL import Image

import rig_assets as ra
from diffusionrig_core import detect
from diffusionrig_core.deca import DECAEncoder
from diffusionrig_core.errors import AssetError, InputError, NoFaceError
from diffusionrig_core.rig import PARAM_SHAPES, FaceRig, Fit


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("assets")
    ra.write_assets(path)
    return path


@pytest.fixture(scope="module")
def rig(folder, tmp_path_factory):
    torch.manual_seed(0)
    enc = DECAEncoder().eval()
    with torch.no_grad():  # keep the random code in a sane range: small head, camera scale ~ 9
        enc.layers[2].weight.mul_(0.01)
        enc.layers[2].bias.zero_()
        enc.layers[2].bias[206] = 9.0
        enc.layers[2].bias[209] = 3.0
    full = tmp_path_factory.mktemp("withdeca")
    for f in folder.iterdir():
        (full / f.name).write_bytes(f.read_bytes())
    torch.save({"E_flame": enc.state_dict()}, full / "deca_model.tar")
    return FaceRig.load(assets_dir=full)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _params(b=1):
    p = {k: torch.zeros(b, *s) for k, s in PARAM_SHAPES.items()}
    p["cam"][:, 0] = 8.0
    p["light"][:, 0] = 3.0
    return p


def _photo(path, size=48, seed=0):
    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return path


LM = np.stack([np.linspace(14, 50, 68), np.linspace(12, 52, 68)], 1)  # in 64x64 resized pixels


def test_render_without_deca_and_fit_says_where_to_get_it(folder):
    rig = FaceRig.load(assets_dir=folder)
    assert rig.encoder is None
    tform = torch.diag(torch.tensor([224 / 64, 224 / 64, 1.0]))[None]
    buffers = rig.render(_params(), tform, size=64)
    assert buffers.shape == (1, 9, 64, 64)
    with pytest.raises(AssetError, match="deca_model.tar") as err:
        rig.fit(np.zeros((64, 64, 3), dtype=np.uint8), landmarks=LM, size=64)
    assert "put it at" in str(err.value)


def test_render_channels_are_rendered_normal_albedo(folder):
    rig = FaceRig.load(assets_dir=folder)
    tform = torch.diag(torch.tensor([224 / 64, 224 / 64, 1.0]))[None]
    p = _params(2)
    p["pose"][1, 1] = 0.4
    out = rig.render_all(p, tform, 64)
    buffers = rig.render(p, tform, 64)
    assert torch.equal(buffers, torch.cat([out["rendered"], out["normal"], out["albedo"]], 1))
    alpha = out["alpha"]
    assert alpha.sum() > 50 and set(alpha.unique().tolist()) == {0.0, 1.0}
    assert (buffers * (1 - alpha) == 0).all()
    # the visible side of the head faces the camera: +z normals dominate
    assert float(out["normal"][0, 2][alpha[0, 0] > 0].mean()) > 0.3


def test_align_center_keeps_the_face_in_place(folder):
    rig = FaceRig.load(assets_dir=folder)
    tform = torch.diag(torch.tensor([224 / 64, 224 / 64, 1.0]))[None]
    p = _params()
    centre = rig.ffhq_center(p)
    assert centre.shape == (1, 3)
    same = rig.render_all(p, tform, 64, align_center=centre)
    plain = rig.render_all(p, tform, 64)
    assert torch.allclose(same["verts"], plain["verts"], atol=1e-7)
    turned = dict(p, pose=torch.tensor([[0.0, 0.5, 0.0, 0, 0, 0]]))
    free = rig.render_all(turned, tform, 64)
    moved = rig.render_all(turned, tform, 64, align_center=centre)
    shift = centre - rig.ffhq_center(turned)  # 3-D, applied to the vertices before projection
    assert shift.abs().max() > 1e-4
    assert torch.allclose(moved["verts"], free["verts"] + shift[:, None], atol=1e-7)
    assert not torch.equal(moved["alpha"], free["alpha"])


def test_fit_reads_sidecar_landmarks_and_batches(rig, tmp_path):
    a = _photo(tmp_path / "a.png", 96, 0)
    b = _photo(tmp_path / "b.png", 80, 1)
    np.savetxt(tmp_path / "a.txt", LM)
    np.savetxt(tmp_path / "b.txt", LM + 2)
    fit = rig.fit([a, b], size=64)
    assert isinstance(fit, Fit) and len(fit) == 2 and fit.size == 64
    assert {k: tuple(v.shape) for k, v in fit.params.items()} == {
        k: (2, *s) for k, s in PARAM_SHAPES.items()}
    assert fit.image.shape == (2, 3, 64, 64) and fit.crop.shape == (2, 3, 224, 224)
    assert np.array_equal(fit.landmarks[1], LM + 2)
    one = rig.fit(a, size=64)
    assert torch.allclose(one.params["exp"], fit.params["exp"][:1], atol=1e-5)
    assert torch.allclose(fit.select(1).tform, fit.tform[1:])
    given = rig.fit(np.asarray(Image.open(a)), landmarks=LM, size=64)
    assert torch.allclose(given.tform, fit.tform[:1])
    buffers = rig.render(fit.params, fit.tform, 64)
    assert buffers.shape == (2, 9, 64, 64) and torch.isfinite(buffers).all()


def test_fit_without_a_face(rig, monkeypatch):
    def none(*a, **k):
        raise NoFaceError("no face found")

    monkeypatch.setattr(detect, "detect_landmarks", none)
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(NoFaceError):
        rig.fit(img, size=64)
    fit = rig.fit(img, size=64, no_face="full")  # the official fallback: whole photo as the face box
    assert fit.landmarks == [None]
    with pytest.raises(InputError, match="68, 2"):
        rig.fit(img, landmarks=np.zeros((5, 2)), size=64)


def test_bad_params_are_reported_by_name(folder):
    rig = FaceRig.load(assets_dir=folder)
    p = _params()
    p["light"] = torch.zeros(1, 27)
    with pytest.raises(InputError, match="'light'"):
        rig.render(p, torch.eye(3)[None], 32)
    del p["light"]
    with pytest.raises(InputError, match="lack 'light'"):
        rig.render(p, torch.eye(3)[None], 32)


def test_mismatched_template_and_model_are_refused(folder, tmp_path):
    obj = tmp_path / "head_template.obj"
    obj.write_text("v 0 0 0\n" * 500 + "vt 0 0\nf 1/1 2/1 500/1\n")
    with pytest.raises(AssetError, match="do not belong together"):
        FaceRig.load(assets_dir=folder, template=obj)


def test_bench_rig_reports_photos_per_second(rig):
    from diffusionrig_core.rig import bench_rig

    out = bench_rig("cpu", n=2, size=32, batch_size=2, rig=rig, detect=False)
    assert out["photos"] == 2 and out["photos_per_s"] > 0
    assert {"load_resize_crop_s", "encode_s", "flame_render_s"} <= set(out)


def test_from_arrays_accepts_raw_texture_files(folder):
    from diffusionrig_core import assets as A

    flame = A.load_flame_model(folder / "generic_model.pkl", cache=False)
    emb = A.load_landmark_embedding(folder / "landmark_embedding.npy")
    template = A.load_obj(folder / "head_template.obj")
    raw = dict(np.load(folder / "FLAME_texture.npz"))
    a = FaceRig.from_arrays(flame, emb, raw, template)
    b = FaceRig.from_arrays(flame, emb, A.load_texture_space(folder / "FLAME_texture.npz"), template)
    code = torch.randn(1, 50)
    assert torch.allclose(a.albedo_map(code), b.albedo_map(code), atol=1e-6)
