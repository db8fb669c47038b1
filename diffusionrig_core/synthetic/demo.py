"""The small demo model of the synthetic face world: where it lives, how it is used, how it is rebuilt.

Two models ship in ``diffusionrig_core/demo_data/`` (float16 safetensors, read back as float32):

* ``stage1.safetensors``: a generic prior (the paper's Stage 1) trained by ``train.py`` on the
  albums of many synthetic people;
* ``personal.safetensors``: that prior fine-tuned (Stage 2) on the album of one person, the demo
  person (person 0 of world seed 0), who never appears in the Stage 1 data.

Both were trained on the synthetic world's own head model (``write_synthetic_assets`` with its
defaults, i.e. ``pipeline.demo_assets_dir()``), so they are used with that face rig. The demo
person's album, the sample photos of the app and the held-out photos of the quality benchmark
are all drawn from fixed seeds, so anyone can re-create them. ``diffusionrig demo build`` (this
module's ``build_demo``) re-creates the whole thing: world, datasets, both stages, the files.

Everything heavy is imported inside the functions (importing this module is cheap).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError, InputError
from ..files import sha256_file

DEMO_DATA_DIR = Path(__file__).resolve().parents[1] / "demo_data"
MODEL_FILES = {"stage1": "stage1.safetensors", "personal": "personal.safetensors"}
MANIFEST = "demo.json"

WORLD_SEED = 0          # people, photos and the head model (write_synthetic_assets' default seed)
DEMO_PERSON = 0         # index of the demo person; Stage 1 people are 1..N, so it is never among them
SAMPLE_SEED = 1         # seed of the app's sample photos (the album uses WORLD_SEED)
STRANGERS = (900, 901)  # people in neither training set: what the generic model does on new faces

# The demo network: a 128 px UNet of 3.5 M parameters and a ResNet-18 encoder with a 16-channel stem
# (0.7 M). Two of them in float16 stay under 20 MB, and a 20-step edit takes seconds on a CPU.
DEMO_MODEL: dict[str, Any] = dict(
    image_size=128, num_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2, 2, 3),
    attention_resolutions=(16, 8), dropout=0.0, encoder_width=16,
)
TINY_MODEL: dict[str, Any] = dict(
    image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(16,),
    dropout=0.0, encoder_width=8,
)


# ----------------------------------------------------------------------------------------------
# Where the demo model is


def demo_model_paths(root: str | Path | None = None) -> dict[str, Path]:
    """``{"stage1": Path, "personal": Path}``: the shipped demo models (they may be missing in a
    source checkout that has not built them; see ``demo_available``)."""
    base = Path(root) if root is not None else DEMO_DATA_DIR
    return {kind: base / name for kind, name in MODEL_FILES.items()}


def demo_available(root: str | Path | None = None) -> bool:
    """True when both demo models are present."""
    return all(p.is_file() and p.stat().st_size > 0 for p in demo_model_paths(root).values())


def demo_model_path(kind: str = "stage1") -> Path:
    """One demo model: ``"stage1"`` (the generic prior: any synthetic face, and the base for
    fine-tuning) or ``"personal"`` (the demo person's Stage 2 model). Raises CheckpointError when
    it is not there."""
    paths = demo_model_paths()
    if kind not in paths:
        raise InputError(f"unknown demo model {kind!r}; use one of {', '.join(paths)}")
    path = paths[kind]
    if not path.is_file():
        raise CheckpointError(
            f"the synthetic demo model {path.name} is missing from {path.parent}; rebuild it with "
            "`diffusionrig demo build` (a few minutes on a GPU) or give a real model")
    return path


def demo_edit_defaults() -> dict[str, Any]:
    """How the demo models edit best. The shipped models are small and briefly trained (Stage 1:
    1,800 updates): from pure noise they draw a clean face but not the photo's background and
    colours, which the inverted source keeps (docs/QUALITY.md has the numbers), so apps start demo
    edits from the DDIM-inverted source."""
    return {"invert": True, "steps": "ddim20"}


def demo_manifest(root: str | Path | None = None) -> dict[str, Any]:
    """What ``build_demo`` recorded about the shipped models ({} when there is none)."""
    path = (Path(root) if root is not None else DEMO_DATA_DIR) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------
# The demo person and the app's sample photos


def demo_person() -> Any:
    """The person of the personal (Stage 2) demo model."""
    from .people import sample_person

    return sample_person(DEMO_PERSON, WORLD_SEED)


def demo_size() -> int:
    """Image size of the shipped demo models (their recorded size; the default config's otherwise)."""
    return int(demo_manifest().get("size", DEMO_MODEL["image_size"]))


def write_demo_album(folder: str | Path, n: int = 24, size: int | None = None, rig: Any = None) -> list[Path]:
    """The demo person's training album (the personal model's Stage 2 data): the same photos for the
    same ``n`` and ``size`` every time (``photo_000.png`` ... with sidecars)."""
    from .photos import default_rig, write_album

    rig = rig if rig is not None else default_rig()
    return write_album(Path(folder), demo_person(), n, seed=WORLD_SEED, size=int(size or demo_size()), rig=rig)


@dataclass
class DemoWorld:
    """What an app needs to run on the synthetic world (read by ``gradio_app.app.load_demo_world``)."""

    assets_dir: Path
    photos: dict[str, Path]         # caption -> photo (with its .params.json sidecar)
    models: dict[str, Path]         # label -> model file, the default first
    person: str = ""                # id of the demo person


def write_demo_samples(folder: str | Path, size: int | None = None, photos_each: int = 3,
                       rig: Any = None) -> dict[str, Path]:
    """Sample photos for trying the demo: the demo person (not from the training album) and two
    people neither model saw; captions -> paths. Photos are drawn with the demo world's rig."""
    from .people import sample_person
    from .photos import default_rig, write_album

    folder = Path(folder)
    size = int(size or demo_size())
    rig = rig if rig is not None else default_rig()
    out: dict[str, Path] = {}
    people = [("Demo person", demo_person())] + [(f"Person {k + 2}", sample_person(i, WORLD_SEED))
                                                 for k, i in enumerate(STRANGERS)]
    for caption, person in people:
        paths = write_album(folder / person.id, person, photos_each, seed=SAMPLE_SEED, size=size, rig=rig,
                            prefix="sample")
        for j, path in enumerate(paths):
            out[f"{caption} · {j + 1}"] = path
    return out


def demo_world(folder: str | Path) -> DemoWorld:
    """The demo world for an app: sample photos written into ``folder`` (a second or so), the demo
    world's assets folder, and the demo models (personal first: the samples start with its person)."""
    from ..pipeline import demo_assets_dir

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    photos = write_demo_samples(folder)
    models: dict[str, Path] = {}
    paths = demo_model_paths()
    if paths["personal"].is_file():
        models["demo: personal model of the demo person (Stage 2)"] = paths["personal"]
    if paths["stage1"].is_file():
        models["demo: generic model (Stage 1)"] = paths["stage1"]
    return DemoWorld(Path(demo_assets_dir()), photos, models, demo_person().id)


# ----------------------------------------------------------------------------------------------
# Building the demo models


@dataclass
class DemoBuildConfig:
    """Settings of ``build_demo``. The defaults made the shipped files (about 4.5 minutes on one H200).

    Training this small network is bound by kernel-launch overhead on a big GPU (a step of batch 8
    costs about as long as one of batch 128), hence few large Stage 1 batches."""

    out: Path = DEMO_DATA_DIR               # where stage1/personal.safetensors and demo.json go
    work: Path | None = None                # world, datasets, checkpoints; None = a temporary folder
    device: str | None = None               # None: cuda when available
    people: int = 160                       # Stage 1 people (indices 1..people)
    photos: int = 10                        # photos per Stage 1 person
    album: int = 24                         # photos of the demo person (Stage 2)
    steps1: int = 1800
    steps2: int = 200
    batch1: int = 128
    batch2: int = 12
    lr1: float = 3e-4
    lr2: float = 1e-4
    ema1: float | None = None               # Stage 1 ships its raw weights (a short EMA lags them)
    seed: int = 0                           # training seed (the world's seeds are fixed above)
    jobs: int | None = None                 # processes drawing photos; None: all CPU cores
    model: dict[str, Any] = field(default_factory=lambda: dict(DEMO_MODEL))
    keep_work: bool = False
    float16: bool = True                    # store the shipped weights in float16

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.work = Path(self.work) if self.work is not None else None
        if self.people < 1 or self.photos < 1 or self.album < 2:
            raise InputError("the demo needs at least 1 Stage 1 person, 1 photo each and an album of 2 photos")
        if self.steps1 < 1 or self.steps2 < 1:
            raise InputError("steps1 and steps2 must be at least 1")
        if self.batch2 > self.album:
            raise InputError(f"batch2 {self.batch2} is larger than the album ({self.album} photos)")

    @property
    def size(self) -> int:
        return int(self.model["image_size"])

    @classmethod
    def tiny(cls, **overrides: Any) -> "DemoBuildConfig":
        """A smoke-test build (32 px, a handful of people, a few steps): seconds on a CPU."""
        kw: dict[str, Any] = dict(people=4, photos=3, album=4, steps1=6, steps2=3, batch1=4, batch2=2,
                                  lr1=1e-3, lr2=1e-4, ema1=None, jobs=1, model=dict(TINY_MODEL))
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"], d["work"] = str(self.out), (str(self.work) if self.work else None)
        d["model"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.model.items()}
        return d


# Worker processes draw photos with their own copy of the rig (loaded once per process).
_WORKER: dict[str, Any] = {}


def _worker_init(assets: str) -> None:
    import torch

    torch.set_num_threads(1)
    from .photos import synthetic_rig

    _WORKER["rig"] = synthetic_rig(assets)


def _draw_part(task: tuple[str, list[int], int, int, str, str]) -> tuple[str, list[str]]:
    """Draw the albums of some Stage 1 people and build their dataset part; returns (part, names)."""
    assets, people, photos, size, photos_dir, part_dir = task
    from ..data import build_dataset
    from .people import sample_person
    from .photos import write_album

    rig = _WORKER.get("rig")
    if rig is None:
        _worker_init(assets)
        rig = _WORKER["rig"]
    paths, names = [], []
    for i in people:
        person = sample_person(i, WORLD_SEED)
        for p in write_album(Path(photos_dir) / person.id, person, photos, seed=WORLD_SEED, size=size, rig=rig):
            paths.append(p)
            names.append(f"{person.id}/{p.name}")
    report = build_dataset(paths, part_dir, rig=rig, size=size, fit="sidecar", progress=False,
                           buffer_dtype="float16", batch_size=16, shard_size=1 << 20, overwrite=True)
    if report.count != len(paths):
        raise RuntimeError(f"dataset part {part_dir}: {len(paths) - report.count} photos failed: {report.failed}")
    return part_dir, names


def _merge(parts: list[tuple[str, list[str]]], out_dir: Path, size: int, settings: dict[str, Any]) -> int:
    """Concatenate dataset parts (in order) into one dataset, items named person/photo."""
    from ..data import DatasetWriter, RigDataset

    writer = DatasetWriter(out_dir, size, buffer_dtype="float16", overwrite=True)
    for part_dir, names in parts:
        ds = RigDataset(part_dir)
        extras = [k for k in ds.keys if k not in ("images", "buffers")]
        for i, name in enumerate(names):
            writer.add(name, ds.raw(i, "images"), ds.raw(i, "buffers"), {k: ds.raw(i, k) for k in extras})
    writer.finish(settings=settings)
    return len(writer.names)


def _mp_context() -> Any:
    # fork is quick (no re-import of torch in every worker) and safe here: no CUDA is touched before
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _export(src: Path, dst: Path, meta: dict[str, Any], float16: bool) -> Path:
    """Write a trained model as a shipped demo file: float16 weights (read back as float32 by
    checkpoint.load_model), metadata that says what it is, no training paths."""
    import torch

    from ..checkpoint import load_model, save_model

    model = load_model(src)
    mean_shape = model.mean_shape
    if float16:
        model = model.to(torch.float16)
    model.mean_shape = mean_shape
    model.metadata = {}
    return save_model(model, dst, metadata=meta)


def build_demo(config: DemoBuildConfig | None = None, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Draw the synthetic world, build both datasets, train Stage 1 and Stage 2 with ``train.py`` and
    write ``stage1.safetensors``, ``personal.safetensors`` and ``demo.json`` into ``config.out``.
    Returns ``{"stage1": path, "personal": path}``."""
    import torch

    from ..data import build_dataset
    from ..train import TrainConfig, train
    from .assets import write_synthetic_assets
    from .photos import synthetic_rig

    cfg = config or DemoBuildConfig()
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = cfg.work or Path(tempfile.mkdtemp(prefix="diffusionrig-demo-build-"))
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    log(f"demo build: {cfg.people} people x {cfg.photos} photos + an album of {cfg.album}, {cfg.size} px, "
        f"Stage 1 {cfg.steps1} steps of {cfg.batch1}, Stage 2 {cfg.steps2} steps of {cfg.batch2}, on {device}; "
        f"work folder {work}")

    # 1. the head model (the demo world's: same seed and resolution as pipeline.demo_assets_dir)
    t0 = time.perf_counter()
    assets = work / "assets"
    write_synthetic_assets(assets, seed=WORLD_SEED)

    # 2. Stage 1 people: albums drawn and dataset parts built in worker processes (started before
    # this process runs any torch code, so forking is safe), merged in order afterwards
    jobs = max(1, min(cfg.jobs or os.cpu_count() or 1, cfg.people))
    ids = list(range(DEMO_PERSON + 1, DEMO_PERSON + 1 + cfg.people))
    # contiguous blocks, merged in order: the dataset is the same whatever the number of processes
    bounds = [round(k * len(ids) / jobs) for k in range(jobs + 1)]
    chunks = [ids[bounds[k]:bounds[k + 1]] for k in range(jobs)]
    tasks = [(str(assets), chunk, cfg.photos, cfg.size, str(work / "people"), str(work / "parts" / f"part{k:03d}"))
             for k, chunk in enumerate(chunks) if chunk]
    pool = _mp_context().Pool(jobs, initializer=_worker_init, initargs=(str(assets),)) if jobs > 1 else None
    try:
        pending = pool.map_async(_draw_part, tasks, chunksize=1) if pool is not None else None

        # 3. meanwhile, the demo person's album (the same photos for the same seed) and its dataset
        rig = synthetic_rig(assets)
        person = demo_person()
        album = write_demo_album(work / "album", cfg.album, cfg.size, rig=rig)
        rep = build_dataset(album, work / "dataset2", rig=rig, size=cfg.size, use_mean_shape=True, fit="sidecar",
                            progress=False, overwrite=True)
        log(f"stage 2 album: {rep.count} photos of {person.id} ({time.perf_counter() - t0:.1f} s)")
        if pool is None:
            _WORKER["rig"] = rig
            parts = [_draw_part(t) for t in tasks]
        else:
            parts = pending.get()
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    times["photos + datasets"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    n1 = _merge(parts, work / "dataset1", cfg.size,
                {"size": cfg.size, "fit": "sidecar", "source": "synthetic world", "seed": WORLD_SEED,
                 "people": cfg.people, "photos": cfg.photos})
    shutil.rmtree(work / "parts", ignore_errors=True)
    times["merge"] = time.perf_counter() - t0
    log(f"stage 1 dataset: {n1} photos of {cfg.people} people ({times['photos + datasets']:.1f} s "
        f"with {jobs} processes, merged in {times['merge']:.1f} s)")

    # 4. Stage 1 and Stage 2 with the training code
    def logger(stage: int, every: int) -> Callable[[int, float], None]:
        def cb(step: int, loss: float) -> None:
            if step % every == 0 or step == 1:
                log(f"stage {stage} step {step}: loss {loss:.4f} ({time.perf_counter() - t_stage:.0f} s)")
        return cb

    workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if device.startswith("cuda") else 0
    c1 = TrainConfig(stage=1, lr=cfg.lr1, batch_size=cfg.batch1, max_steps=cfg.steps1, save_interval=0,
                     ema_rate=cfg.ema1, seed=cfg.seed, num_workers=workers, log_interval=50, keep_checkpoints=1,
                     model=dict(cfg.model), device=device)
    t_stage = time.perf_counter()
    out1 = train(c1, work / "dataset1", work / "stage1", resume=False, progress=False,
                 callback=logger(1, max(1, cfg.steps1 // 15)))
    stage1 = out1.with_name(out1.stem + "_ema" + out1.suffix) if cfg.ema1 else out1
    times["stage 1"] = time.perf_counter() - t_stage
    # the shipped files: Stage 1 is written at once (a Stage 2 that fails leaves it usable)
    cfg.out.mkdir(parents=True, exist_ok=True)
    person_id = demo_person().id
    common = {"demo": "synthetic", "world_seed": WORLD_SEED, "size": cfg.size, "build": "diffusionrig demo build"}
    paths = demo_model_paths(cfg.out)
    _export(stage1, paths["stage1"], {**common, "name": "synthetic demo, generic (Stage 1)", "stage": 1,
                                      "steps": cfg.steps1, "people": cfg.people, "photos": cfg.photos,
                                      "ema_rate": cfg.ema1}, cfg.float16)
    log(f"wrote {paths['stage1']} (Stage 1, {times['stage 1']:.0f} s)")
    c2 = TrainConfig(stage=2, lr=cfg.lr2, batch_size=cfg.batch2, max_steps=cfg.steps2, save_interval=0,
                     seed=cfg.seed, log_interval=50, keep_checkpoints=1, device=device)
    t_stage = time.perf_counter()
    out2 = train(c2, work / "dataset2", work / "stage2", base=stage1, resume=False, progress=False,
                 callback=logger(2, max(1, cfg.steps2 // 8)))
    times["stage 2"] = time.perf_counter() - t_stage

    _export(out2, paths["personal"], {**common, "name": f"synthetic demo, personal: {person_id} (Stage 2)",
                                      "stage": 2, "steps": cfg.steps2, "person": person_id, "album": cfg.album,
                                      "album_seed": WORLD_SEED}, cfg.float16)
    times["total"] = time.perf_counter() - t_all
    manifest = {
        "format": "diffusionrig-demo-v1", "size": cfg.size, "person": person_id, "world_seed": WORLD_SEED,
        "device": str(device) if not str(device).startswith("cuda") else torch.cuda.get_device_name(),
        "torch": torch.__version__, "config": cfg.to_dict(), "seconds": {k: round(v, 1) for k, v in times.items()},
        "files": {kind: {"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for kind, p in paths.items()},
    }
    manifest["config"].pop("out"), manifest["config"].pop("work")
    (cfg.out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"wrote {paths['stage1']} and {paths['personal']} "
        f"({sum(p.stat().st_size for p in paths.values()) / 2**20:.1f} MiB) in {times['total']:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items() if k != "total"))
    if cfg.work is None and not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return paths
