"""Synthetic people and the random conditions of their photos.

A ``Person`` is an identity in the synthetic face world: FLAME-style shape and albedo codes (what
the physical buffers show) plus everything the buffers do *not* show and the diffusion model's
global code has to carry: high-frequency skin detail (seeded, painted in UV space), how shiny the
skin is, a background, a hair band and maybe glasses. ``sample_photo_params`` draws one photo's
conditions: light, head pose, expression and jaw, framing.

Person ``i`` of ``sample_people(n, seed)`` does not depend on ``n``: worlds of different sizes
share their first people.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..edits import directional_light, euler_to_matrix, matrix_to_axis_angle

BACKGROUNDS = ("gradient", "stripes", "checker", "rings", "blobs")

# designed expression components of the synthetic model (see assets._expression_basis)
EXPRESSIONS = {"smile": 0, "lips_apart": 1, "brow_raise": 2, "eyes_closed": 3, "frown": 4, "pucker": 5,
               "brow_furrow": 6, "cheek_puff": 7, "wink_left": 8, "wink_right": 9, "mouth_side": 10,
               "nose_wrinkle": 11, "lip_press": 12, "upper_lip_raise": 13, "lower_lip_down": 14,
               "jaw_forward": 15, "eyes_wide": 16}


@dataclass
class Person:
    """One synthetic identity. Arrays are float32; colours are RGB in 0..1."""

    id: str
    shape: np.ndarray  # (100,) FLAME shape code
    tex: np.ndarray  # (50,) albedo code
    detail_seed: int  # seeds the person's UV skin detail (pores, freckles, moles)
    freckles: float  # 0..1 density of freckles
    pores: float  # amplitude of the fine skin texture
    iris_rgb: np.ndarray  # (3,)
    specular: float  # strength of the skin's highlights
    shininess: float  # Blinn-Phong exponent
    background: str  # one of BACKGROUNDS
    bg_colors: np.ndarray  # (3,3) three background colours
    hair_rgb: np.ndarray  # (3,)
    hair_height: float  # hairline height on the forehead (m, template frame; lower = more hair)
    hair_wave: float  # amplitude (m) of the hairline's waviness
    glasses: bool
    glasses_rgb: np.ndarray  # (3,) frame colour
    lens_rgb: np.ndarray  # (3,) lens tint
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_cache")
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Person":
        arrays = {"shape", "tex", "iris_rgb", "bg_colors", "hair_rgb", "glasses_rgb", "lens_rgb"}
        kw = {k: (np.asarray(v, dtype=np.float32) if k in arrays else v) for k, v in d.items()
              if k in cls.__dataclass_fields__ and k != "_cache"}
        return cls(**kw)


def _rgb(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, 3).astype(np.float32)


def sample_person(index: int, seed: int = 0) -> Person:
    """Person ``index`` of the world ``seed``."""
    rng = np.random.default_rng([seed, 1000 + index])
    shape = np.zeros(100, np.float32)
    shape[:16] = rng.normal(0, 1.0, 16)  # the designed identity directions
    shape[16:] = rng.normal(0, 0.6, 84)
    tex = np.zeros(50, np.float32)
    tex[:9] = rng.normal(0, 0.9, 9)  # skin tone, redness, lips, brows, ...
    tex[9:] = rng.normal(0, 0.6, 41)
    hair_palette = np.array([[0.10, 0.07, 0.05], [0.25, 0.15, 0.08], [0.45, 0.30, 0.15], [0.75, 0.60, 0.35],
                             [0.55, 0.20, 0.08], [0.50, 0.50, 0.50], [0.85, 0.85, 0.82]], np.float32)
    hair = hair_palette[rng.integers(len(hair_palette))] * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    iris_palette = np.array([[0.35, 0.22, 0.12], [0.20, 0.35, 0.55], [0.30, 0.45, 0.25], [0.15, 0.10, 0.07]],
                            np.float32)
    n_bg = len(BACKGROUNDS)
    return Person(
        id=f"person_{index:03d}",
        shape=shape,
        tex=tex.astype(np.float32),
        detail_seed=int(rng.integers(2 ** 31)),
        freckles=float(rng.uniform(0, 1) ** 2),
        pores=float(rng.uniform(0.01, 0.035)),
        iris_rgb=iris_palette[rng.integers(len(iris_palette))],
        specular=float(rng.uniform(0.08, 0.3)),
        shininess=float(rng.uniform(10, 40)),
        background=BACKGROUNDS[int(rng.integers(n_bg))],
        bg_colors=rng.uniform(0.05, 0.95, (3, 3)).astype(np.float32),
        hair_rgb=np.clip(hair, 0, 1),
        hair_height=float(rng.uniform(0.048, 0.085)),
        hair_wave=float(rng.uniform(0.0, 0.006)),
        glasses=bool(rng.uniform() < 0.3),
        glasses_rgb=_rgb(rng, 0.02, 0.6),
        lens_rgb=_rgb(rng, 0.5, 1.0),
    )


def sample_people(n: int, seed: int = 0) -> list[Person]:
    """``n`` people of the world ``seed`` (person i is the same for every n)."""
    return [sample_person(i, seed) for i in range(n)]


def euler_pose(yaw: float, pitch: float, roll: float) -> torch.Tensor:
    """FLAME global axis-angle (3,) of yaw/pitch/roll in degrees (edits.euler_to_matrix's axes)."""
    return matrix_to_axis_angle(euler_to_matrix(yaw, pitch, roll)[None])[0].float()


def sample_light(rng: np.random.Generator) -> torch.Tensor:
    """SH light (9,3): a distant light from the front half-space plus ambient, a tint and a little
    higher-order variation."""
    az = rng.uniform(-70, 70)
    el = rng.uniform(-25, 55)
    d = [math.sin(math.radians(az)) * math.cos(math.radians(el)), math.sin(math.radians(el)),
         math.cos(math.radians(az)) * math.cos(math.radians(el))]
    tint = np.clip(1 + rng.normal(0, 0.06, 3), 0.8, 1.2)
    light = directional_light(d, intensity=float(rng.uniform(0.9, 1.25)), color=tint.tolist(),
                              ambient=float(rng.uniform(0.35, 0.7)))
    light[4:] += torch.from_numpy(rng.normal(0, 0.04, (5, 3))).float()
    return light


def sample_expression(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp (50,), jaw axis-angle (3,)): a little of everything plus up to two clear expressions."""
    exp = rng.normal(0, 0.15, 50)
    names = list(EXPRESSIONS)
    for _ in range(int(rng.integers(0, 3))):
        k = EXPRESSIONS[names[int(rng.integers(len(names)))]]
        exp[k] += rng.uniform(0.4, 1.2)
    jaw = np.zeros(3)
    if rng.uniform() < 0.3:
        jaw[0] = rng.uniform(0.05, 0.3)  # mouth open
    else:
        jaw[0] = abs(rng.normal(0, 0.02))
    jaw[1:] = rng.normal(0, 0.01, 2)
    return torch.from_numpy(exp).float(), torch.from_numpy(jaw).float()


def sample_photo_params(person: Person, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One photo's conditions for ``person``, batch 1.

    Face parameters ``shape, tex, exp, pose, light`` as the official code names them, plus
    ``framing`` (1,3) = [zoom, dx, dy] (size of the face relative to an FFHQ-aligned crop and its
    shift as a fraction of the photo) and ``photo_seed`` (1,) (background jitter, sensor noise).
    ``cam`` and the crop ``tform`` follow from the framing once the face is posed:
    ``photos.frame_photo`` adds them.
    """
    yaw = float(np.clip(rng.normal(0, 13), -30, 30))
    pitch = float(np.clip(rng.normal(0, 8), -20, 20))
    roll = float(np.clip(rng.normal(0, 5), -12, 12))
    exp, jaw = sample_expression(rng)
    pose = torch.cat([euler_pose(yaw, pitch, roll), jaw])
    framing = torch.tensor([rng.uniform(0.78, 0.92), rng.normal(0, 0.015), rng.normal(0, 0.015)],
                           dtype=torch.float32)
    return {
        "shape": torch.from_numpy(person.shape.copy()).float()[None],
        "tex": torch.from_numpy(person.tex.copy()).float()[None],
        "exp": exp[None],
        "pose": pose[None],
        "light": sample_light(rng)[None],
        "framing": framing[None],
        "photo_seed": torch.tensor([int(rng.integers(2 ** 31))], dtype=torch.int64),
    }
