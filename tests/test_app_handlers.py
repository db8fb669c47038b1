"""The Gradio app's handlers (gradio_app/handlers.py) on a tiny synthetic world and tiny models.

These call the same functions the buttons call, without a browser; test_app_browser.py drives the
real page.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from app_world import SIZE, make_world, write_bad_files
from diffusionrig_core.errors import AssetError, ImageError, InputError, NoFaceError

gr_app = pytest.importorskip("gradio_app.app", reason="the app package needs its dependencies")
from gradio_app import handlers as H  # noqa: E402
from gradio_app.app import AppConfig, Engine  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("app_world"))


@pytest.fixture(scope="module")
def engine(world, tmp_path_factory):
    work = tmp_path_factory.mktemp("app_work")
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFUSIONRIG_MODELS", str(work / "no_models_here"))  # never the user's own folder
    eng = Engine(AppConfig(demo=True, work_dir=work, max_pixels=4_000_000, default_invert=False), demo_world=world)
    yield eng
    mp.undo()


@pytest.fixture(scope="module")
def photo(world):
    return world.photos["Person 1 · 1"]


def test_an_edit_gives_before_after_buffers_the_pasted_photo_and_files(engine, photo):
    settings = H.EditSettings(light_mode="Direction", azimuth=40, elevation=20, yaw=15, jaw_open=10)
    calls = []
    out = H.run_edit(engine, photo, None, settings, steps=3, progress=lambda f, m: calls.append((f, m)))
    assert out.before.shape == out.after.shape == (SIZE, SIZE, 3) and out.after.dtype == np.uint8
    assert [caption for _, caption in out.buffers] == ["rendered", "normal", "albedo"]
    assert out.pasted is not None and out.pasted.ndim == 3
    names = [Path(f).name for f in out.files]
    assert all(Path(f).is_file() for f in out.files) and any(n.endswith(".json") for n in names)
    saved = json.loads(Path(next(f for f in out.files if f.endswith(".json"))).read_text())
    assert saved["seed"] == out.seed and saved["settings"]["azimuth"] == 40
    assert calls and calls[-1][0] == pytest.approx(1.0)  # the progress bar reaches the end
    assert f"Seed **{out.seed}**" in out.info


def test_the_seed_is_shown_and_reusing_it_repeats_the_result(engine, photo):
    first = H.run_edit(engine, photo, None, H.EditSettings(yaw=-10), steps=2, random_seed=True)
    again = H.run_edit(engine, photo, None, H.EditSettings(yaw=-10), steps=2, seed=first.seed, random_seed=False)
    assert again.seed == first.seed
    np.testing.assert_array_equal(again.after, first.after)


def test_the_demo_starts_from_the_inversion_unless_told_otherwise(engine, world, photo, tmp_path):
    assert Engine(AppConfig(demo=True, work_dir=tmp_path), demo_world=world).default_invert
    assert not engine.default_invert  # this module's engine turns it off, to stay fast
    out = H.run_edit(engine, photo, None, H.EditSettings(), steps=2, invert=True)
    assert "inverted source" in out.info


def test_light_sliders_change_the_rendered_buffer_but_not_the_normals(engine, photo):
    left = H.preview_buffers(engine, photo, None, H.EditSettings(light_mode="Direction", azimuth=-70))
    right = H.preview_buffers(engine, photo, None, H.EditSettings(light_mode="Direction", azimuth=70))
    assert np.abs(left[0][0].astype(int) - right[0][0].astype(int)).mean() > 1.0
    np.testing.assert_array_equal(left[1][0], right[1][0])


def test_every_light_preset_and_a_colour_make_a_valid_edit(engine, photo):
    for name in H.light_preset_names():
        H.build_edit(H.EditSettings(light_mode="Preset", preset=name, color="#ffcc88"))
    assert H.hex_to_rgb("rgba(255, 0, 127.5, 1)") == pytest.approx((1.0, 0.0, 0.5))
    with pytest.raises(InputError, match="not a colour"):
        H.hex_to_rgb("bright")


def test_taking_from_a_reference_needs_one_and_then_works(engine, world, photo):
    settings = H.EditSettings(take_from=["light", "expression", "pose"])
    with pytest.raises(InputError, match="reference photo"):
        H.run_edit(engine, photo, None, settings, steps=2)
    out = H.run_edit(engine, photo, None, settings, reference=world.photos["Person 2 · 1"], steps=2)
    assert out.after.shape == (SIZE, SIZE, 3)


def test_out_of_range_settings_are_refused_with_the_range(engine, photo):
    with pytest.raises(InputError, match="between"):
        H.run_edit(engine, photo, None, H.EditSettings(yaw=500), steps=2)
    with pytest.raises(InputError, match="steps must be between"):
        H.run_edit(engine, photo, None, H.EditSettings(), steps=0)
    assert H.steps_spec(engine, 37) in ("ddim36", "ddim38")  # snapped to a count the respacing can make
    with pytest.raises(InputError, match="light mode"):
        H.EditSettings(light_mode="Sunny")


def test_mix_and_match_and_identity_swap_give_results(engine, world, photo):
    mixed = H.run_mix(engine, photo, world.photos["Person 2 · 1"], None, steps=2)
    swapped = H.run_swap(engine, photo, "demo: tiny A", "demo: tiny B", steps=2)
    for out in (mixed, swapped):
        assert out.after.shape == (SIZE, SIZE, 3) and out.files
    with pytest.raises(InputError, match="other person's model"):
        H.run_swap(engine, photo, None, None, steps=2)


def test_bad_uploads_raise_messages_that_say_what_is_wrong(engine, tmp_path):
    bad = write_bad_files(tmp_path)
    with pytest.raises(ImageError, match="not an image"):
        H.run_edit(engine, bad["not_image"], None, H.EditSettings(), steps=2)
    with pytest.raises(ImageError, match="megapixels"):
        H.run_edit(engine, bad["huge"], None, H.EditSettings(), steps=2)
    with pytest.raises((NoFaceError, AssetError), match="face|sample people"):
        H.run_edit(engine, bad["no_face"], None, H.EditSettings(), steps=2)
    with pytest.raises(InputError, match="no photo"):
        H.run_edit(engine, None, None, H.EditSettings(), steps=2)


def test_files_over_the_upload_limit_are_refused_before_decoding(world, photo, tmp_path):
    small = Engine(AppConfig(demo=True, work_dir=tmp_path, max_upload_mb=0.0001), demo_world=world)
    with pytest.raises(ImageError, match="MB"):
        H.check_photo(small, photo)


def test_models_load_once_and_unknown_models_are_refused(engine):
    assert engine.model("demo: tiny A") is engine.model("demo: tiny A")
    assert engine.model(str(engine.resolve_model("demo: tiny A"))) is engine.model("demo: tiny A")
    with pytest.raises(InputError, match="unknown model"):
        engine.resolve_model("/etc/passwd")


def test_album_check_shows_crops_with_buffers_and_why_photos_were_rejected(engine, world, tmp_path):
    bad = write_bad_files(tmp_path)
    photos = [world.photos["Person 1 · 1"], world.photos["Person 1 · 2"], bad["not_image"],
              world.photos["Person 1 · 1"]]
    album = H.check_album(engine, photos)
    assert len(album.accepted) == 2 and len(album.gallery) == 2
    assert album.gallery[0][0].shape == (2 * SIZE, 2 * SIZE, 3)  # crop, rendered / normal, albedo
    reasons = dict(album.rejected)
    assert "not an image" in reasons["notes.png"] and "same photo" in reasons[Path(photos[3]).name]
    assert "**2** of 4" in album.summary


def test_stage_two_streams_progress_and_registers_the_personal_model(engine, world):
    photos = [world.photos["Person 1 · 1"], world.photos["Person 1 · 2"]]
    updates = list(H.train_album(engine, photos, "demo: tiny A", steps=2, name="Ada", poll_s=0.05))
    last = updates[-1]
    assert last.model_file and Path(last.model_file).is_file()
    assert last.model_label in engine.model_choices()
    out = H.run_edit(engine, photos[0], last.model_label, H.EditSettings(), steps=2)
    assert out.after.shape == (SIZE, SIZE, 3)


def test_stop_ends_stage_two_without_a_model(engine, world):
    stop = threading.Event()
    stop.set()  # pressed before the first step finished
    before = set(engine.model_choices())
    photos = [world.photos["Person 1 · 1"], world.photos["Person 1 · 2"]]
    updates = list(H.train_album(engine, photos, "demo: tiny A", steps=50, name="Bo", poll_s=0.05, stop=stop))
    assert updates[-1].status.startswith("Stopped") and updates[-1].model_file is None
    assert set(engine.model_choices()) == before


def test_setup_report_names_every_asset_the_models_and_the_demo_mode(engine):
    from diffusionrig_core.assets import ASSETS

    text = H.setup_report(engine)
    assert "synthetic demo" in text
    for info in ASSETS:
        assert info.name in text
    assert "demo: tiny A" in text
    assert "Synthetic demo" in H.demo_banner(engine)


def test_with_assets_and_a_model_the_app_leaves_demo_mode_and_finds_models(world, tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "people").mkdir(parents=True)
    (models / "people" / "bob.safetensors").symlink_to(world.models["demo: tiny B"])
    (models / "deca_model.tar").write_bytes(b"not a DiffusionRig model")
    monkeypatch.setenv("DIFFUSIONRIG_MODELS", str(models))
    eng = Engine(AppConfig(assets_dir=world.assets_dir, model=world.models["demo: tiny A"], work_dir=tmp_path / "w"))
    assert not eng.demo and eng.sample_photos() == {} and H.demo_banner(eng) == ""
    assert list(eng.model_choices()) == ["tiny_0.safetensors (given)", "people/bob.safetensors"]
    out = H.run_edit(eng, world.photos["Person 1 · 1"], None, H.EditSettings(yaw=5), steps=2)
    assert "tiny_0.safetensors (given)" in out.info


def test_demo_mode_is_chosen_when_no_real_assets_are_found(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSIONRIG_MODELS", str(tmp_path / "models"))
    assert Engine(AppConfig(assets_dir=tmp_path / "empty")).demo
    assert not Engine(AppConfig(assets_dir=tmp_path / "empty", demo=False)).demo


def test_building_the_app_loads_nothing_and_names_its_api_endpoints(world, tmp_path):
    from gradio_app import build_demo

    fresh = Engine(AppConfig(demo=True, work_dir=tmp_path), demo_world=world)
    demo = build_demo(engine=fresh)
    assert fresh._models == {} and fresh._rig is None  # models load on the first request
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"edit", "preview", "mix", "swap", "album_check", "train", "setup", "models"} <= names


def test_the_app_command_passes_its_options_to_the_app(monkeypatch, tmp_path):
    import gradio_app
    from diffusionrig_core.cli import build_parser

    seen = {}
    monkeypatch.setattr(gradio_app, "launch", lambda config, **kw: seen.update(config=config, **kw))
    args = build_parser().parse_args(["app", "--port", "7999", "--host", "0.0.0.0", "--no-browser", "--demo",
                                      "--assets", str(tmp_path), "--concurrency", "2"])
    assert args.func(args) == 0
    assert seen["port"] == 7999 and seen["host"] == "0.0.0.0" and seen["open_browser"] is False
    assert seen["config"].demo is True and seen["config"].assets_dir == tmp_path
    assert seen["config"].concurrency_limit == 2
