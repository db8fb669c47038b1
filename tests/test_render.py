"""Rasterizer (pytorch3d conventions), SH shading and the physical buffers."""
import math

import numpy as np
import pytest
import torch

from diffusionrig_core import render as R


def _brute_inside(tri, h, w):
    """Pixel centres strictly inside a triangle (DECA frame, NDC), in float64."""
    cov = np.zeros((h, w), bool)
    for r in range(h):
        for c in range(w):
            p = np.array([(2 * c + 1) / w - 1, (2 * r + 1) / h - 1])
            e, q = [tri[(k + 1) % 3] - tri[k] for k in range(3)], [p - tri[k] for k in range(3)]
            d = [e[k][0] * q[k][1] - e[k][1] * q[k][0] for k in range(3)]
            cov[r, c] = all(x > 0 for x in d) or all(x < 0 for x in d)
    return cov


def test_a_triangle_covers_exactly_the_pixels_whose_centres_are_inside():
    tri = np.array([[-0.83, -0.61], [0.71, -0.27], [-0.12, 0.77]])
    verts = torch.tensor(np.c_[tri, [10.0, 10.0, 10.0]][None], dtype=torch.float32)
    for order in ([0, 1, 2], [0, 2, 1]):  # both windings are drawn (no culling)
        p2f, bary, z = R.rasterize(verts, torch.tensor([order]), 32, 32)
        assert np.array_equal((p2f[0] == 0).numpy(), _brute_inside(tri, 32, 32))


def test_barycentrics_interpolate_linearly():
    tri = np.array([[-0.9, -0.8], [0.85, -0.3], [0.1, 0.9]])
    verts = torch.tensor(np.c_[tri, [10.0, 11.0, 12.0]][None], dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2]])
    p2f, bary, zbuf = R.rasterize(verts, faces, 24, 24)
    attrs = verts[:, faces][..., :3]  # interpolate the positions themselves
    vals = R.interpolate_face_attributes(p2f, bary, attrs)
    rows, cols = torch.nonzero(p2f[0] >= 0, as_tuple=True)
    assert len(rows) > 50
    assert torch.allclose(vals[0, 0, rows, cols], (2 * cols + 1) / 24 - 1, atol=1e-5)
    assert torch.allclose(vals[0, 1, rows, cols], (2 * rows + 1) / 24 - 1, atol=1e-5)
    assert torch.allclose(bary[0, rows, cols].sum(-1), torch.ones(len(rows)), atol=1e-5)
    assert torch.allclose(zbuf[0, rows, cols], vals[0, 2, rows, cols], atol=1e-5)
    assert (bary[0][p2f[0] < 0] == -1).all() and (vals[0][:, p2f[0] < 0] == 0).all()


def test_pixel_centres_exactly_on_an_edge_are_not_covered():
    # on an 8x8 image, centres sit at x = +-0.125, +-0.375, ...; this edge runs along x = 0.125
    verts = torch.tensor([[[0.125, -1.0, 10], [0.125, 1.0, 10], [1.0, 0.0, 10]]])
    p2f, _, _ = R.rasterize(verts, torch.tensor([[0, 1, 2]]), 8, 8)
    assert not (p2f[0, :, 4] >= 0).any()  # column 4: centre x = 0.125
    assert (p2f[0, 3:5, 5] >= 0).all()


def test_nearest_face_wins_and_exact_ties_go_to_the_lower_index():
    a = [[-0.9, -0.9], [0.9, -0.9], [0.0, 0.9]]
    verts = torch.tensor([a + a + a], dtype=torch.float32)
    verts = torch.cat([verts, torch.tensor([[10.0] * 3 + [9.5] * 3 + [9.5] * 3]).T[None]], -1)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    p2f, _, _ = R.rasterize(verts, faces, 16, 16)
    covered = p2f[0] >= 0
    assert covered.any() and (p2f[0][covered] == 1).all()


def test_degenerate_and_behind_camera_faces_are_skipped():
    verts = torch.tensor([[[-0.5, -0.5, 10], [0.5, 0.5, 10], [0.0, 0.0, 10],  # zero area
                           [-0.9, -0.9, -1], [0.9, -0.9, -1], [0.0, 0.9, -1]]])  # z < 0
    p2f, _, _ = R.rasterize(verts, torch.tensor([[0, 1, 2], [3, 4, 5]]), 16, 16)
    assert (p2f < 0).all()


def test_batches_index_faces_per_mesh():
    a, b, c = [-0.9, -0.9, 10], [0.9, -0.9, 10], [0.0, 0.9, 10]
    verts = torch.tensor([[a, b, c, b], [a, a, b, c]])  # the visible face is 0 in mesh 0, 1 in mesh 1
    faces = torch.tensor([[0, 1, 2], [1, 2, 3]])
    p2f, _, _ = R.rasterize(verts, faces, 8, 8)
    assert set(p2f[0].unique().tolist()) == {-1, 0}
    assert set(p2f[1].unique().tolist()) == {-1, 1}


def test_sh_shading_of_a_known_normal_equals_the_formula():
    n = torch.tensor([0.3, -0.5, 0.8])
    light = torch.randn(1, 9, 3)
    x, y, z = n.tolist()
    pi = math.pi
    basis = [1, x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1]
    k = [1 / math.sqrt(4 * pi)] + [2 * pi / 3 * math.sqrt(3 / (4 * pi))] * 3 + \
        [pi / 4 * 3 * math.sqrt(5 / (12 * pi))] * 3 + [pi / 4 * 1.5 * math.sqrt(5 / (12 * pi)),
                                                       pi / 4 * 0.5 * math.sqrt(5 / (4 * pi))]
    expect = sum(light[0, i] * k[i] * basis[i] for i in range(9))
    got = R.sh_shading(n.view(1, 3, 1, 1), light)[0, :, 0, 0]
    assert torch.allclose(got, expect, rtol=1e-5)
    assert torch.allclose(R.SH_CONSTANTS, torch.tensor(k, dtype=torch.float32))


def test_vertex_normals_of_a_ccw_quad_point_at_the_viewer():
    verts = torch.tensor([[[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0.0]]])
    n = R.vertex_normals(verts, torch.tensor([[0, 1, 2], [0, 2, 3]]))
    assert torch.allclose(n, torch.tensor([0, 0, 1.0]).expand(1, 4, 3))


def test_photo_frame_keeps_the_224_and_half_pixel_quirks():
    # identity crop transform: crop pixel u = (x/2 + 1/2) * 224, photo NDC = u / S * 2 - 1
    pts = torch.tensor([[[-1.0, -1.0, 0.3], [1.0, 1.0, -0.2]]])
    out = R.transform_to_photo_frame(pts, torch.eye(3)[None], 256, 256)
    assert torch.allclose(out[0, :, :2], torch.tensor([[-1.0, -1.0], [224 / 128 - 1, 224 / 128 - 1]]))
    assert torch.equal(out[..., 2], pts[..., 2])  # z untouched
    proj = R.orthographic_project(torch.tensor([[[0.1, 0.2, 0.3]]]), torch.tensor([[2.0, 0.5, -0.5]]))
    assert torch.allclose(proj, torch.tensor([[[1.2, 0.6, -0.6]]]))


def test_buffers_of_a_square_facing_the_camera():
    verts = torch.tensor([[[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0.0]]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv = torch.tensor([[0, 0], [1, 0], [1, 1], [0, 1.0]])
    light = torch.zeros(1, 9, 3)
    light[0, 0] = 1 / R.SH_CONSTANTS[0]  # shading = 1 everywhere
    albedo = torch.full((1, 3, 256, 256), 0.25)
    tform = torch.diag(torch.tensor([7.0, 7.0, 1.0]))[None]  # a 32-pixel photo -> the 224 crop
    out = R.render_buffers(verts, torch.tensor([[1.0, 0, 0]]), light, albedo, faces, uv, faces,
                           R.inverse_tform_T(tform), 32)
    alpha = out["alpha"][0, 0]
    assert set(alpha.unique().tolist()) == {0.0, 1.0}
    inside = alpha > 0
    assert torch.allclose(out["normal"][0, :, inside], torch.tensor([0, 0, 1.0])[:, None].expand(3, int(inside.sum())))
    assert torch.allclose(out["albedo"][0, :, inside], torch.tensor(0.25))
    assert torch.allclose(out["rendered"][0, :, inside], torch.tensor(0.25), atol=1e-6)
    for key in ("rendered", "normal", "albedo"):
        assert (out[key][0][:, ~inside] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_gpu_rasterizer_equals_cpu():
    g = torch.Generator().manual_seed(0)
    verts = torch.rand(2, 300, 3, generator=g) * 2 - 1
    verts[..., 2] += 10
    faces = torch.randint(0, 300, (500, 3), generator=g)
    cpu = R.rasterize(verts, faces, 64, 64)
    gpu = R.rasterize(verts.cuda(), faces.cuda(), 64, 64)
    assert torch.equal(cpu[0], gpu[0].cpu())
