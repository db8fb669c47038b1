"""Stage 1 (generic prior) and Stage 2 (personal album) training: one loop for both.

What follows the official recipe (docs/OFFICIAL_SPEC.md section 6):

* Adam (betas 0.9/0.999, eps 1e-8, no weight decay), constant learning rate, gradient norm clipped
  at 1.0 after the gradients are averaged, the epsilon loss with P2 weighting (gamma = k = 1),
  uniform timesteps, dropout as the model config says (official 0.1, active in both stages).
* Stage 1 on several GPUs (torchrun): gradients averaged over the processes, BatchNorm running
  statistics of the encoder *not* synchronised across ranks and the saved model carrying rank 0's
  (quirk 11; official DDP with ``broadcast_buffers=False``). The captured CUDA step sums the flat
  gradients of ``optim.FlatAdam`` in the graph itself; other setups (CPU/gloo, no graph,
  micro-batches) use DistributedDataParallel.
* Stage 2: the base model's weights, only ``denoisingUNet.*`` trainable, **the encoder left in train
  mode** so its BatchNorm layers normalise with batch statistics and their running statistics drift
  to the album (quirk 10; the personal model's encoder buffers differ from the base's and inference
  uses them). ``TrainConfig.freeze_encoder_bn=True`` puts the encoder in eval mode instead.
  Every batch is a random choice without replacement from the album held in memory.

What differs, on purpose:

* bfloat16 autocast on CUDA (official: float16 + GradScaler); float32 on the CPU.
* Steps count updates: a checkpoint of step N holds exactly N updates (the official
  ``model005000.pt`` holds 5001, quirk 22).
* Everything random is seeded: the data order is a per-epoch permutation seeded by (seed, epoch),
  timesteps and noise come from a generator seeded by (seed, step) and drawn for the *global*
  batch, each rank taking its slice, so N ranks with batch B and one process with batch N*B and
  ``micro_batch=B`` see identical samples. Dropout uses the global RNG, whose state per rank is
  saved with every checkpoint: a resumed run continues bit for bit (CPU, float32).
* Checkpoints (``OUT/checkpoints/step_NNNNNNNN/``: ``model.safetensors``, ``ema.safetensors``,
  ``state.safetensors`` with the optimizer, step and RNG states, ``manifest.json`` with sizes and digests) are
  written into a temporary folder, fsynced and renamed; ``OUT/latest.json`` is replaced last. A
  checkpoint whose files do not match its manifest is never loaded. Stage 2 can be resumed too
  (the official code cannot, issue #14).
* An optional EMA of the weights (``ema_rate``), saved beside the raw weights.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .data import RigDataset
from .files import (atomic_link, atomic_write_bytes, atomic_write_json, fsync_dir, piece_digest,
                    save_safetensors, sha256_file)
from .errors import CheckpointError, InputError, TrainingError

PathLike = str | os.PathLike
Callback = Callable[[int, float], None]

STATE_FORMAT = "diffusionrig-train-state"
STATE_VERSION = 2  # 2: state.safetensors (1: state.pt)
STATE_FILE = "state.safetensors"

# Official defaults per stage (README commands): lr, per-GPU batch, steps, save interval.
_STAGE_DEFAULTS = {
    1: dict(lr=1e-4, batch_size=32, max_steps=50_000, save_interval=5_000, num_workers=4),
    2: dict(lr=1e-5, batch_size=4, max_steps=5_000, save_interval=2_500, num_workers=0),
}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Settings of a training run. ``None`` fields take the official default of the stage."""

    stage: int = 1
    lr: float | None = None                 # 1e-4 (stage 1) / 1e-5 (stage 2)
    batch_size: int | None = None           # per process: 32 / 4
    max_steps: int | None = None            # 50,000 / 5,000 updates
    save_interval: int | None = None        # checkpoint every N updates (0: only at the end)
    micro_batch: int | None = None          # split each batch into chunks (gradient accumulation)
    p2: bool = True
    p2_gamma: float = 1.0
    p2_k: float = 1.0
    grad_clip: float = 1.0                  # max gradient norm, 0 disables
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    dropout: float | None = None            # None: the model config's (official 0.1)
    precision: str = "auto"                 # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    ema_rate: float | None = None           # e.g. 0.9999; None: no EMA (official)
    seed: int = 0
    num_workers: int | None = None          # DataLoader workers (stage 1)
    log_interval: int = 10
    fast: bool = True                       # fused attention + channels_last on CUDA
    compile: bool | str = False             # torch.compile the UNet (True or a mode, e.g. "max-autotune-no-cudagraphs")
    cuda_graph: bool = True                 # CUDA, one process: replay each step from one captured CUDA graph
    freeze_encoder_bn: bool = False         # stage 2: official keeps encoder BN in train mode
    keep_checkpoints: int = 2               # older checkpoints are deleted
    model: dict[str, Any] | None = None     # stage 1 from scratch: ModelConfig fields (None: official for the size)
    schedule: str = "linear"
    diffusion_steps: int = 1000
    device: str | None = None               # default: cuda:LOCAL_RANK if available, else cpu

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise InputError(f"stage must be 1 (generic prior) or 2 (personal album), got {self.stage!r}")
        for key, value in _STAGE_DEFAULTS[self.stage].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.betas = tuple(float(b) for b in self.betas)
        if hasattr(self.model, "to_dict"):
            self.model = self.model.to_dict()
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InputError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.batch_size < 1 or self.max_steps < 1 or self.lr <= 0:
            raise InputError("batch_size and max_steps must be at least 1 and lr positive")
        if self.micro_batch is not None and (self.micro_batch < 1 or self.batch_size % self.micro_batch):
            raise InputError(f"micro_batch {self.micro_batch} must divide batch_size {self.batch_size}")
        if self.ema_rate is not None and not 0.0 < self.ema_rate < 1.0:
            raise InputError(f"ema_rate must be in (0, 1), e.g. 0.9999, got {self.ema_rate}")

    @classmethod
    def tiny(cls, stage: int = 1, **overrides: Any) -> "TrainConfig":
        """A CPU preset: the tiny model at 32-64 px, a few dozen steps, seconds per stage."""
        from .model import ModelConfig

        settings = dict(
            stage=stage, lr=1e-3 if stage == 1 else 3e-4, batch_size=4 if stage == 1 else 2,
            max_steps=20, save_interval=10, num_workers=0, precision="fp32", log_interval=5,
            model=ModelConfig.tiny().to_dict(), fast=False, device="cpu",
        )
        settings.update(overrides)
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------
# Distributed context
# ---------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False   # we initialised the process group (and destroy it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_hint: str | None) -> _Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on the CPU."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    use_cuda = torch.cuda.is_available() and (device_hint is None or device_hint.startswith("cuda"))
    if dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, created=False)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return _Dist(rank, world, local_rank, created=True)


def _pick_device(config: TrainConfig, ctx: _Dist) -> torch.device:
    if config.device:
        dev = torch.device(config.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", ctx.local_rank)
        return dev
    return torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _barrier(ctx: _Dist) -> None:
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Randomness: seeded per (seed, epoch) and (seed, step), RNG states per rank
# ---------------------------------------------------------------------------------------------
def _mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across runs and machines)."""
    h = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, 1, epoch)))


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_mix(seed, 2, step))


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
class StepBatchSampler(torch.utils.data.Sampler):
    """Per-rank index lists for steps ``start..stop-1`` of Stage 1.

    The global batch of step s is ``perm_e[o*G:(o+1)*G]`` with G = batch x world, e = s // (N // G),
    o = s % (N // G) (the incomplete last batch of an epoch is dropped, as the official loader does);
    rank r takes items ``r*B .. (r+1)*B-1`` of it. The position in the data is therefore a function
    of the step alone, which is what makes resuming exact.
    """

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, start: int, stop: int):
        self.n, self.batch, self.world, self.rank, self.seed = n, batch, world, rank, seed
        self.start, self.stop = start, stop
        self.global_batch = batch * world
        self.per_epoch = n // self.global_batch
        if self.per_epoch < 1:
            raise TrainingError(
                f"the dataset has {n} items but one step needs {self.global_batch} "
                f"({batch} per process x {world} processes); lower the batch size or add data"
            )

    def position(self, step: int) -> tuple[int, int]:
        return divmod(step, self.per_epoch)

    def indices(self, step: int) -> list[int]:
        epoch, offset = self.position(step)
        perm = self._perm(epoch)
        lo = offset * self.global_batch + self.rank * self.batch
        return perm[lo : lo + self.batch].tolist()

    def _perm(self, epoch: int) -> torch.Tensor:
        if getattr(self, "_cached", (None,))[0] != epoch:
            self._cached = (epoch, epoch_permutation(self.n, self.seed, epoch))
        return self._cached[1]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


class _RawItems(torch.utils.data.Dataset):
    # uint8 images travel to the device and are converted there: 4x less to copy than float.
    def __init__(self, ds: RigDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ds.raw(i, "images"), self.ds.raw(i, "buffers")


def _image_to_model(images_uint8: torch.Tensor) -> torch.Tensor:
    from .data import to_model_image

    return to_model_image(images_uint8)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _write_file_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _state_to_file(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The training state as a safetensors file's tensors and metadata: the nested dicts, lists and
    numbers as JSON, each tensor named by its path in them. Nothing in it is pickled, and the Adam
    moments are written straight from memory (``torch.save`` of them took ~1 s more)."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            name = path if path not in tensors else f"{path}#{len(tensors)}"
            tensors[name] = obj
            return {"$tensor": name}
        if isinstance(obj, dict):  # keys keep their type (the optimizer's state is keyed by int)
            return {"$dict": [[k, encode(v, f"{path}.{k}" if path else str(k))] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"$tuple": [encode(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"{path}: a {type(obj).__name__} cannot be part of the training state")

    tree = encode(state, "")
    return tensors, {"format": STATE_FORMAT, "tree": json.dumps(tree)}


def _state_from_file(tensors: dict[str, torch.Tensor], tree: Any) -> Any:
    if isinstance(tree, list):
        return [_state_from_file(tensors, v) for v in tree]
    if isinstance(tree, dict):
        if "$tensor" in tree:
            return tensors[tree["$tensor"]]
        if "$tuple" in tree:
            return tuple(_state_from_file(tensors, v) for v in tree["$tuple"])
        return {k: _state_from_file(tensors, v) for k, v in tree["$dict"]}
    return tree


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Nested dicts/lists/tuples with ``fn`` applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class _Snapshot:
    """A checkpoint's contents copied at its step, on the device they live on (milliseconds on a
    GPU, where copying them to the CPU held the loop ~2 s a time), and written later."""

    def __init__(self, step: int, final: Path, meta: dict[str, Any], files: dict[str, Any], state: dict[str, Any]):
        self.step, self.final, self.meta, self.files, self.state = step, final, meta, files, state
        devices = {t.device for t in _tensors([f.tensors for f in files.values()]) + _tensors(state) if t.is_cuda}
        self.ready = {d: torch.cuda.Event() for d in devices}
        for d, event in self.ready.items():
            event.record(torch.cuda.current_stream(d))

    @contextlib.contextmanager
    def off_the_training_stream(self) -> Iterator[None]:
        """Copies to the CPU on a stream of their own, after the snapshot: the training stream goes on."""
        with contextlib.ExitStack() as stack:
            for d, event in self.ready.items():
                stream = torch.cuda.Stream(d)
                stream.wait_event(event)
                stack.enter_context(torch.cuda.stream(stream))
            yield


def _tensors(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensors(obj, lambda t: found.append(t) or t)
    return found


def _in_background(fn: Callable[..., Any], *args: Any) -> Future:
    """``fn(*args)`` on a thread of its own; the future's ``result()`` waits and re-raises its error."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="diffusionrig-checkpoint")
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)  # the thread ends with the job


def _checkpoint_dirname(step: int) -> str:
    return f"step_{step:08d}"


def _digest_matches(path: Path, info: dict[str, Any]) -> bool:
    if "digest" in info:
        return piece_digest(path) == info["digest"]
    return sha256_file(path) == info.get("sha256")  # manifests written before the piece digest


def verify_checkpoint(ck_dir: PathLike) -> dict[str, Any] | None:
    """The manifest of a complete checkpoint folder, or None if anything is missing or altered."""
    ck_dir = Path(ck_dir)
    try:
        manifest = json.loads((ck_dir / "manifest.json").read_text("utf-8"))
        for name, info in manifest["files"].items():
            f = ck_dir / name
            if not f.is_file() or f.stat().st_size != int(info["size"]) or not _digest_matches(f, info):
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_checkpoint(out_dir: PathLike, verbose: bool = True) -> Path | None:
    """The newest checkpoint of a run folder that verifies: ``latest.json``'s first, then the others."""
    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    candidates: list[Path] = []
    try:
        latest = json.loads((out_dir / "latest.json").read_text("utf-8"))
        candidates.append(out_dir / latest["dir"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if root.is_dir():
        candidates += sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)
    seen = set()
    for c in candidates:
        if c in seen:
            continue
        seen.add(c)
        if verify_checkpoint(c) is not None:
            return c
        if verbose:
            print(f"warning: checkpoint {c} is incomplete or altered; ignoring it", file=sys.stderr)
    return None


def load_training_state(ck_dir: PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state of a checkpoint (``state.safetensors``: tensors, and JSON for the rest; the
    ``state.pt`` of older checkpoints is read with ``weights_only=True``)."""
    path = Path(ck_dir) / STATE_FILE
    try:
        if not path.is_file() and (Path(ck_dir) / "state.pt").is_file():
            path = Path(ck_dir) / "state.pt"
            state = torch.load(path, map_location=map_location, weights_only=True)
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device=str(map_location)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != STATE_FORMAT:
                    raise CheckpointError(f"{path} is not a DiffusionRig training state")
                state = _state_from_file({k: f.get_tensor(k) for k in f.keys()}, json.loads(meta["tree"]))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read the training state {path} ({exc}); start a new run or use an older checkpoint") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a DiffusionRig training state")
    return state


# ---------------------------------------------------------------------------------------------
# Loss read-back without stalling the GPU
# ---------------------------------------------------------------------------------------------
class _LossTap:
    """Hands back step s's loss while step s+1 runs: a non-blocking copy into pinned memory and an
    event, so reading a loss every step (progress bar, callback) never drains the CUDA queue."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[int, Any, Any]] = []
        if self.cuda:
            self.bufs = [torch.zeros((), dtype=torch.float32).pin_memory() for _ in range(3)]
            self.k = 0

    def put(self, step: int, loss: torch.Tensor) -> None:
        if not self.cuda:
            self.pending.append((step, float(loss), None))
            return
        buf = self.bufs[self.k % len(self.bufs)]
        self.k += 1
        buf.copy_(loss.detach().float(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((step, buf, event))

    def take(self, keep: int = 1) -> list[tuple[int, float]]:
        """Losses of all but the ``keep`` most recent steps (0: all)."""
        out = []
        keep = keep if self.cuda else 0  # on the CPU the value is there already: no lag
        while len(self.pending) > keep:
            step, value, event = self.pending.pop(0)
            if event is not None:
                event.synchronize()
                value = float(value)
            out.append((step, value))
        return out


# ---------------------------------------------------------------------------------------------
# Loss curve (Pillow only)
# ---------------------------------------------------------------------------------------------
def _log_ticks(lo: float, hi: float) -> list[float]:
    """Round values (1, 2, 5 x 10^k) between 10^lo and 10^hi, at most ~8 of them."""
    for mantissas in ((1, 2, 5), (1,)):
        ticks = [m * 10.0 ** e for e in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in mantissas
                 if lo <= math.log10(m * 10.0 ** e) <= hi]
        if len(ticks) <= 8:
            break
    if len(ticks) < 2:
        ticks = sorted(set(ticks) | {10.0 ** lo, 10.0 ** hi})
    return ticks


def save_loss_curve(losses: list[float], path: PathLike, title: str = "training loss", start_step: int = 1) -> Path:
    """Per-step losses (light dots) and their running mean (red line) on a log axis, drawn with Pillow."""
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 900, 440, 80, 25, 40, 55
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((L, 12), title, fill="black")
    path = Path(path)
    vals = np.asarray([v for v in losses if math.isfinite(v) and v > 0], dtype=np.float64)
    n = len(losses)
    if len(vals) == 0:
        d.text((L, H // 2), "no finite loss values", fill="black")
    else:
        lo, hi = float(np.log10(vals.min())), float(np.log10(vals.max()))
        pad = max(0.05 * (hi - lo), 0.02)
        lo, hi = lo - pad, hi + pad

        def xy(i: float, v: float) -> tuple[float, float]:
            x = L + (W - L - R) * (i / max(n - 1, 1))
            y = T + (H - T - B) * (1 - (math.log10(v) - lo) / (hi - lo))
            return x, y

        for v in _log_ticks(lo, hi):
            _, y = xy(0, v)
            d.line([L, y, W - R, y], fill=(225, 225, 225))
            d.text((8, y - 6), f"{v:.3g}", fill="black")
        for k in range(5):
            i = round(k * (n - 1) / 4) if n > 1 else 0
            x, _ = xy(i, 10.0 ** lo)
            d.line([x, H - B, x, H - B + 4], fill="black")
            d.text((x - 12, H - B + 8), str(start_step + i), fill="black")
        d.rectangle([L, T, W - R, H - B], outline="black")
        for i, v in enumerate(losses):
            if math.isfinite(v) and v > 0:
                x, y = xy(i, v)
                d.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(150, 180, 230))
        window = max(1, n // 50)
        clean = np.asarray([v if math.isfinite(v) else np.nan for v in losses], dtype=np.float64)
        line = []
        for i in range(n):
            chunk = clean[max(0, i - window + 1) : i + 1]
            if np.isfinite(chunk).any():
                m = float(np.nanmean(chunk))
                if m > 0:
                    line.append(xy(i, m))
        if len(line) > 1:
            d.line(line, fill=(200, 40, 40), width=2)
        d.text((L + (W - L - R) // 2 - 20, H - 22), "step", fill="black")
        d.text((W - R - 260, 12), f"running mean of {window} (red); last: {np.nanmean(clean[-window:]):.4g}",
               fill=(200, 40, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def _format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def _set_dropout(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    if hasattr(model, "config"):
        model.config.dropout = p


def adam(params: list[nn.Parameter], *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, capturable: bool = False, net: nn.Module | None = None,
         distributed: bool = False) -> Any:
    """Adam as the official recipe. ``capturable``: nothing read back to the host, so the update can
    be part of a CUDA graph; with the fast path's ``net`` (bf16, one backward per step) that is
    ``optim.FlatAdam``, which also keeps the bf16 weights the forward reads (H100, batch 4: ~1 ms a
    step less); ``distributed``: it then also sums the gradients over the processes (in place of
    DDP). Otherwise torch's fused Adam (the same maths in one pass over the parameters; on the CPU
    about 4x faster than the per-tensor loop)."""
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if capturable and net is not None and hasattr(net, "casts_weights") and net.casts_weights() and params[0].is_cuda:
        from .optim import FlatAdam

        return FlatAdam(net, params, distributed=distributed, **kw)
    if capturable:
        kw["capturable"] = True
    try:
        return torch.optim.Adam(params, fused=True, **kw)
    except (RuntimeError, TypeError):  # an older PyTorch without fused Adam on this device
        return torch.optim.Adam(params, **kw)


def clip_and_step(optimizer: Any, params: list[nn.Parameter], max_norm: float) -> None:
    """``clip_grad_norm_(params, max_norm)`` then ``optimizer.step()``.

    With fused Adam the clipping factor rides along as the optimizer's gradient scale (the divisor
    GradScaler uses to unscale), so the gradients are not rewritten in a pass of their own; the
    update is the same up to rounding. Nothing here reads a value back to the host.
    """
    if hasattr(optimizer, "clip_and_step"):  # optim.FlatAdam: the same, inside its own kernels
        optimizer.clip_and_step(max_norm)
        return
    fused = all(group.get("fused") for group in optimizer.param_groups) and isinstance(optimizer, torch.optim.Adam)
    if max_norm <= 0:
        optimizer.step()
    elif fused:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0).float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale  # type: ignore[attr-defined]
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=params[0].is_cuda or None)
        optimizer.step()


def update_step(net: nn.Module, diffusion: Any, optimizer: Any, params: list[nn.Parameter],
                x0: torch.Tensor, buffers: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
                grad_clip: float = 1.0, micro_batch: int | None = None, autocast: bool = False,
                **loss_options: Any) -> torch.Tensor:
    """Forward, backward, clipping and update on one batch; the mean loss stays on the device.

    ``micro_batch``: the batch in chunks whose gradients add up (DDP all-reduces after the last
    only); ``autocast``: bf16 autocast around the loss (the fast path runs its own);
    ``loss_options``: ``Diffusion.training_losses``'s P2 settings."""
    optimizer.zero_grad(set_to_none=True)
    B = x0.shape[0]
    mb = micro_batch or B
    chunks = list(range(0, B, mb))
    total: torch.Tensor | None = None
    for k, lo in enumerate(chunks):
        sl = slice(lo, lo + mb)
        sync = k == len(chunks) - 1 or not hasattr(net, "no_sync")
        with net.no_sync() if not sync else contextlib.nullcontext(), \
                torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast):
            losses = diffusion.training_losses(net, x0[sl], buffers[sl], t[sl], noise[sl], **loss_options)
            loss = losses.mean() * (mb / B) if len(chunks) > 1 else losses.mean()
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    clip_and_step(optimizer, params, grad_clip)
    assert total is not None
    return total


class Trainer:
    """One training run (see ``train``). Kept as an object so tests and benchmarks can step it."""

    def __init__(self, config: TrainConfig, dataset_path: PathLike, out_dir: PathLike, base: PathLike | None = None,
                 resume: bool = True, progress: bool = True, callback: Callback | None = None,
                 model_path: PathLike | None = None):
        self.config, self.out_dir = config, Path(out_dir)
        self.base, self.progress, self.callback = base, progress, callback
        self._writer: Future | None = None  # the checkpoint being written in the background
        self._snapshot: _Snapshot | None = None  # the last checkpoint taken
        self._conv_search: int | None = None  # the process's cuDNN search setting, put back by close()
        self.ctx = _init_distributed(config.device)
        try:
            self._setup(dataset_path, model_path, resume)
        except BaseException:
            self.close()
            raise

    def _setup(self, dataset_path: PathLike, model_path: PathLike | None, resume: bool) -> None:
        config = self.config
        self.device = _pick_device(config, self.ctx)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dataset = dataset_path if isinstance(dataset_path, RigDataset) else RigDataset(dataset_path)
        default_name = "personal.safetensors" if config.stage == 2 else "model.safetensors"
        self.model_path = Path(model_path) if model_path is not None else self.out_dir / default_name
        if self.ctx.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not resume:  # starting over: the old run's checkpoints must never be mistaken for this one's
                (self.out_dir / "latest.json").unlink(missing_ok=True)
                shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
                (self.out_dir / "log.csv").unlink(missing_ok=True)
        _barrier(self.ctx)
        self.ck_dir = find_checkpoint(self.out_dir, verbose=self.ctx.main) if resume else None
        self.step = 0
        self.losses: list[float] = []
        self.step_times: list[float] = []
        self._build()

    # ---- setup ------------------------------------------------------------------------------
    def _build(self) -> None:
        from .checkpoint import load_model
        from .diffusion import Diffusion
        from .model import DiffusionRig, ModelConfig

        cfg = self.config
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        if self.ck_dir is not None:
            self.model = load_model(self.ck_dir / "model.safetensors")
        elif self.base is not None:
            self.model = load_model(self.base)
        elif cfg.stage == 2:
            raise TrainingError("Stage 2 fine-tunes a Stage 1 model: give the base model (--base stage1.safetensors or the official .pt)")
        else:
            mc = ModelConfig.from_dict(cfg.model) if cfg.model else ModelConfig(image_size=self.dataset.size)
            self.model = DiffusionRig(mc)
        self.model = self.model.float()
        if cfg.dropout is not None:
            _set_dropout(self.model, cfg.dropout)
        levels = len(self.model.config.channel_mult)
        if self.dataset.size % (2 ** (levels - 1)):
            raise TrainingError(f"images of {self.dataset.size} px cannot pass through a UNet with {levels} levels; "
                                f"use a size divisible by {2 ** (levels - 1)}")
        if cfg.stage == 2:
            if self.dataset.mean_shape is not None:
                self.model.mean_shape = self.dataset.mean_shape.clone()
            elif self.ctx.main:
                print("note: this album dataset has no mean shape (built without --mean-shape); "
                      "edits will use each photo's own shape", file=sys.stderr)
            if self.ck_dir is None:
                self.model.metadata = {}  # the base's training record does not describe this model
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("denoisingUNet."))
        self.model.to(self.device)
        self.model.train()
        if cfg.stage == 2 and cfg.freeze_encoder_bn:
            self.model.encoder.eval()
        self.use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.net: nn.Module = self.model
        self.fast = cfg.fast and self.device.type == "cuda"
        if self.fast:
            # bf16 autocast + fused attention + channels_last (+ torch.compile of the UNet) around the
            # same float32 parameters; the CPU float32 path stays the reference.
            from .fast import FastDenoiser, recompute_for_batch

            torch.backends.cudnn.benchmark = True
            # cuDNN's search of every convolution costs a few seconds once; a short run (Stage 2's
            # 5,000 steps) earns back only the search of the largest ones (fused.search_convolutions_from).
            from .fused import search_convolutions_from

            self._conv_search = search_convolutions_from(self.dataset.size // 2 if cfg.max_steps <= 30_000 else 0)
            self.net = FastDenoiser(self.model, dtype=torch.bfloat16 if self.use_bf16 else torch.float32,
                                    compile=cfg.compile, recompute=recompute_for_batch(cfg.micro_batch or cfg.batch_size),
                                    cast_at_once=self.ctx.world == 1)
        elif cfg.compile:
            self.net = torch.compile(self.model)
        self.diffusion = Diffusion.create(cfg.schedule, cfg.diffusion_steps)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # One CUDA graph per step removes the host's kernel-launch cost (H100, batch 4: 141 -> 80 ms a
        # step before the fused kernels). Under torchrun too, where optim.FlatAdam sums the gradients
        # over the processes inside the graph: a captured DDP step (all-reduce in the graph, DDP built
        # on the capture stream, 11 eager warm-up steps, NCCL async error handling off) hung on
        # 2 x H200, and DDP launching every kernel from Python scaled 80-95 %. Not around
        # torch.compile's own CUDA graphs, nor with micro-batches (FlatAdam's bf16 gradients are
        # overwritten by each backward, not summed).
        flat = self.fast and cfg.micro_batch in (None, cfg.batch_size) and self.net.casts_weights()
        self.captured = None
        if cfg.cuda_graph and self.fast and not self.net.cudagraphs and (self.ctx.world == 1 or flat):
            from .fast import CapturedStep

            self.captured = CapturedStep(self._step)
        self.optimizer = adam(self.trainable, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                              capturable=self.captured is not None,
                              net=self.net if self.captured is not None and flat else None,
                              distributed=self.ctx.world > 1)
        self.ema = None
        if cfg.ema_rate is not None:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self.ctx.world > 1 and not hasattr(self.optimizer, "clip_and_step"):  # (FlatAdam sums the gradients itself)
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Buffers (BatchNorm running statistics) are not synchronised in the forward (official
            # broadcast_buffers=False; newer PyTorch names it forward_sync_buffers=False).
            import inspect

            sync_kw = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else {"broadcast_buffers": False})
            self.net = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           bucket_cap_mb=128, find_unused_parameters=False, **sync_kw)
        self.global_batch = cfg.batch_size * self.ctx.world
        if self.ck_dir is not None:
            self._load_state()

    def _load_state(self) -> None:
        # On the CPU: RNG states must stay CPU byte tensors (mapped to CUDA, resuming a GPU run
        # failed), and load_state_dict moves the optimizer's state to its parameters' device.
        state = load_training_state(self.ck_dir)
        saved = state.get("config", {})
        for key in ("stage", "batch_size", "seed"):
            if key in saved and saved[key] != getattr(self.config, key):
                raise TrainingError(
                    f"cannot resume {self.out_dir}: it was trained with {key}={saved[key]!r}, now {getattr(self.config, key)!r}; "
                    "use the same settings or a new output folder"
                )
        saved_run, now = state.get("run", {}), self._identity()
        for key, what in (("base", "base model"), ("dataset", "dataset")):
            if key in saved_run and saved_run[key] != now[key]:
                raise TrainingError(
                    f"cannot resume {self.out_dir}: its checkpoints come from another {what} "
                    f"({saved_run[key]!r}, now {now[key]!r}); start over (--fresh / resume=False) or use a new output folder"
                )
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.losses = [float(v) for v in state.get("losses", [])][: self.step]
        if self.ema is not None and (self.ck_dir / "ema.safetensors").is_file():
            from safetensors.torch import load_file

            self.ema.load_state_dict(load_file(str(self.ck_dir / "ema.safetensors"), device=str(self.device)), strict=False)
        rngs = state.get("rng", [])
        if int(state.get("world_size", 1)) == self.ctx.world and len(rngs) == self.ctx.world:
            _set_rng_state(rngs[self.ctx.rank], self.device)
        elif self.ctx.main:
            print(f"warning: the checkpoint was written by {state.get('world_size')} processes, this run has "
                  f"{self.ctx.world}: the data order and random numbers will not continue exactly", file=sys.stderr)
        if self.ctx.main:
            print(f"resuming from {self.ck_dir} (step {self.step})", file=sys.stderr)

    # ---- data -------------------------------------------------------------------------------
    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images (B,H,W,3), buffers (B,9,H,W)) on the device, one per step from self.step."""
        cfg, ds = self.config, self.dataset
        if cfg.stage == 2:
            # The album lives on the device; each step draws a random subset without replacement.
            images = torch.cat([ds.raw(i, "images")[None] for i in range(len(ds))]).to(self.device)
            buffers = torch.cat([ds.raw(i, "buffers")[None] for i in range(len(ds))]).to(self.device).float()
            n = len(ds)
            if n < self.global_batch:
                raise TrainingError(f"the album has {n} photos but one step draws {self.global_batch}; "
                                    f"use --batch-size {n // self.ctx.world or 1} or add photos")
            # The draws of a few hundred steps go to the device in one copy: a copy to the GPU each
            # step waited for the step before it (~0.85 ms of a 29 ms H100 step idle).
            mine = slice(self.ctx.rank * cfg.batch_size, (self.ctx.rank + 1) * cfg.batch_size)
            for start in range(self.step, cfg.max_steps, 256):
                steps = range(start, min(start + 256, cfg.max_steps))
                picks = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(_mix(cfg.seed, 3, s)))
                                     [: self.global_batch][mine] for s in steps]).to(self.device)
                for idx in picks:
                    yield images[idx], buffers[idx]
            return
        sampler = StepBatchSampler(len(ds), cfg.batch_size, self.ctx.world, self.ctx.rank, cfg.seed,
                                   self.step, cfg.max_steps)
        self.sampler = sampler
        loader = torch.utils.data.DataLoader(
            _RawItems(ds), batch_sampler=sampler, num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            # a private generator: creating the loader must not consume the global RNG (exact resume)
            generator=torch.Generator().manual_seed(cfg.seed),
            prefetch_factor=4 if cfg.num_workers > 0 else None,
        )
        for images, buffers in loader:
            yield images.to(self.device, non_blocking=True), buffers.to(self.device, non_blocking=True).float()

    # ---- one update ---------------------------------------------------------------------------
    def _update(self, images: torch.Tensor, buffers: torch.Tensor) -> torch.Tensor:
        cfg, rank, B = self.config, self.ctx.rank, self.config.batch_size
        x0 = _image_to_model(images)  # (memory layout: FastDenoiser picks it on CUDA)
        # t and noise for the whole global batch from a (seed, step) generator; each rank its slice
        g = _step_generator(cfg.seed, self.step, self.device)
        t_all = torch.randint(0, self.diffusion.num_timesteps, (self.global_batch,), generator=g, device=self.device)
        noise_all = torch.randn((self.global_batch, *x0.shape[1:]), generator=g, device=self.device)
        t = t_all[rank * B : (rank + 1) * B]
        noise = noise_all[rank * B : (rank + 1) * B]
        step = self.captured if self.captured is not None else self._step
        loss = step(x0, buffers, t, noise)
        self.step += 1
        return loss

    def _step(self, x0: torch.Tensor, buffers: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``update_step`` with this run's settings, then the EMA; the mean loss stays on the device."""
        cfg = self.config
        total = update_step(self.net, self.diffusion, self.optimizer, self.trainable, x0, buffers, t, noise,
                            grad_clip=cfg.grad_clip or 0.0, micro_batch=cfg.micro_batch,
                            autocast=self.use_bf16 and not self.fast,  # FastDenoiser runs its own autocast
                            p2_gamma=cfg.p2_gamma, p2_k=cfg.p2_k, p2=cfg.p2)
        if self.ema is not None:
            with torch.no_grad():
                ema_params = [p for p, q in zip(self.ema.parameters(), self.model.parameters()) if q.requires_grad]
                torch._foreach_lerp_(ema_params, self.trainable, 1.0 - cfg.ema_rate)
        return total

    # ---- saving -------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "stage": self.config.stage,
            "train_config": self.config.to_dict(),
            "steps": self.step,
            "dataset": str(self.dataset.root),
        }
        if self.config.stage == 2:  # an album: a few dozen names (never a whole FFHQ listing)
            meta["album"] = list(self.dataset.names)
        if self.base is not None:
            meta["base_model"] = Path(self.base).name
        if self.losses:
            meta["final_loss"] = float(np.mean(self.losses[-max(1, self.config.log_interval):]))
        return meta

    def _identity(self) -> dict[str, Any]:
        """What a checkpoint belongs to: the base model's file name and the dataset's item names."""
        names = hashlib.sha256("\n".join(self.dataset.names).encode()).hexdigest()[:16]
        return {"base": Path(self.base).name if self.base is not None else None,
                "dataset": f"{len(self.dataset)} items {names}"}

    def _sync_ema_buffers(self) -> None:
        if self.ema is not None:
            for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
                b_ema.copy_(b)
            self.ema.mean_shape = self.model.mean_shape

    def save_checkpoint(self, wait: bool = True) -> Path | None:
        """Write the checkpoint of the current step (all ranks call this; rank 0 writes). The state
        is copied here, on its device; with ``wait=False`` a background thread copies it to the CPU
        and writes the files while training goes on (a 256 checkpoint took 5 s a time on an H100
        machine), and the next checkpoint, ``wait_for_checkpoint`` or ``close`` waits for it."""
        from .checkpoint import ModelFile

        rng = _rng_state(self.device)
        if self.ctx.world > 1:
            import torch.distributed as dist

            rngs: list[Any] = [None] * self.ctx.world
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        final = None
        if self.ctx.main:
            self.wait_for_checkpoint()
            meta = self._metadata()
            files = {"model.safetensors": ModelFile(self.model, meta, copy=not wait)}
            if self.ema is not None:
                self._sync_ema_buffers()
                files["ema.safetensors"] = ModelFile(self.ema, {**meta, "ema_rate": str(self.config.ema_rate)},
                                                     copy=not wait)
            sampler = getattr(self, "sampler", None)
            epoch, offset = sampler.position(self.step) if sampler is not None else (0, self.step)
            optimizer = _map_tensors(self.optimizer.state_dict(), lambda t: t.detach().clone() if not wait else t)
            state = {
                "format": STATE_FORMAT, "version": STATE_VERSION, "step": self.step,
                "epoch": epoch, "batch_in_epoch": offset, "world_size": self.ctx.world,
                "global_batch": self.global_batch, "config": self.config.to_dict(),
                "optimizer": optimizer, "rng": rngs, "losses": list(self.losses),
                "run": self._identity(),
            }
            final = self.out_dir / "checkpoints" / _checkpoint_dirname(self.step)
            self._snapshot = _Snapshot(self.step, final, meta, files, state)
            if wait:
                self._write_checkpoint(self._snapshot)
            else:
                self._writer = _in_background(self._write_checkpoint, self._snapshot)
        _barrier(self.ctx)
        return final

    def wait_for_checkpoint(self) -> None:
        """Wait until a checkpoint being written in the background is on disk (re-raising its error)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.result()

    def _write_checkpoint(self, snap: _Snapshot) -> None:
        """Files into a temporary folder, fsynced, hashed into the manifest, renamed; latest.json last.
        The model files and the training state are streamed to disk on two threads (their copies to
        the CPU, writes and hashing run without the GIL)."""
        final, root = snap.final, snap.final.parent
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

        def write(contents: list[tuple[str, dict[str, torch.Tensor], dict[str, str]]]) -> list[tuple[str, dict[str, Any]]]:
            with snap.off_the_training_stream():
                return [(name, dataclasses.asdict(save_safetensors(tmp / name, tensors, meta))) for name, tensors, meta in contents]

        try:
            with ThreadPoolExecutor(2, thread_name_prefix="diffusionrig-checkpoint") as pool:
                jobs = [pool.submit(write, [(name, f.tensors, f.header) for name, f in snap.files.items()]),
                        pool.submit(write, [(STATE_FILE, *_state_to_file(snap.state))])]
                written = [entry for job in jobs for entry in job.result()]
        finally:
            snap.files = snap.state = None  # the device copies go
        manifest = {"step": snap.step, "files": dict(sorted(written))}
        _write_file_synced(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
        fsync_dir(tmp)
        if final.exists():  # a stale copy of this step (a run resumed from an older checkpoint)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        atomic_write_json(self.out_dir / "latest.json", {"step": snap.step, "dir": f"checkpoints/{final.name}"})
        self._prune(root, keep=final)

    def _prune(self, root: Path, keep: Path) -> None:
        done = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p != keep),
                      reverse=True)
        for old in done[max(self.config.keep_checkpoints - 1, 0):]:
            shutil.rmtree(old, ignore_errors=True)
        for stray in root.glob(".tmp-*"):  # left by a crash mid-write
            if str(os.getpid()) not in stray.name:
                shutil.rmtree(stray, ignore_errors=True)

    def save_final(self) -> Path:
        from .checkpoint import save_model

        if self.ctx.main:
            meta = self._metadata()
            ema_path = self.model_path.with_name(self.model_path.stem + "_ema" + self.model_path.suffix)
            snap = self._snapshot
            if snap is not None and snap.step == self.step and snap.meta == meta:
                # The checkpoint of this step holds the same files: linked, not written again (the
                # 256 model's 551 MB took 0.7 s more to write and fsync on an H100 machine).
                self.wait_for_checkpoint()
                atomic_link(snap.final / "model.safetensors", self.model_path)
                if self.ema is not None:
                    atomic_link(snap.final / "ema.safetensors", ema_path)
            else:
                save_model(self.model, self.model_path, metadata=meta)
                if self.ema is not None:
                    self._sync_ema_buffers()
                    save_model(self.ema, ema_path, metadata={**meta, "ema_rate": str(self.config.ema_rate)})
            if self.losses:
                save_loss_curve(self.losses, self.out_dir / "loss.png",
                                title=f"Stage {self.config.stage} loss ({len(self.losses)} steps)")
        _barrier(self.ctx)
        return self.model_path

    # ---- run ------------------------------------------------------------------------------------
    def run(self) -> Path:
        from tqdm.auto import tqdm

        cfg, main = self.config, self.ctx.main
        if self.step >= cfg.max_steps:
            if main:
                print(f"{self.out_dir} already finished {self.step} steps; writing the final model", file=sys.stderr)
            return self.save_final()
        if main:
            n_train = sum(p.numel() for p in self.trainable)
            print(f"Stage {cfg.stage}: {cfg.max_steps - self.step} steps of batch {self.global_batch} "
                  f"({cfg.batch_size} x {self.ctx.world} process{'es' if self.ctx.world > 1 else ''}), lr {cfg.lr:g}, "
                  f"{len(self.dataset)} images of {self.dataset.size} px, {n_train / 1e6:.1f} M trainable parameters, "
                  f"on {_device_name(self.device)}", file=sys.stderr)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"stage {cfg.stage}", unit="step",
                   disable=not (self.progress and main), dynamic_ncols=True)
        log_path = self.out_dir / "log.csv"
        if main and not log_path.exists():
            log_path.write_text("step,loss,elapsed_s,images_per_s\n")
        tap = _LossTap(self.device)
        t_start = time.perf_counter()
        # Steps timed for the estimate: after warm-up, compilation and graph capture (steps 1-4).
        left = cfg.max_steps - self.step
        probe = (self.step + max(1, min(6, left // 3)), self.step + min(16, left - 1))
        probe_t: dict[int, float] = {}
        window: list[float] = []

        def handle(losses: list[tuple[int, float]]) -> None:
            for step, value in losses:
                self.losses.append(value)
                window.append(value)
                if self.callback is not None:
                    self.callback(step, value)
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    mean = self._global_mean(float(np.mean(window)))
                    window.clear()
                    bar.set_postfix(loss=f"{mean:.4g}")
                    if main:
                        el = time.perf_counter() - t_start
                        with open(log_path, "a") as f:
                            f.write(f"{step},{mean:.9g},{el:.2f},{(step - first) * self.global_batch / max(el, 1e-9):.2f}\n")

        first = self.step
        try:
            for images, buffers in self._batches():
                loss = self._update(images, buffers)
                tap.put(self.step, loss)
                handle(tap.take(keep=1))
                self.step_times.append(time.perf_counter())  # ~1 step behind the GPU (the loss tap waits)
                bar.update(1)
                if self.step in probe:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    probe_t[self.step] = time.perf_counter()
                    if self.step == probe[1] and probe[1] > probe[0] and probe[0] in probe_t and main:
                        per = (probe_t[probe[1]] - probe_t[probe[0]]) / (probe[1] - probe[0])
                        left = (cfg.max_steps - self.step) * per
                        tqdm.write(f"estimated time: {_format_seconds(left)} for the remaining {cfg.max_steps - self.step} "
                                  f"steps ({per * 1000:.0f} ms/step, {self.global_batch / per:.1f} images/s)", file=sys.stderr)
                interval = cfg.save_interval
                if (interval and self.step % interval == 0) or self.step == cfg.max_steps:
                    handle(tap.take(keep=0))
                    self.save_checkpoint(wait=False)
            handle(tap.take(keep=0))
        except BaseException:
            with contextlib.suppress(Exception):  # the last checkpoint is whole before the error goes up
                self.wait_for_checkpoint()
            raise
        finally:
            bar.close()
        if main:
            total = time.perf_counter() - t_start
            print(f"trained {self.step - first} steps in {_format_seconds(total)}", file=sys.stderr)
        path = self.save_final()
        self.wait_for_checkpoint()  # (save_final waited already when it linked the checkpoint's files)
        return path

    def _global_mean(self, value: float) -> float:
        """The mean of a per-rank value over all ranks (logged losses are of the global batch)."""
        if self.ctx.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.ctx.world

    def close(self) -> None:
        if self._conv_search is not None:  # this run's choice, not the process's
            from .fused import search_convolutions_from

            search_convolutions_from(self._conv_search)
            self._conv_search = None
        try:
            self.wait_for_checkpoint()
        finally:
            if self.ctx.created:
                import torch.distributed as dist

                # A captured step holds the communicator's collectives: its graph goes first (2 x H200:
                # destroying the process group under a live graph hung).
                self.captured = None
                device = getattr(self, "device", None)
                if device is not None and device.type == "cuda":
                    torch.cuda.synchronize(device)
                dist.destroy_process_group()


def train(config: TrainConfig, dataset_path: PathLike | RigDataset, out_dir: PathLike, base: PathLike | None = None,
          resume: bool = True, progress: bool = True, callback: Callback | None = None,
          model_path: PathLike | None = None) -> Path:
    """Train Stage 1 or Stage 2 and return the path of the final model.

    ``dataset_path``: a dataset folder (``build_dataset``/``import_official_lmdb``). ``out_dir`` holds
    checkpoints, ``log.csv``, ``loss.png`` and (by default) the final model; with ``resume`` a run
    continues from the newest valid checkpoint there, without it the folder's old checkpoints are
    deleted and training starts over. ``base``: the model to start from (required
    for Stage 2; official ``.pt`` or ours). ``callback(step, loss)`` is called after every update
    and may raise to cancel the run; the last checkpoint stays valid. Launch with
    ``torchrun --nproc_per_node N`` for several GPUs.
    """
    trainer = Trainer(config, dataset_path, out_dir, base=base, resume=resume, progress=progress,
                      callback=callback, model_path=model_path)
    try:
        return trainer.run()
    finally:
        trainer.close()


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------
def _random_dataset(path: Path, n: int, size: int, seed: int = 0, mean_shape: bool = False) -> Path:
    """Random photos and buffers: the cost of training does not depend on what they show."""
    from .data import DatasetWriter, is_dataset

    if is_dataset(path) and RigDataset(path).size == size and len(RigDataset(path)) == n:
        return path
    g = torch.Generator().manual_seed(seed)
    w = DatasetWriter(path, size, overwrite=True)
    for i in range(n):
        w.add(f"random_{i:05d}.png", torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8),
              torch.rand(9, size, size, generator=g) * 2 - 1)
    w.finish(mean_shape=torch.randn(1, 100, generator=g) if mean_shape else None)
    return path


def _random_base(path: Path, model_config: dict[str, Any] | None, size: int) -> Path:
    from .checkpoint import save_model
    from .model import DiffusionRig, ModelConfig

    if not path.is_file():
        torch.manual_seed(0)
        mc = ModelConfig.from_dict(model_config) if model_config else ModelConfig(image_size=size)
        save_model(DiffusionRig(mc), path)
    return path


def bench_train(stage: int = 2, size: int = 256, device: str | None = None, steps: int | None = None,
                batch_size: int | None = None, compile: bool | str = False, fast: bool = True,
                workdir: PathLike | None = None, num_workers: int = 8, warmup: int = 10,
                model: dict[str, Any] | None = None, album: int = 20, progress: bool = False,
                **overrides: Any) -> dict[str, Any]:
    """Training speed on this machine with random data and a random-weight model of the official
    architecture (``model``: ModelConfig fields; default the 256 model).

    * ``stage=2``: the official recipe end to end, as ``diffusionrig finetune`` runs it: a random
      ``album``-photo dataset at ``size`` and a random base model on disk; the seconds from the start
      of ``train()`` to the personal model written (``total_s``; official: 776 s on an H100 for 5,000
      steps), plus the per-step time after ``warmup`` steps from ``log.csv``.
    * ``stage=1``: images/s per GPU over ``steps`` (default 50) updates after ``warmup``, batch 32 per
      GPU, data read from a dataset on disk through the DataLoader (official: 61.9 images/s per H100).
      Under ``torchrun`` every rank runs it and rank 0 reports (DDP scaling).
    """
    import tempfile

    ctx_world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    work = Path(workdir) if workdir is not None else Path(tempfile.gettempdir()) / f"diffusionrig_bench_{size}"
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"stage": stage, "size": size, "world": ctx_world, "fast": fast, "compile": compile}
    if stage == 2:
        ds = _random_dataset(work / f"album_{album}", album, size, mean_shape=True)
        base = _random_base(work / "base.safetensors", model, size)
        cfg = TrainConfig(stage=2, fast=fast, compile=compile, device=device,
                          **{k: v for k, v in dict(max_steps=steps, batch_size=batch_size).items() if v is not None},
                          **overrides)
        run = work / f"stage2_run_{os.getpid()}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, ds, run, base=base, resume=False, progress=progress)
        try:
            path = trainer.run()
        finally:
            trainer.close()
        total = time.perf_counter() - t0
        gaps = np.diff(trainer.step_times[warmup:])
        per_step = float(np.median(gaps)) if len(gaps) else float("nan")
        result.update(total_s=total, steps=cfg.max_steps, batch=cfg.batch_size, s_per_step=per_step,
                      images_per_s=cfg.batch_size / per_step if per_step == per_step else float("nan"),
                      model_bytes=path.stat().st_size)
        shutil.rmtree(run, ignore_errors=True)
        return result

    # Stage 1: rank 0 writes the dataset once, the other ranks wait for its index.
    batch = batch_size or 32
    n = max(4 * batch * ctx_world, 64)
    ds_path = work / f"stage1_{n}"
    if rank == 0:
        _random_dataset(ds_path, n, size)
    else:
        while not (ds_path / "index.json").is_file() or len(RigDataset(ds_path)) != n:
            time.sleep(1.0)
    measure = steps or 50
    cfg = TrainConfig(stage=1, fast=fast, compile=compile, device=device, batch_size=batch,
                      max_steps=warmup + measure, save_interval=0, num_workers=num_workers, model=model, **overrides)
    trainer = Trainer(cfg, ds_path, work / f"stage1_run_{os.getpid()}", resume=False, progress=False)
    try:
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        sync = (lambda: torch.cuda.synchronize(trainer.device)) if trainer.device.type == "cuda" else (lambda: None)
        t_start = None
        for images, buffers in trainer._batches():
            if trainer.step == warmup:
                sync()
                _barrier(trainer.ctx)
                t_start = time.perf_counter()
            loss = trainer._update(images, buffers)
        sync()
        elapsed = time.perf_counter() - t_start
        result.update(batch_per_gpu=batch, steps=measure, s_per_step=elapsed / measure,
                      images_per_s_per_gpu=batch * measure / elapsed,
                      images_per_s_total=batch * ctx_world * measure / elapsed, loss=float(loss),
                      peak_gib=(torch.cuda.max_memory_allocated(trainer.device) / 2 ** 30
                                if trainer.device.type == "cuda" else float("nan")))
    finally:
        trainer.close()
        shutil.rmtree(work / f"stage1_run_{os.getpid()}", ignore_errors=True)
    return result


def _main(argv: list[str] | None = None) -> int:
    """``python -m diffusionrig_core.train --stage 1 --size 256`` (or under torchrun): print bench_train's JSON."""
    import argparse

    p = argparse.ArgumentParser(description="training benchmark (random data, random weights)")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--compile", default="false", help="false | true | a torch.compile mode")
    p.add_argument("--no-fast", action="store_true")
    p.add_argument("--no-cuda-graph", action="store_true", help="launch each kernel from Python (as under DDP)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="the tiny model (CPU check of the benchmark itself)")
    args = p.parse_args(argv)
    compile_arg: bool | str = {"false": False, "true": True}.get(args.compile.lower(), args.compile)
    model = None
    if args.tiny:
        from .model import ModelConfig

        model = ModelConfig.tiny().to_dict()
    r = bench_train(stage=args.stage, size=args.size, steps=args.steps, batch_size=args.batch_size,
                    compile=compile_arg, fast=not args.no_fast, workdir=args.workdir, num_workers=args.num_workers,
                    model=model, cuda_graph=not args.no_cuda_graph,
                    **({"precision": "fp32", "lr": 1e-4} if args.tiny else {}))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
