"""Stage 1 / Stage 2 training on tiny synthetic datasets (CPU, float32, seconds per test)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading

import pytest
import torch
from safetensors.torch import load_file

from diffusionrig_core.checkpoint import load_model, save_model
from diffusionrig_core.data import DatasetWriter, RigDataset
from diffusionrig_core.errors import InputError, TrainingError
from diffusionrig_core.files import sha256_file
from diffusionrig_core.model import DiffusionRig, ModelConfig
from diffusionrig_core import train as T
from diffusionrig_core.train import StepBatchSampler, TrainConfig, find_checkpoint, train, verify_checkpoint

SIZE = 32


def make_dataset(path, n, seed=0, mean_shape=True):
    """Random photos + random buffers (the loop does not care what they depict)."""
    g = torch.Generator().manual_seed(seed)
    w = DatasetWriter(path, SIZE)
    for i in range(n):
        w.add(f"photo_{i:02d}.png", torch.randint(0, 256, (SIZE, SIZE, 3), generator=g, dtype=torch.uint8),
              torch.randn(9, SIZE, SIZE, generator=g))
    w.finish(mean_shape=torch.randn(1, 100, generator=g) if mean_shape else None)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return {"six": make_dataset(root / "six", 6), "two": make_dataset(root / "two", 2, seed=1)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(123)
    model = DiffusionRig(ModelConfig.tiny())
    path = tmp_path_factory.mktemp("base") / "stage1.safetensors"
    save_model(model, path)
    return path


def _same(a: dict, b: dict, keys=None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (keys or a))


class Stop(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# configuration and data order
# ---------------------------------------------------------------------------------------------
def test_config_defaults_are_the_official_recipe_per_stage():
    s1, s2 = TrainConfig(stage=1), TrainConfig(stage=2)
    assert (s1.lr, s1.batch_size, s1.max_steps) == (1e-4, 32, 50_000)
    assert (s2.lr, s2.batch_size, s2.max_steps) == (1e-5, 4, 5_000)
    for c in (s1, s2):
        assert c.p2 and c.p2_gamma == 1 and c.p2_k == 1 and c.grad_clip == 1.0
        assert c.betas == (0.9, 0.999) and c.eps == 1e-8 and c.weight_decay == 0 and c.ema_rate is None
        assert not c.freeze_encoder_bn  # official: encoder BN keeps training in stage 2
    tiny = TrainConfig.tiny(2)
    assert TrainConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny
    with pytest.raises(InputError):
        TrainConfig(stage=3)
    with pytest.raises(InputError):
        TrainConfig(batch_size=4, micro_batch=3)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and under the bound
def test_clipping_folded_into_fused_adam_updates_like_clip_grad_norm_then_step(max_norm):
    from diffusionrig_core.train import clip_and_step

    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(40, 7, generator=g)) for _ in range(3)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    folded, reference = torch.optim.Adam(ps, lr=1e-2, fused=True), torch.optim.Adam(qs, lr=1e-2, fused=True)
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=g) * 3
            q.grad = p.grad.clone()
        clip_and_step(folded, ps, max_norm)
        torch.nn.utils.clip_grad_norm_(qs, max_norm)
        reference.step()
    assert not hasattr(folded, "grad_scale")
    for p, q in zip(ps, qs):
        assert torch.allclose(p, q, atol=1e-6)


def test_stage1_batches_shard_each_global_batch_over_ranks_and_cover_epochs():
    n, batch, world = 10, 2, 2
    ranks = [StepBatchSampler(n, batch, world, r, seed=7, start=0, stop=4) for r in range(world)]
    steps = list(zip(*(list(s) for s in ranks)))  # per step: (rank 0's items, rank 1's items)
    per_epoch = n // (batch * world)  # 2 steps; the 2 leftover items of each epoch are dropped
    for e in range(2):
        seen = [i for step in steps[e * per_epoch:(e + 1) * per_epoch] for part in step for i in part]
        assert len(seen) == len(set(seen)) == 8
    one = StepBatchSampler(n, batch * world, 1, 0, seed=7, start=0, stop=4)
    assert [a + b for a, b in steps] == list(one)  # same global batches as one process
    resumed = StepBatchSampler(n, batch, world, 1, seed=7, start=3, stop=4)
    assert list(resumed) == [steps[3][1]]
    with pytest.raises(TrainingError, match="lower the batch size"):
        StepBatchSampler(3, 4, 1, 0, 0, 0, 1)


# ---------------------------------------------------------------------------------------------
# stage 1
# ---------------------------------------------------------------------------------------------
def test_stage1_tiny_preset_runs_end_to_end_and_its_model_loads_and_samples(tmp_path, data):
    from diffusionrig_core.sampling import ddim_sample

    cfg = TrainConfig.tiny(1, max_steps=2, save_interval=1)
    path = train(cfg, data["six"], tmp_path / "run", progress=False)
    assert path == tmp_path / "run" / "model.safetensors"
    model = load_model(path)
    assert model.metadata["stage"] == 1 and model.metadata["steps"] == 2
    x, b = RigDataset(data["six"]).load_all()
    with torch.no_grad():
        out = ddim_sample(model, torch.randn(2, 3, SIZE, SIZE), b[:2], model.encode(x[:2]), steps="ddim5")
    assert out.shape == (2, 3, SIZE, SIZE) and torch.isfinite(out).all() and out.abs().max() <= 1
    latest = json.loads((tmp_path / "run" / "latest.json").read_text())
    assert latest["step"] == 2 and verify_checkpoint(tmp_path / "run" / latest["dir"])
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "log.csv").read_text().splitlines()[0].startswith("step,loss")


def test_killed_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, data):
    # dropout on and an EMA: the RNG state and every piece of optimizer state must come back
    cfg = TrainConfig.tiny(1, max_steps=2, save_interval=1, dropout=0.1, ema_rate=0.9)

    def cancel_at_2(step, loss):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, data["six"], tmp_path / "a", progress=False, callback=cancel_at_2)
    # the cancelled run left its last checkpoint (step 1) valid
    assert find_checkpoint(tmp_path / "a") == tmp_path / "a" / "checkpoints" / "step_00000001"
    resumed = train(cfg, data["six"], tmp_path / "a", progress=False)
    straight = train(cfg, data["six"], tmp_path / "b", progress=False)
    assert _same(load_file(resumed), load_file(straight))
    assert _same(load_file(tmp_path / "a" / "model_ema.safetensors"), load_file(tmp_path / "b" / "model_ema.safetensors"))
    assert not _same(load_file(resumed), load_file(tmp_path / "a" / "model_ema.safetensors"),
                     keys=[k for k in load_file(resumed) if k.startswith("denoisingUNet.out")])


def test_a_half_written_checkpoint_is_never_read_as_valid(tmp_path, data, base, monkeypatch):
    # (Stage 2 for speed: both stages write checkpoints through the same code)
    run = tmp_path / "run"
    cfg = TrainConfig.tiny(2, max_steps=2, save_interval=1, keep_checkpoints=3)
    train(cfg, data["six"], run, base=base, progress=False)
    ck = run / "checkpoints"

    # 1. a crash while step 3's checkpoint is being written: latest.json still names step 2
    real = T.save_safetensors

    def crash_on_state(path, tensors, metadata):
        written = real(path, tensors, metadata)
        if path.name == T.STATE_FILE:
            os.truncate(path, written.size // 2)
            raise OSError("disk full")
        return written

    monkeypatch.setattr(T, "save_safetensors", crash_on_state)
    with pytest.raises(OSError, match="disk full"):
        train(TrainConfig.tiny(2, max_steps=3, save_interval=1, keep_checkpoints=3), data["six"], run, base=base,
              progress=False)
    monkeypatch.undo()
    assert json.loads((run / "latest.json").read_text())["step"] == 2
    assert any(p.name.startswith(".tmp-") for p in ck.iterdir())  # the debris stays invisible
    assert find_checkpoint(run) == ck / "step_00000002"

    # 2. a truncated file inside the newest checkpoint: it fails verification, the older one is used
    model_file = ck / "step_00000002" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    assert verify_checkpoint(ck / "step_00000002") is None
    assert find_checkpoint(run, verbose=False) == ck / "step_00000001"

    # 3. a garbled pointer falls back to scanning the verified folders
    (run / "latest.json").write_text("{not json")
    assert find_checkpoint(run, verbose=False) == ck / "step_00000001"

    # 4. and training resumes from there
    train(TrainConfig.tiny(2, max_steps=2, save_interval=1, keep_checkpoints=3), data["six"], run, base=base,
          progress=False)
    assert json.loads((run / "latest.json").read_text())["step"] == 2
    assert verify_checkpoint(ck / "step_00000002") is not None


def test_a_checkpoint_written_in_the_background_holds_the_step_it_was_taken_at(tmp_path, data, base, monkeypatch):
    trainer = T.Trainer(TrainConfig.tiny(2, max_steps=3, save_interval=0), data["six"], tmp_path / "run", base=base,
                        progress=False)
    gate = threading.Event()
    real = T.save_safetensors

    def held(path, tensors, metadata):  # the writer waits until the test has trained on
        assert gate.wait(30)
        return real(path, tensors, metadata)

    monkeypatch.setattr(T, "save_safetensors", held)
    try:
        batches = trainer._batches()
        trainer._update(*next(batches))
        taken = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        ck = trainer.save_checkpoint(wait=False)
        trainer._update(*next(batches))
        assert not ck.exists()
        gate.set()
        trainer.wait_for_checkpoint()
    finally:
        gate.set()
        trainer.close()
    saved = load_file(str(ck / "model.safetensors"))
    assert _same(taken, saved, keys=list(taken)) and not _same(trainer.model.state_dict(), taken)
    assert T.load_training_state(ck)["step"] == 1 and find_checkpoint(tmp_path / "run") == ck


def test_the_final_model_is_its_last_checkpoints_model_file_written_once(tmp_path, data, base, monkeypatch):
    from diffusionrig_core import checkpoint

    written = []
    real = T.save_safetensors
    monkeypatch.setattr(T, "save_safetensors", lambda path, *a: written.append(path.name) or real(path, *a))
    monkeypatch.setattr(checkpoint.ModelFile, "save", lambda *a, **k: pytest.fail("the final model was written again"))
    run = tmp_path / "run"
    path = train(TrainConfig.tiny(2, max_steps=2, save_interval=0), data["six"], run, base=base, progress=False)
    last = find_checkpoint(run)
    assert T.load_training_state(last)["step"] == 2 and written.count("model.safetensors") == 1
    assert path.read_bytes() == (last / "model.safetensors").read_bytes()
    model = checkpoint.load_model(path).state_dict()
    assert _same(load_file(str(path)), model, keys=list(model))
    # the checkpoint going (pruned, deleted) leaves the final model whole
    shutil.rmtree(last)
    assert _same(load_file(str(path)), model, keys=list(model))


def test_the_training_state_is_a_safetensors_file_that_keeps_its_structure(tmp_path, data, base):
    train(TrainConfig.tiny(2, max_steps=1), data["six"], tmp_path / "r", base=base, progress=False)
    ck = find_checkpoint(tmp_path / "r")
    assert not (ck / "state.pt").exists()
    tensors = load_file(str(ck / T.STATE_FILE))  # the safetensors library reads it: nothing pickled
    state = T.load_training_state(ck)
    assert state["step"] == 1 and len(state["rng"]) == 1
    opt = state["optimizer"]
    assert opt["state"] and all(isinstance(k, int) for k in opt["state"])  # torch.optim's int keys
    assert isinstance(opt["param_groups"][0]["betas"], tuple)
    assert any(torch.equal(tensors[name], opt["state"][0]["exp_avg"]) for name in tensors)


def test_a_checkpoint_from_before_the_safetensors_state_still_resumes(tmp_path, data, base):
    run = tmp_path / "r"
    train(TrainConfig.tiny(2, max_steps=1, save_interval=1), data["six"], run, base=base, progress=False)
    ck = find_checkpoint(run)
    state = T.load_training_state(ck)
    (ck / T.STATE_FILE).unlink()
    torch.save(state, ck / "state.pt")
    manifest = json.loads((ck / "manifest.json").read_text())
    del manifest["files"][T.STATE_FILE]
    manifest["files"]["state.pt"] = {"size": (ck / "state.pt").stat().st_size, "sha256": sha256_file(ck / "state.pt")}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    assert find_checkpoint(run) == ck and T.load_training_state(ck)["step"] == 1
    train(TrainConfig.tiny(2, max_steps=2, save_interval=1), data["six"], run, base=base, progress=False)
    assert T.load_training_state(find_checkpoint(run))["step"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, dataset: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings

    warnings.simplefilter("ignore")
    cfg = TrainConfig.tiny(1, max_steps=2, save_interval=0, batch_size=2, dropout=0.0)
    train(cfg, dataset, out, progress=False)


@pytest.mark.slow
def test_two_processes_on_the_cpu_agree_with_one_process_on_the_same_global_batch(tmp_path, data):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(data["six"]), str(tmp_path / "ddp")), nprocs=2)
    # one process, the same global batch of 4 split like the two ranks split it
    one = TrainConfig.tiny(1, max_steps=2, save_interval=0, batch_size=4, micro_batch=2, dropout=0.0)
    train(one, data["six"], tmp_path / "one", progress=False)
    a, b = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    # BatchNorm running statistics are per rank (broadcast_buffers=False, as official): compare parameters
    params = [k for k in a if "running_" not in k and "num_batches" not in k]
    assert max((a[k] - b[k]).abs().max().item() for k in params) <= 1e-6
    la = (tmp_path / "ddp" / "log.csv").read_text().splitlines()[-1].split(",")[1]
    lb = (tmp_path / "one" / "log.csv").read_text().splitlines()[-1].split(",")[1]
    assert abs(float(la) - float(lb)) <= 1e-6 * max(1.0, abs(float(lb)))


# ---------------------------------------------------------------------------------------------
# stage 2
# ---------------------------------------------------------------------------------------------
def test_stage2_trains_only_the_unet_while_encoder_batchnorm_statistics_follow_the_album(tmp_path, data, base):
    path = train(TrainConfig.tiny(2, max_steps=3), data["six"], tmp_path / "s2", base=base, progress=False,
                 model_path=tmp_path / "me.safetensors")
    assert path == tmp_path / "me.safetensors"
    before, after = load_file(base), load_file(path)
    enc_params = dict(DiffusionRig(ModelConfig.tiny()).encoder.named_parameters())
    enc_weights = [f"encoder.{k}" for k in enc_params]
    enc_stats = [k for k in after if k.startswith("encoder.") and "running_" in k]
    assert _same(before, after, enc_weights)                       # frozen: no gradient reached them
    assert not _same(before, after, enc_stats)                     # quirk 10: BN statistics drifted
    assert not _same(before, after, ["denoisingUNet.out.2.weight"])  # the UNet learned
    model = load_model(path)
    assert torch.equal(model.mean_shape, RigDataset(data["six"]).mean_shape)
    assert model.metadata["stage"] == 2 and model.metadata["train_config"]["lr"] == TrainConfig.tiny(2).lr
    assert model.metadata["album"] == RigDataset(data["six"]).names and model.metadata["base_model"] == base.name
    assert (tmp_path / "s2" / "loss.png").is_file()

    frozen = train(TrainConfig.tiny(2, max_steps=2, freeze_encoder_bn=True), data["six"], tmp_path / "s2b",
                   base=base, progress=False)
    assert _same(before, load_file(frozen), enc_weights + enc_stats)


def test_stage2_accepts_an_official_pt_base(tmp_path, data, base):
    pt = tmp_path / "model005000.pt"
    torch.save(load_model(base).state_dict(), pt)
    path = train(TrainConfig.tiny(2, max_steps=1), data["two"], tmp_path / "s2", base=pt, progress=False)
    assert load_model(path).metadata["base_model"] == "model005000.pt"


def test_loss_falls_when_fitting_two_images(tmp_path, data, base, capsys):
    from diffusionrig_core.diffusion import Diffusion

    x, b = RigDataset(data["two"]).load_all()
    t = torch.tensor([100, 300, 500, 700, 900, 999]).repeat_interleave(2)
    noise = torch.randn(12, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    diffusion = Diffusion.create()

    def eval_mse(model):
        model.eval()
        with torch.no_grad():
            return diffusion.training_losses(model, x.repeat(6, 1, 1, 1), b.repeat(6, 1, 1, 1), t, noise, p2=False).mean().item()

    cfg = TrainConfig.tiny(2, max_steps=10, lr=3e-3, batch_size=2)
    path = train(cfg, data["two"], tmp_path / "fit", base=base, progress=False)
    start, end = eval_mse(load_model(base)), eval_mse(load_model(path))
    assert end < 0.6 * start, (start, end)
    assert "estimated time" in capsys.readouterr().err


def test_stage2_can_be_resumed(tmp_path, data, base):
    cfg = TrainConfig.tiny(2, max_steps=4, save_interval=2)

    def cancel_at_3(step, loss):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, data["six"], tmp_path / "a", base=base, progress=False, callback=cancel_at_3)
    resumed = train(cfg, data["six"], tmp_path / "a", base=base, progress=False)
    straight = train(cfg, data["six"], tmp_path / "b", base=base, progress=False)
    assert _same(load_file(resumed), load_file(straight))


def test_stage2_explains_what_is_missing(tmp_path, data, base):
    with pytest.raises(TrainingError, match="base model"):
        train(TrainConfig.tiny(2, max_steps=1), data["two"], tmp_path / "x", progress=False)
    with pytest.raises(TrainingError, match="album has 2 photos"):
        train(TrainConfig.tiny(2, max_steps=1, batch_size=4), data["two"], tmp_path / "y", base=base, progress=False)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def test_finetune_command_turns_a_folder_of_photos_into_a_personal_model(tmp_path, base):
    from diffusionrig_core import synthetic
    from diffusionrig_core.cli import main

    assets = tmp_path / "assets"
    rig = synthetic.synthetic_rig(assets)
    synthetic.write_album(tmp_path / "album", synthetic.sample_people(1, seed=3)[0], n=3, size=SIZE, rig=rig)
    out = tmp_path / "me.safetensors"
    rc = main(["finetune", str(tmp_path / "album"), "--base", str(base), "--out", str(out), "--assets", str(assets),
               "--size", str(SIZE), "--tiny", "--steps", "2", "--quiet"])
    assert rc == 0
    model = load_model(out)
    album = RigDataset(tmp_path / "me_training" / "dataset")
    assert album.names == ["photo_000.png", "photo_001.png", "photo_002.png"]
    assert torch.equal(model.mean_shape, album.mean_shape) and model.metadata["steps"] == 2
    assert (tmp_path / "me_training" / "loss.png").is_file()
    # a second call finds the finished run and the built album and just rewrites the model
    assert main(["finetune", str(tmp_path / "album"), "--base", str(base), "--out", str(out), "--tiny",
                 "--steps", "2", "--quiet", "--assets", str(assets), "--size", str(SIZE)]) == 0


def test_a_run_folder_refuses_to_resume_with_another_album(tmp_path, data, base):
    cfg = TrainConfig.tiny(2, max_steps=1)
    train(cfg, data["six"], tmp_path / "w", base=base, progress=False)
    with pytest.raises(TrainingError, match="another dataset"):
        train(TrainConfig.tiny(2, max_steps=2), data["two"], tmp_path / "w", base=base, progress=False)
    train(TrainConfig.tiny(2, max_steps=1), data["two"], tmp_path / "w", base=base, progress=False, resume=False)
