"""The face-rig assets: where they live, which are present, and safe loaders for their formats.

FLAME, its texture space and DECA's weights are licensed files every user fetches once and puts in
one folder (see ``ASSETS``). Nothing here downloads anything.

The official files are pickles written by other programs, so every loader is restricted to the few
classes those files really contain:

* ``generic_model.pkl`` is a Python-2 pickle (``encoding='latin1'``) holding numpy arrays, one
  chumpy ``Ch`` object and one scipy sparse matrix. chumpy is not needed: a ``Ch`` pickles its array
  as ``x`` in its state dict, and a CSC matrix as ``data``/``indices``/``indptr``/``_shape``, which
  stub classes below turn into dense arrays (scipy is not imported either).
* ``landmark_embedding.npy`` is an ``np.save``'d dict with two torch tensors inside.
* ``deca_model.tar`` is a ``torch.save`` dict read with ``weights_only=True``.

The FLAME pickle is converted once into a ``.safetensors`` copy in the user cache folder, keyed on
the pickle's size and modification time; the assets folder itself is never written to.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import AssetError

FLAME_SITE = "https://flame.is.tue.mpg.de/ (register, then download 'FLAME 2020' and 'FLAME texture space')"
DECA_REPO = "https://github.com/yfeng95/DECA"


@dataclass(frozen=True)
class AssetInfo:
    """One file of the assets folder: what it is for and where a user gets it."""

    name: str
    purpose: str
    required_for: str  # "render" (needed for buffers at all) or "fit" (needed to fit photos)
    source: str


ASSETS: tuple[AssetInfo, ...] = (
    AssetInfo("generic_model.pkl", "FLAME 2020 head model (shape, expression, pose)", "render",
              f"FLAME 2020 from {FLAME_SITE}; take generic_model.pkl from the FLAME2020 zip"),
    AssetInfo("FLAME_texture.npz", "FLAME albedo (texture) space", "render",
              f"'FLAME texture space' from {FLAME_SITE}"),
    AssetInfo("head_template.obj", "mesh faces and UV layout used for rendering", "render",
              f"DECA repository {DECA_REPO}, folder data/"),
    AssetInfo("landmark_embedding.npy", "where the 68 face landmarks sit on the FLAME mesh", "render",
              f"DECA repository {DECA_REPO}, folder data/"),
    AssetInfo("deca_model.tar", "DECA encoder weights (fits FLAME parameters to a photo)", "fit",
              f"DECA's pretrained model, linked from the README of {DECA_REPO} (Google Drive)"),
)
ASSET_NAMES = {a.name: a for a in ASSETS}


def default_assets_dir() -> Path:
    """``$DIFFUSIONRIG_ASSETS``, else ``$XDG_DATA_HOME/diffusionrig/assets`` (``~/.local/share/...``)."""
    env = os.environ.get("DIFFUSIONRIG_ASSETS")
    if env:
        return Path(env).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "diffusionrig" / "assets"


def _cache_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home).expanduser() / "diffusionrig"


@dataclass(frozen=True)
class AssetStatus:
    info: AssetInfo
    path: Path
    found: bool
    size: int | None


def check_assets(dir: str | Path | None = None) -> list[AssetStatus]:
    """Which asset files are present in ``dir`` (default: ``default_assets_dir()``)."""
    root = Path(dir) if dir is not None else default_assets_dir()
    out = []
    for info in ASSETS:
        p = root / info.name
        found = p.is_file()
        out.append(AssetStatus(info, p, found, p.stat().st_size if found else None))
    return out


def format_asset_report(statuses: Iterable[AssetStatus] | None = None, dir: str | Path | None = None) -> str:
    """A human-readable list of found and missing assets, with where to get and put each missing one."""
    root = Path(dir) if dir is not None else default_assets_dir()
    statuses = list(statuses) if statuses is not None else check_assets(root)
    lines = [f"DiffusionRig assets folder: {root}",
             "(change it with --dir or the environment variable DIFFUSIONRIG_ASSETS)", ""]
    for s in statuses:
        mark = "found  " if s.found else "MISSING"
        size = ""
        if s.found and s.size is not None:
            size = f" ({s.size / 1e6:.1f} MB)" if s.size >= 1e5 else f" ({s.size / 1e3:.0f} kB)"
        lines.append(f"  [{mark}] {s.info.name}{size}: {s.info.purpose} (needed to {s.info.required_for})")
    missing = [s for s in statuses if not s.found]
    if missing:
        lines += ["", "To get the missing files (their licences do not allow us to ship them):"]
        for s in missing:
            lines.append(f"  {s.info.name}: {s.info.source}")
            lines.append(f"      put it at {s.path}")
        if all(s.info.required_for == "fit" for s in missing):
            lines += ["", "Rendering works; fitting photos needs the files above."]
    else:
        lines += ["", "All assets are present."]
    return "\n".join(lines)


def _where(path: Path) -> str:
    info = ASSET_NAMES.get(path.name)
    if info is None:
        return f"Check the file {path}."
    return f"Get it from {info.source} and put it at {path}."


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        info = ASSET_NAMES.get(path.name)
        hint = _where(path) if info else f"Get the {what} and pass its path."
        raise AssetError(f"{what} not found: {path}. {hint} "
                         "Run `diffusionrig assets` to see every file the face rig needs.")
    return path


# ----------------------------------------------------------------------------------------------
# Restricted unpickling of the FLAME model


class _ChumpyStub:
    """Stands in for ``chumpy.ch.Ch`` (and any chumpy class): keeps only the array in ``x``."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.x = None

    def __setstate__(self, state: Any) -> None:
        self.x = state.get("x") if isinstance(state, dict) else None

    def to_array(self) -> np.ndarray:
        if self.x is None:
            raise ValueError("a chumpy object without an array 'x' (only leaf Ch objects are supported)")
        arr = self.x
        return arr.to_array() if isinstance(arr, _ChumpyStub) else np.asarray(arr)


class _CscStub:
    """Stands in for scipy's ``csc_matrix``; densifies from data/indices/indptr without scipy."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.state: dict = {}

    def __setstate__(self, state: Any) -> None:
        self.state = dict(state)

    def to_array(self) -> np.ndarray:
        s = self.state
        shape = s.get("_shape", s.get("shape"))
        data, indices, indptr = (np.asarray(s[k]) for k in ("data", "indices", "indptr"))
        n_rows, n_cols = (int(v) for v in shape)
        if len(indptr) != n_cols + 1:
            raise ValueError("CSC matrix with an index pointer that does not match its shape")
        dense = np.zeros((n_rows, n_cols), dtype=data.dtype)
        cols = np.repeat(np.arange(n_cols), np.diff(indptr))
        np.add.at(dense, (indices, cols), data)  # duplicate entries add up, as scipy's todense does
        return dense


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    return _reconstruct, scalar


def _allowed_numpy(module: str, name: str) -> Any:
    _reconstruct, scalar = _numpy_reconstruct()
    if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        return {"_reconstruct": _reconstruct, "scalar": scalar}.get(name)
    if module == "numpy":
        return {"ndarray": np.ndarray, "dtype": np.dtype}.get(name)
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        return getattr(__import__("numpy._core.numeric", fromlist=["_frombuffer"]), "_frombuffer", None)
    return None


_BUILTINS = {"set": set, "frozenset": frozenset, "object": object, "list": list, "dict": dict, "tuple": tuple}


class _FlameUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_numpy(module, name)
        if found is not None:
            return found
        if module in ("__builtin__", "builtins") and name in _BUILTINS:
            return _BUILTINS[name]
        if (module, name) == ("_codecs", "encode"):  # bytes in a pickle re-saved by Python 3 (protocol 2)
            import codecs
            return codecs.encode
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyStub
        if module in ("scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse") and name == "csc_matrix":
            return _CscStub
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _dense(value: Any) -> Any:
    if isinstance(value, (_ChumpyStub, _CscStub)):
        return value.to_array()
    return value


# The arrays DECA reads from the pickle; the rest (J, bs_style, bs_type) is unused.
_FLAME_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")


def _flame_from_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            raw = _FlameUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError, OSError) as exc:
        raise AssetError(f"{path} is not a readable FLAME model pickle ({exc}). The file may be truncated "
                         f"or another file. {_where(path)}") from exc
    if not isinstance(raw, dict):
        raise AssetError(f"{path} is a pickle but not a FLAME model (no dict inside). {_where(path)}")
    missing = [k for k in _FLAME_KEYS if k not in raw]
    if missing:
        raise AssetError(f"{path} is not a FLAME model: it lacks {', '.join(missing)}. "
                         f"DiffusionRig needs the FLAME 2020 generic_model.pkl. {_where(path)}")
    out: dict[str, np.ndarray] = {}
    for key in _FLAME_KEYS:
        try:
            arr = np.asarray(_dense(raw[key]))
        except (ValueError, KeyError, TypeError) as exc:
            raise AssetError(f"{path}: entry {key!r} cannot be read ({exc}). {_where(path)}") from exc
        # DECA converts every float array to float32 before use; indices become int64.
        out[key] = arr.astype(np.int64) if arr.dtype.kind in "iu" else arr.astype(np.float32)
    _check_flame(out, path)
    return out


def _check_flame(d: dict[str, np.ndarray], path: Path) -> None:
    v = d["v_template"]
    n_v = v.shape[0] if v.ndim == 2 else -1
    problems = []
    if v.ndim != 2 or v.shape[1] != 3:
        problems.append(f"v_template has shape {v.shape}, expected (V, 3)")
    if d["shapedirs"].shape[:2] != (n_v, 3) or d["shapedirs"].shape[2] < 350:
        problems.append(f"shapedirs has shape {d['shapedirs'].shape}, expected ({n_v}, 3, >=350)")
    if d["posedirs"].shape != (n_v, 3, 36):
        problems.append(f"posedirs has shape {d['posedirs'].shape}, expected ({n_v}, 3, 36)")
    if d["J_regressor"].shape != (5, n_v):
        problems.append(f"J_regressor has shape {d['J_regressor'].shape}, expected (5, {n_v})")
    if d["weights"].shape != (n_v, 5):
        problems.append(f"weights has shape {d['weights'].shape}, expected ({n_v}, 5)")
    if d["kintree_table"].shape != (2, 5):
        problems.append(f"kintree_table has shape {d['kintree_table'].shape}, expected (2, 5)")
    if d["f"].ndim != 2 or d["f"].shape[1] != 3:
        problems.append(f"f has shape {d['f'].shape}, expected (F, 3)")
    if problems:
        raise AssetError(f"{path} is not a FLAME 2020 model: " + "; ".join(problems) + f". {_where(path)}")


def _cache_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def _flame_cache_candidates(path: Path) -> list[Path]:
    """A copy next to the pickle is used when present; new copies go to the user cache folder,
    so the assets folder (often shared or read-only) is never written to."""
    import hashlib
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return [path.with_name(path.stem + ".safetensors"),
            _cache_dir() / "flame" / f"{path.stem}-{digest}.safetensors"]


def _read_flame_cache(cache: Path, key: str) -> dict[str, np.ndarray] | None:
    if not cache.is_file():
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(cache), framework="numpy") as fh:
            meta = fh.metadata() or {}
            if meta.get("source_key") != key or meta.get("format") != "diffusionrig-flame-v1":
                return None
            return {k: fh.get_tensor(k) for k in _FLAME_KEYS}
    except Exception:  # a broken cache is rebuilt, never trusted
        return None


def _write_atomic_safetensors(arrays: dict[str, np.ndarray], target: Path, metadata: dict[str, str]) -> None:
    from .files import atomic_save_safetensors

    atomic_save_safetensors({k: np.ascontiguousarray(v) for k, v in arrays.items()}, target, metadata)


def load_flame_model(path: str | Path, cache: bool = True) -> dict[str, np.ndarray]:
    """Read FLAME's ``generic_model.pkl`` without chumpy or scipy.

    Returns the arrays DECA uses (``v_template, shapedirs, posedirs, J_regressor, weights,
    kintree_table, f``), floats as float32 (DECA's own conversion) and integers as int64.
    A ``.safetensors`` copy is written to ``$XDG_CACHE_HOME/diffusionrig/flame`` (default
    ``~/.cache/...``) and used while the pickle's size and mtime are unchanged; a matching
    ``generic_model.safetensors`` placed next to the pickle is used too.
    A ``.safetensors`` path is also accepted directly.
    """
    path = _require_file(path, "FLAME model")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        try:
            d = load_file(str(path))
        except Exception as exc:
            raise AssetError(f"{path} is not a readable safetensors file ({exc}).") from exc
        missing = [k for k in _FLAME_KEYS if k not in d]
        if missing:
            raise AssetError(f"{path} is not a FLAME model file: it lacks {', '.join(missing)}.")
        _check_flame(d, path)
        return d
    key = _cache_key(path)
    if cache:
        for candidate in _flame_cache_candidates(path):
            hit = _read_flame_cache(candidate, key)
            if hit is not None:
                return hit
    arrays = _flame_from_pickle(path)
    if cache:
        meta = {"format": "diffusionrig-flame-v1", "source": path.name, "source_key": key}
        try:
            _write_atomic_safetensors(arrays, _flame_cache_candidates(path)[1], meta)
        except OSError:
            pass  # no writable cache: load from the pickle every time (fast enough, just slower)
    return arrays


# ----------------------------------------------------------------------------------------------
# OBJ


def load_obj(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Faces (F,3) int64, UV coordinates (T,2) float32 and UV faces (F,3) int64 of an OBJ file.

    Only ``vt`` and ``f`` lines matter (DECA ignores the template's vertex positions). Faces with more
    than three corners are split into a fan; 1-based and negative (relative) indices are accepted.
    """
    path = _require_file(path, "head template OBJ")
    n_v = 0
    uvs: list[tuple[float, float]] = []
    faces: list[tuple[int, int, int]] = []
    uvfaces: list[tuple[int, int, int]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise AssetError(f"cannot read {path}: {exc}. {_where(path)}") from exc

    def index(token: str, count: int, lineno: int) -> int:
        i = int(token)
        i = i - 1 if i > 0 else count + i
        if not 0 <= i < count:
            raise AssetError(f"{path}, line {lineno}: index {token} is out of range (only {count} defined)")
        return i

    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        tag = parts[0]
        try:
            if tag == "v":
                n_v += 1
            elif tag == "vt":
                uvs.append((float(parts[1]), float(parts[2])))
            elif tag == "f":
                corners = [p.split("/") for p in parts[1:]]
                if len(corners) < 3:
                    raise AssetError(f"{path}, line {lineno}: a face needs at least 3 corners")
                vi = [index(c[0], n_v, lineno) for c in corners]
                if any(len(c) < 2 or c[1] == "" for c in corners):
                    raise AssetError(f"{path}, line {lineno}: face without UV indices; the head template "
                                     f"must give 'f v/vt v/vt v/vt'. {_where(path)}")
                ti = [index(c[1], len(uvs), lineno) for c in corners]
                for k in range(1, len(corners) - 1):
                    faces.append((vi[0], vi[k], vi[k + 1]))
                    uvfaces.append((ti[0], ti[k], ti[k + 1]))
        except (ValueError, IndexError) as exc:
            raise AssetError(f"{path}, line {lineno}: not a valid OBJ line ({line.strip()[:60]!r}). "
                             f"{_where(path)}") from exc
    if not faces:
        raise AssetError(f"{path} has no faces; it is not a head template OBJ. {_where(path)}")
    return (np.asarray(faces, dtype=np.int64), np.asarray(uvs, dtype=np.float32),
            np.asarray(uvfaces, dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# Landmark embedding (np.save'd dict with torch tensors inside)


def _tensor_from_legacy_bytes(data: bytes) -> Any:
    import torch
    return torch.load(io.BytesIO(data), weights_only=True)


class _EmbeddingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_numpy(module, name)
        if found is not None:
            return found
        if (module, name) == ("collections", "OrderedDict"):
            import collections
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            import torch._utils
            return getattr(torch._utils, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _tensor_from_legacy_bytes  # torch's own version unpickles without weights_only
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


_EMBEDDING_KEYS = ("static_lmk_faces_idx", "static_lmk_bary_coords", "dynamic_lmk_faces_idx",
                   "dynamic_lmk_bary_coords", "full_lmk_faces_idx", "full_lmk_bary_coords")


def load_landmark_embedding(path: str | Path) -> dict[str, np.ndarray]:
    """DECA's ``landmark_embedding.npy`` as numpy arrays (faces int64, barycentrics float32)."""
    path = _require_file(path, "landmark embedding")
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(fh)
            if dtype != np.dtype(object) or shape != ():
                raise ValueError(f"expected a pickled dict, found an array {shape} {dtype}")
            obj = _EmbeddingUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, RuntimeError,
            UnicodeDecodeError, OSError) as exc:
        raise AssetError(f"{path} is not a readable landmark embedding ({exc}). {_where(path)}") from exc
    d = obj[()] if isinstance(obj, np.ndarray) else obj
    if not isinstance(d, dict) or any(k not in d for k in _EMBEDDING_KEYS):
        raise AssetError(f"{path} is not DECA's landmark embedding (expected the keys "
                         f"{', '.join(_EMBEDDING_KEYS)}). {_where(path)}")
    out = {}
    for k in _EMBEDDING_KEYS:
        v = d[k]
        v = v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else np.asarray(v)
        out[k] = v.astype(np.int64) if "faces" in k else v.astype(np.float32)
    if out["dynamic_lmk_faces_idx"].shape[0] != 79 or out["static_lmk_faces_idx"].shape[0] != 51:
        raise AssetError(f"{path}: unexpected landmark layout (need 79 dynamic rows and 51 static points).")
    return out


# ----------------------------------------------------------------------------------------------
# Texture space


def load_texture_space(path: str | Path, n_tex: int = 50) -> dict[str, Any]:
    """The albedo space as ``mean`` (H,W,3) and ``basis`` (H,W,3,n_tex) float32, already divided by 255.

    Both FLAME's ``FLAME_texture.npz`` (``mean``/``tex_dir`` in 0..255) and DECA's BFM-derived
    ``FLAME_albedo_from_BFM.npz`` (``MU``/``PC`` in 0..1) are read; the last axis stays in the file's
    channel order (BGR for FLAME's file), which ``FlameTexture`` flips as DECA does.
    """
    path = _require_file(path, "texture space")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if {"mean", "tex_dir"} <= keys:
                mean, basis, scale, kind = z["mean"], z["tex_dir"], 255.0, "FLAME"
            elif {"MU", "PC"} <= keys:
                mean, basis, scale, kind = z["MU"], z["PC"], 1.0, "BFM"
            else:
                raise AssetError(f"{path} has keys {sorted(keys)}; a FLAME texture space has 'mean' and "
                                 f"'tex_dir'. {_where(path)}")
    except AssetError:
        raise
    except Exception as exc:
        raise AssetError(f"{path} is not a readable .npz texture space ({exc}). {_where(path)}") from exc
    n_comp = basis.shape[-1]
    if n_comp < n_tex:
        raise AssetError(f"{path} has {n_comp} texture components; {n_tex} are needed.")
    if mean.ndim != 3:  # BFM stores flat vectors of a 512x512x3 map
        side = int(round((mean.size / 3) ** 0.5))
        if side * side * 3 != mean.size:
            raise AssetError(f"{path}: cannot infer the texture map size from {mean.shape}.")
        mean = mean.reshape(side, side, 3)
        basis = basis.reshape(side, side, 3, n_comp)
    if basis.shape[:3] != mean.shape:
        raise AssetError(f"{path}: basis {basis.shape} does not match mean {mean.shape}.")
    basis = basis[..., :n_tex]
    return {"mean": (mean.astype(np.float32) / np.float32(scale)).astype(np.float32),
            "basis": (basis.astype(np.float32) / np.float32(scale)).astype(np.float32),
            "kind": kind}


# ----------------------------------------------------------------------------------------------
# DECA checkpoint


def load_deca_tar(path: str | Path) -> dict[str, Any]:
    """``deca_model.tar`` read with ``torch.load(weights_only=True)``; returns its dict (``E_flame`` ...)."""
    import torch
    path = _require_file(path, "DECA model")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AssetError(f"{path} cannot be read as a DECA checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}). The file may be truncated or "
                         f"not DECA's model. {_where(path)}") from exc
    if not isinstance(ckpt, dict) or "E_flame" not in ckpt or not isinstance(ckpt["E_flame"], dict):
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise AssetError(f"{path} is not a DECA checkpoint: it has no 'E_flame' weights (found {keys}). "
                         f"{_where(path)}")
    return ckpt


def describe_assets_json(dir: str | Path | None = None) -> str:
    """The asset status as JSON (for tools)."""
    return json.dumps([{"name": s.info.name, "found": s.found, "path": str(s.path),
                        "required_for": s.info.required_for, "source": s.info.source}
                       for s in check_assets(dir)], indent=2)
