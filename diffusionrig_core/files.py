"""Files that are never seen half-written, and their digests.

Every file DiffusionRig writes for a user to keep (models, datasets, caches, training state) goes
through ``atomic_write_bytes``: a temporary file in the same folder, fsync, rename over the target,
fsync the folder. A crash at any point leaves at worst a stray ``.tmp-*`` file, never a truncated
file under the real name.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

PathLike = str | os.PathLike


def fsync_dir(path: PathLike) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); a model or dataset gets the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def atomic_save_safetensors(tensors: Mapping[str, Any], path: PathLike, metadata: dict[str, str] | None = None) -> None:
    """Save torch tensors or numpy arrays (not mixed) as a safetensors file, atomically."""
    first = next(iter(tensors.values()), None)
    if first is not None and not hasattr(first, "detach"):
        from safetensors.numpy import save
    else:
        from safetensors.torch import save
    atomic_write_bytes(path, save(dict(tensors), metadata=metadata))


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
