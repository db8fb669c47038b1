"""Loading official .pt files and our .safetensors, configuration inference, and bad-file errors."""
import argparse
import json
import zipfile

import pytest
import torch

from diffusionrig_core.checkpoint import convert_checkpoint, infer_config, load_model, save_model
from diffusionrig_core.errors import CheckpointError
from diffusionrig_core.model import DiffusionRig, ModelConfig


@pytest.fixture(scope="module")
def tiny_model() -> DiffusionRig:
    torch.manual_seed(0)
    model = DiffusionRig(ModelConfig.tiny())
    with torch.no_grad():  # no zero-initialised layers, so outputs tell models apart
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
        model.encoder.bn1.running_mean.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def official_pt(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model005000.pt"
    torch.save(tiny_model.state_dict(), path)  # exactly what the official training writes
    return path


def _same_weights(a: DiffusionRig, b: DiffusionRig) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_pt_loads_with_the_config_inferred_from_its_tensors(tiny_model, official_pt):
    model = load_model(official_pt)
    assert not model.training
    assert model.config == ModelConfig.from_dict({**ModelConfig.tiny().to_dict(), "dropout": 0.1})
    assert _same_weights(model, tiny_model)
    assert all(p.requires_grad for p in model.parameters())


def test_ddp_module_prefix_is_stripped(tiny_model, tmp_path):
    path = tmp_path / "ddp.pt"
    torch.save({"module." + k: v for k, v in tiny_model.state_dict().items()}, path)
    assert _same_weights(load_model(path), tiny_model)


def test_heads_and_image_size_can_be_overridden_when_loading(official_pt):
    model = load_model(official_pt, num_heads=2, image_size=128)
    assert model.config.num_heads == 2 and model.config.image_size == 128
    assert model.config.attention_resolutions == (64,)  # the 2x-downsampled level of a 128 px model
    assert model.denoisingUNet.middle_block[1].num_heads == 2


@pytest.mark.parametrize("size", [64, 128, 256, 512])
def test_default_configs_are_inferred_exactly(size):
    with torch.device("meta"):
        model = DiffusionRig(ModelConfig(image_size=size, channel_mult=""))
    assert infer_config(model.state_dict()) == model.config


def test_unusual_configs_are_inferred():
    cfg = ModelConfig(image_size=64, num_channels=64, num_res_blocks=3, channel_mult=(1, 1.5, 2),
                      attention_resolutions=(32, 16), latent_dim=32, encoder_type="resnet50", learn_sigma=True)
    with torch.device("meta"):
        sd = DiffusionRig(cfg).state_dict()
    assert infer_config(sd) == cfg


def test_safetensors_round_trip_keeps_config_mean_shape_and_metadata(tiny_model, tmp_path):
    tiny_model.mean_shape = torch.randn(1, 100)
    tiny_model.metadata = {"album": "obama", "steps": 5000}
    try:
        path = save_model(tiny_model, tmp_path / "person.safetensors", metadata={"note": "x"})
    finally:
        mean_shape, tiny_model.mean_shape, tiny_model.metadata = tiny_model.mean_shape, None, {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["person.safetensors"]  # no temp file left
    model = load_model(path)
    assert model.config == tiny_model.config
    assert _same_weights(model, tiny_model)
    assert torch.equal(model.mean_shape, mean_shape)
    assert model.metadata == {"album": "obama", "steps": 5000, "note": "x"}


def test_load_to_a_dtype(official_pt):
    model = load_model(official_pt, dtype=torch.bfloat16)
    assert model.denoisingUNet.out[2].weight.dtype == torch.bfloat16
    assert model.encoder.bn1.num_batches_tracked.dtype == torch.int64
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        eps = model(x, torch.tensor([10]), torch.zeros(1, 9, 64, 64), x_start=x)
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()


def test_convert_official_pt_to_safetensors(tiny_model, official_pt, tmp_path):
    dst = tmp_path / "model.safetensors"
    config = convert_checkpoint(official_pt, dst)
    assert config.num_channels == 32
    model = load_model(dst)
    assert _same_weights(model, tiny_model) and model.metadata["converted_from"] == "model005000.pt"


def test_convert_command(official_pt, tmp_path, capsys):
    from diffusionrig_core.cli import convert

    parser = argparse.ArgumentParser()
    convert.add_parser(parser.add_subparsers())
    dst = tmp_path / "c.safetensors"
    args = parser.parse_args(["convert", str(official_pt), str(dst), "--num-heads", "2"])
    assert convert.run(args) == 0
    assert "channels 32" in capsys.readouterr().out
    assert load_model(dst).config.num_heads == 2


# ---- files that are not what was expected ---------------------------------------------------
def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path, **kw)
    return str(e.value)


def test_missing_file_and_directory(tmp_path):
    assert "not found" in _error(tmp_path / "nope.pt")
    assert "directory" in _error(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.pt")


def test_truncated_download(official_pt, tmp_path):
    data = official_pt.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    msg = _error(bad)
    assert "truncated or corrupt" in msg and "again" in msg
    bad_st = tmp_path / "truncated.safetensors"
    ok = tmp_path / "ok.safetensors"
    save_model(load_model(official_pt), ok)
    bad_st.write_bytes(ok.read_bytes()[:5000])
    assert "truncated or corrupt safetensors" in _error(bad_st)


def test_not_a_checkpoint_at_all(tmp_path):
    path = tmp_path / "photo.pt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    assert "neither a PyTorch checkpoint nor a safetensors file" in _error(path)


def test_optimizer_state_is_named(tiny_model, tmp_path):
    opt = torch.optim.Adam(list(tiny_model.parameters())[:2])
    path = tmp_path / "opt005000.pt"
    torch.save(opt.state_dict(), path)
    msg = _error(path)
    assert "optimizer state" in msg and "modelNNNNNN.pt" in msg


def test_deca_tar_is_recognised(tmp_path):
    path = tmp_path / "deca_model.tar"
    torch.save({"E_flame": {"w": torch.zeros(1)}, "E_detail": {"w": torch.zeros(1)}}, path)
    msg = _error(path)
    assert "DECA" in msg and "not a model state dict" in msg


def test_python_objects_are_refused(tmp_path):
    path = tmp_path / "pickle.pt"
    torch.save({"config": argparse.Namespace(a=1)}, path)
    assert "Python objects other than tensors" in _error(path)


def test_wrong_architecture_lists_missing_and_unexpected_keys(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    sd.pop("denoisingUNet.middle_block.1.qkv.weight")
    sd["denoisingUNet.extra.weight"] = torch.zeros(1)
    path = tmp_path / "other.pt"
    torch.save(sd, path)
    msg = _error(path)
    assert "missing keys" in msg and "middle_block.1.qkv.weight" in msg and "extra.weight" in msg
    path2 = tmp_path / "no_unet.pt"
    torch.save({"layer.weight": torch.zeros(3)}, path2)
    assert "not a DiffusionRig model" in _error(path2)


def test_wrong_tensor_shapes_are_reported(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    sd["denoisingUNet.middle_block.0.emb_layers.1.bias"] = torch.zeros(7)
    path = tmp_path / "shapes.pt"
    torch.save(sd, path)
    msg = _error(path)
    assert "wrong shape" in msg and "middle_block.0.emb_layers.1.bias" in msg


def test_safetensors_config_that_does_not_match_its_tensors(tiny_model, tmp_path):
    from safetensors.torch import save_file

    wrong = ModelConfig.from_dict({**tiny_model.config.to_dict(), "num_channels": 64})
    path = tmp_path / "mismatch.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path),
              metadata={"diffusionrig_config": wrong.to_json()})
    assert "wrong shape" in _error(path)
    # a safetensors file without our config is inferred like an official state dict
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(plain))
    assert load_model(plain).config.num_channels == 32
    assert json.loads(wrong.to_json())["num_channels"] == 64


def test_wrapped_state_dict_is_accepted(tiny_model, tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": tiny_model.state_dict(), "step": torch.tensor(3)}, path)
    assert _same_weights(load_model(path), tiny_model)
    assert zipfile.is_zipfile(path)
