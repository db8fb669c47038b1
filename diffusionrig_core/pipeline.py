"""The editing API: fit a photo, edit its face parameters, render buffers, encode, sample, paste back.

The command line, the ComfyUI nodes and the Gradio app call only these functions, so none of them
holds editing logic of its own. Each step is usable alone; ``edit`` chains them the way the official
``scripts/inference.py`` does (spec section 7), plus what users need around it: a seed per image,
DDIM inversion of the source, and the edited crop pasted back into the full photo.

Reading order: types (Portrait, Edit, EditResult) -> loading -> fit -> apply_edit -> render ->
encode / sample / invert -> paste_back -> edit -> contact_sheet -> finetune -> bench_edit.
"""
from __future__ import annotations

import dataclasses
import math
import secrets
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import AssetError, CheckpointError, InputError, NoFaceError

PathLike = str | Path
Progress = Callable[[int, int], None]

PARAM_KEYS = ("shape", "tex", "exp", "pose", "cam", "light")


# ---------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)  # holds tensors: compare portraits by identity
class Portrait:
    """One or more fitted source photos (batched), everything an edit needs.

    ``alignment[i]`` is the FFHQ alignment of photo i (its quad, in the photo's own pixels, is what
    paste-back inverts) or None when the photo was already aligned (synthetic photos with a sidecar).
    ``face_mask`` is the source face's rendered alpha in the aligned frame (B,S,S), used by paste-back.
    """

    original: list[np.ndarray]          # full-resolution RGB uint8 HxWx3, EXIF applied
    aligned: torch.Tensor               # (B,3,S,S) float in [0,1]: what the model sees
    alignment: list[Any]                # AlignResult or None
    params: dict[str, torch.Tensor]     # shape, tex, exp, pose, cam, light (batched)
    tform: torch.Tensor                 # (B,3,3) official crop transform, S x S frame -> 224 crop
    center: torch.Tensor                # (B,3) official ffhq_center from the source's own shape
    names: list[str] = field(default_factory=list)
    face_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.names:
            self.names = [f"photo{i}" for i in range(len(self))]

    def __len__(self) -> int:
        return int(self.aligned.shape[0])

    @property
    def size(self) -> int:
        return int(self.aligned.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.aligned.device

    def __getitem__(self, index: int | slice) -> "Portrait":
        # an int keeps the batch dimension, so portrait[i] is a Portrait of one photo
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"portrait index {index} out of range for {len(self)} photos")
            index = slice(index % len(self), index % len(self) + 1)
        take = lambda seq: list(seq)[index]  # noqa: E731
        return Portrait(
            original=take(self.original), aligned=self.aligned[index], alignment=take(self.alignment),
            params={k: v[index] for k, v in self.params.items()}, tform=self.tform[index],
            center=self.center[index], names=take(self.names),
            face_mask=None if self.face_mask is None else self.face_mask[index],
        )

    @classmethod
    def cat(cls, portraits: Sequence["Portrait"]) -> "Portrait":
        portraits = list(portraits)
        if not portraits:
            raise InputError("Portrait.cat needs at least one portrait")
        sizes = {p.size for p in portraits}
        if len(sizes) > 1:
            raise InputError(f"cannot join portraits fitted at different sizes {sorted(sizes)}; refit at one size")
        masks = [p.face_mask for p in portraits]
        return cls(
            original=[im for p in portraits for im in p.original],
            aligned=torch.cat([p.aligned for p in portraits]),
            alignment=[a for p in portraits for a in p.alignment],
            params={k: torch.cat([p.params[k] for p in portraits]) for k in portraits[0].params},
            tform=torch.cat([p.tform for p in portraits]),
            center=torch.cat([p.center for p in portraits]),
            names=[n for p in portraits for n in p.names],
            face_mask=None if any(m is None for m in masks) else torch.cat(masks),
        )

    def to(self, device: torch.device | str) -> "Portrait":
        return Portrait(
            original=self.original, aligned=self.aligned.to(device), alignment=self.alignment,
            params={k: v.to(device) for k, v in self.params.items()}, tform=self.tform.to(device),
            center=self.center.to(device), names=self.names,
            face_mask=None if self.face_mask is None else self.face_mask.to(device),
        )


@dataclass(eq=False)  # fields hold tensors and portraits: compare edits by identity
class Edit:
    """One edit of a portrait. Every field is optional: None (or the neutral default) keeps the source's.

    Semantics follow the official inference modes: ``pose_from`` copies the global head rotation only;
    ``expression_from`` copies the expression code and the jaw; ``light_from`` copies the 9x3 SH light;
    ``latent_from`` copies the global latent (mix-and-match). Camera and albedo code are never changed.
    ``yaw``/``pitch``/``roll`` rotate the head relative to its pose; ``expression_strength`` scales the
    resulting expression code and jaw (the target's, or the source's own: 0 = neutral, 1 = as is,
    2 = exaggerated); a jaw given by value (``jaw``, ``jaw_open``) is set exactly.
    ``light_intensity``/``light_color`` scale whatever light results.
    """

    light_from: Portrait | None = None
    light_sh: torch.Tensor | None = None                       # (9,3) SH coefficients
    light_direction: tuple[float, float, float] | None = None   # toward the light: x right, y up, z to camera
    light_intensity: float = 1.0
    light_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    expression_from: Portrait | None = None
    expression: torch.Tensor | None = None                      # (50,) FLAME expression code
    jaw: tuple[float, float, float] | None = None               # jaw axis-angle (radians)
    jaw_open: float | None = None                               # degrees, alternative to ``jaw``
    expression_strength: float = 1.0
    pose_from: Portrait | None = None
    yaw: float = 0.0                                            # degrees, relative to the source
    pitch: float = 0.0
    roll: float = 0.0
    mean_shape: torch.Tensor | None = None                      # (100,); default: the model's
    latent_from: Portrait | torch.Tensor | None = None          # mix-and-match
    model: Any = None                                           # identity swap: another personal model

    # allowed ranges of the numeric fields (inclusive); the app builds its sliders from these
    RANGES = {
        "yaw": (-90.0, 90.0), "pitch": (-90.0, 90.0), "roll": (-90.0, 90.0),
        "jaw_open": (0.0, 45.0), "expression_strength": (-2.0, 3.0),
        "light_intensity": (0.0, 10.0), "light_color": (0.0, 4.0),
    }

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "Edit":
        for name, (lo, hi) in self.RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                if not isinstance(v, (int, float)) or not math.isfinite(float(v)) or not lo <= float(v) <= hi:
                    raise InputError(f"edit {name}={value!r} is out of range: it must be between {lo:g} and {hi:g}")
        if sum(x is not None for x in (self.light_from, self.light_sh, self.light_direction)) > 1:
            raise InputError("give only one of light_from, light_sh and light_direction in one edit")
        if self.jaw is not None and self.jaw_open is not None:
            raise InputError("give either jaw (axis-angle) or jaw_open (degrees), not both")
        if self.light_color is not None and len(tuple(self.light_color)) != 3:
            raise InputError(f"light_color must be 3 numbers (r, g, b), got {self.light_color!r}")
        if self.light_direction is not None:
            d = tuple(float(x) for x in self.light_direction)
            if len(d) != 3 or not all(math.isfinite(x) for x in d) or math.hypot(*d) < 1e-6:
                raise InputError(f"light_direction must be 3 finite numbers, not all zero; got {self.light_direction!r}")
        if self.jaw is not None and (len(tuple(self.jaw)) != 3 or any(abs(float(x)) > math.pi for x in self.jaw)):
            raise InputError(f"jaw must be 3 axis-angle numbers between -pi and pi radians; got {self.jaw!r}")
        if self.light_sh is not None:
            sh = torch.as_tensor(self.light_sh, dtype=torch.float32)
            if sh.numel() != 27 or not torch.isfinite(sh).all():
                raise InputError(f"light_sh must be 27 finite numbers (9 SH coefficients x RGB); got {sh.numel()}")
            if sh.abs().max() > 10:
                raise InputError("light_sh values must be between -10 and 10 (DECA lights are around -1..1)")
            self.light_sh = sh.reshape(9, 3)
        if self.expression is not None:
            e = torch.as_tensor(self.expression, dtype=torch.float32).reshape(-1)
            if e.numel() != 50 or not torch.isfinite(e).all():
                raise InputError(f"expression must be 50 finite FLAME expression coefficients; got {e.numel()}")
            if e.abs().max() > 10:
                raise InputError("expression coefficients must be between -10 and 10 (FLAME uses about -3..3)")
            self.expression = e
        if self.mean_shape is not None:
            s = torch.as_tensor(self.mean_shape, dtype=torch.float32).reshape(-1)
            if s.numel() != 100 or not torch.isfinite(s).all():
                raise InputError(f"mean_shape must be 100 finite FLAME shape coefficients; got {s.numel()}")
            self.mean_shape = s
        if self.latent_from is not None and not isinstance(self.latent_from, (Portrait, torch.Tensor)):
            raise InputError("latent_from must be a fitted Portrait or a latent tensor")
        for name in ("light_from", "expression_from", "pose_from"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Portrait):
                raise InputError(f"{name} must be a fitted Portrait (use pipeline.fit on the target photo)")
        return self

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Edit":
        """From plain values (lists for tensors/tuples); unknown keys raise InputError listing the known ones."""
        known = cls.field_names()
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise InputError(f"unknown edit {', '.join(map(repr, unknown))}; known edits: {', '.join(known)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if v is None:
                continue
            if k in ("light_direction", "light_color", "jaw"):
                v = tuple(float(x) for x in np.asarray(v, dtype=np.float64).reshape(-1))
            elif k in ("light_sh", "expression", "mean_shape") and not isinstance(v, torch.Tensor):
                v = torch.as_tensor(np.asarray(v, dtype=np.float32))
            elif k == "latent_from" and not isinstance(v, (Portrait, torch.Tensor)):
                v = torch.as_tensor(np.asarray(v, dtype=np.float32))
            elif k in cls.RANGES or k in ("yaw", "pitch", "roll"):
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    raise InputError(f"edit {k} must be a number, got {v!r}") from None
            kw[k] = v
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from the neutral edit, as JSON-friendly values.

        Portraits become ``{"portrait": [names]}`` and a swap model its name: enough to describe the
        edit, not to rebuild it (a Portrait is fitted from photos).
        """
        out: dict[str, Any] = {}
        neutral = Edit()
        for name in self.field_names():
            v = getattr(self, name)
            if v is None or (not isinstance(v, (torch.Tensor, Portrait)) and v == getattr(neutral, name)):
                continue
            if isinstance(v, Portrait):
                v = {"portrait": list(v.names)}
            elif isinstance(v, torch.Tensor):
                v = v.detach().cpu().reshape(-1).tolist() if name != "light_sh" else v.cpu().tolist()
            elif isinstance(v, tuple):
                v = list(v)
            elif name == "model":
                v = str(getattr(v, "metadata", {}).get("name", "model"))
            out[name] = v
        return out

    def describe_parts(self) -> list[str]:
        """Short tokens naming what this edit changes, e.g. ["yaw=15", "light<sunset"]."""
        parts = []
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                parts.append(f"{k.replace('_from', '')}<{'+'.join(v['portrait'])}")
            elif isinstance(v, list) and len(v) > 3:
                parts.append(k)
            elif isinstance(v, list):
                parts.append(f"{k}=" + ",".join(f"{x:g}" for x in v))
            elif isinstance(v, float):
                parts.append(f"{k}={v:g}")
            else:
                parts.append(f"{k}={v}")
        return parts

    def describe(self) -> str:
        """A short label for contact sheets and file names."""
        return " ".join(self.describe_parts()) or "reconstruction"


@dataclass
class EditResult:
    image: np.ndarray                   # (S,S,3) uint8, the edited aligned crop
    pasted: np.ndarray | None           # full-resolution photo with the edit pasted back
    buffers: torch.Tensor               # (9,S,S) rendered | normal | albedo
    params: dict[str, torch.Tensor]
    seed: int
    edit: Edit
    photo_index: int = 0                # which photo of the portrait this result edits
    mask: np.ndarray | None = None      # (S,S) float paste mask in the aligned frame


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _device(device: torch.device | str | None) -> torch.device:
    return default_device() if device is None else torch.device(device)


def load_rig(assets_dir: PathLike | None = None, device: torch.device | str | None = None):
    """The face rig (FLAME + DECA + renderer). ``"demo"`` = the synthetic face world's assets; None = the
    configured assets folder, or (with a warning) the demo world's when no real assets are installed."""
    from .rig import FaceRig

    device = _device(device)
    if assets_dir is not None and str(assets_dir) == "demo":
        return FaceRig.load(assets_dir=demo_assets_dir(), device=device)
    if assets_dir is None:
        try:
            return FaceRig.load(device=device)
        except AssetError as exc:
            warnings.warn(f"{exc}\nUsing the synthetic demo world's face rig instead: it edits the demo's "
                          "photos, not real ones.", stacklevel=2)
            return FaceRig.load(assets_dir=demo_assets_dir(), device=device)
    return FaceRig.load(assets_dir=assets_dir, device=device)


def demo_assets_dir() -> Path:
    """Write (once) and return the synthetic world's assets folder (real formats, made-up content).

    It lives in ``$XDG_CACHE_HOME/diffusionrig`` (default ``~/.cache``); a finished folder is moved
    into place in one rename, so two processes starting at once never see half-written files.
    """
    import os
    import shutil
    import tempfile

    from . import synthetic

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffusionrig"
    final = root / "demo_assets"
    if not (final / ".complete").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo_assets-", dir=root))
        synthetic.write_synthetic_assets(tmp)
        (tmp / ".complete").write_text("ok")
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first (or an old incomplete folder is in the way)
            if not (final / ".complete").exists():
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_model(path: PathLike, device: torch.device | str | None = None):
    """A DiffusionRig model (official ``.pt`` or our ``.safetensors``), in eval mode on ``device``.

    ``"demo"`` = the synthetic world's generic demo model, ``"demo:personal"`` its demo person's
    personal model. Anything that is not a model (an optimizer state, a truncated file, another
    network) raises CheckpointError saying so.
    """
    from . import checkpoint

    device = _device(device)
    if is_demo_name(path):
        from . import synthetic

        if not hasattr(synthetic, "demo_model_path"):
            raise CheckpointError("this installation has no demo model; give the path of a DiffusionRig model")
        kind = str(path).partition(":")[2] or "stage1"
        path = synthetic.demo_model_path(kind)
    if not Path(path).exists():
        raise CheckpointError(f"model file {path} does not exist; give the path of a .pt or .safetensors model")
    try:
        model = checkpoint.load_model(path, device=device)
    except (CheckpointError, torch.cuda.OutOfMemoryError):
        raise
    except InputError as exc:
        raise CheckpointError(f"{path} is not a usable DiffusionRig model: {exc}") from exc
    except Exception as exc:  # unpickling/safetensors errors: the file is not a model
        raise CheckpointError(
            f"{path} could not be read as a DiffusionRig model ({type(exc).__name__}: {exc}); "
            "give a model checkpoint (modelNNNNNN.pt or .safetensors), not an optimizer state or other file"
        ) from exc
    return model.eval()


def is_demo_name(path: Any) -> bool:
    """``"demo"`` (the synthetic world's generic model) or ``"demo:KIND"`` (e.g. ``demo:personal``)."""
    return isinstance(path, str) and (path == "demo" or path.startswith("demo:"))


def check_model(model, size: int | None = None) -> None:
    """Raise if ``model`` is not a DiffusionRig, or was trained at another image size than ``size``."""
    from .model import DiffusionRig

    if not isinstance(model, DiffusionRig):
        raise InputError(f"expected a DiffusionRig model, got {type(model).__name__}; load one with load_model")
    if model.config.in_channels != 12:
        raise InputError(
            f"this model takes {model.config.in_channels} input channels; DiffusionRig editing needs 12 "
            "(image + rendered, normal and albedo buffers)"
        )
    if size is not None and int(model.config.image_size) != int(size):
        raise InputError(
            f"the model works at {model.config.image_size} px but the portrait was fitted at {size} px; "
            f"fit the photo again with size={model.config.image_size}"
        )


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# Fit: photo -> landmarks -> FFHQ alignment -> DECA
# ---------------------------------------------------------------------------------------------
def _name_of(item: Any, index: int) -> str:
    if isinstance(item, (str, Path)):
        return Path(item).stem
    return str(getattr(item, "filename", "") and Path(item.filename).stem or f"photo{index}")


def _sidecar_path(item: Any) -> Path | None:
    if not isinstance(item, (str, Path)):
        return None
    p = Path(item)
    side = p.with_name(p.stem + ".params.json")
    return side if side.exists() else None


def _to_unit_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    arr = np.stack([np.asarray(im) for im in images]).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _quad_map(quad: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Affine map of the aligned crop: original pixel p = origin + A @ (aligned pixel + 0.5) / size.

    The official alignment passes (quad + 0.5) to PIL's QUAD transform, whose corners are
    top-left, bottom-left, bottom-right, top-right; the quad of FFHQ alignment is a square, so the
    bilinear QUAD map is exactly affine.
    """
    quad = np.asarray(quad, dtype=np.float64).reshape(4, 2)
    origin = quad[0]
    a = np.stack([quad[3] - quad[0], quad[1] - quad[0]], axis=1)  # columns: crop x axis, crop y axis
    return origin, a


def _landmarks_to_aligned(lms: np.ndarray, quad: np.ndarray, size: int) -> np.ndarray:
    origin, a = _quad_map(quad, size)
    uv = np.linalg.solve(a, (np.asarray(lms, np.float64) - origin).T).T * size - 0.5
    return uv.astype(np.float32)


def fit(rig, images: Sequence[Any], size: int, face_index: int = 0, align: bool = True,
        progress: Progress | None = None, use_sidecar: bool = True,
        landmarks: Sequence[np.ndarray | None] | None = None) -> Portrait:
    """Fit photos for editing: detect 68 landmarks, FFHQ-align to ``size``, fit DECA on the aligned crop.

    ``images`` are paths, uint8 arrays or PIL images. A photo with a ``NAME.params.json`` sidecar (the
    synthetic world's photos) is taken as already aligned with its stored true parameters.
    ``align=False`` takes the photos as already FFHQ-aligned (squashed to ``size`` as the official
    inference does; DECA's landmarks are detected on it, or read from ``NAME.txt`` beside it).
    ``face_index`` picks among several faces (0 = the largest). ``progress(done, total)`` is called
    after each photo is fitted. ``use_sidecar=False`` ignores sidecars (fit synthetic photos with DECA).
    ``landmarks[i]`` (68,2) in photo i's own pixels replaces its face detection (None: detect).
    """
    from .image_io import load_image

    if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "convert"):
        images = [images]
    images = list(images)
    if not images:
        raise InputError("fit needs at least one photo")
    size = int(size)
    if not 16 <= size <= 2048:
        raise InputError(f"size must be between 16 and 2048 pixels, got {size}")
    if landmarks is not None and len(landmarks) != len(images):
        raise InputError(f"{len(landmarks)} landmark sets for {len(images)} photos; give one (or None) per photo")
    device = _rig_device(rig)
    originals, names, alignments, crops, fits = [], [], [], [], []
    for k, item in enumerate(images):
        name = _name_of(item, k)
        image = load_image(item)
        sidecar = _sidecar_path(item) if use_sidecar else None
        if sidecar is not None:
            crop, fitted = _fit_from_sidecar(image, sidecar, size, device)
            crop, alignment = _to_unit_tensor([crop]), None
        else:
            given = None if landmarks is None else landmarks[k]
            crop, alignment, lms = _align(image, name, size, face_index, align, given)
            # an unaligned path goes to the rig as a path, so official NAME.txt / NAME.mat landmarks are used
            source = item if alignment is None and isinstance(item, (str, Path)) else crop
            try:
                result = rig.fit(source, landmarks=lms, size=size, face_index=face_index if lms is None else 0)
            except NoFaceError:
                raise NoFaceError(
                    f"no face found in {name!r}; use a photo where one face is clearly visible, roughly "
                    "frontal and at least about 80 pixels wide") from None
            crop = result.image.float()
            fitted = ({key: result.params[key].float() for key in PARAM_KEYS}, result.tform.float())
        originals.append(image)
        names.append(name)
        alignments.append(alignment)
        crops.append(crop)
        fits.append(fitted)
        if progress is not None:
            progress(k + 1, len(images))
    params = {key: torch.cat([f[0][key].to(device) for f in fits]) for key in PARAM_KEYS}
    tform = torch.cat([f[1].reshape(1, 3, 3).to(device) for f in fits])
    portrait = Portrait(original=originals, aligned=torch.cat([c.to(device) for c in crops]), alignment=alignments,
                        params=params, tform=tform, center=rig.ffhq_center(params).reshape(len(fits), 3),
                        names=_unique(names))
    portrait.face_mask = _alpha(render(rig, portrait))  # the source face, for paste-back masks
    return portrait


def _unique(names: list[str]) -> list[str]:
    """Distinct names (two photos called face.jpg in different folders become face, face-2)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def _align(image: np.ndarray, name: str, size: int, face_index: int, align: bool,
           landmarks: np.ndarray | None = None):
    """(aligned uint8 S x S, AlignResult or None, landmarks in aligned pixels or None)."""
    from .detect import detect_landmarks, pick_face

    if landmarks is not None:
        landmarks = np.asarray(landmarks, dtype=np.float64)
        if landmarks.shape != (68, 2):
            raise InputError(f"landmarks of {name!r} must be a (68, 2) array of (x, y); got {landmarks.shape}")
    if not align:
        if landmarks is None:
            return image, None, None  # rig.fit squashes it to S x S like the official TestData
        scale = np.array([size / image.shape[1], size / image.shape[0]])
        return image, None, (landmarks + 0.5) * scale - 0.5  # TestData's resize, on pixel centres
    if landmarks is None:
        try:
            landmarks = pick_face(detect_landmarks(image), face_index)
        except NoFaceError:
            raise NoFaceError(
                f"no face found in {name!r}; use a photo where one face is clearly visible, roughly frontal "
                "and at least about 80 pixels wide (or pass align=False / --no-align for an aligned crop)"
            ) from None
    from .align import ffhq_align

    result = ffhq_align(image, landmarks, size, return_quad=True)
    return np.asarray(result.image), result, _landmarks_to_aligned(landmarks, result.quad, size)


def _fit_from_sidecar(image: np.ndarray, sidecar: Path, size: int, device: torch.device):
    """A synthetic photo: its true parameters are stored beside it; the crop frame is the photo itself."""
    from .synthetic import load_sidecar

    raw, tform, _ = load_sidecar(sidecar)  # (params, tform (1,3,3) in the photo's pixels, landmarks)
    params = {k: torch.as_tensor(np.asarray(raw[k], dtype=np.float32)).reshape(1, *_PARAM_TAIL[k]).to(device)
              for k in PARAM_KEYS}
    tform = torch.as_tensor(np.asarray(tform, dtype=np.float32)).reshape(1, 3, 3)
    src = int(image.shape[0])
    tform = _scaled_tform(tform, src, size).to(device)  # the sidecar's tform is in the photo's own frame
    if image.shape[0] != size or image.shape[1] != size:
        from .deca import resize_like_testdata

        image = resize_like_testdata(image, size)
    return image, (params, tform)


_PARAM_TAIL = {"shape": (100,), "tex": (50,), "exp": (50,), "pose": (6,), "cam": (3,), "light": (9, 3)}


def _rig_device(rig) -> torch.device:
    dev = getattr(rig, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Edit the parameters
# ---------------------------------------------------------------------------------------------
def _take(t: torch.Tensor, n: int) -> torch.Tensor:
    """A target's values for a batch of n sources: one target is shared, n targets pair up."""
    if t.shape[0] == n:
        return t
    if t.shape[0] == 1:
        return t.expand(n, *t.shape[1:])
    raise InputError(f"a target portrait must have 1 photo or as many as the source ({n}); it has {t.shape[0]}")


def apply_edit(portrait: Portrait, edit: Edit, mean_shape: torch.Tensor | None = None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The edited face parameters and the centre to re-centre on (the source's own ffhq_center).

    Official semantics (spec 5.5): light = the 9x3 SH; expression = exp + jaw; pose = the global
    rotation only; camera and albedo code are never changed. ``mean_shape`` (or ``edit.mean_shape``)
    replaces every shape code, as a personal model was trained on its album's mean shape; the centre
    was computed from the source's own shape before that, so the face stays where it was.
    """
    from . import edits as E

    edit.validate()
    n = len(portrait)
    params = {k: v.clone() for k, v in portrait.params.items()}
    dev = params["pose"].device
    shape = edit.mean_shape if edit.mean_shape is not None else mean_shape
    if shape is not None:
        params = E.with_shape(params, torch.as_tensor(shape, dtype=torch.float32, device=dev).reshape(1, -1))

    # light: from a target, explicit SH, or a directional light; intensity and colour scale any of them
    if edit.light_from is not None:
        params = E.with_light(params, _take(edit.light_from.params["light"].to(dev), n))
    elif edit.light_sh is not None:
        params = E.light_from_sh(params, edit.light_sh.to(dev))
    elif edit.light_direction is not None:
        params = E.with_light(params, E.directional_light(edit.light_direction, intensity=edit.light_intensity,
                                                          color=edit.light_color).to(dev))
    if edit.light_direction is None and (edit.light_intensity != 1.0 or tuple(edit.light_color) != (1.0, 1.0, 1.0)):
        gain = edit.light_intensity * torch.tensor(edit.light_color, dtype=torch.float32, device=dev)
        params["light"] = params["light"] * gain.reshape(1, 1, 3)

    # expression: the code and jaw (from a target or given), scaled by the strength (0 = neutral);
    # a jaw given by value is set exactly, after the scaling
    if edit.expression_from is not None:
        params = E.expression_from(params, {k: _take(v.to(dev), n) for k, v in edit.expression_from.params.items()})
    if edit.expression is not None:
        params = E.with_expression(params, exp=edit.expression.to(dev))
    if edit.expression_strength != 1.0:
        params = E.with_expression(params, strength=edit.expression_strength)
    if edit.jaw is not None:
        params = E.with_expression(params, jaw=torch.tensor(edit.jaw, dtype=torch.float32, device=dev))
    elif edit.jaw_open is not None:
        params = E.with_expression(params, jaw=torch.tensor([math.radians(edit.jaw_open), 0.0, 0.0], device=dev))

    # head pose: the target's global rotation (jaw kept), then a relative yaw/pitch/roll
    if edit.pose_from is not None:
        params = E.pose_from(params, {k: _take(v.to(dev), n) for k, v in edit.pose_from.params.items()})
    if edit.yaw or edit.pitch or edit.roll:
        params = E.with_pose(params, yaw=edit.yaw, pitch=edit.pitch, roll=edit.roll)
    return params, portrait.center.clone()


# ---------------------------------------------------------------------------------------------
# Render the physical buffers
# ---------------------------------------------------------------------------------------------
def _scaled_tform(tform: torch.Tensor, src: int, dst: int) -> torch.Tensor:
    if src == dst:
        return tform
    scale = torch.diag(torch.tensor([src / dst, src / dst, 1.0], device=tform.device, dtype=tform.dtype))
    return tform @ scale


def _render_all(rig, portrait: Portrait, params, size) -> dict[str, torch.Tensor]:
    size = portrait.size if size is None else int(size)
    params = portrait.params if params is None else params
    tform = _scaled_tform(portrait.tform, portrait.size, size)
    return rig.render_all(params, tform, size, align_center=portrait.center)


def render(rig, portrait: Portrait, params: dict[str, torch.Tensor] | None = None,
           size: int | None = None) -> torch.Tensor:
    """The (B,9,S,S) physical buffers rendered | normal | albedo of ``params`` (default: the source's),
    re-centred on the source's ffhq_center as the official ``decode(align_ffhq=True)`` does."""
    size = portrait.size if size is None else int(size)
    params = portrait.params if params is None else params
    tform = _scaled_tform(portrait.tform, portrait.size, size)
    return rig.render(params, tform, size, align_center=portrait.center)


def render_previews(rig, portrait: Portrait, params: dict[str, torch.Tensor] | None = None,
                    size: int | None = None) -> dict[str, torch.Tensor]:
    """Displayable buffers: dict(normal, albedo, shading, rendered) of (B,S,S,3) float in [0,1]."""
    out = _render_all(rig, portrait, params, size)
    to_img = lambda t: t.permute(0, 2, 3, 1).clamp(0, 1)  # noqa: E731
    alpha = out["alpha"] if out["alpha"].dim() == 4 else out["alpha"].unsqueeze(1)
    return {
        "rendered": to_img(out["rendered"]),
        "normal": to_img((out["normal"] + 1) / 2 * alpha),
        "albedo": to_img(out["albedo"]),
        "shading": to_img(out["shading"] * alpha),
    }


def _alpha(buffers: torch.Tensor) -> torch.Tensor:
    """(B,S,S) face coverage from the buffers: the normal buffer is exactly 0 off the face (spec 4.10)."""
    return (buffers[:, 3:6].abs().sum(1) > 0).float()


def buffer_previews(buffers: torch.Tensor) -> dict[str, torch.Tensor]:
    """Displayable (B,S,S,3) [0,1] rendered / normal / albedo straight from (B,9,S,S) buffers."""
    alpha = _alpha(buffers).unsqueeze(1)
    to_img = lambda t: t.permute(0, 2, 3, 1).clamp(0, 1)  # noqa: E731
    return {"rendered": to_img(buffers[:, 0:3]), "normal": to_img((buffers[:, 3:6] + 1) / 2 * alpha),
            "albedo": to_img(buffers[:, 6:9])}


# ---------------------------------------------------------------------------------------------
# Encode, sample, invert
# ---------------------------------------------------------------------------------------------
def encode(model, images: torch.Tensor) -> torch.Tensor:
    """(B,3,S,S) images in [0,1] -> (B, latent_dim) global latents (eval mode; [-1,1] inside)."""
    check_model(model)
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"encode expects images of shape (B,3,H,W) in [0,1], got {tuple(images.shape)}")
    model.eval()
    dev = _model_device(model)
    with torch.no_grad():
        return model.encode(images.to(dev, torch.float32) * 2 - 1).float()


def _steps(steps: str | int) -> str:
    """A step option ("ddim20", 50, "50", "10,10,10") -> the respacing string, validated."""
    from .diffusion import resolve_steps, space_timesteps

    if isinstance(steps, str) and steps.strip().isdigit():
        steps = int(steps)
    try:
        spec = resolve_steps(steps)
        space_timesteps(1000, spec)
    except InputError as exc:
        raise InputError(f"steps {steps!r}: {exc}") from None
    except Exception:
        raise InputError(f"steps {steps!r} is not understood: use 'ddimN' or a number of steps N "
                         "between 1 and 1000 (e.g. ddim20, 50)") from None
    return spec


def _seed_list(seeds: list[int] | int | None, n: int) -> list[int]:
    if seeds is None:
        base = secrets.randbelow(2**31 - 1024)
        return [base + i for i in range(n)]
    if isinstance(seeds, (int, np.integer)):
        return [int(seeds) + i for i in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
        raise InputError(f"got {len(seeds)} seeds for {n} images; give one seed per image")
    return seeds


def make_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise of one image depends only on its seed (drawn on the CPU), never on the batch it is in."""
    from . import sampling

    return sampling.make_noise(tuple(shape), list(seeds), device)


def _check_conditioning(model, buffers: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_model(model)
    s = int(model.config.image_size)
    if buffers.dim() != 4 or buffers.shape[1] != 9:
        raise InputError(f"buffers must be (B,9,H,W) rendered|normal|albedo, got {tuple(buffers.shape)}")
    if buffers.shape[-1] != s or buffers.shape[-2] != s:
        raise InputError(f"the model works at {s} px but the buffers are {buffers.shape[-1]} px; render them at {s}")
    latent = latent.reshape(-1, latent.shape[-1]) if latent.dim() > 0 else latent
    if latent.shape[-1] != model.config.latent_dim:
        raise InputError(f"latent has {latent.shape[-1]} numbers but the model's latent_dim is {model.config.latent_dim}")
    if latent.shape[0] == 1 and buffers.shape[0] > 1:
        latent = latent.expand(buffers.shape[0], -1)
    if latent.shape[0] != buffers.shape[0]:
        raise InputError(f"{latent.shape[0]} latents for {buffers.shape[0]} buffers; give one per image or one for all")
    dev = _model_device(model)
    return buffers.to(dev, torch.float32), latent.to(dev, torch.float32)


_FAST: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _fast_model(model, fast: bool | None):
    """The bf16 + SDPA + channels_last wrapper (default on CUDA), made once per model."""
    if fast is None:
        fast = _model_device(model).type == "cuda"
    if not fast:
        return model
    if model not in _FAST:
        from .fast import enable_fast_path

        _FAST[model] = enable_fast_path(model)
    return _FAST[model]


def _denoiser(model, fast: bool | None, buffers: torch.Tensor, latent: torch.Tensor, x: torch.Tensor):
    """(denoise, conditioning) for the samplers: on CUDA the fast path replayed from a CUDA graph
    (kept per batch shape), which makes a step cost the GPU's time instead of the host's."""
    net = _fast_model(model, fast)
    if net is model or x.device.type != "cuda":
        return net, (buffers, latent)
    with torch.no_grad():
        return net.graphed(buffers, latent, x), (None, None)


def _progress(callback: Progress | None):
    """Our callbacks are ``callback(done, total)``; the samplers call ``(index, total, x)``."""
    if callback is None:
        return None
    return lambda k, total, x: callback(k + 1, total)


def sample(model, buffers: torch.Tensor, latent: torch.Tensor, seeds: list[int] | int | None = None,
           steps: str | int = "ddim20", eta: float = 0.0, noise: torch.Tensor | None = None,
           callback: Progress | None = None, fast: bool | None = None) -> torch.Tensor:
    """DDIM-sample images (B,3,S,S) in [0,1] from buffers (B,9,S,S) and latents (B,D).

    Each image's starting noise (and, with eta > 0, its per-step noise) comes from its own seed, so an
    image is the same whether it is sampled alone or in a batch of 8. ``noise`` (e.g. from ``invert``)
    replaces the seeded starting noise. ``fast`` (default: on CUDA) uses bf16 + SDPA.
    """
    from . import sampling

    buffers, latent = _check_conditioning(model, buffers, latent)
    if not 0.0 <= float(eta) <= 1.0:
        raise InputError(f"eta must be between 0 (deterministic DDIM) and 1, got {eta}")
    b, s = buffers.shape[0], buffers.shape[-1]
    seed_list = _seed_list(seeds, b)
    dev = buffers.device
    if noise is None:
        noise = make_noise((b, 3, s, s), seed_list, dev)
    elif tuple(noise.shape) != (b, 3, s, s):
        raise InputError(f"noise must be (B,3,S,S) = {(b, 3, s, s)}, got {tuple(noise.shape)}")
    model.eval()
    noise = noise.to(dev, torch.float32)
    denoise, cond = _denoiser(model, fast, buffers, latent, noise)
    with torch.no_grad():
        x = sampling.ddim_sample(denoise, noise, *cond, steps=_steps(steps),
                                 eta=float(eta), clip_denoised=True, seeds=seed_list, callback=_progress(callback))
    return ((x.float() + 1) / 2).clamp(0, 1)


def invert(model, images: torch.Tensor, buffers: torch.Tensor, latent: torch.Tensor,
           steps: str | int = "ddim20", callback: Progress | None = None, refine: int = 2,
           fast: bool | None = None) -> torch.Tensor:
    """DDIM inversion: the noise that deterministic DDIM (eta 0) maps back to ``images`` (B,3,S,S) in [0,1].

    ``sampling.ddim_invert`` with ``refine`` fixed-point corrections per step: the plain official
    inversion (``refine=0``) is first-order and its round trip drifts; each refinement costs one more
    network call per step and removes most of that error (numbers in tests/test_pipeline.py).
    """
    buffers, latent = _check_conditioning(model, buffers, latent)
    if tuple(images.shape) != (buffers.shape[0], 3, buffers.shape[-2], buffers.shape[-1]):
        raise InputError(f"images must be (B,3,S,S) matching the buffers, got {tuple(images.shape)}")
    if not 0 <= int(refine) <= 20:
        raise InputError(f"refine must be between 0 and 20 fixed-point iterations, got {refine}")
    model.eval()
    x0 = images.to(buffers.device, torch.float32) * 2 - 1
    denoise, cond = _denoiser(model, fast, buffers, latent, x0)
    from . import sampling

    return sampling.ddim_invert(denoise, x0, *cond, steps=_steps(steps), refine=int(refine),
                                callback=_progress(callback))


# ---------------------------------------------------------------------------------------------
# Paste back into the full photo
# ---------------------------------------------------------------------------------------------
def soft_mask(alpha: torch.Tensor | np.ndarray, grow: float = 0.04, feather: float = 0.03) -> np.ndarray:
    """A face alpha (S,S) grown by ``grow``·S pixels and feathered with a Gaussian of ``feather``·S.

    The blur is truncated at 2 sigma so the mask has compact support: beyond it the mask is exactly 0.
    The crop's outermost pixels are forced to 0 so the pasted crop never shows its own border.
    """
    from scipy import ndimage

    a = np.asarray(alpha.detach().cpu() if isinstance(alpha, torch.Tensor) else alpha, dtype=np.float32) > 0.5
    s = a.shape[-1]
    r = int(round(grow * s))
    if r > 0:
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        a = ndimage.binary_dilation(a, structure=(xx**2 + yy**2) <= r * r)
    m = a.astype(np.float32)
    sigma = feather * s
    if sigma > 0:
        m = ndimage.gaussian_filter(m, sigma, mode="constant", truncate=2.0)
        m[m < 1e-3] = 0.0
    border = max(1, int(round(sigma)))
    m[:border], m[-border:], m[:, :border], m[:, -border:] = 0, 0, 0, 0
    return np.clip(m, 0.0, 1.0)


def _as_uint8_images(images, n: int) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        if t.dim() == 4 and t.shape[1] == 3 and t.shape[-1] != 3:
            t = t.permute(0, 2, 3, 1)
        images = t.numpy()
    arr = np.asarray(images) if not isinstance(images, list) else np.stack([np.asarray(i) for i in images])
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if arr.shape[0] != n or arr.shape[-1] != 3:
        raise InputError(f"paste_back needs {n} images of shape (S,S,3), got {arr.shape}")
    return arr


def paste_back(portrait: Portrait, images, feather: float = 0.03, masks=None, grow: float = 0.04,
               indices: Sequence[int] | None = None) -> list[np.ndarray]:
    """Edited aligned crops -> the full-resolution photos with the edits pasted in.

    ``images`` (N,S,S,3) uint8 or float [0,1]; ``indices[k]`` is the photo of the portrait that image k
    edits (default 0..N-1). ``masks`` (N,S,S) are face alphas in the aligned frame (default: the
    source's face); they are grown, feathered and carried through the inverse of the alignment.
    Pixels where the mask is 0 are copied from the original photo exactly.
    """
    n = len(images) if isinstance(images, list) else int(np.shape(images)[0] if np.ndim(images) == 4 else 1)
    crops = _as_uint8_images(images, n)
    indices = list(range(n)) if indices is None else list(indices)
    if len(indices) != n:
        raise InputError(f"{len(indices)} indices for {n} images")
    s = portrait.size
    if crops.shape[1] != s:
        raise InputError(f"edited crops are {crops.shape[1]} px but the portrait was fitted at {s} px")
    out = []
    for k, i in enumerate(indices):
        if masks is not None:
            alpha = masks[k]
        elif portrait.face_mask is not None:
            alpha = portrait.face_mask[i]
        else:
            alpha = np.ones((s, s), np.float32)
        m = soft_mask(alpha, grow=grow, feather=feather)
        out.append(_paste_one(portrait.original[i], portrait.alignment[i], crops[k], m))
    return out


def _paste_one(original: np.ndarray, alignment, crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
    original = np.asarray(original)
    h, w = original.shape[:2]
    s = crop.shape[0]
    if alignment is None:
        # already-aligned photo: the crop frame is the photo frame (up to a resize)
        if (h, w) != (s, s):
            from PIL import Image

            crop = np.asarray(Image.fromarray(crop).resize((w, h), Image.LANCZOS))
            mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.BILINEAR))
        return _blend(original, crop.astype(np.float32), mask)
    origin, a = _quad_map(np.asarray(alignment.quad), s)
    quad = np.asarray(alignment.quad, np.float64).reshape(4, 2)
    x0, y0 = np.floor(quad.min(0)).astype(int) - 1
    x1, y1 = np.ceil(quad.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x0 >= x1 or y0 >= y1:
        return original.copy()
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    pts = np.stack([xs.ravel() - origin[0], ys.ravel() - origin[1]])
    uv = np.linalg.solve(a, pts) * s - 0.5  # aligned pixel coordinates (centres at integers)
    # grid_sample with align_corners=True: -1 -> pixel 0, +1 -> pixel s-1
    grid = torch.from_numpy((uv / (s - 1) * 2 - 1).T.reshape(1, y1 - y0, x1 - x0, 2).astype(np.float32))
    src = torch.from_numpy(np.concatenate([crop.astype(np.float32), mask[..., None]], -1)).permute(2, 0, 1)[None]
    warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    warped = warped.permute(1, 2, 0).numpy()
    full_mask = np.zeros((h, w), np.float32)
    full_crop = np.zeros((h, w, 3), np.float32)
    full_mask[y0:y1, x0:x1] = warped[..., 3]
    full_crop[y0:y1, x0:x1] = warped[..., :3]
    # bilinear sampling of a masked crop darkens the edge; un-premultiply is unnecessary because the
    # mask is 0 well inside the crop border (soft_mask zeroes the border), so colours there are real
    return _blend(original, full_crop, full_mask)


def _blend(original: np.ndarray, crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = np.clip(mask, 0, 1)[..., None]
    mixed = np.clip(np.rint(original.astype(np.float32) * (1 - m) + crop * m), 0, 255).astype(np.uint8)
    return np.where(m > 0, mixed, original)  # exactly the original wherever the mask is 0


# ---------------------------------------------------------------------------------------------
# The one call
# ---------------------------------------------------------------------------------------------
def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B,3,S,S) [0,1] -> (B,S,S,3) uint8, rounded like torchvision's save_image."""
    return (x.detach().float().cpu().clamp(0, 1) * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _latent_for(model, portrait: Portrait, edit: Edit, own: torch.Tensor) -> torch.Tensor:
    n = len(portrait)
    if edit.latent_from is None:
        return own
    if isinstance(edit.latent_from, Portrait):
        other = encode(model, edit.latent_from.aligned)
        return _take(other, n)
    z = edit.latent_from.to(own.device, torch.float32).reshape(-1, own.shape[-1])
    return _take(z, n)


def _steps_count(steps: str) -> int:
    from .diffusion import space_timesteps

    return len(space_timesteps(1000, steps))


def edit(model, portrait: Portrait, edits: Edit | list[Edit], rig, seed: int | None = None,
         steps: str | int = "ddim20", eta: float = 0.0, invert: bool = False, paste: bool = True,
         shared_noise: bool = True, callback: Progress | None = None, batch_size: int = 8,
         fast: bool | None = None) -> list[EditResult]:
    """Apply every edit to every photo of ``portrait``; results in photo-major order.

    Seeds: photo i uses ``seed + i`` (``seed`` random when None); with ``shared_noise`` every edit of
    a photo uses its photo's seed (and so one noise, which keeps a slider sweep consistent), otherwise
    edit j of photo i uses ``seed + i·len(edits) + j``. Each result carries its seed: editing that photo
    alone with that seed reproduces it. ``invert`` starts from the DDIM inversion of the source (with its
    own buffers and code) instead of seeded noise, so what the buffers do not describe stays put.
    ``callback(done, total)`` counts denoising steps.
    """
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    if not edits:
        raise InputError("give at least one edit (Edit() is a plain reconstruction)")
    for e in edits:
        if not isinstance(e, Edit):
            raise InputError(f"edits must be Edit objects, got {type(e).__name__}; use Edit.from_dict for plain dicts")
        e.validate()
        if e.model is not None:
            check_model(e.model, portrait.size)
    check_model(model, portrait.size)
    steps = _steps(steps)
    if not 0.0 <= float(eta) <= 1.0:
        raise InputError(f"eta must be between 0 (deterministic DDIM) and 1, got {eta}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    n, m = len(portrait), len(edits)
    base = secrets.randbelow(2**31 - 1 - n * m) if seed is None else int(seed)
    seeds = [[base + i if shared_noise else base + i * m + j for j in range(m)] for i in range(n)]

    nsteps = _steps_count(steps)
    models = {id(e.model or model): (e.model or model) for e in edits}
    chunks = lambda k: -(-k // batch_size)  # noqa: E731  (ceil)
    per_model = {key: n * sum(1 for e in edits if id(e.model or model) == key) for key in models}
    # progress counts denoiser steps of each batch: sampling, and the inversion (one fewer step)
    total = sum(nsteps * chunks(k) + ((nsteps - 1) * chunks(n) if invert else 0) for k in per_model.values())
    done = 0

    def tick(k: int = 1) -> None:
        nonlocal done
        done += k
        if callback is not None:
            callback(done, total)

    # per model: its mean shape, the source's latent, and (with invert) the inverted noise
    own_latent, start_noise = {}, {}
    for key, net in models.items():
        portrait_dev = portrait.to(_model_device(net))
        own_latent[key] = encode(net, portrait_dev.aligned)
        if invert:
            src_params, _ = apply_edit(portrait, Edit(), mean_shape=getattr(net, "mean_shape", None))
            src_buffers = render(rig, portrait, src_params)
            start_noise[key] = _invert_chunks(net, portrait_dev.aligned, src_buffers, own_latent[key],
                                              steps, batch_size, lambda *_: tick())

    # every (photo, edit) job: buffers, latent, start noise
    jobs = []  # (i, j, model key, buffers (9,S,S), latent (D,), noise or None, seed, params)
    for j, e in enumerate(edits):
        net = e.model or model
        key = id(net)
        params, _ = apply_edit(portrait, e, mean_shape=getattr(net, "mean_shape", None))
        buffers = render(rig, portrait, params)
        latent = _latent_for(net, portrait, e, own_latent[key])
        for i in range(n):
            noise = start_noise[key][i] if invert else None
            jobs.append((i, j, key, buffers[i], latent[i], noise, seeds[i][j],
                         {k: v[i:i + 1] for k, v in params.items()}))

    images: dict[tuple[int, int], np.ndarray] = {}
    for key, net in models.items():
        mine = [job for job in jobs if job[2] == key]
        for c in range(0, len(mine), batch_size):
            chunk = mine[c:c + batch_size]
            noise = torch.stack([job[5] for job in chunk]) if invert else None
            x = sample(net, torch.stack([job[3] for job in chunk]), torch.stack([job[4] for job in chunk]),
                       seeds=[job[6] for job in chunk], steps=steps, eta=eta, noise=noise,
                       callback=lambda *_: tick(), fast=fast)
            for job, img in zip(chunk, _to_uint8(x)):
                images[(job[0], job[1])] = img

    results = []
    for i in range(n):
        for j, e in enumerate(edits):
            job = next(jb for jb in jobs if jb[0] == i and jb[1] == j)
            buffers = job[3].detach().cpu()
            src_alpha = portrait.face_mask[i].cpu() if portrait.face_mask is not None else _alpha(buffers[None])[0]
            alpha = torch.maximum(src_alpha, _alpha(buffers[None])[0])  # the face where it was and where it goes
            mask = soft_mask(alpha)
            pasted = _paste_one(portrait.original[i], portrait.alignment[i], images[(i, j)], mask) if paste else None
            results.append(EditResult(image=images[(i, j)], pasted=pasted, buffers=buffers,
                                      params={k: v.detach().cpu() for k, v in job[7].items()}, seed=job[6],
                                      edit=e, photo_index=i, mask=mask))
    return results


def _invert_chunks(net, images, buffers, latent, steps, batch_size, callback) -> torch.Tensor:
    out = []
    for c in range(0, images.shape[0], batch_size):
        sl = slice(c, c + batch_size)
        out.append(invert(net, images[sl], buffers[sl], latent[sl], steps=steps, callback=callback))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Contact sheet
# ---------------------------------------------------------------------------------------------
def contact_sheet(portrait: Portrait, results: Sequence[EditResult], rig=None, cell: int | None = None):
    """A PIL image: per photo, a column for the source and one per result; rows = image, rendered,
    normal, albedo (the source column shows the source's buffers when ``rig`` is given)."""
    from PIL import Image, ImageDraw

    s = max(portrait.size, 128) if cell is None else int(cell)  # small crops are enlarged so labels fit
    line, chars = 13, max(4, s // 6)
    label_h = 2 * line + 2  # the photo's name (+ what all its results share), then one label per column
    rows_per_photo = 4
    src_prev = None
    if rig is not None:
        src_prev = {k: v.detach().cpu() for k, v in render_previews(rig, portrait).items()}
    by_photo: dict[int, list[EditResult]] = {}
    for r in results:
        by_photo.setdefault(r.photo_index, []).append(r)
    photos = sorted(set(range(len(portrait))) if not results else by_photo)
    ncols = 1 + max((len(v) for v in by_photo.values()), default=0)
    sheet = Image.new("RGB", (ncols * s, len(photos) * (label_h + rows_per_photo * s)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)

    def put(arr: np.ndarray, col: int, row: int, top: int) -> None:
        im = Image.fromarray(arr)
        if im.size != (s, s):
            im = im.resize((s, s), Image.LANCZOS)
        sheet.paste(im, (col * s, top + label_h + row * s))

    def u8(t: torch.Tensor) -> np.ndarray:
        return (t.numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)

    for p, i in enumerate(photos):
        top = p * (label_h + rows_per_photo * s)
        mine = by_photo.get(i, [])
        parts = [r.edit.describe_parts() for r in mine]
        common = [t for t in parts[0] if all(t in q for q in parts[1:])] if len(parts) > 1 else []
        title = portrait.names[i] + (" · " + " ".join(common) if common else "")
        draw.text((2, top + 1), title[: chars * ncols], fill=(230, 230, 230))
        draw.text((2, top + 1 + line), "source", fill=(160, 160, 160))
        put(_to_uint8(portrait.aligned[i:i + 1])[0], 0, 0, top)
        if src_prev is not None:
            for row, key in enumerate(("rendered", "normal", "albedo"), start=1):
                put(u8(src_prev[key][i]), 0, row, top)
        for c, (r, tokens) in enumerate(zip(mine, parts), start=1):
            label = " ".join(t for t in tokens if t not in common) or ("reconstruction" if not tokens else "")
            draw.text((c * s + 2, top + 1 + line), f"{label[:chars]} #{r.seed}"[: chars + 12], fill=(230, 230, 230))
            put(r.image, c, 0, top)
            prev = buffer_previews(r.buffers[None])
            for row, key in enumerate(("rendered", "normal", "albedo"), start=1):
                put(u8(prev[key][0]), c, row, top)
    return sheet


# ---------------------------------------------------------------------------------------------
# Personalisation (Stage 2) from a list of photos
# ---------------------------------------------------------------------------------------------
def finetune(base_model_or_path, images, rig, steps: int = 5000, out_path: PathLike | None = None,
             callback: Callable[..., None] | None = None, device: torch.device | str | None = None,
             align: bool = True, work_dir: PathLike | None = None, **train_options: Any):
    """Stage 2 from a list of photos (~20 of one person): fit them, render the buffers with the album's
    mean shape (``create_data.py --use_meanshape True``), fine-tune the UNet of the base model and
    return the personal model (its ``mean_shape`` set, saved at ``out_path`` when given).

    ``images``: paths, uint8 arrays or PIL images; synthetic photos with sidecars use their true
    parameters. Photos without a usable face are skipped (all failing raises TrainingError with the
    reasons). ``callback(step, total)`` after each update; it also gets ``loss=`` when it takes that
    keyword, and may raise to cancel. ``train_options`` go to ``train.TrainConfig`` (lr, batch_size...).
    """
    import tempfile

    from .checkpoint import save_model
    from .data import DatasetWriter
    from .errors import DiffusionRigError, TrainingError
    from .flame import mean_shape as album_mean_shape
    from .train import TrainConfig, train

    steps = int(steps)
    if not 1 <= steps <= 1_000_000:
        raise InputError(f"steps must be between 1 and 1000000, got {steps}")
    images = [images] if isinstance(images, (str, Path, np.ndarray)) else list(images)
    if not images:
        raise InputError("finetune needs photos of the person (about 20 work best)")
    work = Path(tempfile.mkdtemp(prefix="diffusionrig_stage2_") if work_dir is None else work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if isinstance(base_model_or_path, (str, Path)):
        base_path = Path(base_model_or_path)
        size = int(load_model(base_path, device="cpu").config.image_size)
    else:
        check_model(base_model_or_path)
        size = int(base_model_or_path.config.image_size)
        base_path = save_model(base_model_or_path, work / "base.safetensors")

    # the album: fit each photo (a failing photo is skipped and reported, as create_data would)
    fitted, failures = [], []
    for k, item in enumerate(images):
        try:
            fitted.append(fit(rig, [item], size=size, align=align))
        except DiffusionRigError as exc:
            failures.append(f"{_name_of(item, k)}: {exc}")
    if not fitted:
        raise TrainingError("none of the photos could be fitted:\n" + "\n".join(failures))
    album = Portrait.cat(fitted)
    mean = album_mean_shape(album.params["shape"]).reshape(1, -1).float()
    params = {**album.params, "shape": mean.expand(len(album), -1).to(album.params["shape"].device).clone()}
    buffers = rig.render(params, album.tform, size).detach().float().cpu()  # no re-centring, as create_data
    writer = DatasetWriter(work / "dataset", size, overwrite=True)
    for i, name in enumerate(album.names):
        writer.add(name, _to_uint8(album.aligned[i:i + 1])[0], buffers[i],
                   {**{f"params.{k}": v[i].detach().cpu() for k, v in params.items()}, "tform": album.tform[i].cpu()})
    writer.finish(mean_shape=mean, settings={"size": size, "use_mean_shape": True, "align": align,
                                             "source": "pipeline.finetune", "skipped": failures})

    wants_loss = callback is not None and _takes_keyword(callback, "loss")

    def on_step(step: int, loss: float) -> None:
        if callback is None:
            return
        if wants_loss:
            callback(step, steps, loss=float(loss))
        else:
            callback(step, steps)

    dev = None if device is None else str(device)
    # the official Stage 2 draws 4 photos per step; a smaller album gives all it has
    train_options.setdefault("batch_size", min(4, len(album)))
    config = TrainConfig(stage=2, max_steps=steps, device=dev, **train_options)
    path = train(config, work / "dataset", work / "run", base=base_path, progress=False, callback=on_step,
                 model_path=out_path)
    model = load_model(path, device=device)
    if getattr(model, "mean_shape", None) is None:
        model.mean_shape = mean
    return model


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


# ---------------------------------------------------------------------------------------------
# Benchmark (run by the coordinator on the GPU)
# ---------------------------------------------------------------------------------------------
def bench_edit(device: torch.device | str, size: int, n_edits: int, steps: str = "ddim20",
               repeats: int = 3, photo_size: int = 1024, batch_size: int = 16, invert: bool = False,
               fast: bool | None = None) -> dict[str, float]:
    """Seconds from a photo file to an edited, pasted-back photo (the coordinator runs this on the GPU).

    What runs is the real path with stand-in weights: a ``photo_size`` synthetic photo file is read,
    dlib looks for faces in it (timed; dlib does not see synthetic faces, so the photo's true 68
    landmarks are then used), the photo is FFHQ-aligned to ``size`` (official 4096 transform), DECA
    with random weights fits it (same cost as the real weights), the buffers are rendered, the latent
    encoded and DDIM run with a random-weight model of the official architecture at ``size``; each
    result is pasted back into the full photo. ``n_edits`` > 1 is a yaw sweep sharing one noise.
    Returns medians over ``repeats`` runs after one warm-up: detect_s, fit_s (read + align + DECA +
    source render), edit_s (render + encode + sampling), paste_s, total_s, per_edit_s.
    """
    import tempfile

    from . import synthetic
    from .deca import DECAEncoder
    from .detect import detect_landmarks
    from .image_io import load_image
    from .model import DiffusionRig, ModelConfig

    device = torch.device(device)
    tmp = Path(tempfile.mkdtemp(prefix="diffusionrig_bench_"))
    # the synthetic photo is drawn on the CPU (the photo renderer's compositing is numpy)
    photo = synthetic.write_album(tmp, synthetic.sample_people(1, seed=0)[0], n=1, size=photo_size,
                                  rig=load_rig("demo", device="cpu"))[0]
    rig = load_rig("demo", device=device)
    landmarks = synthetic.load_sidecar(photo).landmarks
    torch.manual_seed(0)
    rig.encoder = DECAEncoder().to(device).eval()  # random weights: the real ones are licensed
    model = DiffusionRig(ModelConfig(image_size=size)).to(device).eval()
    with torch.no_grad():  # random, non-zero output layers so nothing degenerates
        for name, p in model.named_parameters():
            if name.endswith("out.2.weight") or "out_layers.3" in name:
                p.normal_(0, 0.02)
    values = [15.0] if n_edits == 1 else [float(v) for v in np.linspace(-30, 30, n_edits)]
    edits = [Edit(yaw=v) for v in values]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def once() -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            detect_landmarks(load_image(photo))
        except (NoFaceError, AssetError):  # AssetError: no dlib on this machine; detection is then not timed
            pass
        t1 = time.perf_counter()
        portrait = fit(rig, [photo], size=size, use_sidecar=False, landmarks=[landmarks])
        sync()
        t2 = time.perf_counter()
        results = edit(model, portrait, edits, rig, seed=0, steps=steps, invert=invert, paste=False,
                       batch_size=batch_size, fast=fast)
        sync()
        t3 = time.perf_counter()
        for r in results:
            _paste_one(portrait.original[0], portrait.alignment[0], r.image, r.mask)
        t4 = time.perf_counter()
        return {"detect_s": t1 - t0, "fit_s": t2 - t1, "edit_s": t3 - t2, "paste_s": t4 - t3, "total_s": t4 - t0}

    once()  # warm-up: kernels, caches, lazy imports
    runs = [once() for _ in range(max(1, int(repeats)))]
    out = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    out["per_edit_s"] = out["total_s"] / max(1, n_edits)
    out.update({"size": size, "n_edits": n_edits, "steps": _steps_count(_steps(steps)), "photo_size": photo_size,
                "invert": bool(invert), "device": str(device),
                "fast": bool(fast if fast is not None else device.type == "cuda")})
    return out


__all__ = [
    "Portrait", "Edit", "EditResult", "default_device", "load_rig", "load_model", "check_model", "fit",
    "apply_edit", "render", "render_previews", "buffer_previews", "encode", "sample", "invert",
    "soft_mask", "paste_back", "edit", "contact_sheet", "finetune", "bench_edit", "make_noise",
    "demo_assets_dir",
]
