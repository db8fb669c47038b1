"""The synthetic demo model: shipped files, wiring into pipeline/app, an edit on the CPU, the build."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusionrig_core.files import sha256_file
from diffusionrig_core import pipeline, synthetic
from diffusionrig_core.checkpoint import load_model
from diffusionrig_core.errors import CheckpointError, InputError
from diffusionrig_core.synthetic import demo

needs_demo = pytest.mark.skipif(not demo.demo_available(), reason="the demo models are not built in this checkout "
                                                                   "(diffusionrig demo build)")


@needs_demo
def test_shipped_demo_models_are_small_float16_files_that_load_as_float32():
    paths = demo.demo_model_paths()
    assert sum(p.stat().st_size for p in paths.values()) < 20_000_000
    manifest = demo.demo_manifest()
    for kind, path in paths.items():
        assert manifest["files"][kind]["bytes"] == path.stat().st_size
        model = load_model(path)
        assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
        assert model.config.image_size == manifest["size"] == 128
        assert model.config.encoder_width == 16  # the narrow encoder stem, inferred back from the file
        assert model.metadata["stage"] == (1 if kind == "stage1" else 2)


@needs_demo
def test_personal_demo_model_is_the_demo_persons_with_their_true_shape():
    model = load_model(demo.demo_model_path("personal"))
    person = demo.demo_person()
    assert model.metadata["person"] == person.id == demo.demo_manifest()["person"]
    # every album photo has the person's true shape, so the album mean shape is that shape
    np.testing.assert_allclose(model.mean_shape.reshape(-1).numpy(), person.shape, atol=1e-5)
    assert load_model(demo.demo_model_path("stage1")).mean_shape is None


@needs_demo
def test_demo_model_path_names_the_generic_model_by_default_and_refuses_unknown_kinds(tmp_path):
    assert demo.demo_model_path() == demo.demo_model_paths()["stage1"]
    assert synthetic.demo_model_path("personal").name == "personal.safetensors"
    with pytest.raises(InputError, match="unknown demo model"):
        demo.demo_model_path("stage3")
    assert not demo.demo_available(tmp_path)  # an empty folder has no demo


def test_a_missing_demo_model_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "DEMO_DATA_DIR", tmp_path)
    assert not demo.demo_available()
    with pytest.raises(CheckpointError, match="diffusionrig demo build"):
        demo.demo_model_path()


@needs_demo
def test_pipeline_load_model_demo_is_the_generic_demo_model():
    model = pipeline.load_model("demo", device="cpu")
    assert model.metadata["stage"] == 1 and model.config.image_size == 128


@needs_demo
def test_demo_world_offers_the_personal_model_first_and_samples_of_its_person(tmp_path):
    world = demo.demo_world(tmp_path / "samples")
    labels = list(world.models)
    assert world.models[labels[0]] == demo.demo_model_paths()["personal"]
    assert world.models[labels[1]] == demo.demo_model_paths()["stage1"]
    assert all(label.startswith("demo") for label in labels)
    first = next(iter(world.photos.values()))
    assert first.parent.name == world.person == demo.demo_person().id
    for path in world.photos.values():
        assert path.is_file() and path.with_name(path.stem + ".params.json").is_file()
        side = synthetic.load_sidecar(path)
        assert side.record["size"] == 128
    assert world.assets_dir == pipeline.demo_assets_dir()


@needs_demo
def test_the_gradio_app_finds_the_demo_world_and_models(tmp_path):
    from gradio_app.app import load_demo_world

    world = load_demo_world(tmp_path / "samples")
    assert set(world.models.values()) == set(demo.demo_model_paths().values())
    assert len(world.photos) >= 3


@needs_demo
def test_a_demo_edit_runs_on_the_cpu(tmp_path):
    # load + fit a sample photo + one edit; the full 20-step edit takes seconds on one core (see
    # docs/QUALITY.md), here 5 steps keep the suite quick
    model = pipeline.load_model(demo.demo_model_path("personal"), device="cpu")
    rig = pipeline.load_rig("demo", device="cpu")
    photo = demo.write_demo_samples(tmp_path, photos_each=1)["Demo person · 1"]
    portrait = pipeline.fit(rig, [photo], size=model.config.image_size)
    result = pipeline.edit(model, portrait, pipeline.Edit(light_direction=(1.0, 0.3, 0.6)), rig, seed=0,
                           steps="ddim5", invert=demo.demo_edit_defaults()["invert"])[0]
    assert result.image.shape == (128, 128, 3) and result.image.dtype == np.uint8
    assert result.image.std() > 5  # a picture, not a flat fill
    assert result.pasted is not None and result.pasted.shape == (128, 128, 3)


def test_demo_build_runs_the_whole_chain_on_the_cpu(tmp_path):
    # the tiny build: world -> datasets -> Stage 1 -> Stage 2 -> float16 files and manifest
    config = demo.DemoBuildConfig.tiny(out=tmp_path / "out", work=tmp_path / "work", device="cpu", people=2,
                                       photos=2, album=3, steps1=2, steps2=2, batch1=2, batch2=2)
    paths = demo.build_demo(config, log=lambda s: None)
    assert demo.demo_available(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert manifest["person"] == demo.demo_person().id and manifest["config"]["steps1"] == 2
    for kind, path in paths.items():
        assert manifest["files"][kind]["sha256"] == sha256_file(path)
        model = load_model(path)
        assert model.config.image_size == 32
    assert load_model(paths["personal"]).mean_shape is not None
    # the Stage 1 data: every person's photos, in person order, none of the demo person
    from diffusionrig_core.data import RigDataset

    names = RigDataset(tmp_path / "work" / "dataset1").names
    assert names == ["person_001/photo_000.png", "person_001/photo_001.png",
                     "person_002/photo_000.png", "person_002/photo_001.png"]


def test_the_demo_persons_album_is_the_same_for_the_same_seed_and_not_the_sample_photos(tmp_path):
    a = demo.write_demo_album(tmp_path / "a", n=2, size=64)
    b = demo.write_demo_album(tmp_path / "b", n=2, size=64)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert synthetic.load_sidecar(a[0]).record["person"] == demo.demo_person().id
    sample = demo.write_demo_samples(tmp_path / "s", size=64, photos_each=1)["Demo person · 1"]
    assert not np.allclose(synthetic.load_sidecar(sample).params["pose"], synthetic.load_sidecar(a[0]).params["pose"])


def test_demo_build_config_refuses_impossible_settings():
    with pytest.raises(InputError):
        demo.DemoBuildConfig(album=4, batch2=8)
    with pytest.raises(InputError):
        demo.DemoBuildConfig(steps1=0)


def test_demo_command_is_registered_with_build_and_quality():
    from diffusionrig_core.cli import build_parser

    args = build_parser().parse_args(["demo", "build", "--tiny", "--out", "x", "--steps1", "3"])
    assert args.demo_command == "build" and args.tiny and args.steps1 == 3
    args = build_parser().parse_args(["demo", "quality", "--tiny", "--invert"])
    assert args.demo_command == "quality" and args.invert
