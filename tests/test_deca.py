"""DECA encoder layout, code split, and the official crop (resize, box, similarity, warp)."""
import numpy as np
import pytest
import torch

from diffusionrig_core import deca as D
from diffusionrig_core.assets import load_deca_tar
from diffusionrig_core.errors import AssetError


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return D.DECAEncoder().eval()


def test_encoder_state_dict_matches_e_flame_names(encoder):
    keys = list(encoder.state_dict())
    assert keys[0] == "encoder.conv1.weight"
    assert {k.split(".")[0] for k in keys} == {"encoder", "layers"}
    assert [k for k in keys if k.startswith("layers")] == ["layers.0.weight", "layers.0.bias",
                                                           "layers.2.weight", "layers.2.bias"]
    assert not any(k.startswith("encoder.fc") for k in keys)
    assert encoder.state_dict()["layers.2.weight"].shape == (236, 1024)


def test_deca_tar_round_trip_gives_the_same_code(encoder, tmp_path):
    path = tmp_path / "deca_model.tar"
    torch.save({"E_flame": encoder.state_dict(), "E_detail": {}, "D_detail": {}}, path)
    loaded = D.DECAEncoder.from_checkpoint(path)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))
        code = loaded.encode(x)
    assert set(code) == {"shape", "tex", "exp", "pose", "cam", "light"}
    state = {k: v for k, v in load_deca_tar(path)["E_flame"].items() if not k.startswith("layers.2")}
    with pytest.raises(AssetError, match="not DECA's coarse encoder"):
        D.DECAEncoder.from_state_dict(state)


def test_code_split_order_and_row_major_light():
    code = torch.arange(236.0).unsqueeze(0)
    p = D.decompose_code(code)
    assert [p[k].shape[1] for k in ("shape", "tex", "exp", "pose", "cam")] == [100, 50, 50, 6, 3]
    assert p["cam"].tolist() == [[206.0, 207.0, 208.0]]
    assert p["light"].shape == (1, 9, 3) and p["light"][0, 2, 1] == 209 + 3 * 2 + 1
    with pytest.raises(ValueError):
        D.decompose_code(torch.zeros(1, 235))


def test_crop_transform_is_the_closed_form_similarity():
    lm = np.stack([np.linspace(20, 40, 68), np.linspace(10, 50, 68)], 1)
    t = D.crop_tform(lm, (64, 64))
    old = (20 + 40) / 2 * 1.1
    size = int(old * 1.25)
    k = 223 / size
    assert np.allclose(t, [[k, 0, -k * (30 - size / 2)], [0, k, -k * (30 - size / 2)], [0, 0, 1]])
    # the face box centre lands on the crop centre (111.5, 111.5)
    assert np.allclose(t @ [30, 30, 1], [111.5, 111.5, 1])
    # the no-face fallback uses the whole image (with the official h/w swap)
    # (x spans 0..h-1 and y spans 0..w-1, so a 50x80 image is centred at (24.5, 39.5))
    assert np.allclose(D.crop_tform(None, (50, 80)) @ [24.5, 39.5, 1], [111.5, 111.5, 1])


def test_warp_samples_at_integer_pixel_centres_with_zero_outside():
    img = np.arange(16, dtype=np.float64).reshape(4, 4, 1)
    same = D.warp_bilinear(img, np.eye(3), (4, 4))
    assert np.array_equal(same, img)
    half = D.warp_bilinear(img, np.array([[1, 0, 0.5], [0, 1, 0], [0, 0, 1.0]]), (4, 4))
    assert np.allclose(half[0, :3, 0], [0.5, 1.5, 2.5])
    assert half[0, 3, 0] == pytest.approx(0.5 * 3)  # the missing neighbour counts as zero
    far = D.warp_bilinear(img, np.array([[1, 0, 10], [0, 1, 0], [0, 0, 1.0]]), (4, 4))
    assert (far == 0).all()


def test_resize_like_testdata_truncates_and_is_not_an_identity():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    same = D.resize_like_testdata(img, 32)
    assert same.dtype == np.uint8 and same.shape == (32, 32, 3)
    diff = img.astype(int) - same.astype(int)
    assert set(np.unique(diff)) <= {0, 1} and diff.sum() > 0  # x * (1/255) * 255 truncates some values
    small = D.resize_like_testdata(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), 16)
    assert small.shape == (16, 16, 3)


def test_crop_from_landmarks_output(encoder):
    img = np.full((64, 64, 3), 128, dtype=np.uint8)
    lm = np.stack([np.linspace(20, 44, 68), np.linspace(18, 46, 68)], 1)
    crop, tform = D.crop_from_landmarks(img, lm)
    assert crop.shape == (3, 224, 224) and crop.dtype == torch.float32 and tform.shape == (3, 3)
    assert torch.allclose(crop[:, 112, 112], torch.tensor(128 / 255))
