"""FLAME forward, landmarks with the dynamic contour, texture space, mean shape (tiny assets)."""
import math

import numpy as np
import pytest
import torch

import rig_assets as ra
from diffusionrig_core.flame import FLAME, FlameTexture, batch_rodrigues, ffhq_center, mean_shape
from diffusionrig_core.render import vertex_normals


@pytest.fixture(scope="module")
def flame():
    d = ra.make_flame_dict()
    emb = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in ra.make_embedding(len(d["f"])).items()}
    return FLAME(d, emb), d, emb


def _zeros(b=1):
    return torch.zeros(b, 100), torch.zeros(b, 50), torch.zeros(b, 6)


def test_zero_parameters_give_the_template(flame):
    model, d, _ = flame
    verts, lm2d, lm3d = model(*_zeros(2))
    template = torch.tensor(d["v_template"], dtype=torch.float32)
    assert torch.allclose(verts, template.expand(2, -1, -1), atol=1e-6)


def test_landmarks_are_barycentric_points_of_the_mesh(flame):
    model, d, emb = flame
    verts, lm2d, lm3d = model(*_zeros())
    v = verts[0].double().numpy()
    f = d["f"].astype(np.int64)
    idx, bary = emb["full_lmk_faces_idx"][0], emb["full_lmk_bary_coords"][0]
    expect = np.einsum("lk,lkc->lc", bary, v[f[idx]])
    assert np.allclose(lm3d[0].numpy(), expect, atol=1e-6)
    # at zero yaw the contour uses row 0 of the dynamic table, then the 51 static points
    dyn = np.einsum("lk,lkc->lc", emb["dynamic_lmk_bary_coords"][0], v[f[emb["dynamic_lmk_faces_idx"][0]]])
    assert np.allclose(lm2d[0, :17].numpy(), dyn, atol=1e-6)


def test_global_rotation_turns_the_head_rigidly_and_rotates_normals(flame):
    model, d, _ = flame
    shape, exp, pose = _zeros()
    shape = torch.randn(1, 100) * 0.5
    rest, _, _ = model(shape, exp, pose)
    aa = torch.tensor([[0.3, -0.5, 0.2]])
    posed, _, _ = model(shape, exp, torch.cat([aa, torch.zeros(1, 3)], 1))
    r = batch_rodrigues(aa)[0]
    root = torch.tensor(d["J_regressor"], dtype=torch.float32)[0] @ rest[0]
    assert torch.allclose(posed[0], (rest[0] - root) @ r.T + root, atol=1e-6)
    faces = torch.tensor(d["f"].astype(np.int64))
    n_rest, n_posed = vertex_normals(rest, faces), vertex_normals(posed, faces)
    assert torch.allclose(n_posed[0], n_rest[0] @ r.T, atol=1e-5)


def test_rodrigues_adds_1e8_to_each_component():
    r = torch.tensor([[0.2, -0.1, 0.4]])
    angle = torch.norm(r + 1e-8)
    k = r[0] / angle
    kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    expect = torch.eye(3) + torch.sin(angle) * kx + (1 - torch.cos(angle)) * kx @ kx
    assert torch.allclose(batch_rodrigues(r)[0], expect, atol=1e-7)
    assert torch.equal(batch_rodrigues(torch.zeros(1, 3))[0], torch.eye(3))


@pytest.mark.parametrize("yaw_deg, row", [(0.0, 0), (10.0, 10), (25.9, 26), (39.4, 39), (51.5, 39),
                                          (-0.4, 0), (-0.69, 40), (-10.0, 49), (-28.31, 67),
                                          (-39.0, 78), (-51.4, 78)])
def test_dynamic_contour_row_follows_decas_own_yaw_convention(flame, yaw_deg, row):
    model, _, _ = flame
    pose = torch.zeros(1, 15)
    pose[0, 1] = math.radians(yaw_deg)  # rotation about +y: DECA's method uses +yaw (no negation)
    assert int(model.dynamic_rows(pose)[0]) == row


def test_texture_space_nearest_rule_and_bgr_flip():
    tex = ra.make_texture()
    mean, basis = tex["mean"] / 255, tex["tex_dir"][..., :50] / 255
    model = FlameTexture(mean, basis)
    code = torch.randn(2, 50)
    out = model(code)
    assert out.shape == (2, 3, 256, 256)
    i, j = 200, 37
    texel = mean[i * 8 // 256, j * 8 // 256] + basis[i * 8 // 256, j * 8 // 256] @ code[1].numpy()
    assert np.allclose(out[1, :, i, j].numpy(), texel[::-1], atol=1e-5)  # BGR file -> RGB map
    # linear in the code, unclamped
    assert torch.allclose(model(code * 3) - model(torch.zeros(2, 50)), 3 * (out - model(torch.zeros(2, 50))), atol=1e-4)


def test_mean_shape_and_centre():
    shapes = [torch.full((1, 100), 1.0), torch.full((1, 100), 3.0)]
    assert torch.equal(mean_shape(shapes), torch.full((1, 100), 2.0))
    assert mean_shape(torch.stack([s[0] for s in shapes])).shape == (1, 100)
    lm = torch.zeros(1, 68, 3)
    lm[:, 36:48, 1] = 1.0  # eyes at y = 1
    lm[:, 48, 1] = lm[:, 54, 1] = -1.0  # mouth corners at y = -1
    assert torch.allclose(ffhq_center(lm), torch.tensor([[0.0, 0.8, 0.0]]))
