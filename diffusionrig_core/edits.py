"""Edits of face parameters: light, expression and jaw, head pose, shape.

Every function takes a params dict ({shape, tex, exp, pose, cam, light}, batch B) and returns a new
dict; inputs are never modified. A target's values (batch 1 or B) are broadcast over the batch.

Frames: FLAME's world frame has x to the image's right, y up and z towards the camera. Light
directions point from the face towards the light; ``(0, 0, 1)`` lights the face from the camera.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from .errors import InputError
from .render import SH_CONSTANTS

Params = Mapping[str, torch.Tensor]
LIMITS = {"yaw": 90.0, "pitch": 90.0, "roll": 90.0, "intensity": (0.0, 10.0), "color": (0.0, 4.0),
          "ambient": (0.0, 1.0), "strength": (-2.0, 3.0), "jaw_angle_deg": 60.0, "sh": 100.0}


def _copy(params: Params) -> dict[str, torch.Tensor]:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in params.items()}


def _batch(params: Params) -> int:
    for key in ("pose", "light", "exp", "shape"):
        if key in params:
            return int(params[key].shape[0])
    raise InputError("face parameters are empty; expected shape, tex, exp, pose, cam and light")


def _like(value, ref: torch.Tensor, n: int, tail: tuple[int, ...], name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
    numel_tail = int(np.prod(tail))
    if t.numel() == numel_tail:
        return t.reshape(1, *tail).expand(n, *tail).clone()
    if t.ndim >= 1 and t.shape[0] in (1, n) and t[0].numel() == numel_tail:
        return t.reshape(t.shape[0], *tail).expand(n, *tail).clone()
    raise InputError(f"{name} has shape {tuple(t.shape)}; expected {tail} or (1 or {n}, {', '.join(map(str, tail))})")


def _need(params: Params, *keys: str) -> None:
    for k in keys:
        if k not in params:
            raise InputError(f"face parameters lack {k!r}")


# ----------------------------------------------------------------------------------------------
# light


def with_light(params: Params, light) -> dict[str, torch.Tensor]:
    """Replace the SH light with ``light`` (9,3), (27,) or (B,9,3)."""
    _need(params, "light")
    out = _copy(params)
    light_t = torch.as_tensor(light, dtype=torch.float32)
    if not torch.isfinite(light_t).all():
        raise InputError("light coefficients contain NaN or infinite values")
    if light_t.abs().max() > LIMITS["sh"]:
        raise InputError(f"light coefficients must lie within +-{LIMITS['sh']:g} (DECA's are a few units)")
    out["light"] = _like(light_t, params["light"], _batch(params), (9, 3), "light")
    return out


def light_from(params: Params, target_params: Params) -> dict[str, torch.Tensor]:
    """The target photo's lighting (DiffusionRig's ``light`` mode)."""
    _need(target_params, "light")
    return with_light(params, target_params["light"])


def light_from_sh(params: Params, coeffs) -> dict[str, torch.Tensor]:
    """Lighting from 27 SH numbers, read as DECA's code stores them (row-major (9,3): k*3 + rgb)."""
    c = torch.as_tensor(coeffs, dtype=torch.float32)
    if c.numel() != 27:
        raise InputError(f"SH light needs 27 numbers (9 coefficients x RGB); got {c.numel()}")
    return with_light(params, c.reshape(9, 3))


def light_direction(azimuth: float, elevation: float) -> tuple[float, float, float]:
    """Degrees -> unit vector toward the light (x to the viewer's right, y up, z toward the camera):
    azimuth turns the light from the front toward the right, elevation raises it."""
    az, el = math.radians(float(azimuth)), math.radians(float(elevation))
    return (math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el))


def directional_light(direction: Sequence[float], intensity: float = 1.0,
                      color: Sequence[float] = (1.0, 1.0, 1.0), ambient: float = 0.5) -> torch.Tensor:
    """SH coefficients (9,3) of a distant light plus uniform ambient, for the official SH shading.

    The light's clamped-cosine response max(0, n.d) is projected on the renderer's nine SH terms
    (its constants already hold the Lambertian factors for orders 1 and 2; order 0 gets pi) and scaled
    so that a normal facing the light is shaded exactly ``intensity * color``. ``ambient`` (0..1) is
    the share of that brightness that reaches every normal (0 = a black back side, 1 = flat light).
    """
    d = torch.as_tensor(direction, dtype=torch.float64).reshape(-1)
    if d.numel() != 3 or not torch.isfinite(d).all():
        raise InputError(f"light direction must be 3 finite numbers (x right, y up, z towards the camera); got {direction}")
    norm = float(d.norm())
    if norm < 1e-8:
        raise InputError("light direction must not be the zero vector")
    x, y, z = (d / norm).tolist()
    lo, hi = LIMITS["intensity"]
    if not lo <= float(intensity) <= hi:
        raise InputError(f"light intensity must be in [{lo:g}, {hi:g}]; got {intensity}")
    col = torch.as_tensor(color, dtype=torch.float64).reshape(-1)
    lo, hi = LIMITS["color"]
    if col.numel() != 3 or (col < lo).any() or (col > hi).any():
        raise InputError(f"light color must be 3 numbers (R, G, B) each in [{lo:g}, {hi:g}]; got {color}")
    lo, hi = LIMITS["ambient"]
    if not lo <= float(ambient) <= hi:
        raise InputError(f"ambient must be in [{lo:g}, {hi:g}] (share of the light reaching every normal); got {ambient}")
    pi = math.pi
    y1 = math.sqrt(3 / (4 * pi))
    y2 = math.sqrt(15 / (4 * pi))
    # SH of a delta light in direction d, in the renderer's basis order: coefficient * kappa_k is
    # A_l * Y_lm(d) * (the basis' share of Y_lm(n)); kappa_0 lacks A_0 = pi, so it is put here.
    coeffs = torch.tensor([
        pi / math.sqrt(4 * pi),
        y1 * x, y1 * y, y1 * z,
        y2 * x * y, y2 * x * z, y2 * y * z,
        0.5 * y2 * (x * x - y * y), 0.5 * math.sqrt(5 / (4 * pi)) * (3 * z * z - 1),
    ], dtype=torch.float64)
    kappa = SH_CONSTANTS.double()
    facing = _sh_value(coeffs, kappa, (x, y, z))  # 1.0625 for a unit light: the order-2 lobe overshoots
    lobe = coeffs / facing
    flat = torch.zeros(9, dtype=torch.float64)
    flat[0] = 1.0 / float(kappa[0])  # shading 1 for every normal
    per_unit = (1 - float(ambient)) * lobe + float(ambient) * flat
    return (float(intensity) * per_unit[:, None] * col[None, :]).float()


def _sh_value(coeffs: torch.Tensor, kappa: torch.Tensor, n: Sequence[float]) -> float:
    x, y, z = n
    basis = torch.tensor([1, x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1], dtype=torch.float64)
    return float((coeffs * kappa * basis).sum())


# ----------------------------------------------------------------------------------------------
# expression


def expression_from(params: Params, target: Params) -> dict[str, torch.Tensor]:
    """The target's expression code and jaw (DiffusionRig's ``exp`` mode)."""
    _need(params, "exp", "pose")
    _need(target, "exp", "pose")
    n = _batch(params)
    out = _copy(params)
    out["exp"] = _like(target["exp"], params["exp"], n, (params["exp"].shape[1],), "target exp")
    out["pose"][:, 3:] = _like(target["pose"][:, 3:], params["pose"], n, (3,), "target jaw")
    return out


def with_expression(params: Params, exp=None, jaw=None, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """Set the expression code (50,) and/or the jaw (3,) axis-angle (radians; x opens the mouth),
    then scale both by ``strength`` (1 = as given, 0 = neutral, within [-2, 3])."""
    _need(params, "exp", "pose")
    lo, hi = LIMITS["strength"]
    if not lo <= float(strength) <= hi:
        raise InputError(f"expression strength must be in [{lo:g}, {hi:g}]; got {strength}")
    n = _batch(params)
    out = _copy(params)
    if exp is not None:
        e = _like(exp, params["exp"], n, (params["exp"].shape[1],), "exp")
        if not torch.isfinite(e).all() or e.abs().max() > 20:
            raise InputError("expression values must be finite and within +-20 (DECA's are within about +-3)")
        out["exp"] = e
    if jaw is not None:
        j = _like(jaw, params["pose"], n, (3,), "jaw")
        if torch.rad2deg(j.norm(dim=1)).max() > LIMITS["jaw_angle_deg"]:
            raise InputError(f"jaw rotation must be at most {LIMITS['jaw_angle_deg']:g} degrees "
                             "(axis-angle in radians, e.g. (0.3, 0, 0) opens the mouth)")
        out["pose"][:, 3:] = j
    out["exp"] = out["exp"] * float(strength)
    out["pose"][:, 3:] = out["pose"][:, 3:] * float(strength)
    return out


# ----------------------------------------------------------------------------------------------
# pose


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """(N,3) axis-angle -> (N,3,3) rotation (exact Rodrigues, no epsilon)."""
    aa = aa.double()
    angle = aa.norm(dim=1, keepdim=True)
    axis = aa / angle.clamp(min=1e-12)
    x, y, z = axis.unbind(1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], 1).reshape(-1, 3, 3)
    s, c = torch.sin(angle)[..., None], torch.cos(angle)[..., None]
    return torch.eye(3, dtype=aa.dtype, device=aa.device) + s * k + (1 - c) * (k @ k)


def matrix_to_axis_angle(r: torch.Tensor) -> torch.Tensor:
    """(N,3,3) rotation -> (N,3) axis-angle with angle in [0, pi] (stable near 0 and pi)."""
    r = r.double()
    trace = r[:, 0, 0] + r[:, 1, 1] + r[:, 2, 2]
    cos = ((trace - 1) / 2).clamp(-1, 1)
    vee = torch.stack([r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0], r[:, 1, 0] - r[:, 0, 1]], 1)
    sin = vee.norm(dim=1) / 2
    angle = torch.atan2(sin, cos)
    out = torch.zeros_like(vee)
    small = angle < 1e-6
    regular = (~small) & (angle < math.pi - 1e-4)
    out[small] = vee[small] / 2  # first-order: R ~ I + [w]x
    out[regular] = vee[regular] * (angle[regular] / (2 * sin[regular]))[:, None]
    near_pi = ~(small | regular)
    if near_pi.any():  # R + I = 2 a a^T at pi: its largest column gives the axis up to sign
        sym = r[near_pi] + torch.eye(3, dtype=r.dtype, device=r.device)
        col = sym.norm(dim=1).argmax(dim=1)
        axis = sym[torch.arange(len(col)), :, col]
        axis = axis / axis.norm(dim=1, keepdim=True)
        sign = torch.sign((vee[near_pi] * axis).sum(1))
        sign[sign == 0] = 1
        out[near_pi] = axis * (angle[near_pi] * sign)[:, None]
    return out


def euler_to_matrix(yaw: float, pitch: float, roll: float) -> torch.Tensor:
    """R = R_y(yaw) R_x(pitch) R_z(roll) (degrees) in FLAME's frame: yaw about +y (up), pitch about +x
    (right), roll about +z (towards the camera)."""
    yw, pt, rl = (math.radians(float(v)) for v in (yaw, pitch, roll))
    ry = torch.tensor([[math.cos(yw), 0, math.sin(yw)], [0, 1, 0], [-math.sin(yw), 0, math.cos(yw)]],
                      dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(pt), -math.sin(pt)], [0, math.sin(pt), math.cos(pt)]],
                      dtype=torch.float64)
    rz = torch.tensor([[math.cos(rl), -math.sin(rl), 0], [math.sin(rl), math.cos(rl), 0], [0, 0, 1]],
                      dtype=torch.float64)
    return ry @ rx @ rz


def pose_from(params: Params, target: Params) -> dict[str, torch.Tensor]:
    """The target's global head rotation (DiffusionRig's ``pose`` mode); the jaw is kept."""
    _need(params, "pose")
    _need(target, "pose")
    out = _copy(params)
    out["pose"][:, :3] = _like(target["pose"][:, :3], params["pose"], _batch(params), (3,), "target pose")
    return out


def with_pose(params: Params, yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0,
              relative: bool = True) -> dict[str, torch.Tensor]:
    """Turn the head by yaw/pitch/roll degrees (each within +-90).

    Axes of FLAME's world frame: yaw about +y (positive turns the face towards the image's right),
    pitch about +x (positive tilts the face down), roll about +z (positive turns the top of the head
    towards the image's left, i.e. counter-clockwise as seen from the camera).
    ``relative=True`` applies the turn on top of the current global rotation (R = R_delta R_now);
    ``relative=False`` sets the rotation to R_delta (0, 0, 0 = facing the camera).
    """
    _need(params, "pose")
    for name, value in (("yaw", yaw), ("pitch", pitch), ("roll", roll)):
        if not math.isfinite(float(value)) or abs(float(value)) > LIMITS[name]:
            raise InputError(f"{name} must be within +-{LIMITS[name]:g} degrees; got {value}")
    out = _copy(params)
    delta = euler_to_matrix(yaw, pitch, roll).to(params["pose"].device)
    if relative:
        current = axis_angle_to_matrix(params["pose"][:, :3])
        new = delta.unsqueeze(0) @ current
    else:
        new = delta.unsqueeze(0).expand(params["pose"].shape[0], -1, -1)
    out["pose"][:, :3] = matrix_to_axis_angle(new).to(params["pose"].dtype)
    return out


# ----------------------------------------------------------------------------------------------
# shape


def with_shape(params: Params, mean_shape) -> dict[str, torch.Tensor]:
    """Replace the identity code with an album's mean shape (1,100) or (100,) (or per-item (B,100))."""
    _need(params, "shape")
    out = _copy(params)
    out["shape"] = _like(mean_shape, params["shape"], _batch(params), (params["shape"].shape[1],), "mean shape")
    return out
