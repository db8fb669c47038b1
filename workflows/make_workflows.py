#!/usr/bin/env python3
"""Writes the example workflows: UI format in workflows/*.json, API format in workflows/api/*.json.

    python workflows/make_workflows.py            # node definitions from the pack (through the test shim)
    python workflows/make_workflows.py --object-info http://127.0.0.1:8188/object_info   # from a server

Both formats come from one description per workflow (``WORKFLOWS`` below), so a UI file and its
API twin always describe the same graph. The UI files are what ComfyUI's template browser lists
(it reads ``<pack>/workflows/*.json`` without descending into folders), so the API twins live in
``workflows/api/`` where the browser never shows them. tests/test_workflows.py checks the files
against the registered nodes and runs the API twins.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY_TYPES = {"Note", "MarkdownNote"}  # frontend-only nodes: never sent to the server

# The few built-in ComfyUI nodes the examples use, as GET /object_info describes them (v0.33).
BUILTINS = {
    "LoadImage": {"input": {"required": {"image": [["example.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"],
                  "output_name": ["IMAGE", "MASK"], "output_is_list": [False, False], "output_node": False},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
                  "input_order": {"required": ["images", "filename_prefix"]}, "output": ["IMAGE"],
                  "output_name": ["images"], "output_is_list": [False], "output_node": True},
    "PreviewImage": {"input": {"required": {"images": ["IMAGE"]}}, "input_order": {"required": ["images"]},
                     "output": ["IMAGE"], "output_name": ["images"], "output_is_list": [False], "output_node": True},
    "LoadImageDataSetFromFolder": {
        "input": {"required": {"folder": ["COMBO", {"options": []}]}}, "input_order": {"required": ["folder"]},
        "output": ["IMAGE"], "output_name": ["images"], "output_is_list": [True], "output_node": False},
}

# Models the examples expect in ComfyUI/models/diffusionrig (see workflows/README.md).
STAGE1 = "stage1_ffhq256.pt"
PERSONAL = "personal.safetensors"
DEMO_PERSONAL = "[demo] personal.safetensors"  # shipped in diffusionrig_core/demo_data


def _common(photo: str = "portrait.png") -> dict:
    return {
        "photo": ("LoadImage", {"image": photo}, "Source photo"),
        "rig": ("DiffusionRigFaceRigLoader", {"assets": "diffusionrig_assets"}, None),
        "extract": ("DiffusionRigDECAExtract", {"rig": ("rig", 0), "image": ("photo", 0), "size": 256, "align": True,
                                                 "face_index": 0, "on_no_face": "error"}, None),
    }


def _edit(**widgets) -> dict:
    values = {"light_mode": "keep", "light_x": 0.0, "light_y": 0.0, "light_z": 1.0, "light_intensity": 1.0,
              "light_r": 1.0, "light_g": 1.0, "light_b": 1.0, "pose_mode": "keep", "yaw": 0.0, "pitch": 0.0,
              "roll": 0.0, "expression_mode": "keep", "jaw_open": 0.0, "expression_strength": 1.0,
              "shape_mode": "keep"}
    values.update(widgets)
    return values


def _sample_and_save(model: str, buffers: str, latent_image: str, prefix: str, seed: int = 42,
                     aligned_slot: int = 1, portrait: tuple[str, int] = ("extract", 0)) -> dict:
    return {
        "encode": ("DiffusionRigGlobalEncode", {"model": (model, 0), "image": (latent_image, aligned_slot)}, None),
        "sample": ("DiffusionRigRigSample", {"model": (model, 0), "buffers": (buffers, 0), "latent": ("encode", 0),
                                             "seed": seed, "steps": 20, "eta": 0.0, "portrait": portrait}, None),
        "save": ("SaveImage", {"images": ("sample", 1), "filename_prefix": prefix}, "Save pasted photo"),
        "crop": ("PreviewImage", {"images": ("sample", 0)}, "Edited crop"),
    }


def _relight() -> dict:
    g = _common()
    g["model"] = ("DiffusionRigModelLoader", {"model_name": PERSONAL}, None)
    g["edit"] = ("DiffusionRigEditParams", {"portrait": ("extract", 0), "personal_model": ("model", 0), **_edit(
        light_mode="direction", light_x=0.7, light_y=0.4, light_z=0.6, light_intensity=1.2, light_b=0.9,
        shape_mode="personal model mean")}, "New light")
    g["render"] = ("DiffusionRigBufferRender", {"rig": ("rig", 0), "portrait": ("edit", 0)}, None)
    g["shading"] = ("PreviewImage", {"images": ("render", 3)}, "New shading")
    g.update(_sample_and_save("model", "render", "extract", "diffusionrig/relight"))
    return g


def _mix_and_match() -> dict:
    g = _common()
    g["other"] = ("LoadImage", {"image": "other.png"}, "Photo to take the global code from")
    g["model"] = ("DiffusionRigModelLoader", {"model_name": STAGE1}, None)
    g["extract_other"] = ("DiffusionRigDECAExtract", {"rig": ("rig", 0), "image": ("other", 0), "size": 256,
                                                       "align": True, "face_index": 0, "on_no_face": "error"}, "DECA Extract (other photo)")
    g["render"] = ("DiffusionRigBufferRender", {"rig": ("rig", 0), "portrait": ("extract", 0)}, None)
    g.update(_sample_and_save("model", "render", "extract_other", "diffusionrig/mix_and_match"))
    return g


def _identity_swap() -> dict:
    g = _common()
    g["model"] = ("DiffusionRigModelLoader", {"model_name": PERSONAL}, "Another person's personal model")
    g["edit"] = ("DiffusionRigEditParams", {"portrait": ("extract", 0), "personal_model": ("model", 0),
                                            **_edit(shape_mode="personal model mean")}, "Their face shape")
    g["render"] = ("DiffusionRigBufferRender", {"rig": ("rig", 0), "portrait": ("edit", 0)}, None)
    g.update(_sample_and_save("model", "render", "extract", "diffusionrig/identity_swap"))
    return g


def _expression_pose() -> dict:
    g = _common()
    g["reference"] = ("LoadImage", {"image": "reference.png"}, "Reference photo (expression and pose)")
    g["model"] = ("DiffusionRigModelLoader", {"model_name": PERSONAL}, None)
    g["extract_ref"] = ("DiffusionRigDECAExtract", {"rig": ("rig", 0), "image": ("reference", 0), "size": 256,
                                                     "align": True, "face_index": 0, "on_no_face": "error"},
                        "DECA Extract (reference)")
    g["edit"] = ("DiffusionRigEditParams", {"portrait": ("extract", 0), "target": ("extract_ref", 0),
                                            "personal_model": ("model", 0), **_edit(
        pose_mode="from target", expression_mode="from target", shape_mode="personal model mean")},
        "Expression and pose from the reference")
    g["render"] = ("DiffusionRigBufferRender", {"rig": ("rig", 0), "portrait": ("edit", 0)}, None)
    g.update(_sample_and_save("model", "render", "extract", "diffusionrig/expression_pose"))
    return g


def _personal_finetune() -> dict:
    g = {
        "album": ("LoadImageDataSetFromFolder", {"folder": "diffusionrig_album"},
                  "Album: ~20 photos of one person in input/diffusionrig_album"),
        "rig": ("DiffusionRigFaceRigLoader", {"assets": "diffusionrig_assets"}, None),
        "base": ("DiffusionRigModelLoader", {"model_name": STAGE1}, "Stage 1 model"),
        "finetune": ("DiffusionRigStage2Finetune", {"rig": ("rig", 0), "base_model": ("base", 0),
                                                     "album": ("album", 0), "steps": 5000, "align": True, "batch_size": 4,
                                                     "name": "personal",
                                                     "overwrite": False}, None),
        "photo": ("LoadImage", {"image": "portrait.png"}, "A photo of the same person"),
        "extract": ("DiffusionRigDECAExtract", {"rig": ("rig", 0), "image": ("photo", 0), "size": 256, "align": True,
                                                 "face_index": 0, "on_no_face": "error"}, None),
        "edit": ("DiffusionRigEditParams", {"portrait": ("extract", 0), "personal_model": ("finetune", 0), **_edit(
            yaw=20.0, shape_mode="personal model mean")}, "Try the new model: turn the head"),
        "render": ("DiffusionRigBufferRender", {"rig": ("rig", 0), "portrait": ("edit", 0)}, None),
    }
    g.update(_sample_and_save("finetune", "render", "extract", "diffusionrig/personal"))
    return g


def _demo_relighting() -> dict:
    g = {
        "rig": ("DiffusionRigFaceRigLoader", {"assets": "synthetic demo"}, None),
        "demo": ("DiffusionRigDemoPhoto", {"rig": ("rig", 0), "sample": 0}, None),
        "photo": ("PreviewImage", {"images": ("demo", 0)}, "Demo photo"),
        "model": ("DiffusionRigModelLoader", {"model_name": DEMO_PERSONAL}, None),
        "edit": ("DiffusionRigEditParams", {"portrait": ("demo", 1), "personal_model": ("model", 0), **_edit(
            light_mode="direction", light_x=-0.7, light_y=0.3, light_z=0.6, shape_mode="personal model mean")},
            "New light"),
        "render": ("DiffusionRigBufferRender", {"rig": ("rig", 0), "portrait": ("edit", 0)}, None),
    }
    g.update(_sample_and_save("model", "render", "demo", "diffusionrig/demo_relight", aligned_slot=2,
                              portrait=("demo", 1)))
    return g


# name -> (graph, note shown in the editor)
WORKFLOWS = {
    "relighting": (_relight, "Relight a photo with a directional light (direction, intensity, colour in Edit "
                             "Params; 'from target' + a target portrait copies another photo's light). Needs the "
                             "face-rig files in models/diffusionrig_assets and a personal model (Stage 2) in "
                             "models/diffusionrig."),
    "mix_and_match": (_mix_and_match, "Mix and match: the source's face buffers with the global code (hair, "
                                      "background, look) of another photo. Needs the face-rig files and a Stage 1 "
                                      "model."),
    "identity_swap": (_identity_swap, "Identity swap: another person's personal model samples this photo's "
                                      "buffers and code, with that person's mean face shape. Needs the face-rig "
                                      "files and someone's personal (Stage 2) model."),
    "expression_pose": (_expression_pose, "Copy the expression (and jaw) and the head pose of a reference photo. "
                                          "Needs the face-rig files and a personal (Stage 2) model."),
    "personal_finetune": (_personal_finetune, "Stage 2: fine-tune a Stage 1 model on ~20 photos of one person "
                                              "(put them in ComfyUI/input/diffusionrig_album), save it as "
                                              "models/diffusionrig/personal.safetensors, then use it on a photo. "
                                              "5000 steps take about 30 min on a V100."),
    "demo_relighting": (_demo_relighting, "Try it with nothing downloaded: relight a photo of the synthetic face "
                                          "world with the demo person's personal model shipped in the pack. Change "
                                          "'sample' for other photos, the light in Edit Params."),
}


# ---------------------------------------------------------------------------------------------
def shim_object_info() -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_shim import loaded_pack, node_classes

    with tempfile.TemporaryDirectory() as tmp, loaded_pack(Path(tmp)) as pack:
        from comfy_api.latest import io

        return {cls.GET_SCHEMA().node_id: io.node_info(cls) for cls in node_classes(pack)}


def is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_names(info: dict) -> list[str]:
    names = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            if is_widget(info["input"][section][name]):
                names.append(name)
    return names


def socket_inputs(info: dict) -> list[tuple[str, str, bool]]:
    out = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            spec = info["input"][section][name]
            if not is_widget(spec):
                out.append((name, spec[0], section == "optional"))
    return out


def widgets_values(info: dict, values: dict) -> list:
    out = []
    for name in widget_names(info):
        section = "required" if name in info["input"].get("required", {}) else "optional"
        spec = info["input"][section][name]
        opts = spec[1] if len(spec) > 1 else {}
        out.append(values[name] if name in values else opts.get("default"))
        if opts.get("control_after_generate"):
            out.append("fixed")
        if opts.get("image_upload"):
            out.append("image")
    return out


def _order(graph: dict) -> list[str]:
    """Node keys in an order where every node comes after its inputs."""
    done, out = set(), []

    def visit(key: str) -> None:
        if key in done:
            return
        for v in graph[key][1].values():
            if isinstance(v, tuple):
                visit(v[0])
        done.add(key)
        out.append(key)

    for key in graph:
        visit(key)
    return out


def build(name: str, object_info: dict) -> tuple[dict, dict]:
    make, note = WORKFLOWS[name]
    graph = make()
    order = _order(graph)
    ids = {key: i + 1 for i, key in enumerate(order)}
    depth: dict[str, int] = {}
    for key in order:
        parents = [v[0] for v in graph[key][1].values() if isinstance(v, tuple)]
        depth[key] = 1 + max((depth[p] for p in parents), default=-1)

    api, nodes, links = {}, [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    column_y: dict[int, float] = {}
    for key in order:
        class_type, values, title = graph[key]
        info = object_info[class_type]
        inputs = {}
        for k, v in values.items():
            inputs[k] = [str(ids[v[0]]), v[1]] if isinstance(v, tuple) else v
        api[str(ids[key])] = {"class_type": class_type, "inputs": inputs,
                              "_meta": {"title": title or info.get("display_name") or class_type}}
        ui_inputs = []
        for in_name, in_type, optional in socket_inputs(info):
            link = None
            if in_name in values:
                src, slot = values[in_name]
                link = len(links) + 1
                links.append([link, ids[src], slot, ids[key], len(ui_inputs), object_info[graph[src][0]]["output"][slot]])
                out_links.setdefault((ids[src], slot), []).append(link)
            entry = {"name": in_name, "type": in_type, "link": link}
            if optional:
                entry["shape"] = 7  # the frontend's hollow socket for optional inputs
            ui_inputs.append(entry)
        n_widgets = len(widget_names(info))
        col = depth[key]
        height = 60 + 26 * (len(ui_inputs) + n_widgets + len(info["output"]))
        if class_type in ("LoadImage", "SaveImage", "PreviewImage"):
            height = max(height, 320)
        y = column_y.get(col, 0.0)
        column_y[col] = y + height + 40
        node = {"id": ids[key], "type": class_type, "pos": [40 + 380 * col, 40 + y], "size": [320, height],
                "flags": {}, "order": order.index(key), "mode": 0, "inputs": ui_inputs, "outputs": [],
                "properties": {"Node name for S&R": class_type}, "widgets_values": widgets_values(info, values)}
        if class_type.startswith("DiffusionRig"):
            node["properties"]["cnr_id"] = "diffusionrig"
        if title:
            node["title"] = title
        nodes.append(node)
    for node in nodes:
        info = object_info[node["type"]]
        node["outputs"] = [{"name": n, "type": t, "links": out_links.get((node["id"], slot)) or None, "slot_index": slot}
                           for slot, (n, t) in enumerate(zip(info["output_name"], info["output"]))]
    note_id = len(nodes) + 1
    nodes.append({"id": note_id, "type": "Note", "pos": [40, -200], "size": [700, 160], "flags": {}, "order": len(nodes),
                  "mode": 0, "inputs": [], "outputs": [], "properties": {}, "title": "About this workflow",
                  "widgets_values": [note + " See workflows/README.md and docs/COMFYUI_NODES.md."]})
    ui = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"diffusionrig/workflows/{name}")), "revision": 0,
          "last_node_id": note_id, "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
          "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [60, 330]}}, "version": 0.4}
    return ui, api


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--object-info", help="URL or file of a server's /object_info (default: the pack via the shim)")
    args = parser.parse_args(argv)
    if args.object_info:
        if args.object_info.startswith("http"):
            import urllib.request

            with urllib.request.urlopen(args.object_info) as r:
                object_info = json.load(r)
        else:
            object_info = json.loads(Path(args.object_info).read_text())
    else:
        object_info = shim_object_info()
    object_info = {**BUILTINS, **object_info}
    (HERE / "api").mkdir(exist_ok=True)
    for name in WORKFLOWS:
        ui, api = build(name, object_info)
        (HERE / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        (HERE / "api" / f"{name}.json").write_text(json.dumps(api, indent=1) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
