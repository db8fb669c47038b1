"""``diffusionrig edit`` and ``diffusionrig extract``: the editing pipeline from the command line.

Everything here is argument parsing and file writing; the work is done by ``diffusionrig_core.pipeline``.
Nothing heavy is imported at the top so ``diffusionrig --help`` stays instant.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

# Fields of pipeline.Edit that --sweep can vary (numbers only).
SWEEP_KEYS = ("yaw", "pitch", "roll", "jaw_open", "expression_strength", "light_intensity")

EDIT_EPILOG = """\
examples:
  diffusionrig edit me.jpg --model personal.safetensors --light-from sunset.jpg --out out/
  diffusionrig edit me.jpg --model personal.safetensors --yaw 20 --pitch -5 --out out/
  diffusionrig edit me.jpg --model personal.safetensors --expression-from smile.jpg --jaw-open 10 --out out/
  diffusionrig edit me.jpg --model personal.safetensors --sweep yaw=-30:30:7 --seed 1 --out sweep/
  diffusionrig edit me.jpg --model demo --light-direction 1 0.5 1 --light-color 1 0.8 0.6 --out out/
  diffusionrig edit me.jpg --model friend.safetensors --swap-model me.safetensors --out swap/

All the edit options given together make one edit; --sweep turns it into a series of edits that
differ in one value and share one noise, so the frames are consistent. Without any edit option the
result is a plain reconstruction of the photo. Results: NAME_NN_LABEL.png (the edited aligned crop),
NAME_NN_LABEL_full.png (pasted back into the original photo), contact_sheet.png (source, buffers and
results) and results.json (edits and seeds, to reproduce a result with --seed).
"""


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    _add_edit(subparsers)
    _add_extract(subparsers)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--assets", metavar="DIR", default=None,
                   help="face-rig assets folder (FLAME, DECA, texture); 'demo' = the synthetic face world. "
                        "Default: the configured models folder, or the demo world when none is installed")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--face-index", type=int, default=0, metavar="K",
                   help="which face to use when a photo shows several (0 = the first detected)")
    p.add_argument("--no-align", action="store_true",
                   help="the photos are already FFHQ-aligned crops: skip detection and alignment")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_edit(subparsers) -> None:
    p = subparsers.add_parser(
        "edit", help="edit a photo's lighting, expression or head pose",
        description="Fit the face rig to each photo, edit its lighting / expression / head pose (or swap its "
                    "global code or model), re-render the physical buffers and sample the edited photo.",
        epilog=EDIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="source photo(s): JPEG, PNG, WebP, ...")
    p.add_argument("--model", "-m", required=True, metavar="M",
                   help="DiffusionRig model: official modelNNNNNN.pt or our .safetensors; 'demo' = the synthetic "
                        "world's generic demo model, 'demo:personal' = its demo person's personal model")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if missing)")
    _common(p)

    g = p.add_argument_group("lighting (pick one source; intensity and colour apply to any)")
    g.add_argument("--light-from", metavar="T", help="copy the lighting (9x3 SH) of target photo T")
    g.add_argument("--light-sh", nargs="+", type=float, metavar="V",
                   help="27 numbers: 9 spherical-harmonics coefficients x (R, G, B), in DECA's order")
    g.add_argument("--light-direction", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="a directional light toward (X, Y, Z): x right, y up, z toward the camera")
    g.add_argument("--light-intensity", type=float, default=1.0, metavar="I",
                   help="light strength, 0..10 (default 1: unchanged)")
    g.add_argument("--light-color", nargs=3, type=float, default=(1.0, 1.0, 1.0), metavar=("R", "G", "B"),
                   help="light colour, each 0..4 (default 1 1 1)")

    g = p.add_argument_group("head pose (degrees, relative to the photo)")
    g.add_argument("--yaw", type=float, default=0.0, metavar="D", help="turn left/right, -90..90")
    g.add_argument("--pitch", type=float, default=0.0, metavar="D", help="nod up/down, -90..90")
    g.add_argument("--roll", type=float, default=0.0, metavar="D", help="tilt toward a shoulder, -90..90")
    g.add_argument("--pose-from", metavar="T", help="copy the global head rotation of target photo T (jaw kept)")

    g = p.add_argument_group("expression")
    g.add_argument("--expression-from", metavar="T", help="copy the expression and jaw of target photo T")
    g.add_argument("--jaw-open", type=float, default=None, metavar="D", help="open the jaw by D degrees, 0..45")
    g.add_argument("--expression-strength", type=float, default=1.0, metavar="S",
                   help="blend from the source (0) to the target expression (1) and beyond, -2..3; "
                        "without a target it scales the photo's own expression")

    g = p.add_argument_group("global edits (from the paper)")
    g.add_argument("--latent-from", metavar="OTHER",
                   help="mix-and-match: take the global latent code (hair, glasses, background) from photo OTHER")
    g.add_argument("--swap-model", metavar="M2",
                   help="identity swap: sample this photo's buffers and code with another person's personal model")

    g = p.add_argument_group("sampling")
    g.add_argument("--sweep", metavar="KEY=START:STOP:N",
                   help=f"a series of N edits with KEY from START to STOP; KEY is one of {', '.join(SWEEP_KEYS)}")
    g.add_argument("--seed", type=int, default=None, metavar="N",
                   help="random seed of photo 1 (photo k uses N+k-1); random when omitted, printed either way")
    g.add_argument("--steps", default="ddim20", metavar="S", help="DDIM steps, e.g. ddim20 (official), ddim50, 100")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta, 0 (deterministic, official) .. 1")
    g.add_argument("--invert", action="store_true",
                   help="start from the DDIM inversion of the photo instead of random noise, so what the "
                        "buffers do not describe (background, hair details) stays put")
    g.add_argument("--no-paste", action="store_true", help="do not paste the edit back into the full photo")
    g.add_argument("--independent-noise", action="store_true",
                   help="give every edit its own noise (default: the edits of one photo share one noise)")
    g.add_argument("--batch-size", type=int, default=8, metavar="B", help="images sampled at once (default 8)")
    p.set_defaults(func=run_edit)


def _add_extract(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="fit the face rig: aligned crops, face parameters and buffer previews",
        description="Detect, FFHQ-align and fit each photo; write NAME_aligned.png, NAME.params.safetensors "
                    "and NAME.params.json (shape, tex, exp, pose, cam, light, tform, center), "
                    "NAME.buffers.safetensors (rendered|normal|albedo) and NAME_buffers.png (previews).")
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="photo(s) to fit")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--size", type=int, default=256, help="aligned crop size in pixels (the model's size; default 256)")
    _common(p)
    p.set_defaults(func=run_extract)


# ---------------------------------------------------------------------------------------------
def _bar(quiet: bool, desc: str, unit: str = "step"):
    """A tqdm bar driven by pipeline callbacks ``(done, total)``; returns (callback, close)."""
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def cb(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    return cb, bar.close


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``yaw=-30:30:7`` -> ("yaw", [-30, -20, ..., 30])."""
    from ..errors import InputError

    m = re.fullmatch(r"\s*([a-z_]+)\s*=\s*([-+0-9.eE]+):([-+0-9.eE]+):(\d+)\s*", text or "")
    if not m:
        raise InputError(f"--sweep {text!r} is not KEY=START:STOP:N, e.g. yaw=-30:30:7")
    key, start, stop, n = m.group(1).replace("-", "_"), float(m.group(2)), float(m.group(3)), int(m.group(4))
    if key not in SWEEP_KEYS:
        raise InputError(f"--sweep key {key!r} is unknown; sweepable: {', '.join(SWEEP_KEYS)}")
    if not 1 <= n <= 256:
        raise InputError(f"--sweep count must be between 1 and 256, got {n}")
    values = [start + (stop - start) * k / (n - 1) for k in range(n)] if n > 1 else [start]
    return key, values


def _fit_targets(rig, size: int, args, paths: dict[str, str | None]) -> dict[str, Any]:
    from .. import pipeline

    out = {}
    for key, path in paths.items():
        if path:
            out[key] = pipeline.fit(rig, [path], size=size, face_index=0, align=not args.no_align)
    return out


def build_edits(args, targets: dict[str, Any], swap_model=None) -> list:
    """The Edit list described by the options (one edit, or a sweep)."""
    from .. import pipeline

    base: dict[str, Any] = {
        "light_from": targets.get("light_from"), "light_sh": args.light_sh,
        "light_direction": args.light_direction, "light_intensity": args.light_intensity,
        "light_color": tuple(args.light_color), "yaw": args.yaw, "pitch": args.pitch, "roll": args.roll,
        "pose_from": targets.get("pose_from"), "expression_from": targets.get("expression_from"),
        "jaw_open": args.jaw_open, "expression_strength": args.expression_strength,
        "latent_from": targets.get("latent_from"), "model": swap_model,
    }
    if not args.sweep:
        return [pipeline.Edit.from_dict(base)]
    key, values = parse_sweep(args.sweep)
    return [pipeline.Edit.from_dict({**base, key: v}) for v in values]


def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9=.,+-]+", "_", text).strip("_")
    return (s or "edit")[:limit]


def _save_png(array, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


def run_edit(args) -> int:
    from .. import pipeline
    from ..errors import InputError

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pipeline._device(args.device)
    if pipeline.is_demo_name(args.model) and args.assets is None:
        args.assets = "demo"  # the demo models were trained on the demo world's face rig
    # every option error before any heavy work (loading models, fitting photos)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    build_edits(args, {}, None)
    pipeline._steps(args.steps)
    if not 0.0 <= args.eta <= 1.0:
        raise InputError(f"--eta must be between 0 and 1, got {args.eta}")
    model = pipeline.load_model(args.model, device=device)
    swap = pipeline.load_model(args.swap_model, device=device) if args.swap_model else None
    rig = pipeline.load_rig(args.assets, device=device)
    size = int(model.config.image_size)

    cb, close = _bar(args.quiet, "fitting", "photo")
    try:
        portrait = pipeline.fit(rig, args.photos, size=size, face_index=args.face_index,
                                align=not args.no_align, progress=cb)
    finally:
        close()
    targets = _fit_targets(rig, size, args, {
        "light_from": args.light_from, "pose_from": args.pose_from,
        "expression_from": args.expression_from, "latent_from": args.latent_from})
    edits = build_edits(args, targets, swap)

    cb, close = _bar(args.quiet, "sampling")
    try:
        results = pipeline.edit(model, portrait, edits, rig, seed=args.seed, steps=args.steps, eta=args.eta,
                                invert=args.invert, paste=not args.no_paste,
                                shared_noise=not args.independent_noise, callback=cb,
                                batch_size=args.batch_size)
    finally:
        close()

    records = []
    for r in results:
        j = next(k for k, e in enumerate(edits) if e is r.edit)
        name = portrait.names[r.photo_index]
        stem = f"{name}_{j:02d}_{_slug(r.edit.describe())}"
        _save_png(r.image, out / f"{stem}.png")
        if r.pasted is not None:
            _save_png(r.pasted, out / f"{stem}_full.png")
        records.append({"photo": args.photos[r.photo_index], "file": f"{stem}.png", "seed": r.seed,
                        "edit": r.edit.to_dict()})
    sheet = pipeline.contact_sheet(portrait, results, rig=rig)
    sheet_path = out / "contact_sheet.png"
    sheet.save(sheet_path)
    meta = {"model": str(args.model), "steps": args.steps, "eta": args.eta, "invert": args.invert,
            "results": records}
    (out / "results.json").write_text(json.dumps(meta, indent=1, default=str))

    for i, name in enumerate(portrait.names):
        seeds = sorted({r.seed for r in results if r.photo_index == i})
        print(f"{name}: seed {', '.join(map(str, seeds))}")
    print(f"wrote {len(results)} result(s) and {sheet_path} to {out}")
    return 0


def run_extract(args) -> int:
    import numpy as np
    from safetensors.torch import save_file

    from .. import pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pipeline._device(args.device)
    rig = pipeline.load_rig(args.assets, device=device)
    cb, close = _bar(args.quiet, "fitting", "photo")
    try:
        portrait = pipeline.fit(rig, args.photos, size=args.size, face_index=args.face_index,
                                align=not args.no_align, progress=cb)
    finally:
        close()
    previews = pipeline.render_previews(rig, portrait)
    buffers = pipeline.render(rig, portrait).detach().cpu()
    for i, name in enumerate(portrait.names):
        one = portrait[i]
        _save_png(pipeline._to_uint8(one.aligned)[0], out / f"{name}_aligned.png")
        tensors = {k: v.detach().cpu().float().contiguous() for k, v in one.params.items()}
        tensors["tform"] = one.tform.detach().cpu().float().contiguous()
        tensors["center"] = one.center.detach().cpu().float().contiguous()
        meta = {"format": "diffusionrig.params", "source": str(args.photos[i]), "size": str(portrait.size)}
        alignment = one.alignment[0]
        if alignment is not None:
            meta["quad"] = json.dumps(np.asarray(alignment.quad, dtype=float).round(4).tolist())
        save_file(tensors, str(out / f"{name}.params.safetensors"), metadata=meta)
        record = {k: v[0].tolist() for k, v in tensors.items()}
        record.update({"size": portrait.size, "source": str(args.photos[i])})
        if alignment is not None:
            record["quad"] = np.asarray(alignment.quad, dtype=float).tolist()
        (out / f"{name}.params.json").write_text(json.dumps(record))
        save_file({"buffers": buffers[i].contiguous()}, str(out / f"{name}.buffers.safetensors"),
                  metadata={"layout": "rendered|normal|albedo", "size": str(portrait.size)})
        strip = np.concatenate([(previews[k][i].detach().cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
                                for k in ("rendered", "normal", "albedo", "shading")], axis=1)
        _save_png(strip, out / f"{name}_buffers.png")
        print(f"{name}: {out / (name + '_aligned.png')}")
    return 0
