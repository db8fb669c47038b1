"""The Blocks layout: tabs, controls and which handler each button calls.

Every event calls one function of ``handlers`` through ``_guard``, which turns the core's errors
into a pop-up with the error's own message (the app keeps running). Each event that does real work
has an ``api_name``, so ``gradio_client`` can script the app (see docs/APP.md).
"""
from __future__ import annotations

import functools
import inspect
import logging
import traceback
from typing import Any, Callable

import gradio as gr

from diffusionrig_core.errors import DiffusionRigError
from diffusionrig_core.pipeline import Edit

from . import handlers as H
from .app import Engine

log = logging.getLogger("diffusionrig.app")

CSS = """
#demo-banner { border: 1px solid #e0a800; background: #fff8e1; border-radius: 8px; padding: 4px 12px; }
#demo-banner p { color: #5d4300; }
.dr-info p { font-size: 0.9em; }
"""

R = Edit.RANGES  # slider ranges come from the core, so the app never offers a value it refuses


# ---------------------------------------------------------------------------------------------
# Errors and progress
# ---------------------------------------------------------------------------------------------
def _user_error(exc: BaseException) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, DiffusionRigError):  # the user's to fix: no traceback in the server log
        return gr.Error(_sentence(exc), title=_title(exc), print_exception=False)
    name = type(exc).__name__
    if "OutOfMemory" in name or isinstance(exc, MemoryError):
        _free_gpu_memory()
        return gr.Error("The machine ran out of memory for this request. Try fewer steps or a smaller "
                        "photo, or wait until other edits are finished.", title="Out of memory")
    log.error("unexpected error in the app:\n%s", "".join(traceback.format_exception(exc)))
    return gr.Error(f"Something went wrong ({name}: {exc}). The app is still running; please try again, "
                    "and report the problem if it persists.", title="Unexpected error", print_exception=False)


def _free_gpu_memory() -> None:
    # what a failed request allocated is garbage now; hand it back so the next request fits
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sentence(exc: BaseException) -> str:
    text = str(exc)
    return text[:1].upper() + text[1:]


def _title(exc: BaseException) -> str:
    return {"ImageError": "Unusable photo", "NoFaceError": "No face found", "InputError": "Invalid setting",
            "CheckpointError": "Model problem", "AssetError": "Missing asset",
            "TrainingError": "Training problem"}.get(type(exc).__name__, "Error")


def _guard(fn: Callable) -> Callable:
    """Run a handler; turn any failure into a clear pop-up. Keeps the signature Gradio inspects."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any):
            inner = fn(*args, **kwargs)
            try:
                yield from inner
            except Exception as exc:
                raise _user_error(exc) from exc
            finally:
                inner.close()
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise _user_error(exc) from exc
    return wrapper


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def _progress(progress: gr.Progress) -> H.Progress:
    return lambda fraction, message: progress(fraction, desc=message)


# ---------------------------------------------------------------------------------------------
# Small building blocks
# ---------------------------------------------------------------------------------------------
class PhotoInput(gr.Image):
    """``gr.Image`` whose value reaches the handler as the uploaded file, undecoded.

    Plain ``gr.Image`` decodes uploads before the handler runs, so a file that is not an image fails
    inside Gradio with a generic message; here ``handlers.check_photo`` says what is wrong instead.
    """

    is_template = True  # same front-end component as gr.Image

    def preprocess(self, payload):  # noqa: D401 - Gradio hook
        if payload is None:
            return None
        if getattr(payload, "path", None):
            return str(payload.path)
        return super().preprocess(payload)


def _photo(label: str, **kwargs: Any) -> PhotoInput:
    # Gradio reads a component's properties from its __init__ signature, so PhotoInput keeps
    # gr.Image's and the defaults are given here
    return PhotoInput(label=label, type="filepath", sources=["upload", "clipboard"], **kwargs)


def _model_dropdown(engine: Engine, label: str = "Model", info: str | None = None) -> gr.Dropdown:
    # choices are filled when the page loads, so building the Blocks never scans folders or loads models
    return gr.Dropdown(choices=[], value=None, label=label, info=info, allow_custom_value=False,
                       interactive=True)


def _seed_row(engine: Engine):
    with gr.Row(equal_height=True):
        seed = gr.Number(value=0, precision=0, minimum=0, maximum=2**31 - 1, label="Seed",
                         info="shown after each run; untick 'Random seed' to reuse it", scale=3)
        random_seed = gr.Checkbox(value=True, label="Random seed", scale=1)
    steps = gr.Slider(2, engine.config.max_steps, value=engine.config.default_steps, step=1,
                      label="Steps", info="DDIM steps: more are slower and a little finer")
    return seed, random_seed, steps


def _result_column(prefix: str = ""):
    """Before/after, info line, buffers, pasted photo, downloads; element ids ``{prefix}result`` etc."""
    compare = gr.ImageSlider(label="Before / after (drag the handle)", type="numpy", elem_id=f"{prefix}result")
    info = gr.Markdown(label="Info", elem_classes=["dr-info"])
    buffers = gr.Gallery(label="Physical buffers of the edit (rendered, normal, albedo)", columns=3,
                         height=220, object_fit="contain", allow_preview=True, elem_id=f"{prefix}buffers")
    pasted = gr.Image(label="Pasted back into the full photo", type="numpy", interactive=False,
                      elem_id=f"{prefix}pasted")
    files = gr.File(label="Downloads", file_count="multiple", interactive=False)
    return compare, info, buffers, pasted, files


def _edit_outputs(out: H.EditOutput) -> tuple:
    return (out.before, out.after), out.info, out.buffers, out.pasted, out.files, out.seed


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------
def build(engine: Engine) -> gr.Blocks:
    """All tabs wired to ``engine``. Nothing heavy runs here: models load on the first request."""
    # delete_cache: uploads and outputs Gradio keeps are removed after a day (checked hourly)
    with gr.Blocks(title="DiffusionRig", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# DiffusionRig\nEdit a portrait's **lighting, expression and head pose** while it stays "
                    "the same person (Ding et al., CVPR 2023).")
        banner = gr.Markdown(H.demo_banner(engine), visible=engine.demo, elem_id="demo-banner")
        model_dropdowns: list[gr.Dropdown] = []
        galleries: list[tuple[gr.Gallery, gr.Image]] = []  # demo sample people -> the photo box they fill

        def samples_for(target: gr.Image, what: str = "edit it", **kwargs: Any) -> gr.Gallery:
            gallery = gr.Gallery(label=f"Sample people — click one to {what}", columns=6, height=150,
                                 allow_preview=False, visible=engine.demo, object_fit="cover",
                                 elem_classes=["samples"], **kwargs)
            galleries.append((gallery, target))
            return gallery

        with gr.Tabs():
            # ---------------------------------------------------------------- Edit
            with gr.Tab("Edit", id="edit"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=5):
                        photo = _photo("Photo", elem_id="photo", height=300)
                        samples_for(photo, elem_id="samples")
                        with gr.Row():
                            model = _model_dropdown(engine, info="whose prior renders the edit")
                            refresh = gr.Button("↻", scale=0, min_width=40)
                        model_dropdowns.append(model)
                        with gr.Accordion("Light", open=True):
                            light_mode = gr.Radio(list(H.LIGHT_MODES), value=H.LIGHT_MODES[0],
                                                  label="Light", elem_id="light-mode")
                            with gr.Row():
                                azimuth = gr.Slider(-90, 90, value=0, step=1, label="Azimuth (°)",
                                                    info="− left, + right", elem_id="azimuth")
                                elevation = gr.Slider(-80, 80, value=0, step=1, label="Elevation (°)",
                                                      info="− below, + above", elem_id="elevation")
                            preset = gr.Dropdown(H.light_preset_names(), value=H.light_preset_names()[0],
                                                 label="Preset")
                            with gr.Row():
                                intensity = gr.Slider(0, min(R["light_intensity"][1], 3.0), value=1.0, step=0.05,
                                                      label="Intensity", elem_id="intensity")
                                color = gr.ColorPicker(value="#ffffff", label="Colour")
                        with gr.Accordion("Pose and expression", open=True):
                            with gr.Row():
                                yaw = gr.Slider(*R["yaw"], value=0, step=1, label="Yaw (°)", elem_id="yaw")
                                pitch = gr.Slider(*R["pitch"], value=0, step=1, label="Pitch (°)")
                                roll = gr.Slider(*R["roll"], value=0, step=1, label="Roll (°)")
                            with gr.Row():
                                jaw = gr.Slider(*R["jaw_open"], value=0, step=1, label="Jaw open (°)",
                                                info="0 keeps the photo's")
                                strength = gr.Slider(*R["expression_strength"], value=1.0, step=0.05,
                                                     label="Expression strength")
                        with gr.Accordion("Take from a reference photo", open=False):
                            reference = _photo("Reference photo", height=200)
                            samples_for(reference, "use it as the reference")
                            take_from = gr.CheckboxGroup(list(H.TAKE_FROM), value=[],
                                                         label="Take from the reference")
                        seed, random_seed, steps = _seed_row(engine)
                        invert = gr.Checkbox(value=engine.default_invert,
                                             label="Keep the background and details (start from the photo's "
                                             "DDIM inversion instead of fresh noise; slower)")
                        run = gr.Button("Edit", variant="primary", elem_id="run-edit")
                    with gr.Column(scale=5):
                        compare, info, buffers, pasted, files = _result_column()

                settings_inputs = [light_mode, azimuth, elevation, intensity, color, preset, yaw, pitch, roll,
                                   jaw, strength, take_from]

                def _settings(values: list) -> H.EditSettings:
                    names = ["light_mode", "azimuth", "elevation", "intensity", "color", "preset", "yaw",
                             "pitch", "roll", "jaw_open", "expression_strength", "take_from"]
                    return H.EditSettings(**dict(zip(names, values)))

                @_guard
                def do_edit(photo, model=None, light_mode=H.LIGHT_MODES[0], azimuth=0.0, elevation=0.0,
                            intensity=1.0, color="#ffffff", preset=None, yaw=0.0, pitch=0.0, roll=0.0, jaw_open=0.0,
                            expression_strength=1.0, take_from=None, reference=None, seed=None,
                            random_seed=True, steps=None, invert=None, progress=gr.Progress()):
                    s = _settings([light_mode, azimuth, elevation, intensity, color, preset, yaw, pitch, roll,
                                   jaw_open, expression_strength, take_from])
                    out = H.run_edit(engine, photo, model, s, reference, seed, random_seed, steps, invert,
                                     progress=_progress(progress))
                    return _edit_outputs(out)

                run.click(do_edit, [photo, model, *settings_inputs, reference, seed, random_seed, steps, invert],
                          [compare, info, buffers, pasted, files, seed], api_name="edit",
                          concurrency_id="sample")

                @_guard
                def do_preview(photo, model=None, light_mode=H.LIGHT_MODES[0], azimuth=0.0, elevation=0.0,
                               intensity=1.0, color="#ffffff", preset=None, yaw=0.0, pitch=0.0, roll=0.0,
                               jaw_open=0.0, expression_strength=1.0, take_from=None, reference=None):
                    if not photo:
                        return []
                    s = _settings([light_mode, azimuth, elevation, intensity, color, preset, yaw, pitch, roll,
                                   jaw_open, expression_strength, take_from])
                    return H.preview_buffers(engine, photo, model, s, reference)

                preview_inputs = [photo, model, *settings_inputs, reference]
                preview_kw = dict(fn=do_preview, inputs=preview_inputs, outputs=buffers, show_progress="minimal",
                                  trigger_mode="always_last", concurrency_id="preview", concurrency_limit=2)

                # a bad upload shows its error and is taken out again, instead of staying in the
                # photo box as a broken image
                upload = photo.upload(api_visibility="private", **preview_kw)
                upload.failure(lambda: (None, []), None, [photo, buffers], api_visibility="private", queue=False)
                azimuth.release(api_name="preview", **preview_kw)
                for control in (elevation, intensity, yaw, pitch, roll, jaw, strength):
                    control.release(api_visibility="private", **preview_kw)
                for control in (light_mode, preset, color, take_from, model):
                    control.input(api_visibility="private", **preview_kw)

            # ---------------------------------------------------------------- Mix & match
            with gr.Tab("Mix & match", id="mix"):
                gr.Markdown("Keep this photo's face — shape, expression, pose, light — and take the **global "
                            "code** (hair, glasses, background, the look the 3D face does not describe) from "
                            "another photo.")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=5):
                        with gr.Row():
                            with gr.Column():
                                mix_photo = _photo("Face from", height=240)
                                samples_for(mix_photo, "take the face")
                            with gr.Column():
                                mix_code = _photo("Look (global code) from", height=240)
                                samples_for(mix_code, "take the look")
                        mix_model = _model_dropdown(engine)
                        model_dropdowns.append(mix_model)
                        mix_seed, mix_random, mix_steps = _seed_row(engine)
                        mix_run = gr.Button("Mix", variant="primary")
                    with gr.Column(scale=5):
                        m_compare, m_info, m_buffers, m_pasted, m_files = _result_column("mix-")

                @_guard
                def do_mix(photo, code_photo, model=None, seed=None, random_seed=True, steps=None,
                           progress=gr.Progress()):
                    out = H.run_mix(engine, photo, code_photo, model, seed, random_seed, steps,
                                    progress=_progress(progress))
                    return _edit_outputs(out)

                mix_run.click(do_mix, [mix_photo, mix_code, mix_model, mix_seed, mix_random, mix_steps],
                              [m_compare, m_info, m_buffers, m_pasted, m_files, mix_seed], api_name="mix",
                              concurrency_id="sample")

            # ---------------------------------------------------------------- Identity swap
            with gr.Tab("Identity swap", id="swap"):
                gr.Markdown("Render this photo's buffers and global code with **another person's personal "
                            "model**: their prior takes over the identity details the buffers do not fix.")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=5):
                        swap_photo = _photo("Photo", height=240)
                        samples_for(swap_photo)
                        with gr.Row():
                            swap_model = _model_dropdown(engine, "This photo's model")
                            swap_other = _model_dropdown(engine, "Render as (another person's model)")
                        model_dropdowns += [swap_model, swap_other]
                        swap_seed, swap_random, swap_steps = _seed_row(engine)
                        swap_run = gr.Button("Swap", variant="primary")
                    with gr.Column(scale=5):
                        s_compare, s_info, s_buffers, s_pasted, s_files = _result_column("swap-")

                @_guard
                def do_swap(photo, model=None, other_model=None, seed=None, random_seed=True, steps=None,
                            progress=gr.Progress()):
                    out = H.run_swap(engine, photo, model, other_model, seed, random_seed, steps,
                                     progress=_progress(progress))
                    return _edit_outputs(out)

                swap_run.click(do_swap, [swap_photo, swap_model, swap_other, swap_seed, swap_random, swap_steps],
                               [s_compare, s_info, s_buffers, s_pasted, s_files, swap_seed], api_name="swap",
                               concurrency_id="sample")

            # ---------------------------------------------------------------- Album
            with gr.Tab("Album", id="album"):
                gr.Markdown("Upload about **20 photos of one person** (different days, lights, expressions). "
                            "Check them, then fine-tune a generic model into their **personal model** "
                            "(Stage 2). It appears in every model list and can be downloaded.")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4):
                        album_files = gr.File(label="Photos", file_count="multiple", file_types=["image"],
                                              type="filepath", height=200)
                        album_base = _model_dropdown(engine, "Start from (a generic Stage 1 model)")
                        model_dropdowns.append(album_base)
                        album_sample = gr.Button("Use a sample person's photos", visible=engine.demo, size="sm")
                        album_check = gr.Button("Check photos")
                        album_summary = gr.Markdown(label="Summary")
                        album_rejected = gr.Dataframe(headers=["photo", "why it cannot be used"],
                                                      datatype=["str", "str"], interactive=False,
                                                      label="Rejected photos", wrap=True,
                                                      column_widths=["30%", "70%"])
                        with gr.Row():
                            album_name = gr.Textbox(value="me", label="Name of the personal model")
                            album_steps = gr.Number(value=500, precision=0, minimum=1,
                                                    maximum=engine.config.max_train_steps,
                                                    label="Training steps",
                                                    info="the paper uses 5000 on a GPU")
                        with gr.Row():
                            album_train = gr.Button("Train personal model", variant="primary")
                            album_stop = gr.Button("Stop", variant="stop")
                    with gr.Column(scale=6):
                        album_gallery = gr.Gallery(label="Aligned crops with their buffers (photo, rendered / "
                                                   "normal, albedo)", columns=4, height="auto",
                                                   object_fit="contain")
                        train_status = gr.Markdown(label="Status")
                        train_plot = gr.LinePlot(x="step", y="loss", title="Training loss", label="Training loss",
                                                 height=220)
                        train_file = gr.File(label="Personal model", interactive=False)

                @_guard
                def do_check(files, model=None, progress=gr.Progress()):
                    out = H.check_album(engine, files, model, progress=_progress(progress))
                    return out.gallery, out.rejected, out.summary

                album_check.click(do_check, [album_files, album_base],
                                  [album_gallery, album_rejected, album_summary], api_name="album_check")

                @_guard
                def do_train(files, model=None, steps=500, name="personal", request: gr.Request = None,
                             progress=gr.Progress()):
                    import pandas as pd

                    stop = engine.stop_event(_session(request))
                    for update in H.train_album(engine, files, model, steps, name, progress=_progress(progress),
                                                stop=stop):
                        steps_done, losses = zip(*update.losses) if update.losses else ((), ())
                        # typed columns, so the plot's axes are numeric even while it is empty
                        frame = pd.DataFrame({"step": pd.Series(steps_done, dtype="int64"),
                                              "loss": pd.Series(losses, dtype="float64")})
                        yield update.status, frame, update.model_file

                def do_stop(request: gr.Request = None):
                    engine.stop_event(_session(request), create=False).set()

                train_event = album_train.click(do_train, [album_files, album_base, album_steps, album_name],
                                                [train_status, train_plot, train_file], api_name="train",
                                                concurrency_id="train", concurrency_limit=1)
                album_stop.click(do_stop, None, None, api_visibility="private", queue=False)

            # ---------------------------------------------------------------- Setup
            with gr.Tab("Setup", id="setup"):
                setup_md = gr.Markdown(label="Setup report")
                setup_refresh = gr.Button("Check again")
                setup_refresh.click(_guard(lambda: H.setup_report(engine)), None, setup_md, api_name="setup")

        # ---------------------------------------------------------------- page load
        def refresh_models(*current):
            choices = list(engine.model_choices())
            default, base = engine.default_model_label(), engine.base_model_label()
            # first choices: the default model to edit with, a generic one to fine-tune from, and for
            # a swap the generic model for the photo and another (personal) model to render it as
            first = {album_base: base, swap_model: base,
                     swap_other: next((c for c in choices if c != base), default)}
            return [gr.Dropdown(choices=choices, value=value if value in choices else first.get(dd, default))
                    for dd, value in zip(model_dropdowns, current)]

        def sample_items():
            return [(str(p), name) for name, p in engine.sample_photos().items()]

        def on_load(*current):
            items = sample_items()
            return [*refresh_models(*current), H.setup_report(engine), *([items] * len(galleries))]

        demo.load(_guard(on_load), model_dropdowns, [*model_dropdowns, setup_md, *(g for g, _ in galleries)],
                  api_visibility="private")
        refresh.click(_guard(refresh_models), model_dropdowns, model_dropdowns, api_visibility="private")

        def models() -> list[str]:
            """The labels of every model the app offers (give one as `model` to the other endpoints)."""
            return list(engine.model_choices())

        gr.api(models, api_name="models")
        train_event.then(refresh_models, model_dropdowns, model_dropdowns, api_visibility="private")

        def pick_sample(evt: gr.SelectData):
            photos = list(engine.sample_photos().values())
            return str(photos[evt.index]) if 0 <= evt.index < len(photos) else None

        for gallery, target in galleries:
            event = gallery.select(pick_sample, None, target, api_visibility="private")
            if target in (photo, reference):
                event.then(api_visibility="private", **preview_kw)

        def sample_album():
            # the first sample person's photos: enough to try the album check and a short Stage 2
            first = next(iter(engine.sample_photos().values()), None)
            return [str(p) for p in engine.sample_photos().values()
                    if first is not None and p.parent == first.parent]

        album_sample.click(_guard(sample_album), None, album_files, api_visibility="private")
        del banner
    return demo
