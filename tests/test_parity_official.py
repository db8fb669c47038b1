"""Parity with the official DiffusionRig code, through the fixtures in ../shared/fixtures/official.

Tolerances are the ones its README recommends for a float32 re-implementation.
"""
import copy
import json
import lzma

import numpy as np
import pytest
import torch

from diffusionrig_core.checkpoint import infer_config
from diffusionrig_core.diffusion import Diffusion, cached, get_betas, space_timesteps
from diffusionrig_core.model import DiffusionRig, ModelConfig
from diffusionrig_core.sampling import ddim_sample, ddpm_sample, iter_ddim, make_denoiser
from diffusionrig_core.unet import timestep_embedding


@pytest.fixture(scope="session")
def official(shared_dir):
    from safetensors.torch import load, load_file

    root = shared_dir / "fixtures" / "official"
    if not (root / "tiny_io.safetensors").is_file():
        pytest.skip(f"official tiny fixtures missing under {root}")
    state_dict = load(lzma.open(root / "tiny_model.safetensors.xz").read())
    io = load_file(str(root / "tiny_io.safetensors"))
    config = json.loads((root / "tiny_config.json").read_text())
    return root, state_dict, io, config


def _model(official, **changes) -> DiffusionRig:
    _, sd, _, cfg = official
    model = DiffusionRig(ModelConfig.from_official(**{**cfg, **changes}))
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def tiny(official) -> DiffusionRig:
    return _model(official)


def _close(a, b, atol, rtol=0.0):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max abs error {err:.3g} over atol {atol}"


# ---- state dict layout --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["keys_256.json", "keys_512.json"])
def test_default_model_state_dict_is_key_for_key_the_official_one(shared_dir, name):
    ref = json.loads((shared_dir / "fixtures" / "official" / name).read_text())
    with torch.device("meta"):
        model = DiffusionRig(ModelConfig.from_official(**ref["config"]))
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert len(ours) == ref["count"]
    assert ours == ref["keys"]
    assert infer_config(model.state_dict()) == model.config


def test_tiny_config_is_inferred_from_the_official_state_dict(official):
    _, sd, _, cfg = official
    inferred = infer_config(sd)
    expected = ModelConfig.from_official(**cfg)
    assert inferred == ModelConfig.from_dict({**expected.to_dict(), "dropout": inferred.dropout})


# ---- schedules ----------------------------------------------------------------------------
def test_schedules_and_p2_weights_equal_the_official_float64_values(official):
    sched = json.loads((official[0] / "schedule.json").read_text())
    for kind in ("linear", "cosine"):
        ref = sched["schedules_1000"][kind]
        d = Diffusion.create(kind)
        np.testing.assert_array_equal(get_betas(kind), ref["betas"])
        np.testing.assert_array_equal(d.alphas_cumprod, ref["alphas_cumprod"])
        for gamma in (1, 0.5):
            snr = 1 / (1 - d.alphas_cumprod) - 1
            np.testing.assert_array_equal(1 / (1 + snr) ** gamma, ref[f"p2_weight_gamma{gamma}_k1"])
        assert d.p2_weight(torch.arange(1000)).tolist() == pytest.approx(ref["p2_weight_gamma1_k1"], rel=1e-6)


def test_respacing_maps_and_respaced_coefficients_equal_the_official_ones(official):
    sched = json.loads((official[0] / "schedule.json").read_text())
    for spec, ref in sched["respacing_timestep_maps"].items():
        spec = "" if spec == "(empty string)" else spec
        assert space_timesteps(1000, spec) == ref["timestep_map"], spec
        d = Diffusion.create(respacing=spec)
        assert d.num_timesteps == ref["num_timesteps"] and d.timestep_map.tolist() == ref["timestep_map"]
    for spec, ref in sched["respaced_coefficients"].items():
        d = Diffusion.create(respacing=spec)
        for name, values in ref.items():
            np.testing.assert_array_equal(getattr(d, name), values, err_msg=f"{spec} {name}")


# ---- network ------------------------------------------------------------------------------
def test_timestep_embedding_and_q_sample(official):
    io = official[2]
    _close(timestep_embedding(io["t"], 32), io["temb"], 1e-6)
    _close(Diffusion.create().q_sample(io["x0"], io["t"], io["noise"]), io["x_t"], 1e-6)


def test_global_latent_in_eval_and_train_mode_with_bn_running_stats(official, tiny):
    io = official[2]
    with torch.no_grad():
        _close(tiny.encode(io["x0"]), io["z_eval"], 5e-5)
        trained = copy.deepcopy(tiny).train()
        _close(trained.encode(io["x0"]), io["z_train"], 5e-5)
    enc = trained.encoder
    for ours, ref in [(enc.bn1.running_mean, "bn1_running_mean_after_train_fwd"),
                      (enc.bn1.running_var, "bn1_running_var_after_train_fwd"),
                      (enc.layer4[1].bn2.running_var, "layer4_1_bn2_running_var_after_train_fwd")]:
        assert torch.allclose(ours, io[ref], rtol=1e-5, atol=1e-6)


def test_eps_with_given_latent_encoded_latent_and_zero_latent(official, tiny):
    io = official[2]
    with torch.no_grad():
        _close(tiny(io["x_t"], io["t"], io["physic_cond"], io["z_eval"]), io["eps"], 1e-4)
        _close(tiny(io["x_t"], io["t"], io["physic_cond"], x_start=io["x0"]), io["eps_x_start_eval"], 1e-4)
        _close(tiny(io["x_t"], io["t"], io["physic_cond"], torch.zeros(2, 64)), io["eps_zero_latent"], 1e-4)


@pytest.mark.parametrize("name,changes", [
    ("eps_head_ch32", dict(num_head_channels=32)),
    ("eps_heads2", dict(num_heads=2)),
    ("eps_head_ch32_new_order", dict(num_head_channels=32, use_new_attention_order=True)),
])
def test_eps_of_the_attention_variants(official, name, changes):
    io = official[2]
    model = _model(official, **changes)
    with torch.no_grad():
        _close(model(io["x_t"], io["t"], io["physic_cond"], io["z_eval"]), io[name], 1e-4)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_p2_and_plain_training_losses(official, tiny, mode):
    io = official[2]
    d = Diffusion.create()
    # The four timestep rows go through in one batch of 8 (x0 repeated): the UNet treats samples
    # independently, and train-mode BatchNorm normalises 4 copies of the 2 images exactly as the
    # 2 images alone (same mean, same biased variance), so each row's losses are the official ones.
    t = io["loss_t"].reshape(-1)
    rep = lambda v: v.repeat(4, *([1] * (v.ndim - 1)))  # noqa: E731
    model = copy.deepcopy(tiny).train() if mode == "train" else tiny
    with torch.no_grad():
        terms = d.training_losses(model, rep(io["x0"]), rep(io["physic_cond"]), t, rep(io["noise"]), terms=True)
    for key, name in (("loss", "p2"), ("mse", "nop2")):
        ref = io[f"loss_{name}_{mode}"].reshape(-1)
        assert torch.allclose(terms[key], ref, rtol=1e-5, atol=1e-8), (key, terms[key], ref)
    # p2=False returns the plain loss itself
    plain = d.training_losses(model, rep(io["x0"])[:2], io["physic_cond"], t[:2], io["noise"], p2=False)
    assert torch.allclose(plain, io[f"loss_nop2_{mode}"][0], rtol=1e-5, atol=1e-8)


# ---- samplers -----------------------------------------------------------------------------
def test_ddim10_sample_trajectory_and_x0_estimates(official, tiny):
    io = official[2]
    steps = list(iter_ddim(make_denoiser(tiny, io["physic_cond"], io["z_eval"]), io["xT"], cached("linear", 1000, "ddim10")))
    assert [s.timestep for s in steps] == list(range(900, -1, -100))
    _close(steps[-1].x, io["ddim10_sample"], 2e-4)
    _close(torch.stack([s.x[0] for s in steps]), io["ddim10_traj0"], 2e-4)
    _close(torch.stack([s.pred_x0[0] for s in steps]), io["ddim10_pred_xstart0"], 2e-3)


@pytest.mark.parametrize("name,kwargs,atol", [
    ("ddim20_sample", dict(steps="ddim20"), 2e-4),
    ("ddim_10_10_10_sample", dict(steps="10,10,10"), 2e-4),
    ("ddim10_noclip_sample", dict(steps="ddim10", clip_denoised=False), 1e-3),
])
def test_ddim_samples(official, tiny, name, kwargs, atol):
    # sample 0 only (eval-mode samples are independent; ddim10 above checks the batch of 2)
    io = official[2]
    _close(ddim_sample(tiny, io["xT"][:1], io["physic_cond"][:1], io["z_eval"][:1], **kwargs), io[name][:1], atol)


def test_ddim_with_eta_and_the_official_noise_sequence(official, tiny):
    io = official[2]
    noise = io["ddim_eta_noise"]
    x = ddim_sample(tiny, io["xT"][:1], io["physic_cond"][:1], io["z_eval"][:1], steps="ddim10",
                    eta=float(io["ddim_eta"]), noise_fn=lambda i, x: noise[i])
    _close(x, io["ddim10_eta0.5_sample"], 2e-4)


def test_ddpm_with_the_official_noise_sequence(official, tiny):
    io = official[2]
    noise = io["ddpm_noise"]
    x = ddpm_sample(tiny, io["xT"][:1], io["physic_cond"][:1], io["z_eval"][:1], steps="10",
                    noise_fn=lambda i, x: noise[i])
    _close(x, io["ddpm10_sample"], 2e-4)
