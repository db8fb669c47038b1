"""The official FFHQ-style alignment of album photos (``scripts/align.py``, spec 5.2).

Same geometry, same Pillow calls (LANCZOS where the official code says ANTIALIAS, the QUAD
transform with ``quad + 0.5``, reflect padding blurred towards the median), so results equal the
official PNGs. Two deliberate differences: a photo too small for the output raises ImageError
instead of being skipped silently, and the result carries the quad (where the aligned square sits
in the original photo) so an edited face can be pasted back.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ImageError


@dataclass
class AlignResult:
    """An aligned face and where it came from.

    ``quad`` (4,2) float64: the corners top-left, bottom-left, bottom-right, top-right of the aligned
    square's outer edge, in pixel coordinates of the original photo (pixel centres at integers,
    x = column). ``shrink`` is the integer factor the photo was first reduced by (1 = none).
    """

    image: np.ndarray
    quad: np.ndarray
    shrink: int

    def to_original_matrix(self) -> np.ndarray:
        """3x3 map from aligned-image pixel coordinates (x, y) to the original photo (least squares)."""
        n = self.image.shape[0]
        src = np.array([[-0.5, -0.5], [-0.5, n - 0.5], [n - 0.5, n - 0.5], [n - 0.5, -0.5]])
        a = np.hstack([src, np.ones((4, 1))])
        m, *_ = np.linalg.lstsq(a, self.quad, rcond=None)
        return np.vstack([m.T, [0.0, 0.0, 1.0]])


def ffhq_quad(landmarks68: np.ndarray) -> tuple[np.ndarray, float]:
    """The oriented crop square (4,2) and its side length from 68 landmarks (x, y)."""
    lm = np.asarray(landmarks68, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected 68x2 landmarks, got {lm.shape}")
    eye_left = np.mean(lm[36:42], axis=0)
    eye_right = np.mean(lm[42:48], axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad, float(np.hypot(*x) * 2)


def ffhq_align(image: np.ndarray, landmarks68: np.ndarray, output_size: int = 256, transform_size: int = 4096,
               enable_padding: bool = True, return_quad: bool = False) -> np.ndarray | AlignResult:
    """Align one face of an RGB uint8 photo as the official ``image_align`` does.

    Returns the aligned (output_size, output_size, 3) uint8 image, or an :class:`AlignResult` with
    ``return_quad=True``. Raises ImageError when the face region is smaller than ``output_size``.
    """
    import PIL.Image
    import scipy.ndimage

    quad, qsize = ffhq_quad(landmarks68)
    quad_orig = quad.copy()
    img = PIL.Image.fromarray(np.ascontiguousarray(image[:, :, :3]).astype(np.uint8), "RGB")
    full_w, full_h = img.size

    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(img.size[0]) / shrink)), int(np.rint(float(img.size[1]) / shrink)))
        img = img.resize(rsize, PIL.Image.LANCZOS)
        quad /= shrink
        qsize /= shrink

    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
            int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0),
            min(crop[2] + border, img.size[0]), min(crop[3] + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= crop[0:2]

    pad = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
           int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    pad = (max(-pad[0] + border, 0), max(-pad[1] + border, 0),
           max(pad[2] - img.size[0] + border, 0), max(pad[3] - img.size[1] + border, 0))
    if enable_padding and max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        arr = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = arr.shape
        y, x, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(1.0 - np.minimum(np.float32(x) / pad[0], np.float32(w - 1 - x) / pad[2]),
                          1.0 - np.minimum(np.float32(y) / pad[1], np.float32(h - 1 - y) / pad[3]))
        blur = qsize * 0.02
        arr += (scipy.ndimage.gaussian_filter(arr, [blur, blur, 0]) - arr) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(mask, 0.0, 1.0)
        img = PIL.Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")
        quad += pad[:2]

    if img.size[0] < output_size or img.size[1] < output_size:
        raise ImageError(f"photo too small: the face region is {img.size[0]}x{img.size[1]} pixels, less than "
                         f"the {output_size}x{output_size} output. Use a larger photo (the face should be at "
                         f"least about {output_size // 2} pixels wide) or a smaller output size.")

    img = img.transform((transform_size, transform_size), PIL.Image.QUAD, (quad + 0.5).flatten(),
                        PIL.Image.BILINEAR)
    if output_size < transform_size:
        img = img.resize((output_size, output_size), PIL.Image.LANCZOS)
    out = np.asarray(img, dtype=np.uint8).copy()
    if not return_quad:
        return out
    if shrink > 1:  # the effective corners after the rounded resize, back in original pixels
        sx, sy = full_w / rsize[0], full_h / rsize[1]
        quad_orig = (quad_orig / shrink + 0.5) * [sx, sy] - 0.5
    return AlignResult(image=out, quad=quad_orig - 0.0, shrink=max(shrink, 1))
