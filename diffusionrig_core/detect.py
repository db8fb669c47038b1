"""68-point face landmarks without run-time downloads.

Default backend: dlib's HOG frontal face detector (run with one upsampling, as the official
``align.py``) and its 68-point shape predictor, whose model file ships in the
``face-recognition-models`` package. That package imports ``pkg_resources`` on import (gone from
recent setuptools), so its folder is located through ``importlib.util.find_spec`` without importing it.

Optional backend ``"fan"``: the ``face_alignment`` package (DECA's own choice); it downloads its
weights on first use, which is why it is not the default.

Several faces: all are returned, largest first; callers use the first unless told otherwise
(``face_index``).
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

from .errors import AssetError, InputError, NoFaceError

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
_INSTALL_HINT = "pip install dlib-bin face-recognition-models"
_lock = threading.Lock()
_dlib_models: dict[str, object] = {}
_fan_models: dict[str, object] = {}


def dlib_predictor_path() -> Path:
    """Path of dlib's 68-landmark model inside the installed ``face_recognition_models`` package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None:
        raise AssetError(f"the dlib landmark model is missing: the package face-recognition-models is not "
                         f"installed. Run `{_INSTALL_HINT}`.")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        candidate = Path(folder) / "models" / PREDICTOR_FILE
        if candidate.is_file():
            return candidate
    raise AssetError(f"{PREDICTOR_FILE} was not found in the face-recognition-models package "
                     f"({', '.join(folders)}). Reinstall it: `{_INSTALL_HINT}`.")


def _dlib():
    try:
        import dlib
    except ImportError as exc:
        raise AssetError(f"face detection needs dlib, which is not installed. Run `{_INSTALL_HINT}` "
                         "(or pass landmarks yourself).") from exc
    with _lock:
        if not _dlib_models:
            _dlib_models["detector"] = dlib.get_frontal_face_detector()
            _dlib_models["predictor"] = dlib.shape_predictor(str(dlib_predictor_path()))
    return _dlib_models["detector"], _dlib_models["predictor"]


def _detect_dlib(image: np.ndarray, upsample: int) -> list[tuple[float, np.ndarray]]:
    detector, predictor = _dlib()
    img = np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)
    faces = []
    for rect in detector(img, upsample):
        shape = predictor(img, rect)
        lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        faces.append((float(rect.width() * rect.height()), lm))
    return faces


def _detect_fan(image: np.ndarray, device: str) -> list[tuple[float, np.ndarray]]:
    try:
        import face_alignment
    except ImportError as exc:
        raise AssetError("the 'fan' landmark backend needs the face_alignment package: "
                         "`pip install face-alignment` (it downloads its weights on first use), "
                         "or use the default dlib backend.") from exc
    with _lock:
        model = _fan_models.get(device)
        if model is None:
            kind = getattr(face_alignment.LandmarksType, "TWO_D", None) or face_alignment.LandmarksType._2D
            model = face_alignment.FaceAlignment(kind, flip_input=False, device=device)
            _fan_models[device] = model
    found = model.get_landmarks(np.ascontiguousarray(image[:, :, :3])) or []
    faces = []
    for lm in found:
        lm = np.asarray(lm, dtype=np.float64)[:, :2]
        span = lm.max(0) - lm.min(0)
        faces.append((float(span[0] * span[1]), lm))
    return faces


def detect_landmarks(image: np.ndarray, backend: str = "dlib", upsample: int = 1,
                     device: str = "cpu") -> list[np.ndarray]:
    """68 landmarks (x, y) of every face in an RGB uint8 image, largest face first.

    Raises NoFaceError when no face is found.
    """
    if image.ndim != 3 or image.shape[2] < 3:
        raise InputError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    if backend == "dlib":
        faces = _detect_dlib(image, upsample)
    elif backend == "fan":
        faces = _detect_fan(image, device)
    else:
        raise InputError(f"unknown landmark backend {backend!r}; use 'dlib' (default) or 'fan'")
    if not faces:
        h, w = image.shape[:2]
        raise NoFaceError(f"no face found in the {w}x{h} photo ({backend} detector). Use a photo where one face "
                          "is clearly visible, roughly frontal and at least about 80 pixels wide, or give the "
                          "68 landmarks yourself.")
    faces.sort(key=lambda t: -t[0])
    return [lm for _, lm in faces]


def pick_face(faces: list[np.ndarray], face_index: int = 0) -> np.ndarray:
    """The face to use: ``face_index`` 0 = largest (the default everywhere)."""
    if not -len(faces) <= face_index < len(faces):
        raise InputError(f"face_index {face_index} is out of range: {len(faces)} face(s) found "
                         f"(0 = largest, 1 = next largest, ...)")
    return faces[face_index]
