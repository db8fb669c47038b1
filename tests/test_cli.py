"""``diffusionrig edit`` and ``diffusionrig extract`` on the synthetic rig with a tiny model (CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffusionrig_core.cli import main

import pipeline_fixtures as W


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def photos():
    return W.album()


def edit_args(photos, out, *extra):
    return ["edit", photos[0], "--model", W.model_file(), "--assets", W.assets_dir(), "--device", "cpu",
            "--steps", "ddim2", "--quiet", "--out", out, *extra]


def test_edit_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        run("edit", "--help")
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--light-from", "--light-sh", "--light-direction", "--light-intensity", "--light-color",
                   "--yaw", "--pitch", "--roll", "--pose-from", "--expression-from", "--jaw-open",
                   "--latent-from", "--swap-model", "--sweep", "--seed", "--steps", "--eta", "--invert",
                   "--no-paste", "--out", "--assets", "--model"):
        assert option in text, option
    assert "mix-and-match" in text and "identity swap" in text


def test_edit_writes_results_pasted_photos_a_contact_sheet_and_prints_the_seed(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(*edit_args(photos, out, "--yaw", "15", "--light-direction", "1", "0.5", "1",
                          "--light-color", "1", "0.9", "0.8", "--seed", "5")) == 0
    printed = capsys.readouterr().out
    assert "photo_000: seed 5" in printed
    crops = sorted(p for p in out.glob("photo_000_00_*.png") if not p.stem.endswith("_full"))
    full = sorted(out.glob("photo_000_00_*_full.png"))
    assert len(crops) == 1 and len(full) == 1
    assert Image.open(crops[0]).size == (W.SIZE, W.SIZE)
    assert Image.open(full[0]).size == Image.open(photos[0]).size
    assert Image.open(out / "contact_sheet.png").size[0] == 2 * 128
    record = json.loads((out / "results.json").read_text())
    assert record["results"][0]["seed"] == 5 and record["results"][0]["edit"]["yaw"] == 15.0


def test_the_same_seed_reproduces_a_cli_result(photos, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert run(*edit_args(photos, out, "--jaw-open", "10", "--seed", "9", "--no-paste")) == 0
    files = sorted(a.glob("photo_000_00_*.png"))
    assert files and not list(a.glob("*_full.png"))
    assert np.array_equal(np.asarray(Image.open(files[0])), np.asarray(Image.open(b / files[0].name)))


def test_a_sweep_writes_one_result_per_value_with_one_shared_seed(photos, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run(*edit_args(photos, out, "--sweep", "yaw=-20:20:3", "--seed", "1", "--no-paste")) == 0
    assert "photo_000: seed 1\n" in capsys.readouterr().out
    names = sorted(p.name for p in out.glob("photo_000_*.png"))
    assert len(names) == 3 and any("yaw=-20" in n for n in names) and any("yaw=20" in n for n in names)


def test_targets_for_expression_pose_light_and_latent_are_photos(photos, tmp_path):
    out = tmp_path / "targets"
    assert run(*edit_args(photos, out, "--expression-from", photos[1], "--pose-from", photos[2],
                          "--light-from", photos[2], "--latent-from", photos[1], "--invert", "--seed", "0")) == 0
    record = json.loads((out / "results.json").read_text())
    edit = record["results"][0]["edit"]
    assert set(edit) >= {"expression_from", "pose_from", "light_from", "latent_from"}


def test_extract_writes_aligned_crops_params_and_buffer_previews(photos, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "extract"
    assert run("extract", photos[0], photos[2], "--assets", W.assets_dir(), "--size", W.SIZE, "--device", "cpu",
               "--quiet", "--out", out) == 0
    for name in ("photo_000", "other_000"):
        assert Image.open(out / f"{name}_aligned.png").size == (W.SIZE, W.SIZE)
        assert Image.open(out / f"{name}_buffers.png").size == (4 * W.SIZE, W.SIZE)
        with safe_open(str(out / f"{name}.params.safetensors"), "pt") as f:
            assert set(f.keys()) == {"shape", "tex", "exp", "pose", "cam", "light", "tform", "center"}
            assert tuple(f.get_tensor("light").shape) == (1, 9, 3)
        record = json.loads((out / f"{name}.params.json").read_text())
        assert len(record["shape"]) == 100 and len(record["light"]) == 9
        with safe_open(str(out / f"{name}.buffers.safetensors"), "pt") as f:
            assert tuple(f.get_tensor("buffers").shape) == (9, W.SIZE, W.SIZE)


@pytest.mark.parametrize("extra, message", [
    (["--sweep", "nose=1:2:3"], "sweepable"),
    (["--sweep", "yaw=1..2"], "KEY=START:STOP:N"),
    (["--yaw", "200"], "between -90 and 90"),
    (["--light-sh", "1", "2", "3"], "27"),
    (["--steps", "ddimX"], "steps"),
])
def test_bad_edit_options_exit_with_a_clear_message(photos, tmp_path, capsys, extra, message):
    assert run(*edit_args(photos, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err
    assert "diffusionrig edit: error:" in err and message in err


def test_bad_files_exit_with_a_clear_message(photos, tmp_path, capsys):
    assert run("edit", photos[0], "--model", tmp_path / "nope.pt", "--assets", W.assets_dir(),
               "--out", tmp_path / "o", "--quiet") == 2
    assert "nope.pt does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"no image here")
    assert run(*edit_args([junk], tmp_path / "o2")) == 2
    assert "junk.png" in capsys.readouterr().err


def test_a_swap_model_of_another_size_is_refused(photos, tmp_path, capsys):
    assert run(*edit_args(photos, tmp_path / "swap", "--swap-model", W.model_file(32))) == 2
    assert "32 px" in capsys.readouterr().err


def test_the_demo_model_edits_a_demo_photo_without_any_assets_option(tmp_path, capsys):
    from diffusionrig_core import synthetic

    if not (hasattr(synthetic, "demo_available") and synthetic.demo_available()):
        pytest.skip("the demo models are not built in this checkout (diffusionrig demo build)")
    photo = next(iter(synthetic.write_demo_samples(tmp_path / "samples", photos_each=1).values()))
    out = tmp_path / "demo"
    assert run("edit", photo, "--model", "demo:personal", "--device", "cpu", "--steps", "ddim2", "--yaw", "10",
               "--seed", "0", "--quiet", "--out", out) == 0
    assert "seed 0" in capsys.readouterr().out and (out / "contact_sheet.png").is_file()
