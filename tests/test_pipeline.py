"""The editing pipeline (diffusionrig_core.pipeline) on the synthetic rig and tiny models, CPU only."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusionrig_core import pipeline as P
from diffusionrig_core.errors import CheckpointError, ImageError, InputError, NoFaceError

import pipeline_fixtures as W


@pytest.fixture(scope="module")
def rig():
    return W.rig()


@pytest.fixture(scope="module")
def portrait():
    return W.aligned_portrait(1, seed=0)


@pytest.fixture(scope="module")
def target():
    return W.aligned_portrait(1, seed=7)


@pytest.fixture(scope="module")
def model():
    return W.tiny_model()


# sampling-heavy tests run the tiny architecture at 32 px (4x cheaper than 64)
@pytest.fixture(scope="module")
def small():
    return W.aligned_portrait(1, seed=0, size=32)


@pytest.fixture(scope="module")
def small_target():
    return W.aligned_portrait(1, seed=7, size=32)


@pytest.fixture(scope="module")
def model32():
    return W.tiny_model(size=32)


def buffers_of(rig, portrait, edit, mean_shape=None):
    params, _ = P.apply_edit(portrait, edit, mean_shape=mean_shape)
    return params, P.render(rig, portrait, params)


def rendered(b):
    return b[:, 0:3]


def normal(b):
    return b[:, 3:6]


def albedo(b):
    return b[:, 6:9]


# ---------------------------------------------------------------------------------------------
# Each edit changes the buffers it should, and only those
# ---------------------------------------------------------------------------------------------
def test_light_edit_changes_the_rendered_buffer_and_leaves_normals_and_albedo_equal(rig, portrait, target):
    base = P.render(rig, portrait)
    for edit in (P.Edit(light_from=target), P.Edit(light_sh=torch.randn(9, 3) * 0.5),
                 P.Edit(light_direction=(1.0, 0.5, 1.0), light_intensity=2.0, light_color=(1.0, 0.8, 0.6)),
                 P.Edit(light_intensity=0.5)):
        params, b = buffers_of(rig, portrait, edit)
        for key in ("shape", "tex", "exp", "pose", "cam"):
            assert torch.equal(params[key], portrait.params[key]), key
        assert torch.equal(normal(b), normal(base))
        assert torch.equal(albedo(b), albedo(base))
        assert (rendered(b) - rendered(base)).abs().max() > 1e-2


def test_light_from_copies_the_targets_sh_coefficients(portrait, target):
    params, _ = P.apply_edit(portrait, P.Edit(light_from=target))
    assert torch.equal(params["light"], target.params["light"])


def test_pose_edit_moves_the_geometry_and_leaves_the_sh_light_equal(rig, portrait, target):
    base = P.render(rig, portrait)
    for edit in (P.Edit(yaw=25.0), P.Edit(pitch=-10.0, roll=5.0), P.Edit(pose_from=target)):
        params, b = buffers_of(rig, portrait, edit)
        assert torch.equal(params["light"], portrait.params["light"])
        for key in ("shape", "tex", "exp", "cam"):
            assert torch.equal(params[key], portrait.params[key]), key
        assert torch.equal(params["pose"][:, 3:], portrait.params["pose"][:, 3:])  # the jaw is kept
        assert not torch.allclose(params["pose"][:, :3], portrait.params["pose"][:, :3])
        assert (normal(b) - normal(base)).abs().max() > 1e-2


def test_pose_from_copies_only_the_global_rotation(portrait, target):
    params, _ = P.apply_edit(portrait, P.Edit(pose_from=target))
    assert torch.equal(params["pose"][:, :3], target.params["pose"][:, :3])
    assert torch.equal(params["pose"][:, 3:], portrait.params["pose"][:, 3:])


def test_expression_edit_copies_exp_and_jaw_and_leaves_light_and_head_pose_equal(rig, portrait, target):
    base = P.render(rig, portrait)
    params, b = buffers_of(rig, portrait, P.Edit(expression_from=target))
    assert torch.equal(params["exp"], target.params["exp"])
    assert torch.equal(params["pose"][:, 3:], target.params["pose"][:, 3:])
    assert torch.equal(params["pose"][:, :3], portrait.params["pose"][:, :3])
    for key in ("light", "shape", "tex", "cam"):
        assert torch.equal(params[key], portrait.params[key]), key
    assert (normal(b) - normal(base)).abs().max() > 1e-3


def test_jaw_open_sets_the_jaw_exactly_and_strength_scales_the_expression(portrait):
    params, _ = P.apply_edit(portrait, P.Edit(jaw_open=20.0, expression_strength=0.5))
    assert torch.allclose(params["pose"][:, 3:], torch.tensor([[math.radians(20.0), 0.0, 0.0]]))
    assert torch.allclose(params["exp"], portrait.params["exp"] * 0.5)
    params, _ = P.apply_edit(portrait, P.Edit(expression_strength=0.0))
    assert params["exp"].abs().max() == 0 and params["pose"][:, 3:].abs().max() == 0


def test_latent_edit_changes_no_buffer(rig, portrait, target):
    params, b = buffers_of(rig, portrait, P.Edit(latent_from=target))
    assert all(torch.equal(params[k], portrait.params[k]) for k in params)
    assert torch.equal(b, P.render(rig, portrait))


def test_camera_and_albedo_code_are_never_transferred(portrait, target):
    edit = P.Edit(light_from=target, pose_from=target, expression_from=target, latent_from=target)
    params, center = P.apply_edit(portrait, edit)
    assert torch.equal(params["cam"], portrait.params["cam"])
    assert torch.equal(params["tex"], portrait.params["tex"])
    assert torch.equal(center, portrait.center)


def test_mean_shape_replaces_the_shape_and_the_face_stays_centred_on_the_source(rig, portrait):
    mean = torch.randn(100) * 0.7
    params, center = P.apply_edit(portrait, P.Edit(mean_shape=mean))
    assert torch.equal(params["shape"], mean.reshape(1, 100))
    # the centre comes from the source's own shape, and rendering re-centres the new shape on it
    assert torch.equal(center, rig.ffhq_center(portrait.params))
    out = rig.render_all(params, portrait.tform, W.SIZE, align_center=center)
    moved = rig.ffhq_center({**params}) - rig.ffhq_center(portrait.params)
    assert moved.abs().max() > 1e-4  # the new shape alone would move the face ...
    assert out["alpha"].sum() > 0  # ... but it is drawn where the source face was:
    centre_px = lambda a: (a[0, 0].nonzero().float().mean(0))  # noqa: E731
    src = rig.render_all(portrait.params, portrait.tform, W.SIZE, align_center=center)
    assert (centre_px(out["alpha"]) - centre_px(src["alpha"])).abs().max() < 2.0


def test_a_personal_models_mean_shape_is_used_by_default(rig, small):
    personal = W.tiny_model(0, mean_shape_seed=3, size=32)
    res = P.edit(personal, small, P.Edit(), rig, seed=1, steps="ddim2", paste=False)[0]
    assert torch.equal(res.params["shape"], personal.mean_shape)


# ---------------------------------------------------------------------------------------------
# Seeds and noise
# ---------------------------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_image_in_a_batch_of_1_and_of_8(rig):
    model = W.tiny_model(size=32)  # the tiny architecture at 32 px: a batch of 8 stays cheap
    p8 = W.aligned_portrait(8, seed=20, size=32)
    buffers = P.render(rig, p8)
    latent = P.encode(model, p8.aligned)
    seeds = list(range(100, 108))
    batch = P.sample(model, buffers, latent, seeds=seeds, steps="ddim2")
    for i in (0, 5):
        alone = P.sample(model, buffers[i:i + 1], latent[i:i + 1], seeds=seeds[i], steps="ddim2")
        assert (alone[0] - batch[i]).abs().max() < 1e-4
    assert (batch[0] - batch[1]).abs().max() > 1e-2  # different seeds, different images


def test_eta_above_zero_keeps_per_image_seeds_batch_independent(rig, model32):
    p2 = W.aligned_portrait(2, seed=30, size=32)
    buffers, latent = P.render(rig, p2), P.encode(model32, p2.aligned)
    both = P.sample(model32, buffers, latent, seeds=[5, 6], steps="ddim3", eta=0.7)
    second = P.sample(model32, buffers[1:], latent[1:], seeds=[6], steps="ddim3", eta=0.7)
    assert (both[1] - second[0]).abs().max() < 1e-4


def test_edit_returns_its_seed_and_the_seed_reproduces_the_result(rig, small, model32):
    first = P.edit(model32, small, P.Edit(yaw=10.0), rig, seed=None, steps="ddim2", paste=False)[0]
    assert isinstance(first.seed, int)
    again = P.edit(model32, small, P.Edit(yaw=10.0), rig, seed=first.seed, steps="ddim2", paste=False)[0]
    assert np.array_equal(first.image, again.image)


def test_a_sweep_shares_one_noise_and_a_result_is_the_same_alone_or_in_the_sweep(rig, small, model32):
    sweep = [P.Edit(yaw=float(v)) for v in (-20, 0, 20)]
    results = P.edit(model32, small, sweep, rig, seed=42, steps="ddim2", paste=False)
    assert [r.seed for r in results] == [42, 42, 42]
    alone = P.edit(model32, small, sweep[2], rig, seed=42, steps="ddim2", paste=False)[0]
    assert np.abs(alone.image.astype(int) - results[2].image.astype(int)).max() <= 1
    independent = P.edit(model32, small, sweep, rig, seed=42, steps="ddim2", paste=False, shared_noise=False)
    assert [r.seed for r in independent] == [42, 43, 44]


def test_mix_and_match_samples_with_the_other_portraits_latent(rig, small, small_target, model32):
    res = P.edit(model32, small, P.Edit(latent_from=small_target), rig, seed=3, steps="ddim2", paste=False)[0]
    direct = P.sample(model32, P.render(rig, small), P.encode(model32, small_target.aligned), seeds=3, steps="ddim2")
    assert np.abs(res.image.astype(int) - P._to_uint8(direct)[0].astype(int)).max() <= 1


def test_identity_swap_samples_with_the_other_model_and_its_mean_shape(rig, small, model32):
    other = W.tiny_model(1, mean_shape_seed=5, size=32)
    res = P.edit(model32, small, P.Edit(model=other), rig, seed=4, steps="ddim2", paste=False)[0]
    assert torch.equal(res.params["shape"], other.mean_shape)
    params, _ = P.apply_edit(small, P.Edit(), mean_shape=other.mean_shape)
    direct = P.sample(other, P.render(rig, small, params), P.encode(other, small.aligned), seeds=4,
                      steps="ddim2")
    assert np.abs(res.image.astype(int) - P._to_uint8(direct)[0].astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------
# Inversion
# ---------------------------------------------------------------------------------------------
# Measured on SmoothRig (exact Gaussian denoiser), 64 px, max |error| over pixels in [0,1] units:
#   ddim20: plain official inversion (refine=0) 0.148, refine=1 0.025, refine=2 0.0042, refine=4 0.0003
#   ddim50: refine=0 0.064, refine=2 0.0005.
INVERSION_BOUND = 0.01  # ddim20, refine=2 (the default)


def test_inversion_then_sampling_without_edits_reproduces_the_source(rig):
    smooth = W.smooth_model()
    p = W.aligned_portrait(1, seed=11)
    buffers = P.render(rig, p)
    # an image the Gaussian model finds plausible: the albedo buffer plus smooth detail
    detail = torch.nn.functional.avg_pool2d(torch.randn(1, 3, W.SIZE, W.SIZE, generator=torch.Generator().manual_seed(0)),
                                            5, 1, 2)
    image = (buffers[:, 6:9] + 0.25 * detail / detail.std()).clamp(0, 1)
    latent = P.encode(smooth, image)
    noise = P.invert(smooth, image, buffers, latent, steps="ddim20")
    again = P.sample(smooth, buffers, latent, noise=noise, steps="ddim20", seeds=0)
    err = (again - image).abs().max().item()
    assert err < INVERSION_BOUND, err
    plain = P.sample(smooth, buffers, latent, noise=P.invert(smooth, image, buffers, latent, "ddim20", refine=0),
                     steps="ddim20", seeds=0)
    assert (plain - image).abs().max().item() > 5 * err  # the refinement is what makes it faithful


def test_edit_with_invert_and_no_edit_gives_back_the_source_photo(rig):
    smooth = W.smooth_model()
    p = W.aligned_portrait(1, seed=12)
    res = P.edit(smooth, p, P.Edit(), rig, seed=0, steps="ddim20", invert=True, paste=False)[0]
    src = P._to_uint8(p.aligned)[0].astype(int)
    assert np.abs(res.image.astype(int) - src).max() <= 3  # 0.01 in [0,1] units, as above


# ---------------------------------------------------------------------------------------------
# Paste-back
# ---------------------------------------------------------------------------------------------
def test_soft_mask_is_grown_feathered_and_exactly_zero_beyond_its_support():
    alpha = np.zeros((64, 64), np.float32)
    alpha[24:40, 24:40] = 1
    m = W.P.soft_mask(alpha, grow=0.05, feather=0.03)
    assert m[32, 32] == pytest.approx(1.0)
    assert 0 < m[24 - 3, 32] <= 1  # grown past the face
    assert m[:12].max() == 0 and m[:, :12].max() == 0 and m[52:].max() == 0  # beyond grow + 2 sigma


def test_paste_back_leaves_pixels_outside_the_face_mask_unchanged(rig):
    p = W.quad_portrait(seed=3)
    white = np.full((1, W.SIZE, W.SIZE, 3), 255, np.uint8)
    out = P.paste_back(p, white)[0]
    original = p.original[0]
    changed = np.any(out != original, axis=-1)
    assert changed.sum() > 50  # the face was replaced ...
    # ... and every changed pixel maps back inside the soft face mask of the aligned crop
    mask = P.soft_mask(p.face_mask[0])
    ys, xs = np.nonzero(changed)
    origin, a = P._quad_map(p.alignment[0].quad, W.SIZE)
    uv = np.linalg.solve(a, np.stack([xs - origin[0], ys - origin[1]])) * W.SIZE - 0.5
    u, v = np.clip(np.rint(uv), 0, W.SIZE - 1).astype(int)
    support = np.zeros_like(mask, bool)
    support[1:-1, 1:-1] = mask[1:-1, 1:-1] > 0
    grown = support | np.roll(support, 1, 0) | np.roll(support, -1, 0) | np.roll(support, 1, 1) | np.roll(support, -1, 1)
    assert grown[v, u].all()
    # outside the quad nothing changed at all
    far = np.ones_like(changed)
    x0, y0 = np.floor(p.alignment[0].quad.min(0)).astype(int)
    x1, y1 = np.ceil(p.alignment[0].quad.max(0)).astype(int)
    far[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = False
    assert not changed[far].any()


def test_paste_back_puts_the_crop_where_the_alignment_took_it_from(rig):
    p = W.quad_portrait(seed=4)
    pasted = P.paste_back(p, P._to_uint8(p.aligned))[0]  # pasting the unedited crop changes little
    diff = np.abs(pasted.astype(int) - p.original[0].astype(int))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 40


def test_paste_back_of_an_already_aligned_photo_keeps_the_background(rig, portrait):
    white = np.full((1, W.SIZE, W.SIZE, 3), 255, np.uint8)
    out = P.paste_back(portrait, white)[0]
    mask = P.soft_mask(portrait.face_mask[0])
    assert np.array_equal(out[mask == 0], portrait.original[0][mask == 0])
    assert (out[mask >= 0.999] >= 254).all()


def test_paste_back_takes_float_tensors_and_explicit_masks_as_the_nodes_pass_them(rig):
    p = W.quad_portrait(seed=6)
    images = torch.ones(2, W.SIZE, W.SIZE, 3)  # (B,H,W,C) float in [0,1]
    masks = [p.face_mask[0], torch.zeros(W.SIZE, W.SIZE)]
    a, b = P.paste_back(p, images, indices=[0, 0], masks=masks)
    assert np.any(a != p.original[0]) and np.array_equal(b, p.original[0])


def test_edit_pastes_back_into_the_full_photo(rig, model32):
    p = W.quad_portrait(seed=5, size=32)
    res = P.edit(model32, p, P.Edit(light_intensity=1.5), rig, seed=0, steps="ddim2")[0]
    assert res.pasted.shape == p.original[0].shape and res.pasted.dtype == np.uint8
    assert res.image.shape == (32, 32, 3)
    assert np.any(res.pasted != p.original[0])


# ---------------------------------------------------------------------------------------------
# Types and the contact sheet
# ---------------------------------------------------------------------------------------------
def test_portraits_index_and_join(rig):
    p = W.aligned_portrait(3, seed=40)
    one = p[1]
    assert len(one) == 1 and one.names == [p.names[1]]
    assert torch.equal(one.params["exp"], p.params["exp"][1:2])
    joined = P.Portrait.cat([p[0], p[2]])
    assert len(joined) == 2 and torch.equal(joined.tform, p.tform[[0, 2]])


def test_edit_dict_round_trip_and_known_keys():
    e = P.Edit.from_dict({"yaw": 10, "light_sh": [0.1] * 27, "jaw_open": 5, "light_color": [1, 0.9, 0.8]})
    d = e.to_dict()
    assert d["yaw"] == 10.0 and d["jaw_open"] == 5.0 and len(d["light_sh"]) == 9
    back = P.Edit.from_dict(d)
    assert torch.allclose(back.light_sh, e.light_sh) and back.light_color == e.light_color


def test_contact_sheet_shows_source_buffers_and_results(rig, small, model32):
    results = P.edit(model32, small, [P.Edit(yaw=-15.0), P.Edit(yaw=15.0)], rig, seed=0, steps="ddim2", paste=False)
    sheet = P.contact_sheet(small, results, rig=rig)
    assert sheet.size[0] == 3 * 128 and sheet.size[1] >= 4 * 128  # small crops are shown at 128


# ---------------------------------------------------------------------------------------------
# Clear errors for bad input
# ---------------------------------------------------------------------------------------------
def test_unknown_edit_keys_are_refused_with_the_known_ones_listed():
    with pytest.raises(InputError, match="known edits:.*yaw"):
        P.Edit.from_dict({"yawn": 10})


@pytest.mark.parametrize("field, value, rng", [
    ("yaw", 120.0, "-90 and 90"), ("pitch", -95.0, "-90 and 90"), ("jaw_open", 80.0, "0 and 45"),
    ("expression_strength", 5.0, "-2 and 3"), ("light_intensity", -1.0, "0 and 10"),
    ("light_color", (1.0, 9.0, 1.0), "0 and 4"),
])
def test_values_out_of_range_name_the_range(field, value, rng):
    with pytest.raises(InputError, match=rng):
        P.Edit(**{field: value})


def test_malformed_edits_are_refused():
    with pytest.raises(InputError, match="27"):
        P.Edit(light_sh=torch.zeros(10))
    with pytest.raises(InputError, match="only one"):
        P.Edit(light_sh=torch.zeros(9, 3), light_direction=(0, 0, 1))
    with pytest.raises(InputError, match="not all zero"):
        P.Edit(light_direction=(0, 0, 0))
    with pytest.raises(InputError, match="Portrait"):
        P.Edit(light_from="sunset.jpg")
    with pytest.raises(InputError, match="number"):
        P.Edit.from_dict({"yaw": "left"})


def test_a_model_of_the_wrong_size_is_refused_with_both_sizes(rig, model):
    p32 = W.aligned_portrait(1, seed=0, size=32)
    with pytest.raises(InputError, match="64 px.*32 px"):
        P.edit(model, p32, P.Edit(), rig, steps="ddim2")
    with pytest.raises(InputError, match="64 px"):
        P.sample(model, torch.zeros(1, 9, 32, 32), torch.zeros(1, 64), seeds=0, steps="ddim2")


def test_something_that_is_not_a_diffusionrig_model_is_refused(rig, portrait):
    with pytest.raises(InputError, match="DiffusionRig"):
        P.edit(torch.nn.Linear(2, 2), portrait, P.Edit(), rig)


def test_an_optimizer_state_given_as_model_is_refused(tmp_path):
    # the layout of Adam's state_dict (building a real optimizer costs seconds of imports)
    state = {"state": {0: {"step": torch.tensor(5000.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}},
             "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "params": [0]}]}
    path = tmp_path / "opt005000.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="optimizer"):
        P.load_model(path, device="cpu")
    with pytest.raises(CheckpointError, match="not exist|not found"):
        P.load_model(tmp_path / "missing.pt", device="cpu")
    deca = tmp_path / "deca_model.tar"
    torch.save({"E_flame": {"layers.0.weight": torch.zeros(1)}, "E_detail": {}}, deca)
    with pytest.raises(CheckpointError, match="DECA"):
        P.load_model(deca, device="cpu")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        P.load_model(text, device="cpu")


def test_bad_sampling_options_are_refused(rig, portrait, model):
    with pytest.raises(InputError, match="eta"):
        P.edit(model, portrait, P.Edit(), rig, eta=2.0)
    with pytest.raises(InputError, match="steps 'ddimX'"):
        P.edit(model, portrait, P.Edit(), rig, steps="ddimX")
    with pytest.raises(InputError, match="refine"):
        P.invert(model, portrait.aligned, torch.zeros(1, 9, 64, 64), torch.zeros(1, 64), refine=99)
    with pytest.raises(InputError, match="one seed per image"):
        P.sample(model, torch.zeros(2, 9, 64, 64), torch.zeros(2, 64), seeds=[1, 2, 3])
    with pytest.raises(InputError, match="at least one edit"):
        P.edit(model, portrait, [], rig)


def test_an_unreadable_file_raises_image_error(rig, tmp_path):
    bad = tmp_path / "not_a_photo.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageError, match="not_a_photo"):
        P.fit(rig, [bad], size=W.SIZE)
    with pytest.raises(ImageError, match="not found"):
        P.fit(rig, [tmp_path / "missing.png"], size=W.SIZE)


def test_a_photo_without_a_face_raises_no_face_error_naming_it(rig, tmp_path):
    from PIL import Image

    path = tmp_path / "wall.png"
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(path)
    with pytest.raises(NoFaceError, match="wall"):
        P.fit(rig, [path], size=W.SIZE)


# ---------------------------------------------------------------------------------------------
# The real-photo path: detect -> FFHQ-align -> DECA fit -> paste back through the quad
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rig_with_deca():
    """The synthetic rig plus a DECA encoder with random weights (the real weights are licensed):
    enough to run every step of fitting a photo that has no sidecar."""
    from diffusionrig_core.deca import DECAEncoder
    from diffusionrig_core.rig import FaceRig

    torch.manual_seed(0)
    r = FaceRig.load(assets_dir=W.assets_dir(), device="cpu")
    r.encoder = DECAEncoder().eval()
    return r


def test_a_photo_without_sidecar_is_aligned_fitted_and_pasted_back(rig_with_deca, tmp_path):
    from diffusionrig_core import synthetic

    photo = synthetic.write_album(tmp_path, synthetic.sample_people(1, seed=3)[0], n=1, size=160, rig=W.rig())[0]
    landmarks = synthetic.load_sidecar(photo).landmarks  # dlib does not see synthetic faces: give its answer
    p = P.fit(rig_with_deca, [photo], size=W.SIZE, use_sidecar=False, landmarks=[landmarks])
    assert p.alignment[0] is not None and p.aligned.shape == (1, 3, W.SIZE, W.SIZE)
    assert set(p.params) == {"shape", "tex", "exp", "pose", "cam", "light"} and p.center.shape == (1, 3)
    # the quad maps the aligned crop back onto the photo: pasting the unedited crop over the whole
    # crop area changes the photo only by resampling blur
    whole = np.ones((1, W.SIZE, W.SIZE), np.float32)
    back = P.paste_back(p, P._to_uint8(p.aligned), masks=whole, grow=0.0, feather=0.02)[0]
    diff = np.abs(back.astype(int) - p.original[0].astype(int))
    assert diff.mean() < 3.0 and np.median(diff[diff > 0]) < 12


def test_finetune_builds_the_album_and_returns_a_personal_model_with_its_mean_shape(rig, tmp_path):
    from diffusionrig_core import synthetic

    photos = W.album()[:2]
    calls = []
    model = P.finetune(W.model_file(), photos, rig, steps=2, out_path=tmp_path / "me.safetensors", device="cpu",
                       callback=lambda step, total, loss=None: calls.append((step, total, loss)), batch_size=2,
                       work_dir=tmp_path / "work")
    assert [c[:2] for c in calls] == [(1, 2), (2, 2)] and all(c[2] is not None for c in calls)
    shapes = torch.cat([synthetic.load_sidecar(p).params["shape"] for p in photos])
    assert torch.allclose(model.mean_shape.reshape(-1), shapes.mean(0), atol=1e-6)
    again = P.load_model(tmp_path / "me.safetensors", device="cpu")
    assert torch.equal(again.mean_shape.reshape(-1), model.mean_shape.reshape(-1))
    with pytest.raises(InputError, match="steps"):
        P.finetune(W.model_file(), photos, rig, steps=0)


def test_edit_progress_counts_every_denoising_step_up_to_the_total(rig, small, model32):
    calls = []
    P.edit(model32, small, [P.Edit(yaw=5.0)] * 3, rig, seed=0, steps="ddim3", invert=True, paste=False,
           batch_size=2, callback=lambda done, total: calls.append((done, total)))
    total = 3 * 2 + 2 * 1  # 3 edits in 2 batches of 3 steps, one inversion of 2 steps
    assert calls[-1] == (total, total) and [d for d, _ in calls] == list(range(1, total + 1))
