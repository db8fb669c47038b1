"""Parity with the official DECA/FLAME/renderer/alignment outputs in shared/fixtures/deca.

Tolerances are the ones the fixtures README recommends. The LMDB and mean-shape files are checked
by the data tests, not here.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file

from diffusionrig_core import assets as A
from diffusionrig_core import render as R
from diffusionrig_core.align import ffhq_align
from diffusionrig_core.deca import crop_from_landmarks, decompose_code, resize_like_testdata
from diffusionrig_core.flame import FLAME, FlameTexture
from diffusionrig_core.image_io import load_image
from diffusionrig_core.rig import FaceRig

PARAMS = ("shape", "tex", "exp", "pose", "cam", "light")


@pytest.fixture(scope="module")
def deca_dir(shared_dir):
    path = shared_dir / "fixtures" / "deca"
    if not path.is_dir():
        pytest.skip(f"{path} not found; DECA parity tests skipped")
    return path


@pytest.fixture(scope="module")
def fx(deca_dir):
    return {name: load_file(str(deca_dir / f"{name}.safetensors"))
            for name in ("flame_forward", "texture", "crop", "render", "edit_align_ffhq", "misc")}


@pytest.fixture(scope="module")
def rig(deca_dir, tmp_path_factory):
    a = deca_dir / "assets"
    with pytest.MonkeyPatch.context() as mp:  # the FLAME cache goes to a temporary folder
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield FaceRig.load(flame=a / "generic_model.pkl", texture=a / "FLAME_texture.npz",
                           template=a / "head_template.obj", landmarks=a / "landmark_embedding.npy",
                           assets_dir=tmp_path_factory.mktemp("no_deca"))


def _params(fx):
    return {k: fx["flame_forward"][f"params/{k}"] for k in PARAMS}


def _tforms(fx):
    return torch.stack([fx["crop"][f"crop/{int(i)}/tform"] for i in fx["render"]["render/crop_index"]])


def test_flame_forward_is_bit_exact(rig, fx):
    f = fx["flame_forward"]
    verts, lm2d, lm3d = rig.flame_forward(_params(fx))
    assert torch.equal(rig.flame.dynamic_rows(rig.flame.full_pose(f["params/pose"])), f["flame/dynamic_row"])
    assert torch.allclose(verts, f["flame/verts"], atol=1e-6, rtol=0)
    assert torch.allclose(lm2d, f["flame/landmarks2d_world"], atol=1e-6, rtol=0)
    assert torch.allclose(lm3d, f["flame/landmarks3d_world"], atol=1e-6, rtol=0)
    assert torch.allclose(rig.flame.full_pose(f["params/pose"]), f["flame/full_pose"])
    assert torch.allclose(lm3d, fx["render"]["render/landmarks3d_world"], atol=1e-6, rtol=0)


def test_albedo_maps(rig, fx):
    t = fx["texture"]
    maps = rig.albedo_map(t["tex/codes"])
    assert torch.allclose(maps[1:2], t["tex/albedo_uv256_code1"], atol=1e-6, rtol=0)
    assert torch.allclose(maps[0:1, :, ::8, ::8], t["tex/albedo_uv256_code0_stride8"], atol=1e-6, rtol=0)


def test_crop_resize_tform_and_image(deca_dir, fx):
    c = fx["crop"]
    for i in range(3):
        img = load_image(deca_dir / "inputs" / f"crop_{i}.png")
        resized = resize_like_testdata(img, 64)
        original = torch.from_numpy(resized).permute(2, 0, 1).float() / 255
        assert torch.equal(original, c[f"crop/{i}/original_image"])
        lm = np.loadtxt(deca_dir / "inputs" / f"crop_{i}.txt")
        assert np.allclose(lm, c[f"crop/{i}/landmarks_txt"].numpy())
        crop, tform = crop_from_landmarks(resized, lm)
        assert torch.allclose(tform, c[f"crop/{i}/tform"], atol=1e-5, rtol=0)
        ref = c["crop/0/image224"] if i == 0 else c[f"crop/{i}/image224_stride4"]
        got = crop if i == 0 else crop[:, ::4, ::4]
        assert torch.allclose(got, ref, atol=1e-5, rtol=0)


def test_fit_prepare_matches_testdata_with_sidecar_landmarks(rig, deca_dir, fx):
    resized, crop, tform, lm = rig.prepare(deca_dir / "inputs" / "crop_1.png", size=64)
    assert torch.allclose(tform, fx["crop"]["crop/1/tform"], atol=1e-5, rtol=0)
    assert torch.allclose(crop[:, ::4, ::4], fx["crop"]["crop/1/image224_stride4"], atol=1e-5, rtol=0)


def test_render_buffers_match_the_official_renderer(rig, fx):
    r = fx["render"]
    assert torch.allclose(R.inverse_tform_T(_tforms(fx)), r["render/tform_inv_T"], atol=1e-6)
    out = rig.render_all(_params(fx), _tforms(fx), 64)
    assert torch.allclose(out["trans_verts"], r["render/trans_verts"], atol=1e-5, rtol=0)
    assert torch.allclose(out["photo_verts"], r["render/trans_verts_orig_frame"], atol=1e-5, rtol=0)
    assert torch.equal(out["pix_to_face"], r["render/pix_to_face"].long())
    assert torch.equal(out["alpha"], r["render/alpha_images"])
    covered = out["pix_to_face"] >= 0
    assert torch.allclose(out["bary"][covered], r["render/bary"][covered], atol=1e-5, rtol=0)
    assert torch.allclose(out["grid"], r["render/grid"], atol=1e-5, rtol=0)
    assert torch.allclose(out["vertex_normals"], r["render/vertex_normals_world"], atol=1e-6, rtol=0)
    for ours, theirs in (("rendered", "rendered_images"), ("normal", "normal_images"), ("albedo", "albedo_images")):
        assert torch.allclose(out[ours], r[f"render/{theirs}"], atol=1e-4, rtol=0), ours
    assert torch.allclose(out["shading"], r["render/shading_images"], rtol=1e-5, atol=1e-6)
    buffers = rig.render(_params(fx), _tforms(fx), 64)
    ref = torch.cat([r["render/rendered_images"], r["render/normal_images"], r["render/albedo_images"]], 1)
    assert torch.allclose(buffers, ref, atol=1e-4, rtol=0)


def test_render_buffers_function_with_official_inputs(deca_dir, fx):
    a = deca_dir / "assets"
    flame = FLAME(A.load_flame_model(a / "generic_model.pkl", cache=False), A.load_landmark_embedding(a / "landmark_embedding.npy"))
    tex = A.load_texture_space(a / "FLAME_texture.npz")
    faces, uv, uvf = A.load_obj(a / "head_template.obj")
    p = _params(fx)
    verts, _, _ = flame(p["shape"], p["exp"], p["pose"])
    maps = FlameTexture(tex["mean"], tex["basis"])(fx["texture"]["tex/codes"])[torch.arange(7) % 2]
    out = R.render_buffers(verts, p["cam"], p["light"], maps, torch.from_numpy(faces), torch.from_numpy(uv),
                           torch.from_numpy(uvf), fx["render"]["render/tform_inv_T"], 64)
    assert torch.equal(out["pix_to_face"], fx["render"]["render/pix_to_face"].long())
    assert torch.allclose(out["rendered"], fx["render"]["render/rendered_images"], atol=1e-4, rtol=0)


def test_pose_edit_with_ffhq_recentring(rig, fx):
    e = fx["edit_align_ffhq"]
    p = _params(fx)
    source = {k: v[1:2] for k, v in p.items()}
    centre = rig.ffhq_center(source)
    assert torch.allclose(centre, e["edit/ffhq_center_source"], atol=1e-6, rtol=0)
    from diffusionrig_core import edits as E
    edited = E.with_shape(E.pose_from(source, {"pose": p["pose"][2:3]}), p["shape"][3:4])
    assert torch.allclose(edited["pose"], e["edit/pose"]) and torch.allclose(edited["shape"], e["edit/meanshape"])
    out = rig.render_all(edited, _tforms(fx)[1:2], 64, align_center=centre)
    assert torch.allclose(out["verts"], e["edit/verts"], atol=1e-6, rtol=0)
    assert torch.equal(out["alpha"], e["edit/alpha_images"])
    for k in ("rendered", "normal", "albedo"):
        assert torch.allclose(out[k], e[f"edit/{k}_images"], atol=1e-4, rtol=0), k


def test_misc_sh_transform_points_code_split_and_obj_uvs(deca_dir, fx):
    m = fx["misc"]
    assert torch.allclose(R.SH_CONSTANTS, m["sh/constant_factor"])
    assert torch.allclose(R.sh_shading(m["sh/normals"], m["sh/coeffs"]), m["sh/shading"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(R.transform_points(m["tp/points"], m["tp/tform"], 224, (64, 64)), m["tp/out_64"], atol=1e-5)
    assert torch.allclose(R.transform_points(m["tp/points"], m["tp/tform"], 224, (64, 96)), m["tp/out_64x96"], atol=1e-5)
    split = decompose_code(m["encode/code236"])
    for k in PARAMS:
        assert torch.equal(split[k], m[f"encode/{k}"]), k
    _, uv, uvf = A.load_obj(deca_dir / "assets" / "head_template.obj")
    ndc = R.uv_ndc(torch.from_numpy(uv))
    assert torch.allclose(ndc, m["obj/uvcoords_ndc"], atol=1e-6)
    assert torch.allclose(ndc[torch.from_numpy(uvf)], m["obj/face_uvcoords"], atol=1e-6)


@pytest.mark.parametrize("case", ["align_src", "align_src_b"])
def test_ffhq_alignment_matches_the_official_png(deca_dir, case):
    ref = load_np(str(deca_dir / "align_ffhq.safetensors"))
    log = json.loads((deca_dir / "align_ffhq_official_log.json").read_text())
    lm = np.loadtxt(deca_dir / "inputs" / f"{case}_landmarks.txt")
    assert np.array_equal(lm, ref[f"{case}/landmarks"])
    res = ffhq_align(load_image(deca_dir / "inputs" / f"{case}.png"), lm, output_size=64, return_quad=True)
    diff = np.abs(res.image.astype(int) - ref[f"{case}/aligned64"].astype(int))
    assert diff.max() <= 1
    assert res.shrink == (2 if case == "align_src_b" else 1)
    if case == "align_src":  # no shrink: the quad given to PIL = our quad + 0.5 - crop origin + padding
        quad_log = np.array(next(e for e in log[case] if e[0] == "transform_input_size")[3]).reshape(4, 2)
        crop_origin, pad = np.array([25, 0]), np.array([36, 36])  # from the fixtures README
        assert np.allclose(res.quad + 0.5 - crop_origin + pad, quad_log, atol=1e-9)
