"""What each button of the app does: plain functions over the core's editing API.

No Gradio here: every handler takes plain values (file paths, numbers, strings), returns a small
dataclass, and raises the core's errors (``DiffusionRigError``) with messages meant for the user.
``ui.py`` turns those into Gradio outputs and pop-ups. Tests call these functions directly.
"""
from __future__ import annotations

import functools
import json
import math
import queue
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from diffusionrig_core.edits import light_direction
from diffusionrig_core.errors import DiffusionRigError, ImageError, InputError, TrainingError
from diffusionrig_core.files import sha256_file

from .app import Engine

# progress(fraction in [0, 1], message)
Progress = Callable[[float, str], None]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".avif"}

LIGHT_MODES = ("As in the photo", "Direction", "Preset")
TAKE_FROM = ("light", "expression", "pose")

# Named lights: (azimuth, elevation, intensity, colour). Azimuth: + = from the viewer's right.
LIGHT_PRESETS: dict[str, tuple[float, float, float, str]] = {
    "Soft front": (0.0, 10.0, 1.0, "#ffffff"),
    "Key light left": (-55.0, 20.0, 1.1, "#ffffff"),
    "Key light right": (55.0, 20.0, 1.1, "#ffffff"),
    "Overhead": (0.0, 70.0, 1.0, "#ffffff"),
    "From below": (0.0, -60.0, 1.0, "#ffffff"),
    "Warm sunset (right)": (70.0, 5.0, 1.2, "#ffc68a"),
    "Cool moonlight (left)": (-60.0, 30.0, 0.8, "#a9c4ff"),
    "Dim": (0.0, 10.0, 0.5, "#ffffff"),
}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def photo_path(value: Any) -> Path:
    """A Gradio file value (path string, dict with 'path', or object with .name) -> its path."""
    if isinstance(value, dict):
        value = value.get("path") or value.get("name")
    value = getattr(value, "name", value) if not isinstance(value, (str, Path)) else value
    if value is None or value == "":
        raise InputError("no photo given: upload a photo (or pick a sample person) first")
    return Path(value)


def check_photo(engine: Engine, value: Any, what: str = "photo") -> Path:
    """Refuse what is not a usable image before anything decodes it, with a message saying why."""
    path = photo_path(value)
    name = path.name
    if not path.is_file():
        raise ImageError(f"the {what} {name!r} was not received; upload it again")
    limit = engine.config.max_upload_mb
    size_mb = path.stat().st_size / 1e6
    if size_mb > limit:
        raise ImageError(f"the {what} {name!r} is {size_mb:.0f} MB; the limit is {limit:g} MB. "
                         "Upload a smaller JPEG or PNG (a few megapixels is plenty)")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError(f"the {what} {name!r} is not an image this app can read; "
                         "upload a JPEG, PNG or WebP photo") from None
    except Image.DecompressionBombError:
        width, height = math.inf, math.inf
    if width * height > engine.config.max_pixels:
        raise ImageError(f"the {what} {name!r} is {width} x {height} pixels, more than the "
                         f"{engine.config.max_pixels / 1e6:g} megapixels this app accepts; downscale it first")
    if min(width, height) < 32:
        raise ImageError(f"the {what} {name!r} is only {width} x {height} pixels; a face needs at least ~100")
    return path


@functools.lru_cache(maxsize=4)
def valid_step_counts(maximum: int) -> tuple[int, ...]:
    """DDIM step counts the official respacing can make exactly (e.g. 37 is not one: stride 27 gives 38)."""
    from diffusionrig_core.diffusion import resolve_steps, space_timesteps

    counts = []
    for n in range(1, maximum + 1):
        try:
            space_timesteps(1000, resolve_steps(f"ddim{n}"))
        except DiffusionRigError:
            continue
        counts.append(n)
    return tuple(counts)


def steps_spec(engine: Engine, steps: Any) -> str:
    """A number of DDIM steps -> the core's step spec, snapped to the nearest count the respacing can
    make (the info line shows the count used); None = the app's default."""
    if steps is None or steps == "":
        steps = engine.config.default_steps
    try:
        n = int(float(steps))
    except (TypeError, ValueError):
        raise InputError(f"steps must be a whole number, got {steps!r}") from None
    counts = valid_step_counts(engine.config.max_steps)
    if not counts[0] <= n <= engine.config.max_steps:
        raise InputError(f"steps must be between {counts[0]} and {engine.config.max_steps}, got {n}")
    return f"ddim{min(counts, key=lambda c: (abs(c - n), c))}"


def pick_seed(seed: Any, random_seed: bool) -> int:
    """The seed to use: a fresh one when ``random_seed`` (shown back so the user can reuse it)."""
    if random_seed or seed is None or seed == "":
        return secrets.randbelow(2**31 - 1)
    try:
        value = int(float(seed))
    except (TypeError, ValueError):
        raise InputError(f"seed must be a whole number, got {seed!r}") from None
    if not 0 <= value < 2**31:
        raise InputError(f"seed must be between 0 and {2**31 - 1}, got {value}")
    return value


def hex_to_rgb(color: str | None) -> tuple[float, float, float]:
    """'#rrggbb' (or 'rgb(r, g, b)' / 'rgba(...)' as some browsers send) -> floats in [0, 1]."""
    if not color:
        return (1.0, 1.0, 1.0)
    text = str(color).strip()
    m = re.fullmatch(r"#?([0-9a-fA-F]{6})", text)
    if m:
        h = m.group(1)
        return tuple(int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]
    m = re.fullmatch(r"rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(?:,\s*[\d.]+\s*)?\)", text)
    if m:
        return tuple(min(float(v), 255.0) / 255.0 for v in m.groups())  # type: ignore[return-value]
    raise InputError(f"light colour {color!r} is not a colour like '#ffcc88'")


@dataclass
class EditSettings:
    """The Edit tab's controls, as plain values (the same names as the API endpoint's inputs)."""

    light_mode: str = "As in the photo"     # one of LIGHT_MODES
    azimuth: float = 0.0                    # degrees, + = light from the viewer's right
    elevation: float = 0.0                  # degrees, + = from above
    intensity: float = 1.0
    color: str = "#ffffff"
    preset: str | None = None               # a LIGHT_PRESETS name (light_mode "Preset")
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    jaw_open: float = 0.0                   # degrees; 0 keeps the photo's jaw
    expression_strength: float = 1.0
    take_from: list[str] = field(default_factory=list)  # from the reference photo: light/expression/pose

    def __post_init__(self) -> None:
        if self.light_mode not in LIGHT_MODES:
            raise InputError(f"light mode {self.light_mode!r} is not one of {', '.join(LIGHT_MODES)}")
        self.take_from = [t.lower() for t in (self.take_from or [])]
        unknown = sorted(set(self.take_from) - set(TAKE_FROM))
        if unknown:
            raise InputError(f"cannot take {unknown} from a reference photo; choose from {', '.join(TAKE_FROM)}")
        if self.light_mode == "Preset" and self.preset not in LIGHT_PRESETS and self.preset not in _core_presets():
            raise InputError(f"light preset {self.preset!r} is unknown; choose one of {', '.join(light_preset_names())}")


def _core_presets() -> dict[str, Any]:
    """SH light presets the core may offer (diffusionrig_core.edits.LIGHT_PRESETS: name -> (9,3))."""
    try:
        from diffusionrig_core import edits
    except ImportError:
        return {}
    presets = getattr(edits, "LIGHT_PRESETS", None)
    return dict(presets) if isinstance(presets, dict) else {}


def light_preset_names() -> list[str]:
    return list(LIGHT_PRESETS) + [name for name in _core_presets() if name not in LIGHT_PRESETS]


def build_edit(settings: EditSettings, reference=None):
    """EditSettings (+ the fitted reference photo, when something is taken from it) -> core Edit."""
    from diffusionrig_core.pipeline import Edit

    s = settings
    if s.take_from and reference is None:
        raise InputError(f"to take the {' and '.join(s.take_from)} from a reference photo, upload one "
                         "under 'Reference photo'")
    kw: dict[str, Any] = dict(
        light_intensity=float(s.intensity), light_color=hex_to_rgb(s.color),
        yaw=float(s.yaw), pitch=float(s.pitch), roll=float(s.roll),
        expression_strength=float(s.expression_strength),
        jaw_open=float(s.jaw_open) if s.jaw_open else None,
    )
    if "light" in s.take_from:
        kw["light_from"] = reference
    elif s.light_mode == "Direction":
        kw["light_direction"] = light_direction(s.azimuth, s.elevation)
    elif s.light_mode == "Preset":
        if s.preset in LIGHT_PRESETS:
            az, el, intensity, color = LIGHT_PRESETS[s.preset]
            kw["light_direction"] = light_direction(az, el)
            kw["light_intensity"] = intensity * float(s.intensity)
            tint = hex_to_rgb(color)
            kw["light_color"] = tuple(a * b for a, b in zip(tint, kw["light_color"]))
        else:
            kw["light_sh"] = _core_presets()[s.preset]
    if "expression" in s.take_from:
        kw["expression_from"] = reference
    if "pose" in s.take_from:
        kw["pose_from"] = reference
    return Edit(**kw)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
@dataclass
class EditOutput:
    before: np.ndarray                      # the aligned source crop (S,S,3) uint8
    after: np.ndarray                       # the edited crop
    buffers: list[tuple[np.ndarray, str]]   # (image, caption): rendered, normal, albedo of the edit
    pasted: np.ndarray | None               # the full photo with the edit pasted back
    files: list[str]                        # downloadable: result, pasted photo, buffers, settings
    seed: int
    info: str                               # one line of Markdown: seed, steps, model, time


def _u8(t) -> np.ndarray:
    arr = t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)
    return (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)


def buffer_images(buffers) -> list[tuple[np.ndarray, str]]:
    """(9,S,S) or (B,9,S,S) buffers -> [(rendered, caption), (normal, ...), (albedo, ...)] of the first."""
    from diffusionrig_core.pipeline import buffer_previews

    b = buffers if buffers.dim() == 4 else buffers[None]
    prev = buffer_previews(b[:1].detach().float().cpu())
    return [(_u8(prev[k][0]), k) for k in ("rendered", "normal", "albedo")]


def _source_crop(portrait) -> np.ndarray:
    return _u8(portrait.aligned[0].permute(1, 2, 0))


def _strip(images: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(list(images), axis=1)


def _save_outputs(engine: Engine, kind: str, stem: str, result, settings: dict[str, Any]) -> list[str]:
    from PIL import Image

    folder = engine.new_output_dir(kind)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:60] or "photo"
    files = []
    result_path = folder / f"{stem}_{kind}_seed{result.seed}.png"
    Image.fromarray(result.image).save(result_path)
    files.append(result_path)
    if result.pasted is not None:
        pasted_path = folder / f"{stem}_{kind}_full.png"
        Image.fromarray(result.pasted).save(pasted_path)
        files.append(pasted_path)
    buffers_path = folder / f"{stem}_{kind}_buffers.png"
    Image.fromarray(_strip([im for im, _ in buffer_images(result.buffers)])).save(buffers_path)
    files.append(buffers_path)
    try:
        edit_dict = result.edit.to_dict()
    except Exception:  # describing the edit is a courtesy; never fail a finished edit on it
        edit_dict = {}
    settings_path = folder / f"{stem}_{kind}.json"
    settings_path.write_text(json.dumps({**settings, "seed": result.seed, "edit": edit_dict},
                                        indent=2, default=str))
    files.append(settings_path)
    return [str(f) for f in files]


def _sampling_progress(progress: Progress | None, what: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(done / max(total, 1), f"{what}: step {done}/{total}")


def _run(engine: Engine, kind: str, photo: Any, model_choice: str | None, edit, seed: Any, random_seed: bool,
         steps: Any, invert: bool, settings: dict[str, Any], progress: Progress | None,
         model=None) -> EditOutput:
    """Check the photo, load the model, fit (cached), build the edit (``edit`` may be a function of
    the model's image size, for edits that fit a second photo), sample, paste back, save the files."""
    from diffusionrig_core import pipeline

    path = check_photo(engine, photo)
    spec = steps_spec(engine, steps)
    seed_value = pick_seed(seed, random_seed)
    t0 = time.perf_counter()
    if progress:
        progress(0.0, "loading the model")
    model = model if model is not None else engine.model(model_choice)
    size = int(model.config.image_size)
    if progress:
        progress(0.0, "fitting the face")
    portrait = engine.portrait(path, size)
    edit = edit(size) if callable(edit) else edit
    results = pipeline.edit(model, portrait, edit, engine.rig(), seed=seed_value, steps=spec,
                            invert=bool(invert), paste=True, callback=_sampling_progress(progress, kind))
    result = results[0]
    seconds = time.perf_counter() - t0
    label = model_choice or engine.default_model_label()
    files = _save_outputs(engine, kind, path.stem, result,
                          {**settings, "model": label, "steps": spec, "invert": bool(invert)})
    device = next(model.parameters()).device
    info = (f"Seed **{result.seed}** · {spec[4:]} DDIM steps{' · inverted source' if invert else ''} · "
            f"model `{label}` · {seconds:.1f} s on {device.type.upper()}")
    return EditOutput(before=_source_crop(portrait), after=result.image, buffers=buffer_images(result.buffers),
                      pasted=result.pasted, files=files, seed=int(result.seed), info=info)


# ---------------------------------------------------------------------------------------------
# Edit tab
# ---------------------------------------------------------------------------------------------
def run_edit(engine: Engine, photo: Any, model_choice: str | None, settings: EditSettings,
             reference: Any = None, seed: Any = None, random_seed: bool = True, steps: Any = 20,
             invert: bool | None = None, progress: Progress | None = None) -> EditOutput:
    """Edit one photo with the sliders' settings; everything not touched stays as in the photo.
    ``invert`` None = the app's default (on in demo mode)."""
    def make_edit(size: int):
        ref = None
        if settings.take_from:
            if reference is None or reference == "":
                raise InputError("upload a reference photo to take "
                                 f"{' and '.join(settings.take_from)} from, or untick 'Take from the reference'")
            ref = engine.portrait(check_photo(engine, reference, "reference photo"), size)
        return build_edit(settings, ref)

    invert = engine.default_invert if invert is None else bool(invert)
    return _run(engine, "edit", photo, model_choice, make_edit, seed, random_seed, steps, invert,
                {"settings": asdict(settings)}, progress)


def preview_buffers(engine: Engine, photo: Any, model_choice: str | None, settings: EditSettings,
                    reference: Any = None) -> list[tuple[np.ndarray, str]]:
    """The edited buffers only (no sampling): fast feedback while moving sliders."""
    from diffusionrig_core import pipeline

    path = check_photo(engine, photo)
    model = engine.model(model_choice)
    size = int(model.config.image_size)
    portrait = engine.portrait(path, size)
    ref = None
    if settings.take_from and reference not in (None, ""):
        ref = engine.portrait(check_photo(engine, reference, "reference photo"), size)
    if settings.take_from and ref is None:
        settings = EditSettings(**{**asdict(settings), "take_from": []})
    edit = build_edit(settings, ref)
    params, _ = pipeline.apply_edit(portrait, edit, mean_shape=getattr(model, "mean_shape", None))
    return buffer_images(pipeline.render(engine.rig(), portrait, params))


# ---------------------------------------------------------------------------------------------
# Mix & match and identity swap
# ---------------------------------------------------------------------------------------------
def run_mix(engine: Engine, photo: Any, code_photo: Any, model_choice: str | None, seed: Any = None,
            random_seed: bool = True, steps: Any = 20, progress: Progress | None = None) -> EditOutput:
    """This photo's face (buffers) with the global code (hair, glasses, background...) of another."""
    from diffusionrig_core.pipeline import Edit

    def make_edit(size: int):
        other = engine.portrait(check_photo(engine, code_photo, "photo to take the look from"), size)
        return Edit(latent_from=other)

    return _run(engine, "mix", photo, model_choice, make_edit, seed, random_seed, steps, False,
                {"code_from": photo_path(code_photo).name if code_photo else None}, progress)


def run_swap(engine: Engine, photo: Any, model_choice: str | None, other_model: str | None,
             seed: Any = None, random_seed: bool = True, steps: Any = 20,
             progress: Progress | None = None) -> EditOutput:
    """This photo's buffers and global code, sampled by another person's personal model."""
    from diffusionrig_core.pipeline import Edit

    if not other_model:
        raise InputError("pick the other person's model to render this photo with")
    other = engine.model(other_model)
    base = engine.model(model_choice)
    if other.config.image_size != base.config.image_size:
        raise InputError(f"the two models work at different sizes ({base.config.image_size} and "
                         f"{other.config.image_size} px); pick models of one size")
    return _run(engine, "swap", photo, model_choice, Edit(model=other), seed, random_seed, steps, False,
                {"other_model": other_model}, progress, model=base)


# ---------------------------------------------------------------------------------------------
# Album tab: check photos, then Stage 2
# ---------------------------------------------------------------------------------------------
@dataclass
class AlbumCheck:
    accepted: list[Path]                    # the photos a personal model can be trained on
    gallery: list[tuple[np.ndarray, str]]   # per photo, 2 x 2: aligned crop, rendered / normal, albedo
    rejected: list[list[str]]               # [file name, why]
    summary: str


def _album_paths(values: Any) -> list[Path]:
    if values is None or values == "":
        return []
    if not isinstance(values, (list, tuple)):
        values = [values]
    return [photo_path(v) for v in values]


def check_album(engine: Engine, files: Any, model_choice: str | None = None,
                progress: Progress | None = None) -> AlbumCheck:
    """Fit every photo of an album; report which ones can be used and why the others cannot."""
    from diffusionrig_core import pipeline

    paths = _album_paths(files)
    if not paths:
        raise InputError("upload the photos of one person first (about 20, different days, lights and expressions)")
    if len(paths) > engine.config.max_album:
        raise InputError(f"{len(paths)} photos is more than the {engine.config.max_album} this app takes at once")
    size = int(engine.model(model_choice).config.image_size)
    accepted, gallery, rejected, seen = [], [], [], {}
    for k, path in enumerate(paths):
        if progress:
            progress(k / len(paths), f"fitting {path.name} ({k + 1}/{len(paths)})")
        try:
            path = check_photo(engine, path)
            digest = sha256_file(path)
            if digest in seen:
                raise InputError(f"the same photo as {seen[digest]}")
            seen[digest] = path.name
            portrait = engine.portrait(path, size)
            buffers = buffer_images(pipeline.render(engine.rig(), portrait))
        except DiffusionRigError as exc:
            rejected.append([path.name, str(exc)])
            continue
        accepted.append(path)
        crop, (rendered, _), (normal, _), (albedo, _) = _source_crop(portrait), *buffers
        gallery.append((np.concatenate([_strip([crop, rendered]), _strip([normal, albedo])], axis=0), path.name))
    summary = (f"**{len(accepted)}** of {len(paths)} photos can be used"
               + (f"; {len(rejected)} rejected (see the list)." if rejected else "."))
    if accepted and len(accepted) < 10:
        summary += " About 20 photos give the best personal model; fewer work but generalise less."
    return AlbumCheck(accepted, gallery, rejected, summary)


@dataclass
class TrainUpdate:
    status: str                             # Markdown: step, loss, time left
    losses: list[tuple[int, float]]         # (step, loss) so far, for the plot
    model_file: str | None = None           # set on the last update
    model_label: str | None = None


class _Stopped(Exception):
    """Raised inside the training callback when the user (or a closed page) stops training."""


def _parse_callback(args: tuple, kwargs: dict) -> tuple[int, int, float | None]:
    """Training callbacks report (step, total) and possibly the loss: positionally, as keywords, or
    as one dict of logs. Accept all of these."""
    info: dict[str, Any] = {}
    for a in args:
        if isinstance(a, dict):
            info.update(a)
    info.update(kwargs)
    numbers = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    step = int(info.get("step", numbers[0] if numbers else 0))
    total = int(info.get("total", info.get("max_steps", numbers[1] if len(numbers) > 1 else 0)))
    loss = info.get("loss", numbers[2] if len(numbers) > 2 else None)
    try:
        loss = None if loss is None else float(loss)
    except (TypeError, ValueError):
        loss = None
    return step, total, loss


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text.strip()).strip("-")[:40] or "personal"


def train_album(engine: Engine, files: Any, base_model: str | None, steps: Any = 500,
                name: str = "personal", progress: Progress | None = None,
                poll_s: float = 0.5, stop: threading.Event | None = None) -> Iterator[TrainUpdate]:
    """Stage 2 on the album's usable photos, yielding progress; the last update carries the model.

    Training runs in a worker thread. Setting ``stop`` (the Stop button) or closing this generator
    ends it at the next step, without a model.
    """
    from diffusionrig_core import pipeline

    try:
        n_steps = int(steps)
    except (TypeError, ValueError):
        raise InputError(f"training steps must be a whole number, got {steps!r}") from None
    if not 1 <= n_steps <= engine.config.max_train_steps:
        raise InputError(f"training steps must be between 1 and {engine.config.max_train_steps}, got {n_steps}")
    album = check_album(engine, files, base_model)
    if not album.accepted:
        raise TrainingError("none of the photos can be used (see the rejected list); "
                            "upload photos where one face is clearly visible")
    base_path = engine.resolve_model(base_model)
    samples = engine.samples_by_digest()
    photos = [samples.get(sha256_file(p), p) for p in album.accepted]
    label = f"personal: {_slug(name)} ({time.strftime('%H%M%S')})"
    out_dir = engine.work_dir / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{_slug(name)}-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"

    events: queue.Queue = queue.Queue()
    stop = stop if stop is not None else threading.Event()
    outcome: dict[str, Any] = {}

    def callback(step: Any, total: Any = None, *args: Any, loss: Any = None, **kwargs: Any) -> None:
        events.put(_parse_callback((step, total, *args), {**kwargs, **({"loss": loss} if loss is not None else {})}))
        if stop.is_set():
            raise _Stopped()

    def work() -> None:
        try:
            # the base is loaded from its file, so the shared cached model is never trained in place
            outcome["model"] = pipeline.finetune(
                base_path, photos, engine.rig(), steps=n_steps, out_path=out_path, callback=callback,
                device=engine.config.device, work_dir=out_dir / f"{out_path.stem}-work",
                # Stage 2 draws 4 photos a step (official); a smaller album draws them all
                batch_size=min(4, len(photos)))
        except BaseException as exc:  # handed to the generator, which re-raises it
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="diffusionrig-stage2", daemon=True)
    losses: list[tuple[int, float]] = []
    t0 = last_yield = time.perf_counter()
    last = (0, n_steps)
    thread.start()
    try:
        yield TrainUpdate(f"Training on {len(photos)} photos for {n_steps} steps…", [])
        while thread.is_alive() or not events.empty():
            try:
                got = [events.get(timeout=poll_s)]
            except queue.Empty:
                continue
            while not events.empty():  # report the newest step, keep every loss
                got.append(events.get_nowait())
            for step, total, loss in got:
                last = (step, total or n_steps)
                if loss is not None:
                    losses.append((step, loss))
            now = time.perf_counter()
            if now - last_yield < poll_s and thread.is_alive():
                continue
            last_yield = now
            step, total = last
            elapsed = now - t0
            left = elapsed / max(step, 1) * (total - step)
            if progress:
                progress(step / max(total, 1), f"Stage 2: step {step}/{total}")
            loss_text = f" · loss {losses[-1][1]:.4f}" if losses else ""
            yield TrainUpdate(f"Step **{step}/{total}**{loss_text} · {elapsed:.0f} s, about {left:.0f} s left",
                              list(losses))
        thread.join()
        stopped = stop.is_set()  # asked for by the Stop button (not by the clean-up below)
    finally:
        stop.set()  # a closed generator (page gone) also ends the worker at its next step
    if "model" not in outcome and (stopped or isinstance(outcome.get("error"), _Stopped)):
        yield TrainUpdate(f"Stopped at step {last[0]} of {last[1]}; no model was saved.", list(losses))
        return
    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, DiffusionRigError):
            raise exc
        raise TrainingError(f"training stopped with an error: {type(exc).__name__}: {exc}") from exc
    if not out_path.exists():
        from diffusionrig_core.checkpoint import save_model

        save_model(outcome["model"], out_path)
    engine.add_personal_model(label, out_path)
    step, total = last
    yield TrainUpdate(f"Done: **{total}** steps in {time.perf_counter() - t0:.0f} s. The model "
                      f"**{label}** is now in every model list; download it to keep it.",
                      list(losses), str(out_path), label)


# ---------------------------------------------------------------------------------------------
# Setup tab
# ---------------------------------------------------------------------------------------------
def setup_report(engine: Engine) -> str:
    """Markdown: the mode, every asset (found or where to get it), the models found, the device."""
    from diffusionrig_core.assets import ASSETS, default_assets_dir

    statuses = engine.assets_status()
    root = engine.config.assets_dir or default_assets_dir()
    lines = []
    if engine.demo:
        lines += ["### Running on the synthetic demo world",
                  "The people, photos and model are made up by `diffusionrig_core.synthetic`, so every "
                  "control works without any download. To edit real photos, put the files below in the "
                  "assets folder and a DiffusionRig model in the models folder, then restart the app.", ""]
    lines += [f"### Face-rig assets — `{root}`",
              "Change the folder with `diffusionrig app --assets DIR` or `DIFFUSIONRIG_ASSETS`.", "",
              "| file | status | needed to | where to get it |", "| --- | --- | --- | --- |"]
    for s in statuses:
        status = f"✅ {s.size / 1e6:.1f} MB" if s.found else "❌ missing"
        where = "" if s.found else f"{s.info.source}; put it at `{s.path}`"
        lines.append(f"| `{s.info.name}` | {status} | {s.info.required_for} | {where} |")
    assert len(statuses) == len(ASSETS)
    lines += ["", "### Models",
              "Models are `.safetensors` (ours) or official `.pt` files. Put them in "
              + ", ".join(f"`{d}`" for d in engine.models_dirs())
              + " (or start with `--model PATH`).", ""]
    choices = engine.model_choices()
    if choices:
        lines += ["| model | file |", "| --- | --- |"]
        lines += [f"| {label} | `{path}` |" for label, path in choices.items()]
    else:
        lines.append("**No model found.** Train one (`diffusionrig train`) or convert an official checkpoint "
                     "(`diffusionrig convert`).")
    import torch

    device = engine.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lines += ["", f"### Device\nEdits run on **{device}**; at most {engine.config.concurrency_limit} "
              "at once (the others wait in the queue)."]
    return "\n".join(lines)


def demo_banner(engine: Engine) -> str:
    """The banner shown above the tabs in demo mode (empty otherwise)."""
    if not engine.demo:
        return ""
    return ("**Synthetic demo.** You are editing made-up people from DiffusionRig's procedural face world "
            "with a small demo model, so that everything works on a CPU without downloads. To edit real "
            "photos, add the FLAME/DECA files and a DiffusionRig model as the **Setup** tab explains, "
            "then restart `diffusionrig app`.")
