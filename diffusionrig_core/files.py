"""Files that are never seen half-written, and their digests.

Every file DiffusionRig writes for a user to keep (models, datasets, caches, training state) goes
through ``atomic_write_bytes``: a temporary file in the same folder, fsync, rename over the target,
fsync the folder. A crash at any point leaves at worst a stray ``.tmp-*`` file, never a truncated
file under the real name.

Tensor files are streamed (``write_safetensors``): written from the tensors' own memory, or from
pinned copies of GPU tensors, never assembled in memory first; and what they hold is recorded as a
digest taken while they are written (``PieceDigest``), so a checkpoint's manifest costs no second
read of 1.6 GB.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

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


def _atomically(path: PathLike, write: Callable[[BinaryIO], Any]) -> Any:
    """``write(f)`` into a temporary file beside ``path``, fsync, rename over ``path``, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            result = write(f)
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
    return result


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the whole new one."""
    _atomically(path, lambda f: f.write(data))


def atomic_link(src: PathLike, dst: PathLike) -> None:
    """``dst`` becomes the same file as ``src`` (a hard link; a copy where the file system cannot link),
    atomically: a file written once need not be written twice."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}-link"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or one without hard links
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 24)
                fo.flush()
                os.fsync(fo.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# A digest that many cores take at once
# ---------------------------------------------------------------------------------------------
PIECE = 1 << 26  # 64 MiB
_HASHERS = min(8, os.cpu_count() or 1)
_hash_pool = ThreadPoolExecutor(_HASHERS, thread_name_prefix="diffusionrig-hash")  # (threads start on first use)


def _sha256_of(pieces: list[Any]) -> bytes:
    h = hashlib.sha256()
    for piece in pieces:
        h.update(piece)  # (hashlib lets go of the GIL for large buffers)
    return h.digest()


class PieceDigest:
    """SHA-256 over the SHA-256 digests of a byte stream's 64 MiB pieces, the pieces hashed on a
    thread pool while the stream is still being written. One SHA-256 of a whole 1 GB training state
    took 1.2 s on an H100 machine's CPU, longer than writing it."""

    def __init__(self) -> None:
        self.jobs: list[Future] = []
        self.pending: list[memoryview] = []
        self.filled = 0

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), PIECE - self.filled)
            self.pending.append(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == PIECE:
                self._submit()

    def _submit(self) -> None:
        self.jobs.append(_hash_pool.submit(_sha256_of, self.pending))
        self.pending, self.filled = [], 0

    def hexdigest(self) -> str:
        """Waits for the pieces; the buffers given to ``update`` must live until then."""
        if self.pending or not self.jobs:
            self._submit()
        return hashlib.sha256(b"".join(job.result() for job in self.jobs)).hexdigest()


def piece_digest(path: PathLike) -> str:
    """``PieceDigest`` of a file on disk (the pieces read one after another, hashed in parallel)."""
    digest = PieceDigest()
    with open(path, "rb") as f:
        while True:
            piece = f.read(PIECE)
            if not piece:
                break
            if len(digest.jobs) >= _HASHERS:  # at most one piece a hashing thread held in memory
                digest.jobs[-_HASHERS].result()
            digest.update(piece)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# safetensors, streamed
# ---------------------------------------------------------------------------------------------
_ST_DTYPES = {
    "torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
    "torch.uint8": "U8", "torch.uint16": "U16", "torch.uint32": "U32", "torch.uint64": "U64", "torch.bool": "BOOL",
}


@dataclasses.dataclass(frozen=True)
class Written:
    """What a file holds: its size and ``piece_digest``, known without reading it back."""

    size: int
    digest: str


def write_safetensors(f: BinaryIO, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                      sync: bool = False) -> Written:
    """Write ``tensors`` (torch tensors on any device, or numpy arrays) to the open file ``f`` in the
    safetensors format, hashing as it goes.

    No copy of the whole file is built in memory: CPU tensors are written from their own memory, and
    GPU tensors are staged once through one pinned buffer (copies of a 256 model one tensor at a time
    into a ``bytes`` object took 1.2-1.8 s on an H100 host and held the GIL). The data is laid out
    largest element size first, as the safetensors library does, so every tensor stays aligned.
    ``sync``: fsync the file while the last pieces are still being hashed."""
    import numpy as np
    import torch

    items = []
    for name, t in tensors.items():
        t = t.detach() if isinstance(t, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(t))
        if str(t.dtype) not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in a safetensors file")
        items.append((name, t))
    items.sort(key=lambda item: (-item[1].element_size(), item[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[str(t.dtype)], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    staged = _stage_on_cpu([t for _, t in items])
    digest = PieceDigest()
    for block in [len(head).to_bytes(8, "little"), head, *staged]:
        digest.update(block)
        f.write(block)
    if sync:
        f.flush()
        os.fsync(f.fileno())
    return Written(8 + len(head) + offset, digest.hexdigest())


_STAGING_BLOCK = 1 << 25  # 32 MiB


def _stage_on_cpu(tensors: list[Any]) -> list[memoryview]:
    """Each tensor's bytes in CPU memory, in order; GPU tensors copied on the current stream (a
    checkpoint writer's own) into pinned blocks, waited for once.

    The blocks are 32 MiB: pinning memory holds a driver lock that every other CUDA call waits on,
    and pinning the 1.6 GB of a 256 checkpoint at once held a training loop on another thread ~1 s
    (a stall at every run's first checkpoint). In blocks this small the loop's queued work covers
    each wait, and PyTorch keeps the blocks for the next checkpoint."""
    import torch

    out: list[memoryview] = []
    block, used = None, 0
    device = None
    for t in tensors:
        n = t.numel() * t.element_size()
        if t.device.type == "cpu":
            flat = t.contiguous().reshape(-1)
            out.append(memoryview(flat.view(torch.uint8).numpy()) if n else memoryview(b""))
            continue
        device = t.device
        if block is None or used + n > block.numel():
            block = torch.empty(max(_STAGING_BLOCK, n), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            used = 0
        dst = block[used:used + n]
        if n:
            dst.view(t.dtype).view(t.shape).copy_(t, non_blocking=True)
        out.append(memoryview(dst.numpy()))
        used += -(-n // 16) * 16  # the next tensor starts aligned for any dtype
    if device is not None:
        torch.cuda.current_stream(device).synchronize()
    return out


def save_safetensors(path: PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Written:
    """``write_safetensors`` to a new file at ``path``, fsynced (inside a folder that is renamed into
    place as a whole; ``atomic_save_safetensors`` for a file on its own)."""
    with open(path, "wb") as f:
        return write_safetensors(f, tensors, metadata, sync=True)


def atomic_save_safetensors(tensors: Mapping[str, Any], path: PathLike, metadata: Mapping[str, str] | None = None) -> Written:
    """Save torch tensors or numpy arrays as a safetensors file, atomically."""
    return _atomically(path, lambda f: write_safetensors(f, tensors, metadata, sync=True))


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
