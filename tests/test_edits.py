"""Parameter edits: new dicts, right entries changed, ranges enforced."""
import math

import pytest
import torch

from diffusionrig_core import edits as E
from diffusionrig_core.errors import InputError
from diffusionrig_core.render import sh_shading


def _params(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"shape": torch.randn(b, 100, generator=g), "tex": torch.randn(b, 50, generator=g),
            "exp": torch.randn(b, 50, generator=g), "pose": torch.randn(b, 6, generator=g) * 0.2,
            "cam": torch.randn(b, 3, generator=g), "light": torch.randn(b, 9, 3, generator=g)}


def _unchanged(before, after, keys):
    return all(torch.equal(before[k], after[k]) for k in keys)


def test_edits_never_modify_their_inputs():
    p, t = _params(), _params(1, seed=1)
    snapshot = {k: v.clone() for k, v in p.items()}
    for out in (E.light_from(p, t), E.expression_from(p, t), E.pose_from(p, t), E.with_pose(p, yaw=10),
                E.with_expression(p, jaw=[0.1, 0, 0]), E.with_shape(p, torch.zeros(100)),
                E.light_from_sh(p, torch.arange(27.0))):
        assert out is not p
        out["pose"].add_(1)  # results do not share storage with the inputs either
    assert _unchanged(snapshot, p, p)


def test_light_from_a_target_and_from_27_numbers():
    p, t = _params(), _params(1, seed=1)
    out = E.light_from(p, t)
    assert torch.equal(out["light"], t["light"].expand(2, -1, -1))
    assert _unchanged(p, out, ["shape", "tex", "exp", "pose", "cam"])
    sh = E.light_from_sh(p, torch.arange(27.0))["light"]
    assert sh.shape == (2, 9, 3) and sh[0, 1, 2] == 5.0  # row-major like DECA's code: k * 3 + rgb
    with pytest.raises(InputError, match="27"):
        E.light_from_sh(p, torch.zeros(26))


def test_directional_light_shades_a_facing_normal_with_intensity_times_colour():
    d = torch.tensor([0.3, 0.5, 0.8])
    light = E.directional_light(d, intensity=2.0, color=(1.0, 0.5, 0.25), ambient=0.2)
    n = (d / d.norm()).view(1, 3, 1, 1)
    assert torch.allclose(sh_shading(n, light[None])[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]), atol=1e-5)
    flat = E.directional_light((0, 0, 1), intensity=1.0, ambient=1.0)
    back = sh_shading(torch.tensor([0, 0, -1.0]).view(1, 3, 1, 1), flat[None])
    assert torch.allclose(back, torch.ones_like(back), atol=1e-5)  # ambient 1 = same light everywhere
    dark = E.directional_light((0, 0, 1), ambient=0.0)
    assert float(sh_shading(torch.tensor([0, 0, -1.0]).view(1, 3, 1, 1), dark[None]).max()) < 0.1


@pytest.mark.parametrize("kwargs, words", [
    (dict(direction=(0, 0, 0)), "zero"), (dict(direction=(1, 0)), "3 finite"),
    (dict(direction=(0, 0, 1), intensity=11), r"\[0, 10\]"), (dict(direction=(0, 0, 1), color=(1, 1, 5)), r"\[0, 4\]"),
    (dict(direction=(0, 0, 1), ambient=1.5), r"\[0, 1\]"),
])
def test_directional_light_ranges(kwargs, words):
    with pytest.raises(InputError, match=words):
        E.directional_light(**kwargs)


def test_expression_from_copies_exp_and_jaw_only():
    p, t = _params(), _params(1, seed=1)
    out = E.expression_from(p, t)
    assert torch.equal(out["exp"], t["exp"].expand(2, -1))
    assert torch.equal(out["pose"][:, 3:], t["pose"][:, 3:].expand(2, -1))
    assert torch.equal(out["pose"][:, :3], p["pose"][:, :3])
    assert _unchanged(p, out, ["shape", "tex", "cam", "light"])


def test_with_expression_sets_values_and_strength():
    p = _params()
    out = E.with_expression(p, exp=torch.ones(50), jaw=(0.2, 0, 0), strength=0.5)
    assert torch.allclose(out["exp"], torch.full((2, 50), 0.5))
    assert torch.allclose(out["pose"][:, 3:], torch.tensor([[0.1, 0, 0]] * 2))
    assert torch.allclose(E.with_expression(p, strength=0.0)["exp"], torch.zeros(2, 50))
    with pytest.raises(InputError, match="60 degrees"):
        E.with_expression(p, jaw=(2.0, 0, 0))
    with pytest.raises(InputError, match=r"\[-2, 3\]"):
        E.with_expression(p, strength=5)


def test_pose_from_copies_the_global_rotation_and_keeps_the_jaw():
    p, t = _params(), _params(1, seed=1)
    out = E.pose_from(p, t)
    assert torch.equal(out["pose"][:, :3], t["pose"][:, :3].expand(2, -1))
    assert torch.equal(out["pose"][:, 3:], p["pose"][:, 3:])


def test_yaw_turns_the_face_towards_the_image_right_and_composes():
    p = _params(1)
    p["pose"][:] = 0
    out = E.with_pose(p, yaw=30, relative=False)
    r = E.axis_angle_to_matrix(out["pose"][:, :3])[0]
    forward = r @ torch.tensor([0, 0, 1.0], dtype=r.dtype)
    assert torch.allclose(forward, torch.tensor([0.5, 0, math.sqrt(3) / 2], dtype=r.dtype), atol=1e-6)
    twice = E.with_pose(E.with_pose(p, yaw=20), yaw=20)
    assert torch.allclose(twice["pose"][:, :3], torch.tensor([[0, math.radians(40), 0]]), atol=1e-6)
    down = E.axis_angle_to_matrix(E.with_pose(p, pitch=10)["pose"][:, :3])[0] @ torch.tensor([0, 0, 1.0], dtype=r.dtype)
    assert down[1] < 0  # positive pitch looks down (y is up)
    with pytest.raises(InputError, match="90"):
        E.with_pose(p, yaw=120)


def test_relative_pose_applies_on_top_of_the_current_rotation():
    p = _params(1)
    before = E.axis_angle_to_matrix(p["pose"][:, :3])[0]
    after = E.axis_angle_to_matrix(E.with_pose(p, roll=15)["pose"][:, :3])[0]
    assert torch.allclose(after, E.euler_to_matrix(0, 0, 15) @ before, atol=1e-6)


def test_axis_angle_round_trip_including_half_turns():
    aa = torch.tensor([[0.0, math.pi, 0.0], [1e-9, 0, 0], [0.3, -0.2, 0.1], [0, 0, 3.1415]])
    r = E.axis_angle_to_matrix(aa)
    assert torch.allclose(E.axis_angle_to_matrix(E.matrix_to_axis_angle(r)), r, atol=1e-9)


def test_with_shape_broadcasts_the_mean_shape():
    p = _params()
    assert torch.equal(E.with_shape(p, torch.ones(1, 100))["shape"], torch.ones(2, 100))
    with pytest.raises(InputError, match="mean shape"):
        E.with_shape(p, torch.ones(3, 100))


def test_light_direction_angles_point_front_right_and_up():
    from diffusionrig_core.edits import light_direction

    assert light_direction(0, 0) == pytest.approx((0.0, 0.0, 1.0))
    assert light_direction(90, 0) == pytest.approx((1.0, 0.0, 0.0), abs=1e-12)
    assert light_direction(0, 90) == pytest.approx((0.0, 1.0, 0.0), abs=1e-12)
