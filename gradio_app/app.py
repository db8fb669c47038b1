"""What the app holds between requests: its settings, the face rig, loaded models and fitted photos.

``Engine`` is shared by every user of one app process. It loads the face rig and models on first
use (never at import or in ``build_demo``), keeps models by path so a second request reuses them,
and keeps fitted photos by content so moving a slider does not fit the photo again. All of that is
guarded by locks because Gradio runs handlers in worker threads.

Whether the app runs on the *synthetic demo world* is decided here: when no real FLAME assets are
found and no model is given, the face rig, the sample people and the demo model come from
``diffusionrig_core.synthetic``.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from diffusionrig_core.errors import AssetError, CheckpointError, InputError
from diffusionrig_core.files import sha256_file

log = logging.getLogger("diffusionrig.app")

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth")
# DECA's encoder weights live next to the rig assets; they are not a DiffusionRig model.
_NOT_MODELS = {"deca_model.tar", "deca_model.pt"}


def default_models_dir() -> Path:
    """``$DIFFUSIONRIG_MODELS``, else a ``models`` folder beside the default assets folder."""
    env = os.environ.get("DIFFUSIONRIG_MODELS")
    if env:
        return Path(env).expanduser()
    from diffusionrig_core.assets import default_assets_dir

    return default_assets_dir().parent / "models"


@dataclass
class AppConfig:
    """Settings of one app process (the ``diffusionrig app`` options)."""

    assets_dir: Path | None = None          # FLAME / DECA files; None = diffusionrig_core.assets' default
    model: Path | None = None               # the model selected first
    models_dirs: list[Path] = field(default_factory=list)  # more places to look for models
    device: str | None = None               # None = the GPU when there is one
    demo: bool | None = None                # None = the synthetic demo when no real assets are found
    work_dir: Path | None = None            # results and personal models; None = a temporary folder
    concurrency_limit: int = 1              # edits running at once (each holds a model's activations)
    max_upload_mb: float = 30.0
    max_pixels: int = 50_000_000            # bigger photos are refused before decoding
    max_album: int = 60
    default_steps: int = 20
    default_invert: bool | None = None      # start from the photo's DDIM inversion; None = in demo mode
    max_steps: int = 200
    max_train_steps: int = 20_000
    fit_cache_size: int = 32                # fitted photos kept (by content) ...
    fit_cache_mb: float = 1500.0            # ... within this much memory (full-resolution originals)
    model_cache_size: int = 3
    keep_results_hours: float = 24.0        # older result folders are deleted as new ones are made

    @classmethod
    def from_env(cls, **overrides: Any) -> "AppConfig":
        """Settings from environment variables, for hosted deployments (a Space's "Variables"):
        DIFFUSIONRIG_MODEL, DIFFUSIONRIG_DEVICE, DIFFUSIONRIG_DEMO (1/0), DIFFUSIONRIG_CONCURRENCY,
        DIFFUSIONRIG_MAX_STEPS, DIFFUSIONRIG_WORK_DIR. The assets and models folders already follow
        DIFFUSIONRIG_ASSETS and DIFFUSIONRIG_MODELS."""
        env = os.environ.get
        kw: dict[str, Any] = {}
        if env("DIFFUSIONRIG_MODEL"):
            kw["model"] = env("DIFFUSIONRIG_MODEL")
        if env("DIFFUSIONRIG_DEVICE"):
            kw["device"] = env("DIFFUSIONRIG_DEVICE")
        if env("DIFFUSIONRIG_DEMO"):
            kw["demo"] = env("DIFFUSIONRIG_DEMO", "").lower() in ("1", "true", "yes")
        if env("DIFFUSIONRIG_WORK_DIR"):
            kw["work_dir"] = env("DIFFUSIONRIG_WORK_DIR")
        for key, name in (("concurrency_limit", "DIFFUSIONRIG_CONCURRENCY"), ("max_steps", "DIFFUSIONRIG_MAX_STEPS")):
            if env(name):
                try:
                    kw[key] = int(env(name))
                except ValueError:
                    raise InputError(f"{name} must be a whole number, got {env(name)!r}") from None
        kw.update(overrides)
        return cls(**kw)

    def __post_init__(self) -> None:
        for name in ("assets_dir", "model", "work_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value).expanduser())
        self.models_dirs = [Path(p).expanduser() for p in self.models_dirs]
        if self.concurrency_limit < 1:
            raise InputError(f"concurrency_limit must be at least 1, got {self.concurrency_limit}")


@dataclass
class DemoWorld:
    """The synthetic face world the app runs on when no real assets are configured."""

    assets_dir: Path
    photos: dict[str, Path]                 # caption -> photo with its NAME.params.json sidecar
    models: dict[str, Path]                 # label -> model file


def load_demo_world(folder: Path) -> DemoWorld:
    """The synthetic demo world of ``diffusionrig_core.synthetic.demo_world``: its face-rig assets,
    sample people's photos (written into ``folder``, with their ``.params.json`` sidecars) and the
    demo models (absent from a checkout that has not built them: the Setup tab then says so)."""
    try:
        from diffusionrig_core.synthetic import demo_world
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(
            "this installation has no synthetic demo world (diffusionrig_core.synthetic.demo_world); "
            "configure real assets and a model as the Setup tab explains") from exc
    world = demo_world(folder)
    return DemoWorld(Path(world.assets_dir), {str(k): Path(v) for k, v in world.photos.items()},
                     {k if k.startswith("demo") else f"demo: {k}": Path(v) for k, v in world.models.items()})


def _portrait_bytes(portrait) -> int:
    return sum(int(getattr(o, "nbytes", 0)) for o in portrait.original) + \
        portrait.aligned.element_size() * portrait.aligned.nelement()


class Engine:
    """The app's shared state. Cheap to create; everything heavy loads on first use."""

    def __init__(self, config: AppConfig | None = None, *,
                 demo_world: Callable[[Path], DemoWorld] | DemoWorld | None = None):
        self.config = config or AppConfig()
        self._demo_world_source = demo_world or load_demo_world
        self._demo_world: DemoWorld | None = None
        self._lock = threading.RLock()
        self._rig = None
        self._models: OrderedDict[Path, Any] = OrderedDict()
        self._model_locks: dict[Path, threading.Lock] = {}
        self._fits: OrderedDict[tuple, Any] = OrderedDict()
        self._personal: dict[str, Path] = {}
        self._stops: dict[str, threading.Event] = {}
        self._work_dir: Path | None = None
        self._samples_digest: dict[str, Path] | None = None

    def warm_up(self) -> None:
        """Prepare what the first request needs (demo world, face rig, default model), e.g. in a
        background thread after the server starts. Failures are left for that request to report."""
        try:
            self.sample_photos()
            self.rig()
            if self.default_model_label() is not None:
                self.model(None)
        except Exception as exc:  # noqa: BLE001 - reported again, with its message, on use
            log.info("warm-up stopped: %s", exc)

    # ---- where things are -----------------------------------------------------------------
    @property
    def work_dir(self) -> Path:
        with self._lock:
            if self._work_dir is None:
                if self.config.work_dir is not None:
                    self.config.work_dir.mkdir(parents=True, exist_ok=True)
                    self._work_dir = self.config.work_dir
                else:
                    self._work_dir = Path(tempfile.mkdtemp(prefix="diffusionrig-app-"))
            return self._work_dir

    def new_output_dir(self, kind: str) -> Path:
        """A fresh folder for one request's downloadable files (a long-running server deletes
        folders older than ``keep_results_hours``, so its disk does not fill up)."""
        parent = self.work_dir / kind
        parent.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - self.config.keep_results_hours * 3600
        for old in parent.iterdir():
            try:
                if old.is_dir() and old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:  # removed by another request meanwhile
                pass
        return Path(tempfile.mkdtemp(prefix="", dir=parent))

    def assets_status(self) -> list:
        from diffusionrig_core.assets import check_assets

        return check_assets(self.config.assets_dir)

    @property
    def demo(self) -> bool:
        """True when the app runs on the synthetic demo world."""
        if self.config.demo is not None:
            return self.config.demo
        render_assets = [s for s in self.assets_status() if s.info.required_for == "render"]
        return not all(s.found for s in render_assets) and self.config.model is None

    @property
    def default_invert(self) -> bool:
        """Whether edits start from the photo's DDIM inversion unless told otherwise. On by default
        for the demo: from fresh noise its small model does not redraw the photo's own background; the inversion
        keeps the photo's (at three to four times the time on a CPU)."""
        return self.demo if self.config.default_invert is None else self.config.default_invert

    def demo_world(self) -> DemoWorld | None:
        if not self.demo:
            return None
        with self._lock:
            if self._demo_world is None:
                source = self._demo_world_source
                self._demo_world = source if isinstance(source, DemoWorld) else source(self.work_dir / "samples")
            return self._demo_world

    def sample_photos(self) -> dict[str, Path]:
        """Photos to try the app with: the demo people in demo mode, else none."""
        world = self.demo_world()
        return dict(world.photos) if world else {}

    # ---- models ---------------------------------------------------------------------------
    def models_dirs(self) -> list[Path]:
        dirs = list(self.config.models_dirs)
        default = default_models_dir()
        if default not in dirs:
            dirs.append(default)
        return dirs

    def model_choices(self) -> dict[str, Path]:
        """Every model the app offers, label -> file: demo, given, found in the models folders, personal."""
        choices: dict[str, Path] = {}
        world = self.demo_world()
        if world is not None:
            choices.update(world.models)
        if self.config.model is not None:
            choices[f"{self.config.model.name} (given)"] = self.config.model
        for folder in self.models_dirs():
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path.suffix in MODEL_SUFFIXES and path.name not in _NOT_MODELS and path.is_file():
                    label = str(path.relative_to(folder))
                    if path not in choices.values():
                        choices[label] = path
        with self._lock:
            choices.update(self._personal)
        return choices

    def default_model_label(self) -> str | None:
        choices = self.model_choices()
        if self.config.model is not None:
            for label, path in choices.items():
                if path == self.config.model:
                    return label
        return next(iter(choices), None)

    def stop_event(self, session: str, create: bool = True) -> threading.Event:
        """The Stop flag of one browser session's training (a fresh one each time ``create``)."""
        with self._lock:
            if create or session not in self._stops:
                self._stops[session] = threading.Event()
            return self._stops[session]

    def base_model_label(self) -> str | None:
        """The model to fine-tune from: a generic (Stage 1) one when its label says so."""
        for label in self.model_choices():
            low = label.lower()
            if "stage 1" in low or "stage1" in low or "generic" in low:
                return label
        return self.default_model_label()

    def add_personal_model(self, label: str, path: Path) -> None:
        with self._lock:
            self._personal[label] = Path(path)

    def resolve_model(self, choice: str | None) -> Path:
        """A model label (or the path of a known model) -> its file. Unknown paths are refused, so
        the API cannot be used to read arbitrary files of the server."""
        choices = self.model_choices()
        if not choice:
            label = self.default_model_label()
            if label is None:
                raise CheckpointError(
                    "no DiffusionRig model found: put a .safetensors or .pt model in "
                    f"{self.models_dirs()[-1]} or start the app with --model PATH (see the Setup tab)")
            return choices[label]
        if choice in choices:
            return choices[choice]
        known = {str(p): p for p in choices.values()}
        if str(choice) in known:
            return known[str(choice)]
        raise InputError(f"unknown model {choice!r}; choose one of: {', '.join(choices) or '(none found)'}")

    def model(self, choice: str | None):
        """The loaded model for a label or known path, loaded once and kept (a few, by path)."""
        path = self.resolve_model(choice).resolve()
        with self._lock:
            if path in self._models:
                self._models.move_to_end(path)
                return self._models[path]
            lock = self._model_locks.setdefault(path, threading.Lock())
        with lock:  # one load per file even when several requests ask at once
            with self._lock:
                if path in self._models:
                    return self._models[path]
            from diffusionrig_core import pipeline

            model = pipeline.load_model(path, device=self.config.device)
            model.eval()
            with self._lock:
                self._models[path] = model
                while len(self._models) > self.config.model_cache_size:
                    self._models.popitem(last=False)
            return model

    # ---- face rig and fitted photos -------------------------------------------------------
    def rig(self):
        with self._lock:
            if self._rig is None:
                from diffusionrig_core import pipeline

                world = self.demo_world()
                assets = world.assets_dir if world is not None else self.config.assets_dir
                self._rig = pipeline.load_rig(assets, device=self.config.device)
            return self._rig

    def portrait(self, photo: str | Path, size: int):
        """The fitted photo (cached by its content, so slider moves do not refit)."""
        path = Path(photo)
        digest = sha256_file(path)
        key = (digest, size)
        with self._lock:
            if key in self._fits:
                self._fits.move_to_end(key)
                return self._fits[key]
        # A demo sample uploaded back (Gradio copies example files) is fitted from the original,
        # whose params.json sidecar holds the true parameters.
        source = self.samples_by_digest().get(digest, path)
        from diffusionrig_core import pipeline

        try:
            portrait = pipeline.fit(self.rig(), [source], size=size)
        except AssetError as exc:
            if not self.demo:
                raise
            # the demo world has no DECA weights, so only its own sample photos can be fitted
            raise AssetError(
                f"the synthetic demo can only edit its sample people, not {path.name!r} (fitting your own "
                "photos needs DECA's weights). Pick a sample person, or add the real models as the Setup "
                f"tab explains. ({exc})") from exc
        with self._lock:
            self._fits[key] = portrait
            budget = self.config.fit_cache_mb * 1e6
            while len(self._fits) > 1 and (len(self._fits) > self.config.fit_cache_size
                                           or sum(map(_portrait_bytes, self._fits.values())) > budget):
                self._fits.popitem(last=False)
        return portrait

    def samples_by_digest(self) -> dict[str, Path]:
        """The sample photos by the SHA-256 of their contents (a copy Gradio uploads back is the same photo)."""
        with self._lock:
            if self._samples_digest is None:
                self._samples_digest = {sha256_file(p): p for p in self.sample_photos().values() if p.is_file()}
            return self._samples_digest
