"""The ComfyUI nodes without ComfyUI: declarations, conventions, conversions and error messages.

The pack is loaded against tests/comfy_shim (a stand-in for the comfy modules) exactly as ComfyUI
loads it: a package named after its folder, ``comfy_entrypoint`` -> ``get_node_list``. Models are
tiny (``ModelConfig.tiny()``, 64 px); nothing here needs real FLAME/DECA files.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_shim import REPO, loaded_pack, node_classes

# Stored in every saved workflow: these can never change once published.
NODE_IDS = {
    "DiffusionRigModelLoader": "DiffusionRig Model Loader",
    "DiffusionRigFaceRigLoader": "DiffusionRig Face Rig Loader",
    "DiffusionRigDECAExtract": "DiffusionRig DECA Extract",
    "DiffusionRigBufferRender": "DiffusionRig Buffer Render",
    "DiffusionRigEditParams": "DiffusionRig Edit Params",
    "DiffusionRigGlobalEncode": "DiffusionRig Global Encode",
    "DiffusionRigRigSample": "DiffusionRig Rig Sample",
    "DiffusionRigStage2Finetune": "DiffusionRig Stage 2 Finetune",
    "DiffusionRigDemoPhoto": "DiffusionRig Demo Photo",
}
CUSTOM_TYPES = {"DRIG_MODEL", "DRIG_RIG", "DRIG_PORTRAIT", "DRIG_BUFFERS", "DRIG_LATENT"}
HOST_TYPES = {"IMAGE", "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    with loaded_pack(root) as pack:
        import comfy.model_management as mm
        import comfy.utils as cu
        import folder_paths

        classes = {cls.GET_SCHEMA().node_id: cls for cls in node_classes(pack)}
        core = importlib.import_module(f"{pack.__name__}.diffusionrig_core")
        for sub in ("pipeline", "errors", "model", "checkpoint"):
            importlib.import_module(f"{core.__name__}.{sub}")
        yield type("Comfy", (), dict(pack=pack, nodes=classes, core=core, mm=mm, pbar=cu,
                                     folder_paths=folder_paths, root=root))


@pytest.fixture(scope="module")
def tiny(comfy):
    """A tiny 64 px model saved as models/diffusionrig/tiny.safetensors, and loaded."""
    torch.manual_seed(0)
    model = comfy.core.model.DiffusionRig(comfy.core.model.ModelConfig.tiny())
    path = Path(comfy.folder_paths.get_folder_paths("diffusionrig")[0]) / "tiny.safetensors"
    comfy.core.checkpoint.save_model(model, path)
    return comfy.nodes["DiffusionRigModelLoader"].execute(model_name="tiny.safetensors").args[0]


def _run(comfy, node_id: str, **kwargs):
    return comfy.nodes[node_id].execute(**kwargs).args


def _portrait(comfy, n: int = 1, size: int = 64, seed: int = 0):
    """A fitted-looking Portrait built from numbers (no face rig needed for parameter edits)."""
    g = torch.Generator().manual_seed(seed)
    params = {"shape": torch.randn(n, 100, generator=g) * 0.3, "tex": torch.randn(n, 50, generator=g) * 0.3,
              "exp": torch.randn(n, 50, generator=g) * 0.3, "pose": torch.randn(n, 6, generator=g) * 0.05,
              "cam": torch.tensor([[8.0, 0.0, 0.0]]).repeat(n, 1), "light": torch.randn(n, 9, 3, generator=g) * 0.3}
    return comfy.core.pipeline.Portrait(
        original=[np.full((size, size, 3), 128, np.uint8) for _ in range(n)],
        aligned=torch.rand(n, 3, size, size, generator=g), alignment=[None] * n, params=params,
        tform=torch.eye(3).repeat(n, 1, 1), center=torch.zeros(n, 3))


# ---------------------------------------------------------------------------------------------
# Registration and declarations
# ---------------------------------------------------------------------------------------------
def test_pack_registers_its_nodes_with_stable_ids_and_one_category_root(comfy):
    assert {k: c.GET_SCHEMA().display_name for k, c in comfy.nodes.items()} == NODE_IDS
    for cls in comfy.nodes.values():
        assert cls.GET_SCHEMA().category.startswith("DiffusionRig/")


def test_custom_types_are_namespaced(comfy):
    seen = set()
    for cls in comfy.nodes.values():
        schema = cls.GET_SCHEMA()
        for port in list(schema.inputs) + list(schema.outputs):
            seen.add(port.io_type)
    assert seen - HOST_TYPES == CUSTOM_TYPES


def test_every_input_and_output_has_a_tooltip(comfy):
    for node_id, cls in comfy.nodes.items():
        schema = cls.GET_SCHEMA()
        for port in list(schema.inputs) + list(schema.outputs):
            assert port.tooltip and len(port.tooltip) > 10, f"{node_id}.{port.id} has no tooltip"
        assert schema.description


def test_execute_takes_exactly_the_declared_inputs(comfy):
    for node_id, cls in comfy.nodes.items():
        schema = cls.GET_SCHEMA()
        params = dict(inspect.signature(cls.execute).parameters)
        assert set(params) == {i.id for i in schema.inputs}, node_id
        for inp in schema.inputs:
            has_default = params[inp.id].default is not inspect.Parameter.empty
            assert has_default == bool(inp.optional), f"{node_id}.{inp.id}: optional inputs (only) need a default"


def test_every_combo_is_checked_by_the_node_itself(comfy):
    # ComfyUI skips its own combo check for inputs the node's validate_inputs takes, so every combo
    # is taken (and checked) there, with a message naming the allowed values.
    for node_id, cls in comfy.nodes.items():
        combos = [i.id for i in cls.GET_SCHEMA().inputs if i.io_type == "COMBO"]
        if not combos:
            continue
        wanted = set(inspect.signature(cls.validate_inputs).parameters)
        assert set(combos) <= wanted, f"{node_id}: validate_inputs must take {combos}"
        for name in combos:
            others = {k: None for k in wanted if k != name}
            assert cls.validate_inputs(**{name: "no such value"}, **others) is not True
            assert cls.validate_inputs(**{name: None}, **others) is True  # linked: checked when it runs


def test_edit_params_rejects_an_unknown_mode_listing_the_allowed_ones(comfy):
    msg = comfy.nodes["DiffusionRigEditParams"].validate_inputs(
        light_mode="sunset", pose_mode="keep", expression_mode="keep", shape_mode="keep")
    assert "light_mode" in msg and "direction" in msg and "from target" in msg


def test_importing_the_pack_is_cheap_and_registers_the_model_folders(comfy):
    loaded = [m for m in sys.modules if m.startswith(comfy.pack.__name__ + ".diffusionrig_core.")]
    # the fixture imported a few core modules itself; the pack's own import must not pull in heavy ones
    assert f"{comfy.pack.__name__}.diffusionrig_core.rig" not in loaded
    fp = comfy.folder_paths
    models, exts = fp.folder_names_and_paths["diffusionrig"]
    assert models[-1] == os.path.join(fp.models_dir, "diffusionrig") and {".pt", ".safetensors"} <= exts
    assert fp.get_folder_paths("diffusionrig_assets")[-1] == os.path.join(fp.models_dir, "diffusionrig_assets")


def test_requirements_leave_torch_to_the_host_and_do_not_pin_numpy():
    lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    names = [ln for ln in lines if ln]
    for ln in names:
        name = ln.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].split("~")[0].strip().lower()
        assert name not in ("torch", "torchvision", "torchaudio", "torchsde"), ln
        if name == "numpy":
            assert "==" not in ln
    assert any(ln.startswith("dlib-bin") for ln in names), "dlib from wheels, never the source-only 'dlib'"


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------
def test_model_loader_lists_the_models_folder_and_loads_a_model(comfy, tiny):
    cls = comfy.nodes["DiffusionRigModelLoader"]
    combo = next(i for i in cls.GET_SCHEMA().inputs if i.id == "model_name")
    assert "tiny.safetensors" in combo.choices
    assert isinstance(tiny, comfy.core.model.DiffusionRig) and tiny.config.image_size == 64
    assert cls.validate_inputs(model_name="tiny.safetensors") is True
    fp1 = cls.fingerprint_inputs(model_name="tiny.safetensors")
    assert fp1 == cls.fingerprint_inputs(model_name="tiny.safetensors")


def test_model_loader_says_where_to_put_a_missing_model(comfy):
    msg = comfy.nodes["DiffusionRigModelLoader"].validate_inputs(model_name="stage1.pt")
    assert "stage1.pt" in msg and "diffusionrig" in msg and "Refresh" in msg


def test_model_loader_refuses_a_file_that_is_not_a_diffusionrig_model(comfy):
    folder = Path(comfy.folder_paths.get_folder_paths("diffusionrig")[0])
    torch.save({"state": {}, "param_groups": [{"lr": 1e-4}]}, folder / "opt005000.pt")
    with pytest.raises(comfy.core.errors.CheckpointError, match="opt005000"):
        _run(comfy, "DiffusionRigModelLoader", model_name="opt005000.pt")
    (folder / "opt005000.pt").unlink()


def test_face_rig_loader_lists_missing_assets_with_where_to_get_them(comfy, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSIONRIG_ASSETS", str(tmp_path / "none"))
    with pytest.raises(comfy.core.errors.AssetError) as err:
        _run(comfy, "DiffusionRigFaceRigLoader", assets="diffusionrig_assets")
    msg = str(err.value)
    assert "models/diffusionrig_assets" in msg and "generic_model.pkl" in msg and "flame.is.tue.mpg.de" in msg
    assert "deca_model.tar" in msg and "extra_model_paths.yaml" in msg


# ---------------------------------------------------------------------------------------------
# Encode and sample
# ---------------------------------------------------------------------------------------------
def test_global_encode_gives_one_code_per_image_and_leaves_the_input_alone(comfy, tiny):
    image = torch.rand(2, 64, 64, 3)
    before = image.clone()
    (latent,) = _run(comfy, "DiffusionRigGlobalEncode", model=tiny, image=image)
    assert latent.shape == (2, tiny.config.latent_dim) and latent.device.type == "cpu"
    assert torch.equal(image, before)


def test_global_encode_names_the_size_to_set_when_the_crop_does_not_fit_the_model(comfy, tiny):
    with pytest.raises(comfy.core.errors.InputError, match="DECA Extract's size set to 64"):
        _run(comfy, "DiffusionRigGlobalEncode", model=tiny, image=torch.rand(1, 128, 128, 3))


def _buffers(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 9, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_rig_sample_returns_images_whose_seed_does_not_depend_on_the_batch(comfy, tiny):
    latent = torch.randn(2, tiny.config.latent_dim)
    buffers = _buffers(2)
    image, pasted = _run(comfy, "DiffusionRigRigSample", model=tiny, buffers=buffers, latent=latent, seed=7,
                         steps=2, eta=0.0)
    assert image.shape == (2, 64, 64, 3) and image.dtype == torch.float32 and pasted is image
    (second,) = _run(comfy, "DiffusionRigRigSample", model=tiny, buffers=buffers[1:], latent=latent[1:], seed=8,
                     steps=2, eta=0.0)[:1]
    assert torch.allclose(image[1], second[0], atol=1e-5)


def test_rig_sample_shares_one_code_across_a_batch_of_buffers(comfy, tiny):
    image, _ = _run(comfy, "DiffusionRigRigSample", model=tiny, buffers=_buffers(3),
                    latent=torch.randn(1, tiny.config.latent_dim), seed=0, steps=1, eta=0.0)
    assert image.shape[0] == 3


def test_rig_sample_reports_progress_and_stops_on_cancel(comfy, tiny):
    comfy.pbar.UPDATES.clear()
    _run(comfy, "DiffusionRigRigSample", model=tiny, buffers=_buffers(1), latent=torch.randn(1, 64), seed=0,
         steps=3, eta=0.0)
    assert comfy.pbar.UPDATES[-1] == (3, 3)
    comfy.mm.interrupt_current_processing(True)
    with pytest.raises(comfy.mm.InterruptProcessingException):
        _run(comfy, "DiffusionRigRigSample", model=tiny, buffers=_buffers(1), latent=torch.randn(1, 64), seed=0,
             steps=3, eta=0.0)
    assert not comfy.mm.processing_interrupted()


def test_rig_sample_says_which_size_to_use_for_a_model_of_another_resolution(comfy, tiny):
    with pytest.raises(comfy.core.errors.InputError, match="set DECA Extract's size to 64"):
        _run(comfy, "DiffusionRigRigSample", model=tiny, buffers=torch.zeros(1, 9, 32, 32),
             latent=torch.randn(1, 64), seed=0, steps=1, eta=0.0)


def test_rig_sample_pastes_into_the_original_photo(comfy, tiny):
    portrait = _portrait(comfy)
    portrait.original = [np.full((80, 96, 3), 30, np.uint8)]
    buffers = torch.zeros(1, 9, 64, 64)
    buffers[:, 3:6, 16:48, 16:48] = 0.5  # a square "face"
    image, pasted = _run(comfy, "DiffusionRigRigSample", model=tiny, buffers=buffers, latent=torch.randn(1, 64),
                         seed=0, steps=1, eta=0.0, portrait=portrait)
    assert pasted.shape == (1, 80, 96, 3) and image.shape == (1, 64, 64, 3)
    corner = (pasted[0, :4, :4] * 255).round()
    assert torch.all(corner == 30), "pixels off the face stay the original's"


# ---------------------------------------------------------------------------------------------
# Edit Params
# ---------------------------------------------------------------------------------------------
WIDGETS = dict(light_mode="keep", light_x=0.0, light_y=0.0, light_z=1.0, light_intensity=1.0, light_r=1.0,
               light_g=1.0, light_b=1.0, pose_mode="keep", yaw=0.0, pitch=0.0, roll=0.0, expression_mode="keep",
               jaw_open=0.0, expression_strength=1.0, shape_mode="keep")


def _edit(comfy, portrait, **kw):
    return _run(comfy, "DiffusionRigEditParams", portrait=portrait, **{**WIDGETS, **kw})[0]


def test_edit_params_directional_light_changes_only_the_light_and_not_the_input(comfy):
    src = _portrait(comfy)
    before = {k: v.clone() for k, v in src.params.items()}
    out = _edit(comfy, src, light_mode="direction", light_x=0.8, light_y=0.3, light_z=0.5)
    assert out is not src and not torch.equal(out.params["light"], src.params["light"])
    for k in ("shape", "exp", "pose", "cam", "tex"):
        assert torch.equal(out.params[k], src.params[k]), k
    for k, v in before.items():
        assert torch.equal(src.params[k], v), f"the input portrait's {k} was modified"


def test_edit_params_copies_light_expression_and_pose_from_a_target(comfy):
    src, tgt = _portrait(comfy, seed=1), _portrait(comfy, seed=2)
    out = _edit(comfy, src, target=tgt, light_mode="from target", expression_mode="from target",
                pose_mode="from target")
    assert torch.allclose(out.params["light"], tgt.params["light"])
    assert torch.allclose(out.params["exp"], tgt.params["exp"])
    assert torch.allclose(out.params["pose"], tgt.params["pose"])
    assert torch.equal(out.params["shape"], src.params["shape"])


def test_edit_params_asks_for_a_target_when_a_mode_needs_one(comfy):
    with pytest.raises(comfy.core.errors.InputError, match="connect DECA Extract of the reference photo"):
        _edit(comfy, _portrait(comfy), pose_mode="from target")


def test_edit_params_mean_shape_needs_a_personal_model(comfy, tiny):
    with pytest.raises(comfy.core.errors.InputError, match="Stage 2"):
        _edit(comfy, _portrait(comfy), shape_mode="personal model mean", personal_model=tiny)
    out = _edit(comfy, _portrait(comfy), shape_mode="FLAME mean")
    assert torch.count_nonzero(out.params["shape"]) == 0


def test_edit_params_yaw_turns_the_head_and_keeps_the_light(comfy):
    src = _portrait(comfy)
    out = _edit(comfy, src, yaw=30.0)
    assert not torch.allclose(out.params["pose"][:, :3], src.params["pose"][:, :3])
    assert torch.equal(out.params["light"], src.params["light"])


# ---------------------------------------------------------------------------------------------
# DECA Extract and Stage 2 Finetune: checks made before any heavy work
# ---------------------------------------------------------------------------------------------
def test_deca_extract_says_a_rig_without_deca_weights_cannot_fit_photos(comfy):
    rig = type("RenderOnlyRig", (), {"encoder": None})()
    with pytest.raises(comfy.core.errors.AssetError, match="deca_model.tar.*models/diffusionrig_assets"):
        _run(comfy, "DiffusionRigDECAExtract", rig=rig, image=torch.rand(1, 64, 64, 3), size=64, align=True,
             face_index=0, on_no_face="error")


def test_deca_extract_rejects_a_tensor_that_is_not_an_image_batch(comfy):
    with pytest.raises(comfy.core.errors.InputError, match="IMAGE batch"):
        _run(comfy, "DiffusionRigDECAExtract", rig=None, image=torch.zeros(3, 64, 64), size=64, align=True,
             face_index=0, on_no_face="error")


def test_finetune_checks_the_name_and_refuses_to_overwrite(comfy, tiny):
    cls = comfy.nodes["DiffusionRigStage2Finetune"]
    assert cls.validate_inputs(name=["personal"]) is True
    assert "letters" in cls.validate_inputs(name=["../evil"])
    folder = Path(comfy.folder_paths.get_folder_paths("diffusionrig")[0])
    (folder / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(comfy.core.errors.InputError, match="overwrite"):
        cls.execute(rig=[None], base_model=[tiny], album=[torch.rand(2, 64, 64, 3)], steps=[1], align=[True], batch_size=[2],
                    name=["taken"], overwrite=[False])
    with pytest.raises(comfy.core.errors.InputError, match="lower batch_size to 2"):
        cls.execute(rig=[None], base_model=[tiny], album=[torch.rand(2, 64, 64, 3)], steps=[1], align=[True], batch_size=[4],
                    name=["free"], overwrite=[False])
