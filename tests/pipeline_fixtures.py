"""Small worlds for the editing-pipeline tests (tests/test_pipeline.py, tests/test_cli.py).

Builders are cached per process (not pytest fixtures) so both test files share one synthetic rig
and one tiny model without relying on conftest.py.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch

from diffusionrig_core import pipeline as P
from diffusionrig_core.diffusion import get_betas
from diffusionrig_core.model import DiffusionRig, ModelConfig

SIZE = 64  # ModelConfig.tiny().image_size


@functools.lru_cache(maxsize=None)
def assets_dir() -> Path:
    from diffusionrig_core.synthetic.assets import write_synthetic_assets

    out = Path(tempfile.mkdtemp(prefix="drig_pipeline_assets_"))
    write_synthetic_assets(out, resolution="tiny")
    return out


@functools.lru_cache(maxsize=None)
def rig():
    return P.load_rig(assets_dir(), device="cpu")


def random_params(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Plausible face parameters for the synthetic head (shape/expression codes of a few units)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    light = torch.zeros(n, 9, 3)
    light[:, 0] = 3.0 + 0.2 * r(n, 1)
    light[:, 1:4] = 0.6 * r(n, 3, 1)
    light[:, 4:] += 0.1 * r(n, 5, 3)
    pose = torch.zeros(n, 6)
    pose[:, :3] = 0.1 * r(n, 3)
    pose[:, 3] = 0.05 + 0.05 * r(n).abs()
    return {"shape": 0.7 * r(n, 100), "tex": 0.7 * r(n, 50), "exp": 0.7 * r(n, 50), "pose": pose,
            "cam": torch.cat([8.5 + 0.3 * r(n, 1), 0.02 * r(n, 2)], 1), "light": light}


def crop_tform(n: int, size: int = SIZE) -> torch.Tensor:
    k = 224.0 / size
    return torch.tensor([[k, 0, 0], [0, k, 0], [0, 0, 1.0]]).expand(n, 3, 3).clone()


def _background(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.3 + 0.4 * xx, 0.5 + 0.3 * yy, 0.6 - 0.3 * xx * yy], -1)
    return np.clip((base + 0.05 * rng.standard_normal((h, w, 3))) * 255, 0, 255).astype(np.uint8)


def aligned_portrait(n: int = 1, seed: int = 0, size: int = SIZE) -> P.Portrait:
    """A portrait whose photos are already aligned (alignment None): the face rendered on a background."""
    params = random_params(n, seed)
    tform = crop_tform(n, size)
    center = rig().ffhq_center(params)
    shell = P.Portrait(original=[np.zeros((size, size, 3), np.uint8)] * n, aligned=torch.zeros(n, 3, size, size),
                       alignment=[None] * n, params=params, tform=tform, center=center)
    prev = P.render_previews(rig(), shell)
    alpha = P._alpha(P.render(rig(), shell))[..., None].numpy()
    photos = []
    for i in range(n):
        bg = _background(size, size, seed + i).astype(np.float32)
        face = prev["rendered"][i].numpy() * 255
        photos.append(np.clip(bg * (1 - alpha[i]) + face * alpha[i], 0, 255).astype(np.uint8))
    return P.Portrait(original=photos, aligned=P._to_unit_tensor(photos), alignment=[None] * n, params=params,
                      tform=tform, center=center, names=[f"p{seed}_{i}" for i in range(n)],
                      face_mask=torch.from_numpy(alpha[..., 0]))


def quad_portrait(seed: int = 0, size: int = SIZE, hw: tuple[int, int] = (150, 190)) -> P.Portrait:
    """A portrait whose aligned crop was cut from a larger photo through a rotated quad (as FFHQ alignment)."""
    from PIL import Image

    from diffusionrig_core.align import AlignResult

    base = aligned_portrait(1, seed, size)
    h, w = hw
    photo = _background(h, w, seed + 100)
    c, half, ang = np.array([w * 0.55, h * 0.45]), 0.32 * min(h, w), np.radians(12)
    x = half * np.array([np.cos(ang), np.sin(ang)])
    y = np.array([-x[1], x[0]])
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    # put the rendered face into the photo through the quad, then cut the aligned crop out of it
    face = Image.fromarray(base.original[0]).transform((w, h), Image.QUAD, _inverse_quad_data(quad, size, w, h),
                                                      Image.BILINEAR)
    photo = np.asarray(face).copy()
    outside = np.asarray(Image.fromarray(np.full((size, size), 255, np.uint8)).transform(
        (w, h), Image.QUAD, _inverse_quad_data(quad, size, w, h), Image.BILINEAR)) < 255
    photo[outside] = _background(h, w, seed + 100)[outside]
    aligned = np.asarray(Image.fromarray(photo).transform((size, size), Image.QUAD, (quad + 0.5).flatten(),
                                                          Image.BILINEAR))
    return P.Portrait(original=[photo], aligned=P._to_unit_tensor([aligned]),
                      alignment=[AlignResult(image=aligned, quad=quad, shrink=1)], params=base.params,
                      tform=base.tform, center=base.center, names=["quad"], face_mask=base.face_mask)


def _inverse_quad_data(quad: np.ndarray, size: int, w: int, h: int) -> tuple:
    """PIL QUAD data that draws an S x S image into a w x h canvas at ``quad`` (corners of the canvas map
    back through the inverse affine map)."""
    origin, a = P._quad_map(quad, size)
    corners = np.array([[0, 0], [0, h], [w, h], [w, 0]], np.float64) - 0.5  # canvas outer edge, centres at ints
    uv = np.linalg.solve(a, (corners - origin).T).T * size  # in S-pixel outer-edge units
    return tuple(uv.flatten())


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0, mean_shape_seed: int | None = None, size: int = SIZE) -> DiffusionRig:
    """ModelConfig.tiny() (at ``size`` px) with random weights; the zero-initialised output convs get
    small random weights so the image depends on noise, buffers and latent."""
    torch.manual_seed(seed)
    config = ModelConfig.tiny()
    if size != config.image_size:
        config = ModelConfig.from_dict({**config.to_dict(), "image_size": size,
                                        "attention_resolutions": [size // 2]})
    model = DiffusionRig(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("out.2.weight") or "out_layers.3" in name:
                p.normal_(0, 0.02)
    if mean_shape_seed is not None:
        model.mean_shape = 0.7 * torch.randn(1, 100, generator=torch.Generator().manual_seed(mean_shape_seed))
    return model.eval()


_ALPHA_BAR = torch.as_tensor(np.cumprod(1 - get_betas("linear", 1000)), dtype=torch.float32)


class SmoothRig(DiffusionRig):
    """A DiffusionRig whose noise prediction is the exact one for Gaussian images N(mu, s^2) with mu
    read from the albedo buffer: a smooth, well-posed denoiser, so DDIM inversion can be checked."""

    s2 = 0.5 ** 2

    def forward(self, x_t, t, buffers, latent=None, x_start=None):
        ab = _ALPHA_BAR.to(x_t.device)[t].view(-1, 1, 1, 1)
        mu = buffers[:, 6:9] * 2 - 1
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * self.s2 + 1 - ab)


@functools.lru_cache(maxsize=None)
def smooth_model() -> SmoothRig:
    torch.manual_seed(0)
    return SmoothRig(ModelConfig.tiny()).eval()


@functools.lru_cache(maxsize=None)
def album() -> list[Path]:
    """Three synthetic photos (64 px, with their NAME.params.json sidecars) of two people, rendered
    with ``rig()`` so the true parameters match the assets the tests load."""
    from diffusionrig_core import synthetic

    out = Path(tempfile.mkdtemp(prefix="drig_pipeline_album_"))
    people = synthetic.sample_people(2, seed=0)
    paths = synthetic.write_album(out / "a", people[0], n=2, size=SIZE, rig=rig())
    paths += synthetic.write_album(out / "b", people[1], n=1, size=SIZE, rig=rig(), prefix="other")
    return [Path(p) for p in paths]


@functools.lru_cache(maxsize=None)
def model_file(size: int = SIZE) -> Path:
    from diffusionrig_core.checkpoint import save_model

    out = Path(tempfile.mkdtemp(prefix="drig_pipeline_model_")) / f"tiny{size}.safetensors"
    return save_model(tiny_model(size=size), out)
