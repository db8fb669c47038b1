"""Photos of synthetic people, rendered with more than the physical buffers show.

A photo is rendered through the same face rig and the same photo-frame path as the buffers
(``FaceRig.render_all``), so the face pixels of a photo and its buffers come from one
rasterization. On top of the buffers' albedo x SH shading a photo adds what real photos have and
DECA's buffers lack: crisper painted features and per-person skin detail (pores, freckles, moles)
sampled from UV maps, Blinn-Phong highlights, a hair band and optional glasses on the head, a
background and a little sensor noise.

Frame conventions (so a photo can be "fitted" exactly, without DECA):

* The photo is S x S. Its face is placed like an FFHQ-aligned portrait: the FFHQ alignment rule
  (eye/mouth landmarks, spec 5.2) applied to the posed face sets the scale and the centre, then the
  photo's ``framing`` = [zoom, dx, dy] perturbs them.
* ``landmarks`` (68, 2) are the posed 68 landmarks in photo pixels with pixel centres at integers
  (x = column, y = row), as a detector reports them.
* ``tform`` is the official crop transform of those landmarks (TestData's rule, ``deca.crop_tform``),
  float32: exactly what the official pipeline computes from ``NAME.txt``.
* ``cam`` is solved from ``tform`` so that DECA's projection followed by the official way back to
  the photo (spec 4.7, with its 224/223 and half-pixel quirks) puts every landmark where the photo
  shows it. Hence ``rig.render(params, tform, S)`` gives buffers aligned pixel for pixel with the
  photo, and the face mask of the photo is ``render_all(...)["alpha"]``.

Sidecar ``NAME.params.json`` next to each ``NAME.png`` (schema ``diffusionrig-synthetic-photo-v1``)::

    {"format": "diffusionrig-synthetic-photo-v1", "image": "NAME.png", "size": S, "person": "person_000",
     "params": {"shape": [100], "tex": [50], "exp": [50], "pose": [6], "cam": [3], "light": [[3] x 9]},
     "tform": [[3] x 3],            # photo pixels -> 224 crop pixels (float32 values)
     "landmarks": [[x, y] x 68],    # photo pixels, pixel centres at integers (also in NAME.txt)
     "framing": [zoom, dx, dy], "photo_seed": int, "options": {...render switches...},
     "align_center": null | [x, y, z],  # re-centring point used (edit ground truths)
     "edit": null | {"mode": "light"|"exp"|"pose", "source": "...png", "target": "...png"}}

All numbers are the float32 values used for rendering, so reading them back reproduces the buffers
bit for bit. ``NAME.txt`` holds the same landmarks as "x y" lines (the official TestData
convention); edit ground truths have no ``.txt`` (they are references, not inputs).
"""
from __future__ import annotations

import json
import math
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..deca import crop_tform
from ..errors import InputError
from ..render import CROP_SIZE, SH_CONSTANTS, orthographic_project, rasterize, transform_points
from . import assets as A
from .people import Person, sample_people, sample_photo_params

FORMAT = "diffusionrig-synthetic-photo-v1"
FACE_KEYS = ("shape", "tex", "exp", "pose", "cam", "light")
UV_SIZE = 256  # resolution of the per-person detail maps


@dataclass(frozen=True)
class PhotoOptions:
    """What a photo shows beyond the buffers (all off: the photo is the clamped rendered buffer)."""

    detail: bool = True  # crisp features + per-person skin detail
    specular: bool = True  # Blinn-Phong highlights
    extras: bool = True  # hair band, glasses
    background: bool = True  # else black, like the buffers
    noise: bool = True  # sensor noise


ALL_OFF = PhotoOptions(False, False, False, False, False)


# ----------------------------------------------------------------------------------------------
# Rigs


def synthetic_rig(assets_dir: str | Path, seed: int = 0, resolution: str = "small",
                  device: str | torch.device = "cpu") -> Any:
    """The face rig of the synthetic world in ``assets_dir`` (files written first if missing).

    The files are read by the same loaders as real assets; the FLAME pickle is read directly (no
    safetensors cache copy: synthetic worlds are many and cheap to parse)."""
    from ..assets import load_flame_model, load_landmark_embedding, load_obj, load_texture_space
    from ..rig import FaceRig

    root = Path(assets_dir)
    if not all((root / name).is_file() for name in A.FILE_NAMES.values()):
        A.write_synthetic_assets(root, seed=seed, resolution=resolution)
    return FaceRig.from_arrays(load_flame_model(root / A.FILE_NAMES["flame"], cache=False),
                               load_landmark_embedding(root / A.FILE_NAMES["landmarks"]),
                               load_texture_space(root / A.FILE_NAMES["texture"]),
                               load_obj(root / A.FILE_NAMES["template"]), device=device)


# ----------------------------------------------------------------------------------------------
# Framing


def _ffhq_quad(lm: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and side of the FFHQ alignment square of 68 landmarks (x right, y down)."""
    eye_l, eye_r = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg = (eye_l + eye_r) / 2
    eye_to_eye = eye_r - eye_l
    mouth_avg = (lm[48] + lm[54]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    x = x / np.linalg.norm(x) * max(np.linalg.norm(eye_to_eye) * 2, np.linalg.norm(eye_to_mouth) * 1.8)
    return eye_avg + 0.1 * eye_to_mouth, float(2 * np.linalg.norm(x))


def cam_from_tform(tform: np.ndarray, scale: float, offset: np.ndarray) -> np.ndarray:
    """DECA camera [s, tx, ty] that, through the official way back to the photo, maps a world point
    (x, y) to photo pixel centres (scale * x + offset[0], -scale * y + offset[1])."""
    t = np.asarray(tform, np.float64)
    k, half = t[0, 0], CROP_SIZE / 2
    s = k * scale / half
    # u224 = (s (x + tx) / 2 + 1/2) 224 and u = (u224 - t02) / k = pixel + 0.5 (rasterizer centres)
    tx = (k * (offset[0] + 0.5) + t[0, 2] - half) / (half * s)
    ty = (half - k * (offset[1] + 0.5) - t[1, 2]) / (half * s)
    return np.array([s, tx, ty])


def frame_photo(rig: Any, params: Mapping[str, torch.Tensor], size: int
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, np.ndarray]:
    """Place the posed face in an S x S photo: returns (params with ``cam``, tform (1,3,3) float32,
    landmarks (68,2) in photo pixels). See the module notes for the conventions."""
    _, lm_world, _ = rig.flame_forward(params)
    pts = lm_world[0, :, :2].double().numpy() * np.array([1.0, -1.0])  # image axes, metres
    centre, qsize = _ffhq_quad(pts)
    zoom, dx, dy = (float(v) for v in params.get("framing", torch.tensor([[1.0, 0.0, 0.0]]))[0])
    scale = size / qsize * zoom  # pixels per metre
    offset = np.array([(size - 1) / 2 + dx * size, (size - 1) / 2 + dy * size]) - scale * centre
    landmarks = pts * scale + offset
    tform = crop_tform(landmarks, (size, size)).astype(np.float32)
    cam = cam_from_tform(tform, scale, offset)
    out = dict(params)
    out["cam"] = torch.tensor(cam, dtype=torch.float32)[None]
    return out, torch.from_numpy(tform)[None], landmarks


def project_landmarks(lm_world: torch.Tensor, cam: torch.Tensor, tform: torch.Tensor) -> np.ndarray:
    """Photo-pixel positions (B,68,2) of world landmarks, pixel centres at integers."""
    crop = orthographic_project(lm_world.float(), cam.float())
    inv_t = torch.inverse(tform.float()).transpose(1, 2)
    photo = transform_points(crop, inv_t, CROP_SIZE, None)[..., :2]
    return photo.double().numpy() - 0.5


# ----------------------------------------------------------------------------------------------
# UV-space maps: template positions per texel, then per-person detail


_ATLAS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _atlas(rig: Any, size: int = UV_SIZE) -> dict[str, np.ndarray]:
    """Template point of every texel of a size x size UV map, found by rasterizing the head template
    in UV space with the rig's own UV layout (so the maps line up with the albedo buffer)."""
    per_rig = _ATLAS.setdefault(rig, {})
    if size in per_rig:
        return per_rig[size]
    uv = rig.uvcoords.float().cpu()
    corners = torch.stack([2 * uv[:, 0] - 1, 1 - 2 * uv[:, 1], torch.full_like(uv[:, 0], 10.0)], 1)
    uvf = rig.uvfaces.cpu()
    # one "vertex" per UV corner: rasterize the UV triangles, then interpolate 3-D template points
    pix_to_face, bary, _ = rasterize(corners[None], uvf, size, size)
    template = rig.flame.v_template.float().cpu()
    jaw = rig.flame.lbs_weights[:, 2].float().cpu()
    faces = rig.faces.cpu()
    f = pix_to_face[0].reshape(-1)
    valid = f >= 0
    fv = template[faces[f.clamp(min=0)]]  # (N,3,3)
    b = bary[0].reshape(-1, 3).clamp(min=0)
    p = (fv * b[..., None]).sum(1)
    # the mouth strip: triangles that join the upper lip (jaw weight ~0) to the lower lip (~1)
    fj = jaw[faces[f.clamp(min=0)]]
    mouth = valid & ((fj.max(1).values - fj.min(1).values) > 0.5) & (p[:, 2] > 0) & \
        (p[:, 0].abs() < A.MOUTH_HALF_WIDTH + 0.004) & ((p[:, 1] - A.MOUTH_Y).abs() < 0.006)
    out = {"points": p.numpy().astype(np.float64), "valid": valid.numpy(), "mouth": mouth.numpy()}
    per_rig[size] = out
    return out


def _mean_albedo(rig: Any, size: int) -> np.ndarray:
    """The rig's albedo map at tex = 0 (RGB, 0..1) as (size*size, 3) texels."""
    with torch.no_grad():
        m = rig.albedo_map(torch.zeros(1, rig.texture.n_tex))[:1].float().cpu()
    if m.shape[-1] != size:
        m = F.interpolate(m, size=(size, size), mode="nearest")
    return m[0].permute(1, 2, 0).reshape(-1, 3).double().numpy()


def _dilate(maps: np.ndarray, valid: np.ndarray, steps: int = 2) -> np.ndarray:
    """Copy values into a few texels around the UV islands, so bilinear lookups at island borders
    do not fade to zero."""
    maps, valid = maps.copy(), valid.copy()
    for _ in range(steps):
        acc = np.zeros_like(maps)
        cnt = np.zeros(valid.shape)
        for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
            acc += np.roll(maps * valid[..., None], shift, axis)
            cnt += np.roll(valid, shift, axis)
        grow = (~valid) & (cnt > 0)
        maps[grow] = acc[grow] / cnt[grow][:, None]
        valid = valid | grow
    return maps


def _hf_noise(rng: np.random.Generator, size: int, blur: int = 1) -> np.ndarray:
    n = rng.normal(size=(size, size))
    for _ in range(blur):  # a cheap blur keeps pores a few texels wide
        n = (n + np.roll(n, 1, 0) + np.roll(n, -1, 0) + np.roll(n, 1, 1) + np.roll(n, -1, 1)) / 5
    return n / (n.std() + 1e-12)


def person_maps(rig: Any, person: Person, size: int = UV_SIZE) -> torch.Tensor:
    """(11, size, size) UV maps of a person: albedo correction (3), albedo multiplier (3), specular
    strength (1), hair alpha (1), hair strand shade (1), lens alpha (1), frame alpha (1)."""
    key = (id(rig), size)
    if key in person._cache:
        return person._cache[key]
    at = _atlas(rig, size)
    p, valid, mouth = at["points"], at["valid"], at["mouth"]
    x, y, z = p.T
    rng = np.random.default_rng(person.detail_seed)
    # crisper painted features (with the person's iris colour) than the albedo space holds: the
    # correction is taken against the rig's own mean albedo map, so it also undoes its blockiness
    crisp = A.paint_albedo(p, mouth, sharp=4.0, iris_rgb=person.iris_rgb.astype(np.float64) * 255) / 255.0
    mean_map = _mean_albedo(rig, size)
    delta = crisp - mean_map
    feats = A.face_features(p, sharp=4.0)
    skin = np.clip(1 - feats["lips"] - feats["eye_open"] - feats["brows"] - mouth, 0, 1)
    # skin detail: pores (fine, mostly luminance), freckles and a few moles
    pores = _hf_noise(rng, size).reshape(-1)
    mul = 1 + person.pores * pores[:, None] * np.array([1.0, 0.95, 0.9]) * skin[:, None]
    n_freckles = int(person.freckles * 150)
    spots = np.zeros(len(p))
    centres = rng.uniform([-0.06, -0.04], [0.06, 0.06], (n_freckles, 2))
    radii = rng.uniform(0.0008, 0.002, n_freckles)
    moles = rng.uniform([-0.06, -0.09], [0.06, 0.05], (int(rng.integers(0, 4)), 2))
    front = z > 0.02
    for (cx, cy), r in zip(centres, radii):
        near = front & (np.abs(x - cx) < 3 * r) & (np.abs(y - cy) < 3 * r)
        spots[near] += 0.35 * np.exp(-((x[near] - cx) ** 2 + (y[near] - cy) ** 2) / (2 * r * r))
    for cx, cy in moles:
        near = front & (np.abs(x - cx) < 0.006) & (np.abs(y - cy) < 0.006)
        spots[near] += 1.5 * np.exp(-((x[near] - cx) ** 2 + (y[near] - cy) ** 2) / (2 * 0.0012 ** 2))
    spots = np.clip(spots, 0, 1) * skin
    mul *= 1 - spots[:, None] * np.array([0.25, 0.32, 0.36])
    # specular strength: T-zone and lips shinier, eyes wet, brows matte
    tzone = A._gauss(x, y, 0, 0.045, 0.03, 0.02) + A._gauss(x, y, 0, -0.015, 0.012, 0.02)
    spec = (1 + 0.8 * tzone + 1.2 * feats["lips"] + 3.0 * feats["eye_open"]) * (1 - 0.7 * feats["brows"])
    # hair band: everything above a hairline that runs round the head
    phi = np.abs(np.arctan2(x, z))
    line = np.interp(phi, [0, 0.5, 0.9, 1.3, 1.8, np.pi],
                     [person.hair_height, person.hair_height + 0.008, person.hair_height - 0.012,
                      0.0, -0.03, -0.045])
    wave_phase = rng.uniform(0, 2 * np.pi)
    line = line + person.hair_wave * np.sin(phi * 9 + wave_phase)
    hair = A._smoothstep(line - 0.0015, line + 0.0015, y) * (y < 0.2)
    strands = _hf_noise(rng, size, blur=0)
    strands = (strands + np.roll(strands, 1, 0) + np.roll(strands, 2, 0) + np.roll(strands, 3, 0)) / 2
    strands = strands.reshape(-1)
    # glasses: two lenses, a bridge and the arms back to the ears
    lens = np.zeros(len(p))
    frame = np.zeros(len(p))
    if person.glasses:
        for sx in (-1.0, 1.0):
            d = np.sqrt(((x - sx * A.EYE_X) / 0.021) ** 2 + ((y - A.EYE_Y - 0.001) / 0.0155) ** 2)
            lens = np.maximum(lens, A._smoothstep(1.02, 0.98, d) * (z > 0.02))
            frame = np.maximum(frame, A._smoothstep(0.9, 0.96, d) * A._smoothstep(1.16, 1.1, d) * (z > 0.02))
        bar = A._smoothstep(0.0022, 0.0014, np.abs(y - A.EYE_Y - 0.007))
        frame = np.maximum(frame, bar * (np.abs(x) < 0.013) * (z > 0.05))
        frame = np.maximum(frame, bar * (np.abs(x) > 0.052) * (z > -0.02) * (phi < 1.7))
        lens = lens * (1 - frame)
    maps = np.concatenate([delta, mul, spec[:, None], hair[:, None], strands[:, None], lens[:, None],
                           frame[:, None]], 1)
    maps[~valid] = 0
    maps = _dilate(maps.reshape(size, size, -1), valid.reshape(size, size))
    out = torch.from_numpy(np.ascontiguousarray(maps.transpose(2, 0, 1)).astype(np.float32))
    person._cache[key] = out
    return out


# ----------------------------------------------------------------------------------------------
# Backgrounds


def background(person: Person, photo_seed: int, size: int) -> np.ndarray:
    """(S,S,3) float background: the person's kind and colours, jittered per photo."""
    base = np.random.default_rng([person.detail_seed, 17])
    jit = np.random.default_rng([int(photo_seed), 18])
    c0, c1, c2 = person.bg_colors.astype(np.float64)
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    angle = base.uniform(0, np.pi) + jit.normal(0, 0.15)
    ux, uy = math.cos(angle), math.sin(angle)
    along = (xx - 0.5) * ux + (yy - 0.5) * uy
    kind = person.background
    if kind == "gradient":
        t = np.clip(along * base.uniform(0.8, 1.6) + 0.5 + jit.normal(0, 0.05), 0, 1)[..., None]
        img = np.where(t < 0.5, c0 + (c2 - c0) * 2 * t, c2 + (c1 - c2) * (2 * t - 1))
    elif kind == "stripes":
        period = base.uniform(0.06, 0.2)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (along / period + jit.uniform(0, 1)))
        t = A._smoothstep(0.35, 0.65, t)[..., None]
        img = c0 * (1 - t) + c1 * t
    elif kind == "checker":
        cell = base.uniform(0.08, 0.2)
        across = -(xx - 0.5) * uy + (yy - 0.5) * ux
        shift = jit.uniform(0, cell, 2)
        t = ((np.floor((along + shift[0]) / cell) + np.floor((across + shift[1]) / cell)) % 2)[..., None]
        img = c0 * (1 - t) + c1 * t
    elif kind == "rings":
        cx, cy = base.uniform(-0.3, 1.3, 2) + jit.normal(0, 0.03, 2)
        r = np.hypot(xx - cx, yy - cy)
        t = A._smoothstep(0.3, 0.7, 0.5 + 0.5 * np.sin(2 * np.pi * r / base.uniform(0.08, 0.2)))[..., None]
        img = c0 * (1 - t) + c2 * t
    else:  # blobs
        img = np.broadcast_to(c0, (size, size, 3)).copy()
        for k in range(5):
            cx, cy = base.uniform(0, 1, 2) + jit.normal(0, 0.03, 2)
            r = base.uniform(0.08, 0.25)
            m = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - m) + (c1 if k % 2 else c2) * m
    shade = 1 - 0.25 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)  # a soft vignette
    return np.clip(img * shade[..., None], 0, 1)


# ----------------------------------------------------------------------------------------------
# Rendering


def _specular_terms(normal: torch.Tensor, light: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n.h clamped and masked to lit normals (B,1,H,W), light strength per colour (B,3,1,1)) for
    the distant light hidden in the SH's first-order terms. The camera looks along -z
    (orthographic), so the Blinn-Phong half vector is between the light and +z."""
    lin = light[:, 1:4, :]  # (B, 3 xyz, 3 rgb)
    d = F.normalize(lin.mean(2), dim=1)  # (B,3)
    strength = (lin.norm(dim=1) * SH_CONSTANTS[1])[:, :, None, None]
    h = F.normalize(d + torch.tensor([0.0, 0.0, 1.0]), dim=1)
    n = F.normalize(normal, dim=1, eps=1e-6)
    ndh = torch.einsum("bchw,bc->bhw", n, h).clamp(min=0)[:, None]
    lit = torch.einsum("bchw,bc->bhw", n, d)[:, None] > 0
    return ndh * lit, strength


def compose_photo(out: Mapping[str, torch.Tensor], person: Person | None, params: Mapping[str, torch.Tensor],
                  maps: torch.Tensor | None, options: PhotoOptions, size: int) -> np.ndarray:
    """The photo (H,W,3) float in [0,1] from the rig's render_all output and the person's maps."""
    alpha = out["alpha"][:1]
    albedo = out["albedo"][:1]
    shading = out["shading"][:1]
    uv = None
    if maps is not None and (options.detail or options.specular or options.extras):
        uv = F.grid_sample(maps[None], out["grid"][:1], mode="bilinear", padding_mode="zeros",
                           align_corners=False) * alpha
    if options.detail and uv is not None:
        albedo = (albedo + uv[:, 0:3]) * torch.where(alpha > 0, uv[:, 3:6], torch.ones_like(uv[:, 3:6]))
    color = albedo * shading
    light = params["light"][:1].float()
    if (options.specular or options.extras) and uv is not None:
        ndh, strength = _specular_terms(out["normal"][:1], light)
        spec = lambda shininess: strength * ndh ** shininess  # noqa: E731
    if options.specular and uv is not None:
        color = color + person.specular * uv[:, 6:7] * spec(person.shininess)
    if options.extras and uv is not None:
        hair_a, strands = uv[:, 7:8], uv[:, 8:9]
        hair_rgb = torch.from_numpy(person.hair_rgb)[None, :, None, None]
        hair = hair_rgb * (1 + 0.25 * strands) * shading
        hair = hair + 0.08 * spec(8.0) * (1 + 0.5 * strands)
        color = color * (1 - hair_a) + hair * hair_a
        lens_a, frame_a = uv[:, 9:10], uv[:, 10:11]
        lens_rgb = torch.from_numpy(person.lens_rgb)[None, :, None, None]
        color = color * (1 - 0.5 * lens_a * (1 - lens_rgb))
        color = color + 0.5 * lens_a * spec(60.0)
        frame_rgb = torch.from_numpy(person.glasses_rgb)[None, :, None, None]
        frame = frame_rgb * shading + 0.4 * spec(30.0)
        color = color * (1 - frame_a) + frame * frame_a
    color = color * alpha
    img = color[0].permute(1, 2, 0).numpy()
    a = alpha[0, 0].numpy()[..., None]
    seed = int(params["photo_seed"][0]) if "photo_seed" in params else 0
    if options.background and person is not None:
        img = img + (1 - a) * background(person, seed, size).astype(np.float32)
    if options.noise:
        rng = np.random.default_rng([seed, 19])
        sigma = np.float32(rng.uniform(0.002, 0.008))
        img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0.0, 1.0)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def render_photo(rig: Any, person: Person | None, params: Mapping[str, torch.Tensor], size: int = 256,
                 options: PhotoOptions = PhotoOptions(), tform: torch.Tensor | None = None,
                 align_center: torch.Tensor | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Render one photo: (uint8 (S,S,3) RGB, info).

    ``params`` (batch 1) as ``sample_photo_params`` returns them; without ``cam`` or ``tform`` the
    face is framed first (``frame_photo``). ``align_center`` (1,3) re-centres the head as the
    official edits do (used for edit ground truths). ``info`` holds ``params`` (with ``cam``),
    ``tform`` (1,3,3), ``landmarks`` (68,2) photo pixels, ``alpha`` (S,S) bool (the face mask) and
    ``buffers`` (the rig's ``render_all`` output).
    """
    if tform is None or "cam" not in params:
        params, tform, landmarks = frame_photo(rig, params, size)
    else:
        landmarks = None
    out = rig.render_all(params, tform, size, align_center)
    if landmarks is None:
        lm = out["landmarks2d_world"]
        if align_center is not None:
            from ..flame import ffhq_center
            lm = lm + (align_center.float() - ffhq_center(lm)).unsqueeze(1)
        landmarks = project_landmarks(lm, params["cam"], tform)[0]
    maps = person_maps(rig, person) if person is not None and options != ALL_OFF else None
    img = compose_photo(out, person, params, maps, options, size)
    info = {"params": dict(params), "tform": tform, "landmarks": landmarks,
            "alpha": out["alpha"][0, 0].numpy() > 0, "buffers": out}
    return to_uint8(img), info


# ----------------------------------------------------------------------------------------------
# Files


def _f32_list(t: torch.Tensor) -> Any:
    # float32 -> Python float is exact, so reading back gives the same float32 values
    return t.detach().cpu().float().numpy().astype(np.float64).tolist()


def _write_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(img).save(tmp, format="PNG", optimize=False, compress_level=6)
    tmp.replace(path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_photo(path: str | Path, img: np.ndarray, info: Mapping[str, Any], person: Person | None,
               size: int, options: PhotoOptions = PhotoOptions(), write_txt: bool = True,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``NAME.png``, ``NAME.params.json`` (and ``NAME.txt`` landmarks) for one rendered photo."""
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_png(path, img)
    params = info["params"]
    side = {
        "format": FORMAT,
        "image": path.name,
        "size": int(size),
        "person": person.id if person is not None else None,
        "params": {k: _f32_list(params[k][0]) for k in FACE_KEYS},
        "tform": _f32_list(info["tform"][0]),
        "landmarks": np.asarray(info["landmarks"], np.float64).tolist(),
        "framing": _f32_list(params["framing"][0]) if "framing" in params else None,
        "photo_seed": int(params["photo_seed"][0]) if "photo_seed" in params else None,
        "options": asdict(options),
        "align_center": None,
        "edit": None,
    }
    side.update(dict(extra or {}))
    _write_text(path.with_name(path.stem + ".params.json"), json.dumps(side, indent=1))
    if write_txt:
        lines = "".join(f"{float(x)!r} {float(y)!r}\n" for x, y in np.asarray(info["landmarks"], np.float64))
        _write_text(path.with_suffix(".txt"), lines)
    return path


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    if path.name.endswith(".params.json"):
        return path
    return path.with_name(path.stem + ".params.json")


class Sidecar(tuple):
    """What ``load_sidecar`` returns: unpacks as ``params, tform, landmarks``; the raw JSON is
    ``.record``, and ``get(name)`` reads it like the JSON (``"params"``, ``"tform"`` and
    ``"landmarks"`` give the tensors/arrays above)."""

    def __new__(cls, params: dict[str, torch.Tensor], tform: torch.Tensor, landmarks: np.ndarray | None,
                record: dict[str, Any]) -> "Sidecar":
        obj = super().__new__(cls, (params, tform, landmarks))
        obj.record = record
        return obj

    params = property(lambda self: self[0])
    tform = property(lambda self: self[1])
    landmarks = property(lambda self: self[2])

    def photo_params(self) -> dict[str, torch.Tensor]:
        """The face parameters plus ``framing`` and ``photo_seed``: with ``tform`` they re-render
        the photo itself (background jitter and noise included) through ``render_photo``."""
        out = dict(self[0])
        if self.record.get("framing") is not None:
            out["framing"] = torch.tensor(self.record["framing"], dtype=torch.float32)[None]
        if self.record.get("photo_seed") is not None:
            out["photo_seed"] = torch.tensor([int(self.record["photo_seed"])], dtype=torch.int64)
        return out

    def get(self, key: str, default: Any = None) -> Any:
        if key in ("params", "tform", "landmarks"):
            return self[("params", "tform", "landmarks").index(key)]
        return self.record.get(key, default)


def load_sidecar(path: str | Path) -> Sidecar:
    """The true parameters of a synthetic photo (the "oracle fit"): ``(params, tform, landmarks)``
    with params {shape, tex, exp, pose, cam, light} batch 1 float32, tform (1,3,3) float32 (photo
    pixels -> 224 crop) and landmarks (68,2) photo pixels or None; the raw JSON is ``.record``.
    ``path`` is the photo or its ``.params.json``."""
    side = sidecar_path(path)
    if not side.is_file():
        raise InputError(f"no synthetic-photo sidecar {side.name} next to {Path(path).name}; only photos "
                         "written by diffusionrig_core.synthetic have true parameters")
    try:
        d = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{side} is not a readable sidecar ({exc})") from exc
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        fmt = d.get("format") if isinstance(d, dict) else None
        raise InputError(f"{side} is not a synthetic-photo sidecar (format {fmt!r}, expected {FORMAT!r})")
    try:
        params = {k: torch.tensor(d["params"][k], dtype=torch.float32)[None] for k in FACE_KEYS}
        tform = torch.tensor(d["tform"], dtype=torch.float32).reshape(1, 3, 3)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{side} lacks or mangles a face parameter or the tform ({exc})") from exc
    lm = d.get("landmarks")
    return Sidecar(params, tform, (np.asarray(lm, np.float64) if lm is not None else None), d)


_DEFAULT_RIG: dict[str, Any] = {}


def default_rig() -> Any:
    """The rig of the demo world's assets (written once into the user cache by the pipeline);
    loaded once per process."""
    from ..pipeline import demo_assets_dir

    root = Path(demo_assets_dir())
    key = f"{root}:{(root / A.FILE_NAMES['flame']).stat().st_mtime_ns}"
    if key not in _DEFAULT_RIG:
        _DEFAULT_RIG.clear()
        _DEFAULT_RIG[key] = synthetic_rig(root)
    return _DEFAULT_RIG[key]


def write_album(out_dir: str | Path, person: Person, n: int, seed: int = 0, size: int = 256,
                rig: Any = None, options: PhotoOptions = PhotoOptions(), prefix: str = "photo") -> list[Path]:
    """``n`` photos of ``person`` as ``PREFIX_000.png`` (+ sidecar + .txt) in ``out_dir``.
    ``rig`` defaults to the demo world's rig (``default_rig``); photos and sidecars must be used
    with the rig that rendered them."""
    out = Path(out_dir)
    if rig is None:
        rig = default_rig()
    rng = np.random.default_rng([seed, 2000 + _person_index(person)])
    paths = []
    for i in range(n):
        params = sample_photo_params(person, rng)
        img, info = render_photo(rig, person, params, size, options)
        paths.append(save_photo(out / f"{prefix}_{i:03d}.png", img, info, person, size, options))
    return paths


def _person_index(person: Person) -> int:
    digits = "".join(ch for ch in person.id if ch.isdigit())
    return int(digits) if digits else 0


EDIT_MODES = ("light", "exp", "pose")


def edited_params(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], mode: str
                  ) -> dict[str, torch.Tensor]:
    """The official inference edits (spec 7): light, exp (+jaw) or global pose from the target."""
    from .. import edits

    transfer = {"light": edits.light_from, "exp": edits.expression_from, "pose": edits.pose_from}
    if mode not in transfer:
        raise InputError(f"unknown edit mode {mode!r}; use one of {', '.join(EDIT_MODES)}")
    return transfer[mode](source, target)


def write_heldout(out_dir: str | Path, person: Person, n_cases: int, seed: int = 0, size: int = 256,
                  rig: Any = None, options: PhotoOptions = PhotoOptions()) -> list[dict[str, str]]:
    """Held-out edit cases of ``person``: ``case_NN_source.png`` and ``case_NN_target.png`` (ordinary
    photos with sidecars and landmarks) and the ground truths ``case_NN_{light,exp,pose}.png``: the
    source photo (same person, background, framing, noise) with the target's light, expression+jaw
    or head pose, re-centred as the official edit does. Returns one dict of file names per case."""
    out = Path(out_dir)
    if rig is None:
        rig = default_rig()
    rng = np.random.default_rng([seed, 3000 + _person_index(person)])
    cases = []
    for c in range(n_cases):
        src_params = sample_photo_params(person, rng)
        tgt_params = sample_photo_params(person, rng)
        name = f"case_{c:02d}"
        img, src = render_photo(rig, person, src_params, size, options)
        src_path = save_photo(out / f"{name}_source.png", img, src, person, size, options)
        img, tgt = render_photo(rig, person, tgt_params, size, options)
        tgt_path = save_photo(out / f"{name}_target.png", img, tgt, person, size, options)
        centre = rig.ffhq_center(src["params"])
        case = {"source": src_path.name, "target": tgt_path.name}
        for mode in EDIT_MODES:
            params = edited_params(src["params"], tgt["params"], mode)
            img, info = render_photo(rig, person, params, size, options, tform=src["tform"], align_center=centre)
            extra = {"align_center": _f32_list(centre[0]),
                     "edit": {"mode": mode, "source": src_path.name, "target": tgt_path.name}}
            p = save_photo(out / f"{name}_{mode}.png", img, info, person, size, options, write_txt=False,
                           extra=extra)
            case[mode] = p.name
        cases.append(case)
    return cases


def write_world(out_dir: str | Path, n_people: int = 8, photos_per_person: int = 8, seed: int = 0,
                size: int = 128, heldout_per_person: int = 1, resolution: str = "small",
                options: PhotoOptions = PhotoOptions()) -> Path:
    """A whole synthetic world in ``out_dir``: ``assets/`` (the four face-rig files),
    ``people/person_NNN/photo_MMM.png`` (+ sidecars, .txt), ``heldout/person_NNN/case_*`` and
    ``world.json`` (people, settings and the list of files). Returns the path of ``world.json``."""
    out = Path(out_dir)
    rig = synthetic_rig(out / "assets", seed=seed, resolution=resolution)
    people = sample_people(n_people, seed)
    record: dict[str, Any] = {"format": "diffusionrig-synthetic-world-v1", "seed": seed, "size": size,
                              "resolution": resolution, "assets": "assets", "options": asdict(options),
                              "people": [], "photos": {}, "heldout": {}}
    for person in people:
        album = write_album(out / "people" / person.id, person, photos_per_person, seed, size, rig, options)
        record["people"].append(person.to_dict())
        record["photos"][person.id] = [str(p.relative_to(out)) for p in album]
        if heldout_per_person:
            cases = write_heldout(out / "heldout" / person.id, person, heldout_per_person, seed, size, rig,
                                  options)
            record["heldout"][person.id] = [{k: f"heldout/{person.id}/{v}" for k, v in c.items()} for c in cases]
    path = out / "world.json"
    _write_text(path, json.dumps(record, indent=1))
    return path


def load_world(path: str | Path) -> tuple[dict[str, Any], list[Person]]:
    """``world.json`` (a world folder or the file) -> (record, people)."""
    path = Path(path)
    if path.is_dir():
        path = path / "world.json"
    record = json.loads(path.read_text())
    return record, [Person.from_dict(d) for d in record["people"]]


def photo_paths(world: str | Path, people: Sequence[str] | None = None) -> list[Path]:
    """Training photos of a world (all people, or the given ids), sorted."""
    record, _ = load_world(world)
    root = Path(world) if Path(world).is_dir() else Path(world).parent
    ids = people if people is not None else list(record["photos"])
    return [root / p for pid in ids for p in record["photos"][pid]]
