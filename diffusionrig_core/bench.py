"""``diffusionrig bench``: timings of the core engine (and, registered by other modules, of the rig,
the edits, training and quality).

Sections are plain functions in ``SECTIONS`` (name -> function(options) -> list of result rows);
a row is a dict with at least ``section``, ``name``, ``value`` and ``unit`` and optionally
``baseline`` (the official-equivalent figure measured in the same run), ``speedup`` and ``notes``.
``run_sections`` runs the chosen ones and ``to_markdown`` prints the table.

The "model" section measures, on one GPU and the default 256 model:
* training throughput (images/s) at batch 32 and 4: P2 loss, Adam, gradient clipping at 1.0;
  ours = bf16 autocast + fused attention + fused GroupNorm/FiLM/SiLU kernels (fused.py) +
  channels_last + fused Adam, the whole step replayed from one CUDA graph (``--train-compile``
  tries torch.compile instead);
  baseline = the official recipe (fp16 autocast + GradScaler, eager, legacy attention, Adam);
* peak training memory at batch 32;
* DDIM-20 sampling time for 1 and 16 images; ours = the fast path eager, replayed from a CUDA graph
  (what the pipeline uses), or compiled (variants in ``SAMPLE_VARIANTS``); baseline = float32 eager
  (official inference).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Row = dict[str, Any]
SECTIONS: dict[str, Callable[["BenchOptions"], list[Row]]] = {}


def register(name: str) -> Callable:
    """Decorator: add a benchmark section (``diffusionrig bench --<name>``)."""
    def wrap(fn: Callable[["BenchOptions"], list[Row]]) -> Callable:
        SECTIONS[name] = fn
        return fn
    return wrap


@dataclass
class BenchOptions:
    device: str = "cuda"
    train_batches: tuple[int, ...] = (32, 4)
    sample_batches: tuple[int, ...] = (1, 16)
    steps: str = "ddim20"
    train_iters: int = 10
    warmup: int = 5  # the captured training step: 1 eager step, the capture, replays
    sample_repeats: int = 5
    baseline: bool = True
    config: Any = None  # ModelConfig; default 256 model
    image_size: int | None = None
    log: Callable[[str], None] = print
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> tuple[float, float]:
    if device.type != "cuda":
        return float("nan"), float("nan")
    return (torch.cuda.max_memory_allocated(device) / 2 ** 30, torch.cuda.max_memory_reserved(device) / 2 ** 30)


def _build_model(opts: BenchOptions, device: torch.device):
    from .model import DiffusionRig, ModelConfig

    config = opts.config or ModelConfig()
    torch.manual_seed(0)
    model = DiffusionRig(config).to(device)
    # Zero-initialised output convs would make every eps 0; give them small random weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and float(p.abs().max()) == 0.0:
                p.normal_(0, 1e-3)
    return model


def _batch(config, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = config.image_size
    x0 = (torch.rand(batch, 3, s, s, generator=g) * 2 - 1).to(device)
    buffers = torch.rand(batch, 9, s, s, generator=g).to(device)
    noise = torch.randn(batch, 3, s, s, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return x0, buffers, noise, t


# ---------------------------------------------------------------------------------------------
# training step: ours and the official recipe
# ---------------------------------------------------------------------------------------------
def make_train_step(model, fast: bool, compile_mode: str | None = None, lr: float = 1e-4,
                    clip: float = 1.0, batch: int = 32) -> Callable[..., float]:
    """One optimisation step ``step(x0, buffers, t, noise)`` -> None (loss kept on device)."""
    from .diffusion import Diffusion
    from .fast import FastDenoiser, recompute_for_batch, set_sdpa
    from .train import adam, update_step

    diffusion = Diffusion.create()
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    if fast:
        from .fast import CapturedStep

        net = FastDenoiser(model, compile=compile_mode or False, recompute=recompute_for_batch(batch))
        graph = next(model.parameters()).is_cuda and not net.cudagraphs  # (not inside torch.compile's own)
        opt = adam(params, lr=lr, capturable=graph, net=net)

        def step(x0, buffers, t, noise):
            return update_step(net, diffusion, opt, params, x0, buffers, t, noise, grad_clip=clip)
        # the Trainer's step, replayed (as there) from one CUDA graph after one eager warm-up step
        return CapturedStep(step) if graph else step

    # Official: fp16 autocast around forward + loss, GradScaler, unscale, clip, step.
    set_sdpa(model, False)
    opt = torch.optim.Adam(params, lr=lr)
    scaler = torch.amp.GradScaler("cuda")

    def official_step(x0, buffers, t, noise):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = diffusion.training_losses(model, x0, buffers, t, noise).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()
        return loss
    return official_step


def bench_train(opts: BenchOptions, batch: int, fast: bool) -> Row:
    device = torch.device(opts.device)
    if fast and device.type == "cuda":
        # as train.Trainer does: without cuDNN's search, batch 32 ran ~3 % slower on one H100
        torch.backends.cudnn.benchmark = True
    model = _build_model(opts, device)
    compile_mode = opts.extra.get("train_compile", "none") if fast else None
    compile_mode = {"none": None, "default": True}.get(compile_mode, compile_mode)
    budget = opts.extra.get("memory_budget")
    if fast and compile_mode and budget is not None:
        # Inductor's min-cut partitioner then recomputes cheap activations to fit the budget (0..1).
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = float(budget)
    step = make_train_step(model, fast, compile_mode, batch=batch)
    data = [_batch(model.config, batch, device, seed) for seed in range(2)]
    _peak_reset(device)
    t0 = time.perf_counter()
    for i in range(opts.warmup):
        x0, b, n, t = data[i % 2]
        step(x0, b, t, n)
    _sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(opts.train_iters):
        x0, b, n, t = data[i % 2]
        loss = step(x0, b, t, n)
    _sync(device)
    elapsed = time.perf_counter() - t0
    alloc, reserved = _peak_gib(device)
    del model, step, data
    _peak_reset(device)
    return {"batch": batch, "images_per_s": batch * opts.train_iters / elapsed,
            "step_ms": 1000 * elapsed / opts.train_iters, "peak_alloc_gib": alloc, "peak_reserved_gib": reserved,
            "warmup_s": warm, "loss": float(loss.detach())}


# ---------------------------------------------------------------------------------------------
# DDIM sampling
# ---------------------------------------------------------------------------------------------
SAMPLE_VARIANTS = ("official", "fast", "fast+graph", "fast+compile")


def bench_ddim(opts: BenchOptions, batches: tuple[int, ...], variant: str) -> list[Row]:
    """DDIM timings of one variant: "official" (float32 eager, legacy attention), "fast" (bf16 +
    SDPA + channels_last, eager), "fast+graph" (the same replayed from a CUDA graph) or
    "fast+compile" (torch.compile, mode ``sample_compile``, CUDA graphs by default)."""
    from .fast import FastDenoiser, GraphedDenoiser, set_sdpa
    from .sampling import ddim_sample

    device = torch.device(opts.device)
    model = _build_model(opts, device).eval()
    if variant == "official":
        set_sdpa(model, False)
        net: Any = model
    else:
        mode = opts.extra.get("sample_compile", "reduce-overhead") if variant == "fast+compile" else False
        net = FastDenoiser(model, compile=mode, channels_last=opts.extra.get("channels_last"))
    repeats = opts.sample_repeats if variant != "official" else max(2, opts.sample_repeats // 2)
    rows = []
    for batch in batches:
        x0, buffers, noise, _ = _batch(model.config, batch, device)
        with torch.no_grad():
            latent = net.encode(x0) if variant != "official" else model.encode(x0)
            t0 = time.perf_counter()
            run: Any = net
            if variant == "fast+graph":
                run, cond = GraphedDenoiser(net, buffers, latent, noise), (None, None)
            else:
                cond = (buffers, latent)
            for _ in range(2 if variant == "fast+compile" else 1):  # compile / capture / cuDNN search
                ddim_sample(run, noise, *cond, steps=opts.steps)
            _sync(device)
            warm = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                x = ddim_sample(run, noise, *cond, steps=opts.steps)
                _sync(device)
                times.append(time.perf_counter() - t0)
        row = {"variant": variant, "batch": batch, "seconds": statistics.median(times), "min_s": min(times),
               "warmup_s": warm, "finite": bool(torch.isfinite(x).all())}
        opts.log(json.dumps(row))
        rows.append(row)
    del model, net
    _peak_reset(device)
    return rows


# ---------------------------------------------------------------------------------------------
# the "model" section
# ---------------------------------------------------------------------------------------------
# The official code's figures measured on an H100 (issue 2), for reference in the table.
OFFICIAL_H100 = {"train_32": 61.9, "train_4": 25.8, "mem_32": 71.4, "ddim_1": 0.92, "ddim_16": 2.27}


@register("model")
def model_section(opts: BenchOptions) -> list[Row]:
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows: list[Row] = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    opts.log(f"# model benchmark on {name}, torch {torch.__version__}")

    def add(row: Row) -> None:
        rows.append(row)
        opts.log(json.dumps(row))

    for batch in opts.train_batches:
        base = bench_train(opts, batch, fast=False) if opts.baseline else None
        ours = bench_train(opts, batch, fast=True)
        add({"section": "model", "name": f"training images/s, batch {batch}", "value": ours["images_per_s"],
             "unit": "img/s", "baseline": base and base["images_per_s"],
             "speedup": base and ours["images_per_s"] / base["images_per_s"], "ours": ours, "official": base})
        add({"section": "model", "name": f"peak training memory, batch {batch}", "value": ours["peak_alloc_gib"],
             "unit": "GiB", "baseline": base and base["peak_alloc_gib"],
             "notes": f"reserved {ours['peak_reserved_gib']:.1f} GiB (official {base and base['peak_reserved_gib']})"})
    variants = opts.extra.get("sample_variants") or ("official", "fast+graph")
    if device.type != "cuda":  # CUDA graphs need a GPU
        variants = tuple(v for v in variants if v != "fast+graph")
    timings = {v: bench_ddim(opts, opts.sample_batches, v) for v in variants if v != "official" or opts.baseline}
    base_s = timings.get("official", [None] * len(opts.sample_batches))
    for v, ours_s in timings.items():
        if v == "official":
            continue
        for b, o in zip(base_s, ours_s):
            add({"section": "model", "name": f"DDIM {opts.steps}, {o['batch']} image(s), {v}", "value": o["seconds"],
                 "unit": "s", "baseline": b and b["seconds"], "speedup": b and b["seconds"] / o["seconds"],
                 "ours": o, "official": b})
    return rows


# ---------------------------------------------------------------------------------------------
# running and printing
# ---------------------------------------------------------------------------------------------
@register("rig")
def rig_section(opts: BenchOptions) -> list[Row]:
    """Photos per second from PNG file to buffers (FLAME-sized assets, DECA of the real architecture)."""
    from .rig import bench_rig

    n = int(opts.extra.get("rig_photos", 64 if opts.device.startswith("cuda") else 8))
    r = bench_rig(opts.device, n=n, size=opts.image_size or 256)
    rows = [{"section": "rig", "name": f"file -> buffers, {r['size']}px, batch {r['batch_size']}",
             "value": r["photos_per_s"], "unit": "photos/s"}]
    labels = {"load_resize_crop_s": "load, resize, crop", "encode_s": "DECA encode",
              "flame_render_s": "FLAME + render", "detect_s_per_photo": "dlib detection (CPU)"}
    for key, label in labels.items():
        if key in r:
            rows.append({"section": "rig", "name": f"{label}, per photo", "value": r[key], "unit": "s"})
    return rows


@register("edit")
def edit_section(opts: BenchOptions) -> list[Row]:
    """Seconds from a photo file to an edited photo pasted back, one edit and a sweep of 16."""
    from .pipeline import bench_edit

    sizes = opts.extra.get("edit_sizes", (256, 512) if opts.device.startswith("cuda") else (64,))
    rows = []
    for size in sizes:
        for n in (1, 16):
            r = bench_edit(opts.device, size, n, steps=opts.steps, repeats=int(opts.extra.get("edit_repeats", 3)))
            rows.append({"section": "edit", "name": f"photo -> pasted edit, {size}px, {n} edit(s), {opts.steps}",
                         "value": r["total_s"], "unit": "s",
                         "notes": f"detect {r['detect_s']:.2f}, fit {r['fit_s']:.2f}, edit {r['edit_s']:.2f}, "
                                  f"paste {r['paste_s']:.2f}"})
    return rows


@register("train")
def train_section(opts: BenchOptions) -> list[Row]:
    """Stage 2 end to end with the official recipe (``extra['stage2_steps']``, default 5000) and
    Stage 1 images/s per GPU at batch 32 (under torchrun every rank runs it)."""
    from .train import bench_train

    size = opts.image_size or 256
    rows = []
    steps2 = int(opts.extra.get("stage2_steps", 5000))
    r = bench_train(stage=2, size=size, device=opts.device, steps=steps2, compile=opts.extra.get("train_compile_stage2", False))
    rows.append({"section": "train", "name": f"Stage 2, official recipe, {steps2} steps at {size}px",
                 "value": r["total_s"], "unit": "s", "baseline": 776.0 * steps2 / 5000,
                 "speedup": 776.0 * steps2 / 5000 / r["total_s"],
                 "notes": f"{r['s_per_step'] * 1000:.1f} ms/step; baseline = official H100 776 s per 5000 steps"})
    r = bench_train(stage=1, size=size, device=opts.device, steps=int(opts.extra.get("stage1_steps", 50)))
    rows.append({"section": "train", "name": f"Stage 1 per GPU, batch 32, {size}px (world {r['world']})",
                 "value": r["images_per_s_per_gpu"], "unit": "images/s", "baseline": 61.9,
                 "speedup": r["images_per_s_per_gpu"] / 61.9, "notes": f"peak {r['peak_gib']:.1f} GiB"})
    return rows


def run_sections(names: list[str], opts: BenchOptions) -> list[Row]:
    rows: list[Row] = []
    for name in names:
        rows += SECTIONS[name](opts)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def to_markdown(rows: list[Row]) -> str:
    lines = ["| section | benchmark | ours | official-equivalent | speedup | unit |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        lines.append(f"| {r['section']} | {r['name']} | {_fmt(r['value'])} | {_fmt(r.get('baseline'))} | {speed} | {r['unit']} |")
    return "\n".join(lines)
