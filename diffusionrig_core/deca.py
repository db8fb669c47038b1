"""DECA's coarse encoder (E_flame) and the official photo -> 224 crop (spec 4.5, 4.6).

The crop reproduces DiffusionRig's ``TestData`` without scikit-image: the anti-aliased resize
(``skimage.transform.resize`` = Gaussian pre-filter + ``scipy.ndimage.zoom`` in grid mode, then
truncation to uint8), the landmark box enlarged by 1.1 and 1.25, the similarity transform onto
0..223, and the bilinear warp with zero padding and pixel centres at integer coordinates.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .encoder import ResNet
from .errors import AssetError, ImageError

CROP = 224
CODE_SPLIT = (("shape", 100), ("tex", 50), ("exp", 50), ("pose", 6), ("cam", 3), ("light", 27))
CODE_DIM = sum(n for _, n in CODE_SPLIT)  # 236


class DECAEncoder(nn.Module):
    """ResNet-50 features -> Linear(2048,1024) -> ReLU -> Linear(1024,236); loads ``E_flame``.

    Input: the 224 crop, RGB in [0, 1], no normalisation. Output: the 236-number code.
    """

    def __init__(self):
        super().__init__()
        self.encoder = ResNet("resnet50", num_outputs=None)
        self.layers = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, CODE_DIM))

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        return self.layers(self.encoder(crop))

    def encode(self, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        return decompose_code(self(crop))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> "DECAEncoder":
        """Build from an ``E_flame`` state dict (as in ``deca_model.tar``)."""
        model = cls()
        own = model.state_dict()
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own and not k.startswith("encoder.fc.")]
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            detail = "; ".join(x for x in (
                f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                f"wrong shape {wrong[:3]}" if wrong else "") if x)
            raise AssetError(f"{source}: 'E_flame' is not DECA's coarse encoder ({detail}). "
                             "Use DECA's deca_model.tar from https://github.com/yfeng95/DECA.")
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        return model.eval()

    @classmethod
    def from_checkpoint(cls, path) -> "DECAEncoder":
        from .assets import load_deca_tar
        return cls.from_state_dict(load_deca_tar(path)["E_flame"], str(path))


def decompose_code(code: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split the (B,236) code into shape|tex|exp|pose|cam|light, light reshaped row-major to (B,9,3)."""
    if code.ndim != 2 or code.shape[1] != CODE_DIM:
        raise ValueError(f"expected a (B, {CODE_DIM}) DECA code, got {tuple(code.shape)}")
    out, start = {}, 0
    for name, n in CODE_SPLIT:
        out[name] = code[:, start:start + n]
        start += n
    out["light"] = out["light"].reshape(code.shape[0], 9, 3)
    return out


# ----------------------------------------------------------------------------------------------
# TestData's resize


def resize_like_testdata(image: np.ndarray, size: int) -> np.ndarray:
    """``(resize(image, (size, size), anti_aliasing=True) * 255).astype(uint8)`` as TestData does.

    image: uint8 (H, W, 3). Aspect ratio is not kept (the official code squashes to a square).
    Even a same-size call changes the image (x * (1/255) * 255 truncates some values one level down).
    """
    from scipy import ndimage as ndi

    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError("resize_like_testdata expects a uint8 (H, W, 3) image")
    img = np.multiply(image, 1.0 / 255, dtype=np.float64)  # skimage's img_as_float
    in_shape = np.array(img.shape, dtype=np.float64)
    factors = np.divide(in_shape, np.array((size, size, img.shape[2]), dtype=np.float64))
    sigma = np.maximum(0, (factors - 1) / 2)
    filtered = ndi.gaussian_filter(img, sigma, cval=0, mode="mirror")
    zoom = [1 / f for f in factors]
    out = ndi.zoom(filtered, zoom, order=1, mode="mirror", cval=0, grid_mode=True)
    np.clip(out, img.min(), img.max(), out=out)
    return (out * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Landmarks -> crop


def crop_tform(landmarks68: np.ndarray | None, image_hw: tuple[int, int], scale: float = 1.25) -> np.ndarray:
    """The official 3x3 similarity (float64) from image pixels to the 224 crop (spec 4.6).

    ``landmarks68=None`` reproduces TestData's no-face fallback (whole image, with its h/w swap).
    """
    if landmarks68 is None:
        h, w = image_hw
        left, right, top, bottom = 0, h - 1, 0, w - 1
    else:
        kpt = np.asarray(landmarks68, dtype=np.float64)
        if kpt.ndim != 2 or kpt.shape[0] != 68 or kpt.shape[1] < 2:
            raise ValueError(f"expected 68x2 landmarks, got shape {kpt.shape}")
        left, right = np.min(kpt[:, 0]), np.max(kpt[:, 0])
        top, bottom = np.min(kpt[:, 1]), np.max(kpt[:, 1])
    old_size = (right - left + bottom - top) / 2 * 1.1
    cx, cy = right - (right - left) / 2.0, bottom - (bottom - top) / 2.0
    size = int(old_size * scale)
    if size <= 0:
        raise ImageError("the face is too small to crop (its landmarks span less than a pixel)")
    k = (CROP - 1) / size
    return np.array([[k, 0.0, -k * (cx - size / 2)],
                     [0.0, k, -k * (cy - size / 2)],
                     [0.0, 0.0, 1.0]], dtype=np.float64)


def warp_bilinear(image: np.ndarray, inverse: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """skimage-style ``warp(image, inverse, output_shape)`` with order 1, zero outside.

    Output pixel (r, c) samples the source at inverse @ (c, r, 1); pixel centres sit at integers.
    image (H, W, C) float64 -> (h, w, C) float64.
    """
    h_in, w_in = image.shape[:2]
    rows, cols = np.meshgrid(np.arange(out_hw[0], dtype=np.float64), np.arange(out_hw[1], dtype=np.float64),
                             indexing="ij")
    m = inverse
    x = m[0, 0] * cols + m[0, 1] * rows + m[0, 2]
    y = m[1, 0] * cols + m[1, 1] * rows + m[1, 2]
    wz = m[2, 0] * cols + m[2, 1] * rows + m[2, 2]
    if not np.all(wz == 1):
        x, y = x / wz, y / wz
    r0, c0 = np.floor(y), np.floor(x)
    r1, c1 = np.ceil(y), np.ceil(x)
    dr, dc = (y - r0)[..., None], (x - c0)[..., None]

    def pixel(r, c):
        ok = (r >= 0) & (r < h_in) & (c >= 0) & (c < w_in)
        ri = np.clip(r, 0, h_in - 1).astype(np.int64)
        ci = np.clip(c, 0, w_in - 1).astype(np.int64)
        return np.where(ok[..., None], image[ri, ci], 0.0)

    top = (1 - dc) * pixel(r0, c0) + dc * pixel(r0, c1)
    bottom = (1 - dc) * pixel(r1, c0) + dc * pixel(r1, c1)
    return (1 - dr) * top + dr * bottom


def crop_from_landmarks(image: np.ndarray, landmarks68: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder input of one resized S x S uint8 image: (crop (3,224,224) float32, tform (3,3) float32).

    ``landmarks68`` are in the coordinates of ``image`` (x = column, y = row); ``tform`` maps image
    pixels to crop pixels, as the official code returns it.
    """
    t = crop_tform(landmarks68, image.shape[:2])
    crop = warp_bilinear(image / 255.0, np.linalg.inv(t), (CROP, CROP))
    return (torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))).float(),
            torch.from_numpy(t).float())
