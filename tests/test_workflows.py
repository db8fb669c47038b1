"""The example workflows: valid against the registered nodes, UI and API twins in step, and runnable.

ComfyUI's template browser lists ``<pack>/workflows/*.json`` (not sub-folders), so the UI files sit
there and the API twins in ``workflows/api/``. Each API twin is executed here node by node in
topological order, the way ComfyUI's executor would, on the synthetic face world and a tiny model.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_shim import REPO, loaded_pack, node_classes

WORKFLOWS = REPO / "workflows"
NAMES = ["relighting", "mix_and_match", "identity_swap", "expression_pose", "personal_finetune", "demo_relighting"]
UI_ONLY = {"Note", "MarkdownNote"}


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_workflows", WORKFLOWS / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """The pack loaded against the ComfyUI shim: (pack module, node classes by id, object_info)."""
    with loaded_pack(tmp_path_factory.mktemp("comfy")) as pack:
        from comfy_api.latest import io

        classes = {cls.GET_SCHEMA().node_id: cls for cls in node_classes(pack)}
        info = {**gen.BUILTINS, **{k: io.node_info(c) for k, c in classes.items()}}
        yield pack, classes, info


def _ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def _api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


# ---------------------------------------------------------------------------------------------
# Layout for the template browser
# ---------------------------------------------------------------------------------------------
def test_the_template_folder_holds_exactly_the_ui_workflows():
    top = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert top == sorted(NAMES)
    for name in NAMES:
        assert {"nodes", "links", "version"} <= set(_ui(name)), f"{name}.json is not a UI-format workflow"
        assert "nodes" not in _api(name), f"api/{name}.json is not an API-format workflow"


def test_readme_has_a_line_per_workflow_naming_its_models():
    readme = (WORKFLOWS / "README.md").read_text()
    for name in NAMES:
        line = next((ln for ln in readme.splitlines() if f"{name}.json" in ln), None)
        assert line is not None, f"workflows/README.md has no line for {name}.json"
        assert "model" in line.lower() or "assets" in line.lower()


def test_committed_workflows_equal_the_generator_output(comfy):
    _, _, info = comfy
    for name in NAMES:
        ui, api = gen.build(name, info)
        assert ui == _ui(name), f"workflows/{name}.json is stale: run python workflows/make_workflows.py"
        assert api == _api(name), f"workflows/api/{name}.json is stale: run python workflows/make_workflows.py"


# ---------------------------------------------------------------------------------------------
# UI format: node types, widgets, sockets, links
# ---------------------------------------------------------------------------------------------
def _expected_widget_count(node_info: dict) -> int:
    count = 0
    for name in gen.widget_names(node_info):
        section = "required" if name in node_info["input"].get("required", {}) else "optional"
        spec = node_info["input"][section][name]
        opts = spec[1] if len(spec) > 1 else {}
        count += 1 + bool(opts.get("control_after_generate")) + bool(opts.get("image_upload"))
    return count


def _check_widget_values(node: dict, node_info: dict) -> None:
    values = iter(node["widgets_values"])
    for name in gen.widget_names(node_info):
        section = "required" if name in node_info["input"].get("required", {}) else "optional"
        kind, opts = node_info["input"][section][name][0], node_info["input"][section][name][1]
        value = next(values)
        where = f"node {node['id']} ({node['type']}) widget {name}"
        if kind in ("INT", "FLOAT"):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), where
            assert opts.get("min", -np.inf) <= value <= opts.get("max", np.inf), where
        elif kind == "BOOLEAN":
            assert isinstance(value, bool), where
        elif kind == "STRING":
            assert isinstance(value, str), where
        elif kind == "COMBO" and name != "model_name" and opts.get("options"):
            assert value in opts["options"], f"{where}: {value!r} not in {opts['options']}"
        if opts.get("control_after_generate"):
            assert next(values) in ("fixed", "increment", "decrement", "randomize"), where
        if opts.get("image_upload"):
            assert next(values) == "image", where


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_names_registered_nodes_with_the_right_widgets_and_sockets(comfy, name):
    _, _, info = comfy
    wf = _ui(name)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] >= max(ids)
    for node in wf["nodes"]:
        if node["type"] in UI_ONLY:
            continue
        assert node["type"] in info, f"{name}: node type {node['type']} is not registered"
        node_info = info[node["type"]]
        assert len(node["widgets_values"]) == _expected_widget_count(node_info), \
            f"{name}: node {node['id']} ({node['type']}) has {len(node['widgets_values'])} widget values"
        _check_widget_values(node, node_info)
        sockets = [(n, t) for n, t, _ in gen.socket_inputs(node_info)]
        assert [(i["name"], i["type"]) for i in node["inputs"]] == sockets, f"{name}: node {node['id']} sockets"
        assert [(o["name"], o["type"]) for o in node["outputs"]] == \
            list(zip(node_info["output_name"], node_info["output"]))
        for (in_name, _, optional), slot in zip(gen.socket_inputs(node_info), node["inputs"]):
            if not optional:
                assert slot["link"] is not None, f"{name}: required input {in_name} of node {node['id']} is unlinked"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_links_are_consistent_on_both_ends(comfy, name):
    wf = _ui(name)
    nodes = {n["id"]: n for n in wf["nodes"]}
    link_ids = [lk[0] for lk in wf["links"]]
    assert len(link_ids) == len(set(link_ids)) and wf["last_link_id"] >= max(link_ids)
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == kind == inp["type"], f"{name}: link {link_id} joins {out['type']} to {inp['type']}"
        assert link_id in (out["links"] or []) and inp["link"] == link_id
    for node in wf["nodes"]:
        for out in node["outputs"]:
            assert all(lk in link_ids for lk in out["links"] or [])
        for inp in node["inputs"]:
            assert inp["link"] is None or inp["link"] in link_ids


def _ui_to_api(wf: dict, info: dict) -> dict:
    """What the editor's 'Export (API)' makes of a UI workflow (no muted or bypassed nodes here)."""
    links = {lk[0]: lk for lk in wf["links"]}
    api = {}
    for node in wf["nodes"]:
        if node["type"] in UI_ONLY:
            continue
        node_info = info[node["type"]]
        inputs = {}
        for slot in node["inputs"]:
            if slot["link"] is not None:
                lk = links[slot["link"]]
                inputs[slot["name"]] = [str(lk[1]), lk[2]]
        values = iter(node["widgets_values"])
        for name in gen.widget_names(node_info):
            section = "required" if name in node_info["input"].get("required", {}) else "optional"
            opts = node_info["input"][section][name][1]
            inputs[name] = next(values)
            if opts.get("control_after_generate") or opts.get("image_upload"):
                next(values)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_is_the_ui_workflow_exported(comfy, name):
    _, _, info = comfy
    expected = _ui_to_api(_ui(name), info)
    got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in _api(name).items()}
    assert set(got) == set(expected)
    for k in got:
        assert got[k]["class_type"] == expected[k]["class_type"]
        assert got[k]["inputs"] == expected[k]["inputs"], f"{name}: node {k} differs from its UI twin"


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_is_a_valid_prompt(comfy, name):
    _, _, info = comfy
    prompt = _api(name)
    assert any(info[n["class_type"]]["output_node"] for n in prompt.values()), "a prompt needs an output node"
    for node_id, node in prompt.items():
        node_info = info[node["class_type"]]
        for name_ in node_info["input_order"].get("required", []):
            assert name_ in node["inputs"], f"node {node_id} misses required input {name_}"
        declared = {**node_info["input"].get("required", {}), **node_info["input"].get("optional", {})}
        for in_name, value in node["inputs"].items():
            assert in_name in declared, f"node {node_id} has an undeclared input {in_name}"
            if isinstance(value, list):
                src = prompt[value[0]]
                out_type = info[src["class_type"]]["output"][value[1]]
                assert out_type == declared[in_name][0], f"node {node_id}.{in_name}: {out_type} linked"


# ---------------------------------------------------------------------------------------------
# Running the API twins through the node functions
# ---------------------------------------------------------------------------------------------
def _topological(prompt: dict) -> list[str]:
    order, done = [], set()

    def visit(k: str) -> None:
        if k in done:
            return
        for v in prompt[k]["inputs"].values():
            if isinstance(v, list):
                visit(v[0])
        done.add(k)
        order.append(k)

    for k in sorted(prompt, key=int):
        visit(k)
    return order


class FakeBuiltins:
    """LoadImage / SaveImage / PreviewImage / LoadImageDataSetFromFolder over a temp input folder."""

    def __init__(self, input_dir: Path):
        self.input_dir = input_dir
        self.saved: dict[str, torch.Tensor] = {}

    @staticmethod
    def _read(path: Path) -> torch.Tensor:
        from PIL import Image

        arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr)[None]

    def run(self, node_id: str, class_type: str, inputs: dict):
        if class_type == "LoadImage":
            image = self._read(self.input_dir / inputs["image"])
            return (image, torch.zeros(1, 64, 64))
        if class_type == "LoadImageDataSetFromFolder":
            folder = self.input_dir / inputs["folder"]
            return ([self._read(p) for p in sorted(folder.glob("*.png"))],)
        if class_type in ("SaveImage", "PreviewImage"):
            self.saved[node_id] = inputs["images"]
            return (inputs["images"],)
        raise KeyError(class_type)


def run_prompt(prompt: dict, classes: dict, info: dict, builtins: FakeBuiltins, cache: dict | None = None) -> dict:
    """Execute a prompt like ComfyUI: validate_inputs with the widget values, then execute in order.

    ``cache`` keeps node outputs between prompts under the node's signature (class, literal inputs
    and the signatures of its inputs), as ComfyUI's output cache does; output nodes always run.
    """
    outputs: dict[str, tuple] = {}
    signature: dict[str, str] = {}
    cache = {} if cache is None else cache
    for node_id in _topological(prompt):
        node = prompt[node_id]
        class_type = node["class_type"]
        signature[node_id] = json.dumps([class_type, {k: ["<link>", signature[v[0]], v[1]] if isinstance(v, list) else v
                                                      for k, v in sorted(node["inputs"].items())}])
        cacheable = class_type in classes and not info[class_type]["output_node"]
        if cacheable and signature[node_id] in cache:
            outputs[node_id] = cache[signature[node_id]]
            continue
        kwargs, list_inputs = {}, set()
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                kwargs[name] = outputs[value[0]][value[1]]
                if info[prompt[value[0]]["class_type"]]["output_is_list"][value[1]]:
                    list_inputs.add(name)
            else:
                kwargs[name] = value
        if class_type not in classes:
            outputs[node_id] = builtins.run(node_id, class_type, kwargs)
            continue
        cls = classes[class_type]
        schema = cls.GET_SCHEMA()
        if schema.is_input_list:
            kwargs = {k: v if k in list_inputs else [v] for k, v in kwargs.items()}
        else:
            assert not list_inputs, f"{class_type} would run once per list item"
        if "validate_inputs" in cls.__dict__:
            wanted = list(inspect.signature(cls.validate_inputs).parameters)
            literal = {k: (node["inputs"][k] if not isinstance(node["inputs"].get(k), list) else None)
                       for k in wanted if k in node["inputs"]}
            if schema.is_input_list:
                literal = {k: [v] for k, v in literal.items()}
            assert cls.validate_inputs(**literal) is True, f"node {node_id} fails validation"
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            result = cls.execute(**kwargs)
        assert len(result.args) == len(schema.outputs), f"{class_type} returned {len(result.args)} values"
        for value, out in zip(result.args, schema.outputs):
            if out.io_type == "IMAGE":
                assert value.dtype == torch.float32 and value.ndim == 4 and value.shape[-1] == 3
                assert value.device.type == "cpu" and 0.0 <= float(value.min()) and float(value.max()) <= 1.0
        outputs[node_id] = result.args
        if cacheable:
            cache[signature[node_id]] = result.args
    return outputs


def _aligned_template(align_mod, landmarks: np.ndarray) -> np.ndarray:
    """Landmarks of an FFHQ-aligned crop in units of its side (the same for every aligned face)."""
    quad = np.asarray(align_mod.ffhq_quad(landmarks)[0], np.float64).reshape(4, 2)
    axes = np.stack([quad[3] - quad[0], quad[1] - quad[0]], axis=1)  # crop x and y axes (TL, BL, BR, TR)
    return np.linalg.solve(axes, (landmarks - quad[0]).T).T


@pytest.fixture(scope="module")
def world(comfy, tmp_path_factory):
    """What a user installs, in the synthetic face world: face-rig files in models/diffusionrig_assets,
    tiny models in models/diffusionrig, photos (pixels only) in the input folder.

    Two stand-ins, both for things no test can ship: DECA's weights are a ResNet-50 whose last layer
    outputs the true parameters of one synthetic photo, and dlib's detector, which does not reliably
    see synthetic faces, is replaced by the photos' true landmarks. Everything between them (FFHQ
    alignment, DECA's crop and encoder, rendering, encoding, sampling, paste-back) is the real code.
    """
    pack, classes, info = comfy
    core = importlib.import_module(f"{pack.__name__}.diffusionrig_core")
    mods = {m: importlib.import_module(f"{core.__name__}.{m}")
            for m in ("model", "checkpoint", "deca", "detect", "align", "synthetic.people", "synthetic.photos")}
    import folder_paths
    from PIL import Image

    input_dir = Path(folder_paths.get_input_directory())
    assets = Path(folder_paths.get_folder_paths("diffusionrig_assets")[-1])
    photos_mod = mods["synthetic.photos"]
    rig = photos_mod.synthetic_rig(assets, resolution="tiny")
    people = mods["synthetic.people"].sample_people(2, seed=0)
    tmp = tmp_path_factory.mktemp("photos")
    album = photos_mod.write_album(tmp / "a", people[0], n=3, size=128, rig=rig)
    other = photos_mod.write_album(tmp / "b", people[1], n=1, size=128, rig=rig)

    # ComfyUI hands nodes pixels only: the input folder gets the photos without their sidecars
    known: dict[bytes, np.ndarray] = {}
    copies = {"portrait.png": album[0], "reference.png": album[1], "other.png": other[0]}
    copies.update({f"diffusionrig_album/{k}.png": p for k, p in enumerate(album)})
    for name, src in copies.items():
        (input_dir / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(Image.open(src).convert("RGB"))
        Image.fromarray(pixels).save(input_dir / name)
        known[pixels.tobytes()] = np.loadtxt(src.with_suffix(".txt"))[:, :2]
    first = np.asarray(Image.open(album[0]).convert("RGB"))
    template = _aligned_template(mods["align"], known[first.tobytes()])

    no_face = importlib.import_module(f"{core.__name__}.errors").NoFaceError

    def fake_detect(image, backend="dlib", upsample=1, device="cpu"):
        image = np.ascontiguousarray(np.asarray(image)[..., :3])
        if image.std() < 1.0:
            raise no_face("no face found (a blank image)")
        if image.tobytes() in known:
            return [known[image.tobytes()].copy()]
        return [template * image.shape[0] - 0.5]  # an aligned crop: the faces sit where FFHQ puts them

    truth, _, _ = photos_mod.load_sidecar(album[0])
    deca = mods["deca"]
    with torch.device("meta"):  # shapes only: every weight is set below
        shapes = {k: v.shape for k, v in deca.DECAEncoder().state_dict().items()}
    state = {k: torch.ones(v) if k.endswith("running_var") else torch.zeros(v, dtype=torch.long)
             if k.endswith("num_batches_tracked") else torch.zeros(v) for k, v in shapes.items()}
    state["layers.2.bias"] = torch.cat([truth[k].reshape(-1) for k, _ in deca.CODE_SPLIT])
    torch.save({"E_flame": state}, assets / "deca_model.tar")

    models = Path(folder_paths.get_folder_paths("diffusionrig")[-1])
    torch.manual_seed(0)
    model = mods["model"].DiffusionRig(mods["model"].ModelConfig.tiny())
    mods["checkpoint"].save_model(model, models / "tiny.safetensors")
    model.mean_shape = truth["shape"].reshape(1, 100)
    mods["checkpoint"].save_model(model, models / "tiny_personal.safetensors")
    config = mods["model"].ModelConfig(image_size=128, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                                       attention_resolutions=(32,), dropout=0.0)
    model = mods["model"].DiffusionRig(config)
    model.mean_shape = torch.zeros(1, 100)
    mods["checkpoint"].save_model(model, models / "tiny128_personal.safetensors")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mods["detect"], "detect_landmarks", fake_detect)
        yield FakeBuiltins(input_dir)


@pytest.fixture(scope="module")
def loader_cache():
    return {}


def _small(prompt: dict) -> dict:
    """The workflow with test-sized settings: the tiny models, 64 px crops, 2 steps."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "DiffusionRigModelLoader" and inputs["model_name"].startswith("[demo]"):
            inputs["model_name"] = "tiny128_personal.safetensors"  # the demo photos are 128 px
        elif kind == "DiffusionRigModelLoader":
            inputs["model_name"] = "tiny_personal.safetensors" if "personal" in inputs["model_name"] else "tiny.safetensors"
        elif kind == "DiffusionRigDECAExtract":
            inputs["size"] = 64
        elif kind in ("DiffusionRigRigSample", "DiffusionRigStage2Finetune"):
            inputs["steps"] = 2
        if kind == "DiffusionRigStage2Finetune":
            inputs.update(name="test_personal", batch_size=2, align=False)  # the synthetic photos are aligned
    return prompt


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_on_the_synthetic_world_and_saves_images(comfy, world, loader_cache, name):
    _, classes, info = comfy
    world.saved.clear()
    prompt = _small(_api(name))
    outputs = run_prompt(prompt, classes, info, world, loader_cache)
    sample = next(k for k, n in prompt.items() if n["class_type"] == "DiffusionRigRigSample")
    image, pasted = outputs[sample]
    source, slot = prompt[sample]["inputs"]["portrait"]
    portrait = outputs[source][slot]
    assert tuple(image.shape) == (1, portrait.size, portrait.size, 3) and torch.isfinite(image).all()
    assert tuple(pasted.shape[1:3]) == portrait.original[0].shape[:2], "pasted into the full source photo"
    save = next(k for k, n in prompt.items() if n["class_type"] == "SaveImage")
    assert torch.equal(world.saved[save], pasted)


def test_finetune_stops_on_cancel_and_writes_no_model(comfy, world):
    pack, classes, info = comfy
    import comfy.model_management as mm
    import folder_paths

    rig = classes["DiffusionRigFaceRigLoader"].execute(assets="diffusionrig_assets").args[0]
    base = classes["DiffusionRigModelLoader"].execute(model_name="tiny.safetensors").args[0]
    album = [world._read(p) for p in sorted((world.input_dir / "diffusionrig_album").glob("*.png"))]
    mm.interrupt_current_processing(True)
    with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
        classes["DiffusionRigStage2Finetune"].execute(rig=[rig], base_model=[base], album=album, steps=[50],
                                                      align=[False], batch_size=[2], name=["cancelled"],
                                                      overwrite=[False])
    models = Path(folder_paths.get_folder_paths("diffusionrig")[-1])
    assert not (models / "cancelled.safetensors").exists()


def test_deca_extract_names_the_photo_without_a_face_or_skips_it(comfy, world, loader_cache):
    pack, classes, info = comfy
    errors = importlib.import_module(f"{pack.__name__}.diffusionrig_core.errors")
    rig = classes["DiffusionRigFaceRigLoader"].execute(assets="diffusionrig_assets").args[0]
    photo = world._read(world.input_dir / "portrait.png")
    batch = torch.cat([torch.full_like(photo, 0.5), photo])
    extract = classes["DiffusionRigDECAExtract"]
    with pytest.raises(errors.NoFaceError, match="image 1 of 2"), torch.inference_mode():
        extract.execute(rig=rig, image=batch, size=64, align=True, face_index=0, on_no_face="error")
    with torch.inference_mode():
        portrait, aligned = extract.execute(rig=rig, image=batch, size=64, align=True, face_index=0,
                                            on_no_face="skip").args
    assert len(portrait) == 1 and tuple(aligned.shape) == (1, 64, 64, 3)
    assert portrait.original[0].shape == (128, 128, 3)
