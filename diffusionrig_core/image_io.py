"""Any photo in, RGB uint8 (H, W, 3) out.

Handles what real albums contain: greyscale, palette, RGBA (the official code keeps the first three
channels and ignores alpha; we do the same), 16-bit, CMYK and EXIF-rotated phone photos.

EXIF orientation is applied, so a portrait shot on a phone is upright. The official ``align.py`` and
DECA's ``TestData`` ignore it (they would see such a photo lying on its side); pass
``apply_exif=False`` to reproduce that.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from .errors import ImageError

if TYPE_CHECKING:
    import PIL.Image

MAX_PIXELS = 50_000_000  # 50 megapixels: larger files are refused before decoding
ImageSource = Union[str, Path, bytes, bytearray, np.ndarray, "PIL.Image.Image"]  # noqa: F821


def _from_array(arr: np.ndarray, what: str = "array") -> np.ndarray:
    arr = np.asarray(arr)
    if arr.size == 0:
        raise ImageError(f"the {what} is empty (shape {arr.shape}); give an image with pixels")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"the {what} has shape {arr.shape}, which looks channels-first; "
                         "give (H, W, 3) (e.g. tensor.permute(1, 2, 0))")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ImageError(f"the {what} has shape {arr.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise ImageError(f"the {what} has {arr.shape[0] * arr.shape[1] / 1e6:.0f} megapixels; the limit is "
                         f"{MAX_PIXELS / 1e6:.0f} MP. Downscale it first.")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 2:  # grey + alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    else:
        arr = arr[:, :, :3]  # RGBA: the alpha channel is dropped, as the official TestData does
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if arr.dtype.kind in "iu":
        hi = 65535 if arr.max() > 255 else 255
        return np.clip(np.rint(arr.astype(np.float64) * 255.0 / hi), 0, 255).astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(f"the {what} contains NaN or infinite values")
        return np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    raise ImageError(f"the {what} has dtype {arr.dtype}; expected uint8, uint16 or float in [0, 1]")


def _from_pil(img, apply_exif: bool) -> np.ndarray:
    from PIL import ImageOps
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"the image is {w}x{h} ({w * h / 1e6:.0f} megapixels); the limit is "
                         f"{MAX_PIXELS / 1e6:.0f} MP. Downscale it first.")
    if w == 0 or h == 0:
        raise ImageError("the image has no pixels")
    if apply_exif:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if mode == "I" and arr.max(initial=0) <= 255:  # 8-bit grey stored as 32-bit int
            return _from_array(arr.astype(np.uint8), "image")
        return _from_array(np.clip(arr, 0, 65535).astype(np.uint16), "image")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 if arr.max(initial=0) > 1.0 else 1.0
        return _from_array(arr / scale, "image")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        arr = np.asarray(img.convert("RGBA"))
        return _from_array(arr, "image")  # first three channels, alpha ignored
    if mode == "P" and "transparency" in img.info:
        return _from_array(np.asarray(img.convert("RGBA")), "image")
    if mode != "RGB":
        img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def load_image(src: ImageSource, apply_exif: bool = True) -> np.ndarray:
    """Read a photo (path, bytes, numpy array or PIL image) as RGB uint8 (H, W, 3).

    Raises ImageError for missing, empty, unreadable or non-image files and for images above
    50 megapixels. Arrays: uint8, uint16 (scaled to 8 bits), bool or float in [0, 1]; grey,
    grey+alpha, RGB or RGBA (alpha dropped).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, np.ndarray):
        return _from_array(src)
    if isinstance(src, Image.Image):
        return _from_pil(src, apply_exif)
    name = "the image data"
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, Path)):
        path = Path(src)
        name = str(path)
        if not path.exists():
            raise ImageError(f"image file not found: {path}")
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read {path}: {exc}") from exc
    elif hasattr(src, "read"):
        data = src.read()
    else:
        raise ImageError(f"cannot read an image from a {type(src).__name__}; give a path, bytes, "
                         "a numpy array or a PIL image")
    if len(data) == 0:
        raise ImageError(f"{name} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{name} is {w}x{h} ({w * h / 1e6:.0f} megapixels); the limit is "
                                 f"{MAX_PIXELS / 1e6:.0f} MP. Downscale it first.")
            img.load()
            return _from_pil(img, apply_exif)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name} is not an image Pillow can read (JPEG, PNG, WebP, BMP, TIFF ...)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name} is too large (limit {MAX_PIXELS / 1e6:.0f} megapixels)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name} is damaged or truncated and cannot be decoded ({exc})") from exc


def to_tensor(image: np.ndarray):
    """uint8 (H, W, 3) -> float tensor (3, H, W) in [0, 1]."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def from_tensor(t) -> np.ndarray:
    """float tensor (3, H, W) in [0, 1] -> uint8 (H, W, 3) (clamped, rounded)."""
    arr = t.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(arr)
