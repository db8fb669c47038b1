"""Datasets of (image, buffers) for training: build, store, read, and import official LMDBs.

On disk a dataset is a folder:

* ``index.json``: format/version, item count, image size, buffer dtype, the shards with their item
  counts, the source file names in item order, the album's mean DECA shape (or null) and the
  settings it was built with. It is written last, atomically: a folder without it is not a dataset.
* ``shard-NNNNN.safetensors`` (``SHARD_SIZE`` items each): ``images`` uint8 (N,H,W,3) RGB,
  ``buffers`` (N,9,H,W) rendered | normal | albedo exactly as the rig renders them, and, when the
  dataset was fitted here, the DECA parameters ``params.<name>`` and crop transforms ``tform``.
* ``report.json``: what was built and which photos failed, by name, with the reason.

Buffers are float32 by default: the official LMDB holds float32 and float32 keeps training
bit-for-bit comparable with it. ``buffer_dtype="float16"`` halves the disk size (2.4 MB -> 1.2 MB
per 256 px item; FFHQ 70k: 165 GB -> 83 GB) at a relative error of ~5e-4 on the buffers, far below
what the 8-bit photos carry. Readers always hand out float32.

safetensors holds raw arrays only (no pickled objects) and is memory-mapped on read, so a reader in
a DataLoader worker touches only the items it is asked for.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .files import atomic_save_safetensors, atomic_write_json, fsync_dir
from .errors import DiffusionRigError, ImageError, InputError, NoFaceError

PathLike = str | os.PathLike

FORMAT = "diffusionrig-dataset"
VERSION = 1
SHARD_SIZE = 256
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
BUFFER_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
@dataclass
class DatasetReport:
    """What a dataset build or import produced. ``failed`` lists (file name, reason) per skipped photo."""

    out_dir: str
    count: int = 0
    size: int = 0
    sources: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files without an image extension
    mean_shape: list[float] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed"] = [{"name": n, "reason": r} for n, r in self.failed]
        return d

    def write(self, path: PathLike | None = None) -> Path:
        path = Path(path) if path is not None else Path(self.out_dir) / "report.json"
        atomic_write_json(path, self.to_dict())
        return path

    def summary(self) -> str:
        lines = [f"{self.count} items of {self.size}x{self.size} written to {self.out_dir} in {self.seconds:.1f} s"]
        if self.failed:
            lines.append(f"{len(self.failed)} photo(s) skipped:")
            lines += [f"  {name}: {reason}" for name, reason in self.failed]
        if self.ignored:
            lines.append(f"{len(self.ignored)} file(s) ignored (not an image extension)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


class DatasetWriter:
    """Appends items and writes full shards as they fill; ``finish`` writes ``index.json`` last.

    Refuses a folder that already holds a dataset unless ``overwrite``; overwriting removes the old
    ``index.json`` first so a half-rewritten folder is never read as a dataset.
    """

    def __init__(self, out_dir: PathLike, size: int, buffer_dtype: str = "float32",
                 shard_size: int = SHARD_SIZE, overwrite: bool = False):
        if buffer_dtype not in BUFFER_DTYPES:
            raise InputError(f"buffer_dtype must be one of {sorted(BUFFER_DTYPES)}, got {buffer_dtype!r}")
        self.out_dir = Path(out_dir)
        self.size = int(size)
        self.buffer_dtype = buffer_dtype
        self.shard_size = int(shard_size)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        index = self.out_dir / "index.json"
        if index.exists():
            if not overwrite:
                raise InputError(f"{self.out_dir} already holds a dataset; choose another folder or pass overwrite")
            index.unlink()
            fsync_dir(self.out_dir)
        for old in self.out_dir.glob("shard-*.safetensors"):
            old.unlink()
        self._pending: list[dict[str, torch.Tensor]] = []
        self.shards: list[dict[str, Any]] = []
        self.names: list[str] = []

    def add(self, name: str, image: np.ndarray | torch.Tensor, buffers: torch.Tensor,
            extras: dict[str, torch.Tensor] | None = None) -> None:
        image = image if isinstance(image, torch.Tensor) else torch.tensor(np.asarray(image))
        if image.dtype != torch.uint8 or tuple(image.shape) != (self.size, self.size, 3):
            raise InputError(f"{name}: dataset images must be uint8 ({self.size},{self.size},3), "
                             f"got {image.dtype} {tuple(image.shape)}")
        if tuple(buffers.shape) != (9, self.size, self.size):
            raise InputError(f"{name}: buffers must be (9,{self.size},{self.size}), got {tuple(buffers.shape)}")
        item = {"images": image.cpu(), "buffers": buffers.detach().cpu().to(BUFFER_DTYPES[self.buffer_dtype])}
        for key, value in (extras or {}).items():
            item[key] = value.detach().cpu().float()
        if self._pending and set(item) != set(self._pending[0]):
            raise InputError(f"{name}: every item of a dataset must carry the same fields")
        self._pending.append(item)
        self.names.append(name)
        if len(self._pending) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        tensors = {key: torch.stack([item[key] for item in self._pending]) for key in self._pending[0]}
        name = _shard_name(len(self.shards))
        atomic_save_safetensors(tensors, self.out_dir / name, {"format": FORMAT})
        self.shards.append({"file": name, "count": len(self._pending)})
        self._pending = []

    def finish(self, mean_shape: torch.Tensor | None = None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        self._flush()
        if not self.names:
            raise InputError(f"no usable images: nothing was written to {self.out_dir}")
        index = {
            "format": FORMAT,
            "version": VERSION,
            "count": len(self.names),
            "size": self.size,
            "buffer_dtype": self.buffer_dtype,
            "shards": self.shards,
            "names": self.names,
            # float32 -> Python float -> JSON repr -> float32 is exact
            "mean_shape": None if mean_shape is None else [float(v) for v in mean_shape.detach().cpu().float().reshape(-1)],
            "settings": settings or {},
        }
        atomic_write_json(self.out_dir / "index.json", index)
        return index


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def is_dataset(path: PathLike) -> bool:
    return (Path(path) / "index.json").is_file()


def to_model_image(images_uint8: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float in [-1, 1], as ToTensor + Normalize(0.5, 0.5) computes it."""
    x = images_uint8.movedim(-1, -3).float().div(255)
    return x.sub(0.5).div(0.5)


class RigDataset(torch.utils.data.Dataset):
    """A dataset folder as a torch Dataset of ``(image (3,H,W) in [-1,1], buffers (9,H,W) float32)``.

    Shards are opened lazily with safetensors' ``safe_open`` (memory-mapped, one handle set per
    process, so it works in DataLoader workers, forked or spawned) and only the requested item is
    read. ``mean_shape`` is the album's (1,100) mean DECA shape, or None for per-image shapes.
    """

    def __init__(self, path: PathLike):
        self.root = Path(path)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise InputError(
                f"{self.root} is not a DiffusionRig dataset (no index.json); build one with "
                "`diffusionrig dataset PHOTOS OUT` or import an official LMDB with `diffusionrig import-lmdb`"
            )
        try:
            index = json.loads(index_path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{index_path} is not readable JSON ({exc}); rebuild the dataset") from exc
        if index.get("format") != FORMAT or int(index.get("version", 0)) > VERSION:
            raise InputError(f"{index_path} is not a dataset index this version can read "
                             f"(format {index.get('format')!r}, version {index.get('version')!r})")
        self.index = index
        self.size = int(index["size"])
        self.names: list[str] = list(index["names"])
        self.settings: dict[str, Any] = dict(index.get("settings", {}))
        ms = index.get("mean_shape")
        self.mean_shape: torch.Tensor | None = None if ms is None else torch.tensor(ms, dtype=torch.float32).reshape(1, -1)
        self._files = [self.root / s["file"] for s in index["shards"]]
        counts = [int(s["count"]) for s in index["shards"]]
        self._starts = np.cumsum([0] + counts)
        if self._starts[-1] != int(index["count"]) or len(self.names) != int(index["count"]):
            raise InputError(f"{index_path} is inconsistent (shard counts, names and count disagree); rebuild the dataset")
        for file, count in zip(self._files, counts):
            self._check_shard(file, count)
        self._handles: dict[int, Any] = {}
        self._pid = -1

    def _check_shard(self, file: Path, count: int) -> None:
        from safetensors import safe_open

        if not file.is_file():
            raise InputError(f"dataset shard {file} is missing; rebuild the dataset")
        try:
            with safe_open(str(file), framework="pt") as f:
                img = f.get_slice("images").get_shape()
                buf = f.get_slice("buffers").get_shape()
                self.keys = sorted(f.keys())
        except Exception as exc:  # safetensors raises its own error types for a corrupt header
            raise InputError(f"dataset shard {file} is unreadable ({exc}); rebuild the dataset") from exc
        s = self.size
        if list(img) != [count, s, s, 3] or list(buf) != [count, 9, s, s]:
            raise InputError(f"dataset shard {file} holds images {img} / buffers {buf}, "
                             f"expected [{count},{s},{s},3] / [{count},9,{s},{s}]; rebuild the dataset")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _handle(self, k: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # after a fork, never share the parent's file handles
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(k)
        if h is None:
            h = self._handles[k] = safe_open(str(self._files[k]), framework="pt")
        return h

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item {i} out of range for a dataset of {n}")
        i %= n
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return k, i - int(self._starts[k])

    def raw(self, i: int, key: str = "images") -> torch.Tensor:
        """One stored array of item ``i`` as saved (images uint8 HxWx3, buffers as stored, params...)."""
        k, j = self._locate(int(i))
        return self._handle(k).get_slice(key)[j : j + 1][0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_image(self.raw(i, "images")), self.raw(i, "buffers").float()

    def load_all(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item at once: images (N,3,H,W) in [-1,1] and buffers (N,9,H,W) float32 (albums, Stage 2)."""
        images, buffers = [], []
        for k in range(len(self._files)):
            h = self._handle(k)
            images.append(h.get_tensor("images"))
            buffers.append(h.get_tensor("buffers"))
        x = to_model_image(torch.cat(images).to(device))
        return x, torch.cat(buffers).to(device).float()

    def params(self, i: int) -> dict[str, torch.Tensor]:
        """The DECA parameters stored for item ``i`` (empty for imported datasets)."""
        return {k[len("params."):]: self.raw(i, k) for k in self.keys if k.startswith("params.")}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, -1
        return state


# ---------------------------------------------------------------------------------------------
# Building from photos
# ---------------------------------------------------------------------------------------------
def list_photos(photos: PathLike | Sequence[PathLike]) -> tuple[list[Path], list[str]]:
    """Image files in name order (a folder) or as given (a list), and the names of ignored files."""
    if isinstance(photos, (str, os.PathLike)):
        root = Path(photos)
        if root.is_file():
            return [root], []
        if not root.is_dir():
            raise InputError(f"{root} is neither a folder of photos nor an image file")
        entries = [p for p in sorted(root.iterdir(), key=lambda p: p.name) if p.is_file() and not p.name.startswith(".")]
        files = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS]
        # landmark files and synthetic sidecars belong to a photo: not worth a mention
        stems = {p.stem for p in files}
        ignored = [p.name for p in entries if p.suffix.lower() not in IMAGE_EXTENSIONS
                   and not any(p.name[:i] in stems for i, ch in enumerate(p.name) if ch == ".")]
        return files, ignored
    return [Path(p) for p in photos], []


def build_dataset(
    photos: PathLike | Sequence[PathLike],
    out_dir: PathLike,
    rig: Any = None,
    size: int = 256,
    use_mean_shape: bool = False,
    align: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    overwrite: bool = False,
    buffer_dtype: str = "float32",
    shard_size: int = SHARD_SIZE,
    detector: str = "dlib",
    fit: str = "auto",
) -> DatasetReport:
    """Detect, (optionally) FFHQ-align, fit DECA, render the buffers and store a dataset.

    The steps of the official ``align.py`` + ``create_data.py``: with ``align`` each photo is first
    FFHQ-aligned to ``size`` (largest face); then it is resized to ``size`` as DECA's ``TestData``
    does, landmarks are found (or read from a ``.txt``/``.mat`` next to the photo), DECA encodes the
    224 crop in batches of ``batch_size``, and the buffers are rendered at ``size``.
    ``use_mean_shape`` (albums): every item is rendered with the album's mean DECA shape, which is
    kept with the dataset (``create_data.py --use_meanshape True``). Photos that fail (unreadable,
    no face, too small to align) are skipped and reported by name with the reason; the report is
    also written to ``OUT/report.json``. Album-sized: fitted parameters are kept in memory until
    rendering (a few kB per photo) and images are rendered batch by batch.

    ``fit``: "deca" fits every photo; "sidecar" reads the true parameters of synthetic photos from
    their ``NAME.params.json`` (written by ``diffusionrig_core.synthetic``; the photo is taken as
    framed, ``align`` is not applied); "auto" (default) = "sidecar" when the rig has no DECA weights
    (the demo world's rig), else "deca".
    """
    from tqdm.auto import tqdm

    from .image_io import load_image

    t0 = time.perf_counter()
    if rig is None:
        from .rig import FaceRig

        rig = FaceRig.load()
    files, ignored = list_photos(photos)
    if not files:
        raise InputError(f"no photos found in {photos} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    out_dir = Path(out_dir)
    report = DatasetReport(out_dir=str(out_dir), size=int(size), ignored=ignored)
    settings = {"size": int(size), "use_mean_shape": bool(use_mean_shape), "align": bool(align),
                "buffer_dtype": buffer_dtype, "detector": detector,
                "source": str(photos) if isinstance(photos, (str, os.PathLike)) else "list"}

    # Synthetic photos carry their true parameters; with a rig that cannot fit (no DECA weights,
    # e.g. the demo world's) those are used instead of a fit ("oracle fit").
    if fit not in ("auto", "deca", "sidecar"):
        raise InputError(f"fit must be 'auto', 'deca' or 'sidecar', got {fit!r}")
    oracle = fit == "sidecar" or (fit == "auto" and getattr(rig, "encoder", True) is None)
    settings["fit"] = "sidecar" if oracle else "deca"

    def prepare(path: Path) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor] | None]:
        if oracle:
            return _sidecar_item(path, size, load_image)
        source: Any = path
        if align:
            from .align import ffhq_align
            from .detect import detect_landmarks, pick_face

            image = _load(path, load_image)
            source = ffhq_align(image, pick_face(detect_landmarks(image, backend=detector)), output_size=size)
        else:
            _load(path, load_image)  # a clear "unreadable" before any landmark work
        resized, crop, tform, _ = rig.prepare(source, size=size, detector=detector)
        return np.asarray(resized), crop, tform, None

    # Pass 1: prepare each photo (failures are per photo), encode the crops in batches.
    items: list[tuple[str, np.ndarray, torch.Tensor]] = []   # name, resized uint8, tform
    params_parts: list[dict[str, torch.Tensor]] = []          # in item order
    crops: list[torch.Tensor] = []

    def encode_pending() -> None:
        if crops:
            code = rig.encode(torch.stack(crops))
            params_parts.append({k: v.detach().float().cpu() for k, v in code.items()})
            crops.clear()

    bar = tqdm(total=len(files), desc="fitting", unit="photo", disable=not progress)
    for path in files:
        try:
            resized, crop, tform, true_params = prepare(path)
        except NoFaceError as exc:
            report.failed.append((path.name, f"no face found: {exc}"))
        except DiffusionRigError as exc:
            report.failed.append((path.name, str(exc)))
        else:
            items.append((path.name, resized, torch.as_tensor(tform).float().cpu().reshape(3, 3)))
            if true_params is not None:
                params_parts.append(true_params)
            else:
                crops.append(crop)
                if len(crops) == batch_size:
                    encode_pending()
        bar.update(1)
    encode_pending()
    bar.close()
    if not items:
        report.seconds = time.perf_counter() - t0
        out_dir.mkdir(parents=True, exist_ok=True)
        report.write()
        raise NoFaceError(f"none of the {len(files)} photos could be used:\n{report.summary()}")
    params = {k: torch.cat([p[k] for p in params_parts]) for k in params_parts[0]}

    mean_shape = None
    if use_mean_shape:
        from .flame import mean_shape as flame_mean_shape

        mean_shape = flame_mean_shape(params["shape"]).reshape(1, -1).float()
        params["shape"] = mean_shape.expand(len(items), -1).clone()

    # Pass 2: render in batches and write shards.
    writer = DatasetWriter(out_dir, size, buffer_dtype=buffer_dtype, shard_size=shard_size, overwrite=overwrite)
    bar = tqdm(total=len(items), desc="rendering", unit="photo", disable=not progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        p = {k: v[start : start + len(chunk)] for k, v in params.items()}
        tform = torch.stack([t for _, _, t in chunk])
        buffers = rig.render(p, tform, size).detach().float().cpu()
        for j, (name, image, _) in enumerate(chunk):
            extras = {f"params.{k}": v[j] for k, v in p.items()}
            extras["tform"] = tform[j]
            writer.add(name, image, buffers[j], extras)
        bar.update(len(chunk))
    bar.close()
    return _finish(writer, report, mean_shape, settings, t0)


def _finish(writer: "DatasetWriter", report: "DatasetReport", mean_shape: torch.Tensor | None,
            settings: dict, t0: float) -> "DatasetReport":
    """Close the dataset (its index is written last) and write the report beside it."""
    writer.finish(mean_shape=mean_shape, settings=settings)
    report.count = len(writer.names)
    report.sources = list(writer.names)
    report.mean_shape = None if mean_shape is None else [float(v) for v in mean_shape.reshape(-1)]
    report.settings = settings
    report.seconds = time.perf_counter() - t0
    report.write()
    return report


def _sidecar_item(path: Path, size: int, load_image) -> tuple[np.ndarray, None, torch.Tensor, dict[str, torch.Tensor]]:
    from .synthetic import load_sidecar

    image = _load(path, load_image)
    try:
        side = load_sidecar(path)
    except InputError as exc:
        raise InputError(f"no true parameters to use ({exc}), and the face rig has no DECA weights to fit "
                         "the photo; install deca_model.tar (see `diffusionrig assets`)") from exc
    if image.shape[:2] != (size, size):
        raise InputError(f"the synthetic photo is {image.shape[1]}x{image.shape[0]} but the dataset is {size} px; "
                         f"build it with size {image.shape[0]}")
    params = {k: v.detach().float().cpu() for k, v in side.params.items()}
    return np.ascontiguousarray(image[:, :, :3]), None, side.tform[0].float(), params


def _load(path: Path, load_image) -> np.ndarray:
    try:
        return load_image(path)
    except DiffusionRigError:
        raise
    except Exception as exc:  # PIL and OS errors of broken files
        raise ImageError(f"unreadable image ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------------------------------------
# Official create_data.py LMDB
# ---------------------------------------------------------------------------------------------
def _storage_from_bytes(payload: bytes):
    # The official tensors embed their storage as a legacy torch.save payload; torch's own
    # weights-only loader reads it (and maps a CUDA location tag to the CPU).
    if not isinstance(payload, (bytes, bytearray)):
        raise InputError("malformed pickled tensor: storage payload is not bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation notice
        storage = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise InputError(f"malformed pickled tensor: storage payload holds {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    if not isinstance(storage, torch.TypedStorage):
        raise InputError("malformed pickled tensor: expected a typed storage")
    if not (isinstance(storage_offset, int) and all(isinstance(v, int) for v in (*size, *stride))):
        raise InputError("malformed pickled tensor: offset, size and stride must be integers")
    if requires_grad or backward_hooks:
        raise InputError("malformed pickled tensor: gradients or hooks are not allowed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dtype, untyped = storage.dtype, storage.untyped()
    # set_ checks that offset/size/stride stay inside the storage
    return torch.empty(0, dtype=dtype).set_(untyped, storage_offset, tuple(size), tuple(stride))


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickles exactly what ``pickle.dump(cpu_or_cuda_tensor)`` writes, and nothing else."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise InputError(
                f"refusing to unpickle {module}.{name}: official dataset files may hold only tensors; "
                "this file is not one create_data.py writes"
            ) from None

    def persistent_load(self, pid):
        raise InputError("refusing a pickle with persistent ids: not a tensor written by create_data.py")


def load_pickled_tensor(data: bytes) -> torch.Tensor:
    """A tensor pickled with plain ``pickle`` (official LMDB values, ``mean_shape.pkl``), on the CPU."""
    try:
        value = _TensorOnlyUnpickler(io.BytesIO(data)).load()
    except DiffusionRigError:
        raise
    except Exception as exc:
        raise InputError(f"not a pickled tensor ({type(exc).__name__}: {exc})") from exc
    if not isinstance(value, torch.Tensor):
        raise InputError(f"expected a pickled tensor, found {type(value).__name__}")
    return value.contiguous()


def load_official_mean_shape(path: PathLike) -> torch.Tensor:
    """``mean_shape.pkl`` of an official album LMDB as a CPU (1,100) float32 tensor.

    The official file is a pickled **CUDA** tensor; this reads it on a CPU-only machine too.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "mean_shape.pkl"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read mean shape {path}: {exc}") from exc
    t = load_pickled_tensor(data).float().reshape(1, -1)
    if t.shape[1] != 100:
        raise InputError(f"{path} holds {t.shape[1]} numbers; a DECA mean shape has 100")
    return t


def import_official_lmdb(lmdb_dir: PathLike, out_dir: PathLike, overwrite: bool = False, progress: bool = True,
                         shard_size: int = SHARD_SIZE) -> DatasetReport:
    """Convert an LMDB written by the official ``create_data.py`` into a dataset folder.

    Buffers and images come out exactly as stored (float32 buffers, PNG-decoded uint8 images);
    ``mean_shape.pkl`` next to ``data.mdb`` becomes the dataset's mean shape. Items with a missing
    key are reported and skipped. Needs the ``lmdb`` package (``pip install lmdb``).
    """
    try:
        import lmdb
    except ImportError as exc:
        raise InputError("importing an official LMDB needs the lmdb package: pip install lmdb") from exc
    from PIL import Image
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    lmdb_dir = Path(lmdb_dir)
    if not (lmdb_dir / "data.mdb").is_file():
        raise InputError(f"{lmdb_dir} is not an LMDB folder (no data.mdb)")
    env = lmdb.open(str(lmdb_dir), readonly=True, lock=False, readahead=False, meminit=False, subdir=True)
    report = DatasetReport(out_dir=str(out_dir))
    writer = None
    try:
        with env.begin(write=False) as txn:
            raw_length = txn.get(b"length")
            if raw_length is None:
                raise InputError(f"{lmdb_dir} has no 'length' key: not written by create_data.py")
            length = int(raw_length.decode("ascii"))
            for i in tqdm(range(length), desc="importing", unit="item", disable=not progress):
                name = f"image_{i:06d}"
                values = {k: txn.get(f"{k}_{i:06d}".encode()) for k in ("image", "rendered", "normal", "albedo")}
                missing = [k for k, v in values.items() if v is None]
                if missing:
                    report.failed.append((name, f"missing key(s) {', '.join(f'{k}_{i:06d}' for k in missing)}"))
                    continue
                try:
                    with Image.open(io.BytesIO(values["image"])) as im:
                        image = np.array(im.convert("RGB"))
                except Exception as exc:
                    report.failed.append((name, f"unreadable PNG ({exc})"))
                    continue
                buffers = torch.cat([load_pickled_tensor(values[k]).float() for k in ("rendered", "normal", "albedo")])
                if writer is None:
                    size = image.shape[0]
                    writer = DatasetWriter(out_dir, size, shard_size=shard_size, overwrite=overwrite)
                    report.size = size
                if image.shape != (writer.size, writer.size, 3) or tuple(buffers.shape) != (9, writer.size, writer.size):
                    report.failed.append((name, f"image {image.shape} / buffers {tuple(buffers.shape)} do not match "
                                                f"the dataset size {writer.size}"))
                    continue
                writer.add(name, image, buffers)
    finally:
        env.close()
    mean_path = lmdb_dir / "mean_shape.pkl"
    mean_shape = load_official_mean_shape(mean_path) if mean_path.is_file() else None
    if writer is None:
        raise InputError(f"{lmdb_dir} holds no usable items")
    settings = {"size": writer.size, "use_mean_shape": mean_shape is not None, "imported_from": str(lmdb_dir),
                "buffer_dtype": "float32"}
    return _finish(writer, report, mean_shape, settings, t0)
