"""The ground-truth benchmark: PSNR, SSIM and the run on held-out synthetic photos."""
from __future__ import annotations

import math

import numpy as np
import pytest

from diffusionrig_core import quality
from diffusionrig_core.synthetic import demo


def _image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_psnr_of_a_known_error_and_of_identical_images():
    a = np.zeros((8, 8, 3), np.float32)
    b = a + 0.1  # MSE 0.01 -> 20 dB
    assert quality.psnr(a, b) == pytest.approx(20.0)
    assert quality.psnr(a, a) == math.inf
    mask = np.zeros((8, 8), bool)
    mask[:2] = True
    b2 = a.copy()
    b2[4:] = 1.0  # an error outside the mask does not count
    assert quality.psnr(a, b2, mask) == math.inf
    assert quality.psnr(_image(0), _image(0).astype(np.float32) / 255) > 100  # uint8 and float agree


def test_ssim_is_one_for_identical_images_symmetric_and_lower_for_noise():
    a = _image(1)
    assert quality.ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + np.random.default_rng(2).integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    s = quality.ssim(a, noisy)
    assert -1 <= s < 0.99
    assert quality.ssim(noisy, a) == pytest.approx(s)


def test_ssim_matches_the_gaussian_window_formula_at_one_window():
    a, b = _image(3, 13), _image(4, 13)
    smap = quality.ssim_map(a, b)
    assert smap.shape == (3, 3)
    # the window centred at pixel (6, 6), computed directly (data range 1, K1 0.01, K2 0.03)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for c in range(3):
        x, y = a[1:12, 1:12, c] / 255.0, b[1:12, 1:12, c] / 255.0
        mx, my = (w * x).sum(), (w * y).sum()
        vx, vy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2
        cxy = (w * x * y).sum() - mx * my
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert float(smap[1, 1]) == pytest.approx(np.mean(vals), abs=1e-9)


def test_masked_ssim_averages_the_windows_centred_in_the_mask():
    a, b = _image(5), _image(6)
    mask = np.zeros((32, 32), bool)
    mask[10:20, 10:20] = True
    smap = quality.ssim_map(a, b).numpy()
    assert quality.ssim(a, b, mask) == pytest.approx(smap[5:15, 5:15].mean())


@pytest.mark.skipif(not demo.demo_available(), reason="the demo models are not built (diffusionrig demo build)")
def test_the_tiny_quality_preset_runs_on_the_demo_models(tmp_path):
    report = quality.run_quality_bench("tiny", device="cpu", work_dir=tmp_path, log=lambda s: None)
    models = {r["model"] for r in report.rows}
    assert {"Stage 1", "Stage 2 (personal)", "reference: source photo (no edit)",
            "reference: physical render only"} <= models
    assert {r["edit"] for r in report.rows} == {"light", "exp", "pose"}
    for r in report.rows:
        assert r["n"] == 1 and math.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1
        assert math.isfinite(r["face_psnr"])
        assert (r["identity"] is not None) == report.settings["identity"]
    table = report.markdown()
    assert table.startswith("| people | model | edit | PSNR dB |") and "tiny preset" in table
    # the held-out photos were drawn at the model's size, with their true re-renders
    assert sorted(p.name for p in (tmp_path / "person_000").glob("case_00_*.png")) == [
        "case_00_exp.png", "case_00_light.png", "case_00_pose.png", "case_00_source.png", "case_00_target.png"]


def test_unknown_preset_is_refused():
    with pytest.raises(Exception, match="unknown quality preset"):
        quality.run_quality_bench("huge")


def test_bench_quality_flag_runs_the_quality_benchmark(monkeypatch, capsys):
    from diffusionrig_core.cli import main

    calls = {}

    def fake(**kwargs):
        calls.update(kwargs)
        return quality.QualityReport([{"people": "demo person", "model": "Stage 1", "edit": "light", "n": 1,
                                       "psnr": 20.0, "ssim": 0.5, "face_psnr": 21.0, "face_ssim": 0.6,
                                       "identity": None}], settings={"preset": kwargs["preset"]})

    monkeypatch.setattr(quality, "run_quality_bench", fake)
    assert main(["bench", "--quality", "--tiny", "--device", "cpu"]) == 0
    assert calls["preset"] == "tiny" and calls["device"] == "cpu" and calls["steps"] is None
    assert "| demo person | Stage 1 | light | 20.00 |" in capsys.readouterr().out
