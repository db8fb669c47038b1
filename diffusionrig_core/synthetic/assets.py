"""A procedural face model written in the real FLAME/DECA file formats.

``write_synthetic_assets(out_dir)`` produces the four files the face rig reads --
``generic_model.pkl``, ``head_template.obj``, ``landmark_embedding.npy``, ``FLAME_texture.npz`` --
laid out exactly like the licensed originals (spec 4.1, 4.3, 4.4, 4.9), so every loader, the FLAME
forward pass and the renderer run on them unchanged. They describe a small closed head (a few
thousand triangles: fast on a CPU) with a nose, brow ridge, eye sockets, lips, a chin, a jaw that
opens the mouth and a neck; identity and expression bases; 68 iBUG landmarks with a pose-dependent
jaw contour; and a skin-coloured albedo space.

The geometry is a "lathe" surface: horizontal rings (constant height y) whose cross-sections are
half-ellipses in front and behind, plus a relief field (nose, brows, eye sockets, lips, chin)
pushed along +z on the front. Longitudes are denser on the face than at the back of the head, and
the UV map follows the same grid, so the face also gets most of the texture. The mouth line is a
pair of rings a hair apart; the jaw joint pulls the lower one away, which opens a dark "mouth"
strip of the texture that is invisible while the mouth is closed.

Frame: FLAME's (metres; x to the image right, y up, z toward the camera). Everything is derived
from ``seed`` with numpy only, and written without pickling library objects, so a seed gives the
same bytes on every machine.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ._pickle import ChumpyCh, PickleWriter, ScipyCsc, TorchTensor

FILE_NAMES = {
    "flame": "generic_model.pkl",
    "template": "head_template.obj",
    "landmarks": "landmark_embedding.npy",
    "texture": "FLAME_texture.npz",
}

N_SHAPE_TOTAL, N_EXP_TOTAL, N_TEX_TOTAL = 300, 100, 200


@dataclass(frozen=True)
class Resolution:
    """Mesh and texture density of one preset."""

    n_lon: int  # vertices per ring (even)
    face_step: float  # ring spacing (m) in the face band
    tex_size: int  # albedo space is tex_size x tex_size


RESOLUTIONS = {
    "tiny": Resolution(n_lon=24, face_step=0.012, tex_size=32),
    "small": Resolution(n_lon=48, face_step=0.005, tex_size=64),
    "medium": Resolution(n_lon=72, face_step=0.0035, tex_size=128),
}

# ---------------------------------------------------------------------------------------------
# Face layout (metres, template pose). The landmark, relief and texture features all use these.

EYE_Y = 0.012  # eye line
EYE_X = 0.032  # eye centres at (+-EYE_X, EYE_Y)
MOUTH_Y = -0.052  # the lips' meeting line
MOUTH_GAP = 0.0006  # half the distance between the two mouth rings
CHIN_Y = -0.100  # lowest point of the face (chin bottom)
BROW_Y = 0.034
MOUTH_HALF_WIDTH = 0.025

# iBUG-68 landmarks 17..67 in the face plane (x, y); x < 0 is the image left (subject's right).
_BROWS = [(-0.056, 0.028), (-0.047, 0.035), (-0.036, 0.038), (-0.025, 0.037), (-0.014, 0.033)]
_NOSE = [(0.0, 0.012), (0.0, 0.001), (0.0, -0.010), (0.0, -0.021),
         (-0.013, -0.029), (-0.007, -0.031), (0.0, -0.032), (0.007, -0.031), (0.013, -0.029)]
_EYE_R = [(-0.045, 0.012), (-0.038, 0.0175), (-0.027, 0.018), (-0.019, 0.011), (-0.027, 0.0065),
          (-0.038, 0.0065)]
_MOUTH_OUT = [(-0.025, -0.052), (-0.016, -0.0465), (-0.006, -0.0435), (0.0, -0.0445), (0.006, -0.0435),
              (0.016, -0.0465), (0.025, -0.052), (0.016, -0.0595), (0.007, -0.0635), (0.0, -0.0645),
              (-0.007, -0.0635), (-0.016, -0.0595)]
_MOUTH_IN = [(-0.021, -0.052), (-0.007, -0.0513), (0.0, -0.0513), (0.007, -0.0513), (0.021, -0.052),
             (0.007, -0.0527), (0.0, -0.0527), (-0.007, -0.0527)]


def _static_landmarks_xy() -> np.ndarray:
    brows = _BROWS + [(-x, y) for x, y in reversed(_BROWS)]
    eye_l = [(-x, y) for x, y in (_EYE_R[3], _EYE_R[2], _EYE_R[1], _EYE_R[0], _EYE_R[5], _EYE_R[4])]
    pts = brows + _NOSE + _EYE_R + eye_l + _MOUTH_OUT + _MOUTH_IN
    return np.asarray(pts, dtype=np.float64)  # (51, 2): iBUG points 17..67


# ---------------------------------------------------------------------------------------------
# Small numeric helpers


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _gauss(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _pchip(xk: np.ndarray, yk: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Monotone cubic interpolation (Fritsch-Carlson), numpy only."""
    h = np.diff(xk)
    d = np.diff(yk) / h
    m = np.zeros_like(yk)
    for i in range(1, len(xk) - 1):
        if d[i - 1] * d[i] > 0:
            w1, w2 = 2 * h[i] + h[i - 1], h[i] + 2 * h[i - 1]
            m[i] = (w1 + w2) / (w1 / d[i - 1] + w2 / d[i])
    m[0], m[-1] = d[0], d[-1]
    i = np.clip(np.searchsorted(xk, x) - 1, 0, len(xk) - 2)
    t = (x - xk[i]) / h[i]
    h00, h10 = 2 * t ** 3 - 3 * t ** 2 + 1, t ** 3 - 2 * t ** 2 + t
    h01, h11 = -2 * t ** 3 + 3 * t ** 2, t ** 3 - t ** 2
    return h00 * yk[i] + h10 * h[i] * m[i] + h01 * yk[i + 1] + h11 * h[i] * m[i + 1]


# ---------------------------------------------------------------------------------------------
# The head surface


# Ring profile keyframes from the crown (arc parameter 0) to the bottom of the neck (1):
# y, half-width ax, front depth azf, back depth azb, centre z.
_PROFILE = np.array([
    # y       ax      azf     azb     zc      front taper
    [0.117, 0.000, 0.000, 0.000, -0.012, 0.00],
    [0.113, 0.026, 0.026, 0.033, -0.012, 0.00],
    [0.102, 0.048, 0.050, 0.064, -0.012, 0.00],
    [0.083, 0.064, 0.070, 0.087, -0.012, 0.00],
    [0.060, 0.073, 0.084, 0.100, -0.012, 0.00],
    [0.034, 0.077, 0.092, 0.105, -0.012, 0.00],
    [0.005, 0.078, 0.094, 0.104, -0.012, 0.00],
    [-0.030, 0.076, 0.094, 0.098, -0.014, 0.02],
    [-0.060, 0.070, 0.092, 0.088, -0.016, 0.10],
    [-0.085, 0.062, 0.088, 0.075, -0.018, 0.38],
    [-0.100, 0.054, 0.078, 0.066, -0.020, 0.60],
    [-0.108, 0.051, 0.058, 0.060, -0.024, 0.35],
    [-0.116, 0.050, 0.050, 0.057, -0.026, 0.00],
    [-0.150, 0.053, 0.051, 0.055, -0.030, 0.00],
    [-0.190, 0.057, 0.054, 0.058, -0.030, 0.00],
    [-0.203, 0.040, 0.038, 0.040, -0.030, 0.00],
    [-0.207, 0.000, 0.000, 0.000, -0.030, 0.00],
])


def _profile_param() -> np.ndarray:
    # arc-length-like parameter of the keyframes (in the y/width plane)
    seg = np.hypot(np.diff(_PROFILE[:, 0]), np.diff(_PROFILE[:, 1]))
    return np.concatenate([[0.0], np.cumsum(seg)]) / seg.sum()


def _profile(s: np.ndarray) -> np.ndarray:
    """(len(s), 6) ring description at arc parameters s."""
    sk = _profile_param()
    return np.stack([_pchip(sk, _PROFILE[:, k], s) for k in range(_PROFILE.shape[1])], 1)


def _theta(t: np.ndarray) -> np.ndarray:
    """Longitude (radians, 0 = front) of grid parameter t in [-1, 1): dense on the face."""
    return np.pi * (0.4 * t + 0.6 * t ** 3)


def _relief(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Face relief (m, along +z) over the face plane."""
    ax = np.abs(x)
    # nose: a ridge growing from the brows to the tip, dropping under the tip
    h = np.interp(y, [-0.034, -0.027, -0.021, -0.005, 0.010, 0.022], [0.0, 0.012, 0.024, 0.016, 0.007, 0.0])
    sx = np.interp(y, [-0.034, -0.024, -0.005, 0.02], [0.010, 0.010, 0.0065, 0.0055])
    r = h * np.exp(-0.5 * (x / sx) ** 2)
    r += 0.006 * (_gauss(x, y, -0.012, -0.026, 0.005, 0.004) + _gauss(x, y, 0.012, -0.026, 0.005, 0.004))
    # brow ridge, eye sockets with the eyeballs, cheekbones, temples
    r += 0.007 * _gauss(x, y, 0.0, BROW_Y - 0.002, 0.045, 0.008) * _smoothstep(0.07, 0.05, ax)
    for side in (-1.0, 1.0):
        r -= 0.013 * _gauss(x, y, side * EYE_X, EYE_Y + 0.002, 0.014, 0.010)
        r += 0.007 * _gauss(x, y, side * EYE_X, EYE_Y, 0.0085, 0.0065)
        r += 0.006 * _gauss(x, y, side * 0.046, -0.012, 0.014, 0.012)
        r -= 0.004 * _gauss(x, y, side * 0.045, -0.055, 0.012, 0.014)
        r -= 0.003 * _gauss(x, y, side * 0.066, 0.032, 0.010, 0.016)
        r -= 0.003 * _gauss(x, y, side * MOUTH_HALF_WIDTH, MOUTH_Y, 0.004, 0.005)
    # muzzle, lips, chin
    r += 0.008 * _gauss(x, y, 0.0, -0.052, 0.026, 0.018)
    r += 0.005 * _gauss(x, y, 0.0, -0.0465, 0.014, 0.0045)
    r += 0.0045 * _gauss(x, y, 0.0, -0.0585, 0.013, 0.0045)
    r -= 0.003 * _gauss(x, y, 0.0, -0.069, 0.012, 0.004)
    r += 0.008 * _gauss(x, y, 0.0, -0.087, 0.016, 0.010)
    return r


def surface(t: np.ndarray, s: np.ndarray, with_relief: bool = True) -> np.ndarray:
    """Template surface point(s) (N,3) at longitude parameter t and profile parameter s."""
    t, s = np.broadcast_arrays(np.asarray(t, float), np.asarray(s, float))
    prof = _profile(s.reshape(-1))
    y, ax, azf, azb, zc, taper = prof.T
    th = _theta(t.reshape(-1))
    c, sn = np.cos(th), np.sin(th)
    x = ax * sn * (1 - taper * np.clip(c, 0, None) ** 2)  # the taper narrows the chin, not the neck
    z = zc + np.where(c >= 0, azf, azb) * c
    if with_relief:
        front = _smoothstep(0.25, 0.75, c) * _smoothstep(CHIN_Y - 0.012, CHIN_Y + 0.004, y)
        z = z + front * _relief(x, y)
    return np.stack([x, y, z], 1)


@dataclass
class HeadMesh:
    verts: np.ndarray  # (V,3) float64
    faces: np.ndarray  # (F,3) int64, counter-clockwise seen from outside
    uv: np.ndarray  # (T,2)
    uv_faces: np.ndarray  # (F,3)
    t: np.ndarray  # (V,) longitude parameter of each vertex (poles: 0)
    s: np.ndarray  # (V,) profile parameter
    ring: np.ndarray  # (V,) ring index (-1 top pole, n_rings bottom pole)
    ring_s: np.ndarray  # (R,) profile parameter of every ring
    ring_v: np.ndarray  # (R,) texture v of every ring


def _ring_params(res: Resolution) -> tuple[np.ndarray, np.ndarray]:
    """Profile parameters of the rings and their UV v (face band gets most of the texture)."""
    dense = np.linspace(0, 1, 4001)
    ys = _profile(dense)[:, 0]
    s_of_y = lambda y: float(np.interp(-y, -ys, dense))  # y decreases along s
    # above the face: uniform in s; the face band: uniform in y; below: uniform in s
    top_y, bottom_y = 0.048, CHIN_Y - 0.006
    s_top, s_bot = s_of_y(top_y), s_of_y(bottom_y)
    n_top = max(3, int(round(s_top / 0.05)))
    rings = list(np.linspace(0, s_top, n_top + 1)[1:])
    n_face = int(round((top_y - bottom_y) / res.face_step))
    face_y = list(np.linspace(top_y, bottom_y, n_face + 1)[1:])
    # the two mouth rings replace the nearest face ring(s)
    face_y = [y for y in face_y if abs(y - MOUTH_Y) > 0.6 * res.face_step]
    face_y += [MOUTH_Y + MOUTH_GAP, MOUTH_Y - MOUTH_GAP]
    rings += [s_of_y(y) for y in sorted(face_y, reverse=True)]
    n_bot = max(3, int(round((1 - s_bot) / 0.04)))
    rings += list(np.linspace(s_bot, 1, n_bot + 1)[1:-1])
    ring_s = np.asarray(rings)
    # texture rows: weight each interval between consecutive rings (poles included)
    knots = np.concatenate([[0.0], ring_s, [1.0]])
    ymid = _profile((knots[1:] + knots[:-1]) / 2)[:, 0]
    weight = np.diff(knots) * np.where((ymid < top_y + 0.01) & (ymid > bottom_y - 0.004), 3.0, 1.0)
    mouth = np.argmin(np.abs(ymid - MOUTH_Y))
    weight[mouth] = 0.0
    weight *= (1 - 2.0 / res.tex_size) / weight.sum()
    weight[mouth] = 2.0 / res.tex_size  # two texel rows of mouth interior inside the closed lips
    v = 1 - np.cumsum(np.concatenate([[0.0], weight]))
    return ring_s, v[1:-1]


def build_head(res: Resolution) -> HeadMesh:
    ring_s, ring_v = _ring_params(res)
    n_r, n = len(ring_s), res.n_lon
    t = -1 + 2 * np.arange(n) / n  # t = -1 is the back (UV seam), t = 0 the front
    tt, ss = np.meshgrid(t, ring_s)
    ring_pts = surface(tt.ravel(), ss.ravel())
    top = surface(np.zeros(1), np.zeros(1))
    bottom = surface(np.zeros(1), np.ones(1))
    verts = np.concatenate([top, ring_pts, bottom])
    v_t = np.concatenate([[0.0], tt.ravel(), [0.0]])
    v_s = np.concatenate([[0.0], ss.ravel(), [1.0]])
    v_ring = np.concatenate([[-1], np.repeat(np.arange(n_r), n), [n_r]])
    vid = lambda r, j: 1 + r * n + (j % n)
    bottom_id = 1 + n_r * n

    # UV vertices: each ring has n+1 (the seam column is doubled), each pole n (one per fan triangle)
    u = np.arange(n + 1) / n
    uv_rings = np.stack(np.meshgrid(u, ring_v), -1).reshape(-1, 2)
    uv_top = np.stack([(np.arange(n) + 0.5) / n, np.ones(n)], 1)
    uv_bot = np.stack([(np.arange(n) + 0.5) / n, np.zeros(n)], 1)
    uv = np.concatenate([uv_rings, uv_top, uv_bot])
    tid = lambda r, j: r * (n + 1) + j
    top_uv0, bot_uv0 = n_r * (n + 1), n_r * (n + 1) + n

    faces, uv_faces = [], []
    for j in range(n):
        faces.append((0, vid(0, j + 1), vid(0, j)))
        uv_faces.append((top_uv0 + j, tid(0, j + 1), tid(0, j)))
    for r in range(n_r - 1):
        for j in range(n):
            a, b = vid(r, j), vid(r, j + 1)
            c, d = vid(r + 1, j), vid(r + 1, j + 1)
            ta, tb, tc, td = tid(r, j), tid(r, j + 1), tid(r + 1, j), tid(r + 1, j + 1)
            faces += [(a, b, d), (a, d, c)]
            uv_faces += [(ta, tb, td), (ta, td, tc)]
    for j in range(n):
        faces.append((bottom_id, vid(n_r - 1, j), vid(n_r - 1, j + 1)))
        uv_faces.append((bot_uv0 + j, tid(n_r - 1, j), tid(n_r - 1, j + 1)))
    faces = np.asarray(faces, np.int64)
    uv_faces = np.asarray(uv_faces, np.int64)
    # orient faces outward (positive signed volume)
    fv = verts[faces]
    vol = np.einsum("ij,ij->i", fv[:, 0], np.cross(fv[:, 1], fv[:, 2])).sum()
    if vol < 0:
        faces = faces[:, [0, 2, 1]]
        uv_faces = uv_faces[:, [0, 2, 1]]
    return HeadMesh(verts, faces, uv, uv_faces, v_t, v_s, v_ring, ring_s, ring_v)


def uv_to_surface(mesh: HeadMesh, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Template points (N,3) at texture coordinates (u, v) (inverse of the UV layout)."""
    t = 2 * np.asarray(u, float) - 1
    knots_v = np.concatenate([[1.0], mesh.ring_v, [0.0]])
    knots_s = np.concatenate([[0.0], mesh.ring_s, [1.0]])
    s = np.interp(-np.asarray(v, float), -knots_v, knots_s)
    return surface(t, s)


# ---------------------------------------------------------------------------------------------
# Skinning, joints


def _skinning(mesh: HeadMesh) -> tuple[np.ndarray, np.ndarray]:
    """LBS weights (V,5) and a joint regressor (5,V) (rows: root, neck, jaw, eye R, eye L)."""
    v = mesh.verts
    x, y, z = v.T
    n_v = len(v)
    theta = np.abs(_theta(mesh.t))
    # jaw: below the mouth line, sharp between the lips and smooth beyond the mouth corners
    half = np.interp(np.abs(x), [0.0, MOUTH_HALF_WIDTH - 0.004, 0.045, 0.07], [1e-4, 1e-4, 0.015, 0.03])
    lower = np.clip(0.5 + (MOUTH_Y - y) / (2 * half + 2 * MOUTH_GAP), 0, 1)
    lower = lower * lower * (3 - 2 * lower)
    side = _smoothstep(np.radians(105), np.radians(70), theta)
    neck = _smoothstep(-0.128, -0.104, y)
    w_jaw = lower * side * neck * (mesh.ring >= 0) * (mesh.ring < len(mesh.ring_s))
    w_root = _smoothstep(-0.14, -0.17, y)
    w_eyes = []
    for sx in (-1.0, 1.0):
        d = np.hypot(x - sx * EYE_X, y - EYE_Y)
        w_eyes.append(0.9 * _smoothstep(0.007, 0.003, d) * (z > 0.05))
    w_eye = np.stack(w_eyes, 1)
    w_jaw = np.minimum(w_jaw, 1 - w_root)
    w_neck = np.clip(1 - w_root - w_jaw - w_eye.sum(1), 0, 1)
    weights = np.concatenate([w_root[:, None], w_neck[:, None], w_jaw[:, None], w_eye], 1)
    weights /= weights.sum(1, keepdims=True)

    def ring_near(y0: float) -> np.ndarray:
        r = np.argmin(np.abs(_profile(mesh.ring_s)[:, 0] - y0))
        return np.nonzero(mesh.ring == r)[0]

    reg = np.zeros((5, n_v))
    reg[0, ring_near(-0.155)] = 1
    reg[1, ring_near(-0.112)] = 1
    # jaw hinge: vertices at the sides of the head at ear level
    hinge_ring = ring_near(-0.012)
    sides = hinge_ring[np.argsort(-np.abs(v[hinge_ring, 0]))[:4]]
    reg[2, sides] = 1
    for k, sx in enumerate((-1.0, 1.0)):
        d = np.hypot(x - sx * EYE_X, y - EYE_Y) + 10 * (z < 0.05)
        reg[3 + k, np.argsort(d)[:3]] = 1
    reg /= reg.sum(1, keepdims=True)
    return weights, reg


# ---------------------------------------------------------------------------------------------
# Bases


def _face_frame(mesh: HeadMesh) -> tuple[np.ndarray, ...]:
    x, y, z = mesh.verts.T
    front = _smoothstep(0.2, 0.7, np.cos(_theta(mesh.t))) * (mesh.ring >= 0) * (mesh.ring < len(mesh.ring_s))
    jaw_side = (y < MOUTH_Y).astype(float)
    return x, y, z, front, jaw_side


def _shape_basis(mesh: HeadMesh, rng: np.random.Generator) -> np.ndarray:
    """(V,3,300): designed identity deformations first, then smooth random ones (m per unit)."""
    x, y, z, front, _ = _face_frame(mesh)
    v = mesh.verts
    zero = np.zeros_like(x)
    lower = _smoothstep(0.0, -0.08, y)
    upper = _smoothstep(0.0, 0.08, y)
    nose = _gauss(x, y, 0, -0.012, 0.012, 0.02) * front
    designed = [
        v * 0.03,  # overall size
        np.stack([x * 0.05, zero, zero], 1),  # head width
        np.stack([zero, np.minimum(y, 0) * 0.06, zero], 1),  # face length (chin lower)
        np.stack([zero, zero, nose * 0.006], 1),  # nose projection
        np.stack([x * lower * 0.07, zero, zero], 1),  # jaw width
        np.stack([zero, upper * 0.008, -upper * 0.006 * front], 1),  # forehead height/slope
        np.stack([x * _gauss(x, y, 0, -0.022, 0.02, 0.014) * 0.35 * front, zero, zero], 1),  # nose width
        np.stack([zero, -_gauss(x, y, 0, -0.09, 0.025, 0.015) * 0.004,
                  _gauss(x, y, 0, -0.09, 0.025, 0.015) * 0.006 * front], 1),  # chin prominence
        np.stack([x * 0.04 * _gauss(np.abs(x), y, 0.05, -0.03, 0.02, 0.03), zero,
                  0.004 * front * _gauss(np.abs(x), y, 0.045, -0.03, 0.018, 0.025)], 1),  # cheek fullness
        np.stack([np.sign(x) * 0.003 * _gauss(np.abs(x), y, EYE_X, EYE_Y, 0.02, 0.015), zero, zero], 1),
        np.stack([zero, zero, 0.002 * front * (_gauss(x, y, 0, -0.0465, 0.015, 0.004)
                                               + _gauss(x, y, 0, -0.0585, 0.014, 0.004))], 1),  # lips
        np.stack([zero, zero, 0.004 * front * _gauss(x, y, 0, BROW_Y, 0.04, 0.008)], 1),  # brow ridge
        np.stack([zero, zero, 0.004 * front * _gauss(x, y, 0, 0.004, 0.006, 0.012)], 1),  # nose bridge
        np.stack([zero, 0.002 * x / 0.08, zero], 1),  # slight asymmetry
        np.stack([zero, zero, (z < 0) * z * 0.08], 1),  # back of the head
        np.stack([zero, 0.004 * _gauss(x, y, 0, -0.012, 0.03, 0.03) * front, zero], 1),  # mid-face height
    ]
    dirs = np.zeros((len(v), 3, N_SHAPE_TOTAL))
    for k, d in enumerate(designed):
        dirs[:, :, k] = d
    for k in range(len(designed), N_SHAPE_TOTAL):
        amp = 0.0025 / (1 + (k - len(designed)) / 12)
        dirs[:, :, k] = _smooth_field(v, rng, amp, symmetric=k < 60)
    return dirs


def _smooth_field(p: np.ndarray, rng: np.random.Generator, amp: float, symmetric: bool,
                  window: np.ndarray | None = None) -> np.ndarray:
    """A smooth random displacement field (N,3) of typical size ``amp``: a few 3-D sine waves."""
    out = np.zeros_like(p)
    for _ in range(3):
        k = rng.normal(size=3) * 25.0  # wavelengths of ~0.1-0.3 m
        phase = rng.uniform(0, 2 * np.pi)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        wave = np.sin(p @ k + phase)
        if symmetric:  # mirror-symmetric field: even in x for y,z; odd in x for x
            pm = p * np.array([-1.0, 1.0, 1.0])
            wave_m = np.sin(pm @ k + phase)
            field = np.outer(wave, direction) + np.outer(wave_m, direction * np.array([-1.0, 1.0, 1.0]))
            out += field / 2
        else:
            out += np.outer(wave, direction)
    out *= amp / np.sqrt(3)
    if window is not None:
        out *= window[:, None]
    return out


def _expression_basis(mesh: HeadMesh, rng: np.random.Generator) -> np.ndarray:
    """(V,3,100): smile, mouth open, brow raise, eyes closed, ... then small local random fields."""
    x, y, z, front, jaw_side = _face_frame(mesh)
    ax = np.abs(x)
    zero = np.zeros_like(x)
    upper_side = 1 - jaw_side
    corners = _gauss(ax, y, MOUTH_HALF_WIDTH, MOUTH_Y, 0.012, 0.01) * front
    cheeks = _gauss(ax, y, 0.04, -0.025, 0.015, 0.015) * front
    mouth_zone = _gauss(x, y, 0, MOUTH_Y, 0.024, 0.014) * front
    lower_lip = mouth_zone * jaw_side
    upper_lip = mouth_zone * upper_side
    brows = _gauss(ax, y, 0.035, BROW_Y, 0.025, 0.012) * front
    inner_brows = _gauss(ax, y, 0.016, BROW_Y - 0.002, 0.01, 0.01) * front

    def eye_close(side: float | None) -> np.ndarray:
        # squash each eye opening vertically onto its centre line, dragging the lids along
        dy = np.zeros_like(x)
        for sx in ((-1.0, 1.0) if side is None else (side,)):
            d = ((x - sx * EYE_X) / 0.016) ** 2 + ((y - EYE_Y) / 0.009) ** 2
            m = _smoothstep(1.6, 0.7, d) * front
            dy += -(y - (EYE_Y - 0.0015)) * m
        return np.stack([zero, dy, zero], 1)

    designed = [
        np.stack([np.sign(x) * corners * 0.004, corners * 0.005 + cheeks * 0.002,
                  cheeks * 0.002 - corners * 0.001], 1),  # smile
        np.stack([zero, -lower_lip * 0.007 + upper_lip * 0.0015, zero], 1),  # lips apart
        np.stack([zero, brows * 0.005 + _gauss(x, y, 0, 0.06, 0.05, 0.02) * front * 0.002, zero], 1),  # brow raise
        eye_close(None),  # eyes closed
        np.stack([zero, -corners * 0.005, zero], 1),  # mouth corners down
        np.stack([-x * mouth_zone * 0.25, zero, mouth_zone * 0.005], 1),  # pucker
        np.stack([-np.sign(x) * inner_brows * 0.003, -inner_brows * 0.003, zero], 1),  # brow furrow
        np.stack([np.sign(x) * cheeks * 0.004, zero, cheeks * 0.005], 1),  # cheek puff
        eye_close(-1.0),  # wink (image-left eye)
        eye_close(1.0),  # wink (image-right eye)
        np.stack([mouth_zone * 0.006, zero, zero], 1),  # mouth to the image right
        np.stack([zero, (_gauss(x, y, 0, -0.018, 0.015, 0.012) * front) * 0.003, zero], 1),  # nose wrinkle
        np.stack([zero, (upper_lip * 0.002 - lower_lip * 0.002) * -1, -mouth_zone * 0.002], 1),  # lip press
        np.stack([zero, upper_lip * 0.003, zero], 1),  # upper lip raise
        np.stack([zero, -lower_lip * 0.003, lower_lip * 0.001], 1),  # lower lip down
        np.stack([zero, zero, jaw_side * _smoothstep(0.3, 0.8, front) * 0.004], 1),  # jaw forward
        -eye_close(None) * 0.4,  # eyes wide open
    ]
    dirs = np.zeros((len(x), 3, N_EXP_TOTAL))
    for k, d in enumerate(designed):
        dirs[:, :, k] = d
    window = front * _smoothstep(0.075, 0.03, ax) * _smoothstep(CHIN_Y - 0.01, CHIN_Y + 0.01, y)
    for k in range(len(designed), N_EXP_TOTAL):
        amp = 0.0012 / (1 + (k - len(designed)) / 15)
        dirs[:, :, k] = _smooth_field(mesh.verts, rng, amp, symmetric=False, window=window)
    return dirs


# ---------------------------------------------------------------------------------------------
# Landmarks


def _point_on_front(mesh: HeadMesh, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Face index and barycentrics of the front-most surface point under each (x, y)."""
    fv = mesh.verts[mesh.faces]  # (F,3,3)
    a, b, c = fv[:, 0, :2], fv[:, 1, :2], fv[:, 2, :2]
    faces_idx, barys = [], []
    for p in xy:
        v0, v1, v2 = b - a, c - a, p[None] - a
        den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
        ok = np.abs(den) > 1e-12
        den = np.where(ok, den, 1.0)
        w1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
        w2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
        w0 = 1 - w1 - w2
        inside = ok & (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
        zs = np.where(inside, w0 * fv[:, 0, 2] + w1 * fv[:, 1, 2] + w2 * fv[:, 2, 2], -np.inf)
        f = int(np.argmax(zs))
        faces_idx.append(f)
        barys.append(np.clip([w0[f], w1[f], w2[f]], 0, 1) / np.clip([w0[f], w1[f], w2[f]], 0, 1).sum())
    return np.asarray(faces_idx, np.int64), np.asarray(barys, np.float64)


def jaw_line(x: np.ndarray) -> np.ndarray:
    """Height of the lower border of the face (the jaw seen from the front) at x."""
    return CHIN_Y - 0.002 + 0.047 * np.minimum(np.abs(x) / 0.068, 1.0) ** 2


def _contour_angles() -> np.ndarray:
    # 17 directions around the face centre, from the image left (0) through the chin (8)
    return np.radians(np.linspace(180.0, 360.0, 17))


def _contour(mesh: HeadMesh, yaw_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Face indices and barycentrics of the 17 jaw-contour points seen at ``yaw_deg``:
    on each of 17 rays from the face centre, the face-region vertex that sticks out furthest
    (the silhouette of the face region in the rotated view)."""
    a = np.radians(yaw_deg)
    v = mesh.verts
    xr = v[:, 0] * np.cos(a) + v[:, 2] * np.sin(a)
    face_region = ((np.abs(_theta(mesh.t)) < np.radians(85)) & (v[:, 1] < EYE_Y + 0.004)
                   & (v[:, 1] > jaw_line(v[:, 0])) & (mesh.ring >= 0))
    cx = 0.09 * np.sin(a)
    dx, dy = xr - cx, v[:, 1] - EYE_Y
    ang = np.arctan2(dy, dx) % (2 * np.pi)
    rad = np.hypot(dx, dy)
    # one incident face per vertex, with the vertex as corner 0
    first_face = np.full(len(v), -1)
    corner = np.zeros(len(v), int)
    for k in range(3):
        for f, vi in enumerate(mesh.faces[:, k]):
            if first_face[vi] < 0:
                first_face[vi], corner[vi] = f, k
    faces_idx, barys = [], []
    for target in _contour_angles():
        diff = np.abs((ang - target + np.pi) % (2 * np.pi) - np.pi)
        tol = np.radians(6)
        cand = np.nonzero(face_region & (diff < tol))[0]
        while cand.size == 0:  # coarse meshes: widen the ray
            tol *= 2
            cand = np.nonzero(face_region & (diff < tol))[0]
        vi = cand[np.argmax(rad[cand] - 0.002 * np.degrees(diff[cand]))]
        bary = np.zeros(3)
        bary[corner[vi]] = 1.0
        faces_idx.append(first_face[vi])
        barys.append(bary)
    return np.asarray(faces_idx, np.int64), np.asarray(barys)


def _landmark_embedding(mesh: HeadMesh) -> dict[str, object]:
    static_f, static_b = _point_on_front(mesh, _static_landmarks_xy())
    dyn_f = np.zeros((79, 17), np.int64)
    dyn_b = np.zeros((79, 17, 3), np.float32)
    for row in range(79):
        yaw = row if row <= 39 else -(row - 39)  # rows 40..78 are yaws -1..-39 (spec 4.2)
        f, b = _contour(mesh, float(yaw))
        dyn_f[row], dyn_b[row] = f, b
    full_f = np.concatenate([dyn_f[0], static_f])[None]
    full_b = np.concatenate([dyn_b[0], static_b.astype(np.float32)])[None].astype(np.float32)
    return {
        "static_lmk_faces_idx": static_f,
        "static_lmk_bary_coords": static_b.astype(np.float64),
        "dynamic_lmk_faces_idx": TorchTensor(dyn_f),
        "dynamic_lmk_bary_coords": TorchTensor(dyn_b),
        "full_lmk_faces_idx": full_f,
        "full_lmk_bary_coords": full_b,
    }


# ---------------------------------------------------------------------------------------------
# Texture space


SKIN_RGB = np.array([205.0, 158.0, 132.0])


def face_features(p: np.ndarray, sharp: float = 1.0) -> dict[str, np.ndarray]:
    """Soft masks (N,) of the face's painted features at template points p (N,3).

    ``sharp`` > 1 narrows the soft edges (the photo's detail layer uses sharper features than the
    smooth albedo space)."""
    x, y, z = p.T
    ax = np.abs(x)
    e = 1.0 / sharp
    frontal = _smoothstep(0.0, 0.04, z)
    lips_up = _smoothstep(1.0 + 0.5 * e, 1.0 - 0.3 * e,
                          (x / MOUTH_HALF_WIDTH) ** 2 + ((y - (MOUTH_Y + 0.004)) / 0.0048) ** 2)
    lips_lo = _smoothstep(1.0 + 0.5 * e, 1.0 - 0.3 * e,
                          (x / (MOUTH_HALF_WIDTH - 0.002)) ** 2 + ((y - (MOUTH_Y - 0.0065)) / 0.0065) ** 2)
    lips = np.maximum(lips_up, lips_lo) * frontal
    brow_y = BROW_Y + 0.002 - 40 * (ax - 0.036) ** 2
    brows = (_smoothstep(0.0045 + 0.003 * e, 0.0045, np.abs(y - brow_y))
             * _smoothstep(0.010, 0.013, ax) * _smoothstep(0.060, 0.054, ax) * frontal)
    eye_open, iris, pupil, socket = (np.zeros_like(x) for _ in range(4))
    for sx in (-1.0, 1.0):
        d = ((x - sx * EYE_X) / 0.0135) ** 2 + ((y - EYE_Y) / 0.0055) ** 2
        eye_open = np.maximum(eye_open, _smoothstep(1.0 + 0.4 * e, 1.0 - 0.2 * e, d))
        r = np.hypot(x - sx * EYE_X, (y - EYE_Y) * 1.0)
        iris = np.maximum(iris, _smoothstep(0.0052 + 0.0015 * e, 0.0052, r))
        pupil = np.maximum(pupil, _smoothstep(0.0022 + 0.001 * e, 0.0022, r))
        socket = np.maximum(socket, _gauss(x, y, sx * EYE_X, EYE_Y + 0.001, 0.017, 0.012))
    eye_open *= frontal
    nostrils = (_gauss(x, y, -0.0075, -0.0295, 0.0028 * e ** 0.5, 0.0018 * e ** 0.5)
                + _gauss(x, y, 0.0075, -0.0295, 0.0028 * e ** 0.5, 0.0018 * e ** 0.5)) * frontal
    cheeks = (_gauss(ax, y, 0.045, -0.022, 0.016, 0.014)) * frontal
    return {"lips": lips, "brows": brows, "eye_open": eye_open, "iris": iris * eye_open,
            "pupil": pupil * eye_open, "socket": socket * frontal, "nostrils": nostrils, "cheeks": cheeks}


def paint_albedo(p: np.ndarray, mouth: np.ndarray, sharp: float = 1.0,
                 iris_rgb: np.ndarray | None = None) -> np.ndarray:
    """RGB albedo (N,3) in 0..255 of template points p; ``mouth`` marks the mouth-interior texels."""
    f = face_features(p, sharp)
    col = np.tile(SKIN_RGB, (len(p), 1))
    col += f["cheeks"][:, None] * np.array([10.0, -6.0, -4.0])
    col *= (1 - 0.12 * f["socket"])[:, None]
    col = _mix(col, np.array([168.0, 82.0, 84.0]), f["lips"])
    col = _mix(col, np.array([78.0, 56.0, 44.0]), 0.9 * f["brows"])
    col = _mix(col, np.array([120.0, 70.0, 62.0]), np.clip(f["nostrils"], 0, 1) * 0.8)
    col = _mix(col, np.array([232.0, 226.0, 220.0]), f["eye_open"])
    col = _mix(col, np.array([92.0, 66.0, 48.0]) if iris_rgb is None else iris_rgb, f["iris"])
    col = _mix(col, np.array([18.0, 14.0, 14.0]), f["pupil"])
    col = _mix(col, np.array([72.0, 22.0, 28.0]), mouth.astype(float))
    return col


def _mix(col: np.ndarray, target: np.ndarray, m: np.ndarray) -> np.ndarray:
    m = np.clip(m, 0, 1)[:, None]
    return col * (1 - m) + target[None] * m


def texel_points(mesh: HeadMesh, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template points (size*size, 3), a mouth-interior mask and (u, v) of the texel centres of a
    size x size UV map (row 0 = v near 1, the top of the head)."""
    cols, rows = np.meshgrid(np.arange(size), np.arange(size))
    u = (cols.ravel() + 0.5) / size
    v = 1 - (rows.ravel() + 0.5) / size
    p = uv_to_surface(mesh, u, v)
    ring_y = _profile(mesh.ring_s)[:, 0]
    upper = mesh.ring_v[np.argmin(np.abs(ring_y - (MOUTH_Y + MOUTH_GAP)))]
    lower = mesh.ring_v[np.argmin(np.abs(ring_y - (MOUTH_Y - MOUTH_GAP)))]
    mouth = (v < upper) & (v > lower) & (np.abs(p[:, 0]) < MOUTH_HALF_WIDTH + 0.003) & (p[:, 2] > 0)
    return p, mouth, np.stack([u, v], 1)


def _texture_space(mesh: HeadMesh, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """mean (H,W,3) and tex_dir (H,W,3,200), both BGR in 0..255 units (as FLAME's file)."""
    p, mouth, uv = texel_points(mesh, size)
    mean = paint_albedo(p, mouth)
    f = face_features(p)
    skin = np.clip(1 - f["lips"] - f["eye_open"] - f["brows"] - mouth, 0, 1)
    x, y, z = p.T
    lower_face = _smoothstep(-0.035, -0.065, y) * _smoothstep(0.0, 0.04, z)
    designed = [
        skin[:, None] * np.array([-30.0, -26.0, -22.0]),  # darker / lighter skin
        skin[:, None] * np.array([10.0, -6.0, -6.0]),  # redness
        skin[:, None] * np.array([4.0, 4.0, -10.0]),  # yellow / olive
        f["lips"][:, None] * np.array([14.0, -8.0, -4.0]),  # lip colour
        f["brows"][:, None] * np.array([-25.0, -18.0, -14.0]),  # brow darkness
        f["cheeks"][:, None] * np.array([14.0, -4.0, -2.0]),  # blush
        f["socket"][:, None] * np.array([-10.0, -10.0, -6.0]),  # darker eye region
        (lower_face * (1 - f["lips"]))[:, None] * np.array([-8.0, -6.0, -3.0]),  # stubble shadow
        f["iris"][:, None] * np.array([-20.0, 10.0, 25.0]),  # iris hue
    ]
    dirs = np.zeros((size * size, 3, N_TEX_TOTAL))
    for k, d in enumerate(designed):
        dirs[:, :, k] = d
    for k in range(len(designed), N_TEX_TOTAL):
        amp = 4.0 / (1 + (k - len(designed)) / 6)
        lum = _uv_noise(uv, rng, cells=int(rng.integers(3, 9)))
        chroma = np.stack([_uv_noise(uv, rng, cells=4) for _ in range(3)], 1)
        dirs[:, :, k] = amp * (lum[:, None] * np.array([1.0, 0.85, 0.75]) + 0.12 * chroma)
    mean_bgr = mean[:, ::-1].reshape(size, size, 3)
    dirs_bgr = dirs[:, ::-1, :].reshape(size, size, 3, N_TEX_TOTAL)
    return mean_bgr.astype(np.float32), dirs_bgr.astype(np.float32)


def _uv_noise(uv: np.ndarray, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth zero-mean noise over UV (bilinear interpolation of a coarse random grid), unit std."""
    grid = rng.normal(size=(cells + 1, cells + 1))
    gx, gy = uv[:, 0] * cells, (1 - uv[:, 1]) * cells
    i, j = np.minimum(gx.astype(int), cells - 1), np.minimum(gy.astype(int), cells - 1)
    fx, fy = gx - i, gy - j
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    val = (grid[j, i] * (1 - fx) * (1 - fy) + grid[j, i + 1] * fx * (1 - fy)
           + grid[j + 1, i] * (1 - fx) * fy + grid[j + 1, i + 1] * fx * fy)
    return (val - val.mean()) / (val.std() + 1e-12)


# ---------------------------------------------------------------------------------------------
# Writers


def _obj_text(mesh: HeadMesh) -> str:
    lines = ["# Blender v2.79 (sub 0) OBJ File: 'synthetic_head.blend'",
             "# www.blender.org (synthetic DiffusionRig head; not the FLAME mesh)",
             "mtllib template.mtl"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.verts]
    lines.append("usemtl material_1")
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in mesh.uv]
    lines.append("s off")
    lines += [f"f {a + 1}/{ta + 1} {b + 1}/{tb + 1} {c + 1}/{tc + 1}"
              for (a, b, c), (ta, tb, tc) in zip(mesh.faces, mesh.uv_faces)]
    return "\n".join(lines) + "\n"


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _npy_bytes_object(obj: dict) -> bytes:
    """``np.save`` of a dict (0-d object array, pickle protocol 3), written deterministically."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    writer = PickleWriter(protocol=3)
    # the 0-d object array around the dict, as numpy pickles it
    writer._op(b"\x80\x03")
    writer.global_("numpy.core.multiarray", "_reconstruct")
    writer.global_("numpy", "ndarray")
    writer.save((0,))
    writer._save_bytes(b"b")
    writer._op(b"\x87R")  # TUPLE3, REDUCE
    writer._op(b"(")  # MARK
    writer.save(1)
    writer.save(())
    writer.global_("numpy", "dtype")
    writer.save(("O8", False, True))
    writer._op(b"R")
    writer.save((3, "|", None, None, None, -1, -1, 63))
    writer._op(b"b")  # BUILD
    writer.save(False)
    writer.save([obj])
    writer._op(b"tb.")  # TUPLE, BUILD, STOP
    return buf.getvalue() + bytes(writer.out)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            data = io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, data.getvalue())
    return buf.getvalue()


def build_flame_dict(mesh: HeadMesh, rng: np.random.Generator) -> dict[str, object]:
    weights, regressor = _skinning(mesh)
    shapedirs = np.concatenate([_shape_basis(mesh, rng), _expression_basis(mesh, rng)], 2)
    posedirs = np.stack([_smooth_field(mesh.verts, rng, 4e-4, symmetric=False) for _ in range(36)], 2)
    return {
        "f": mesh.faces.astype(np.uint32),
        "J_regressor": ScipyCsc.from_dense(regressor),
        "kintree_table": np.array([[2 ** 32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
        "J": regressor @ mesh.verts,
        "bs_style": "lbs",
        "weights": weights,
        "posedirs": posedirs,
        "v_template": mesh.verts,
        "shapedirs": ChumpyCh(shapedirs),
        "bs_type": "lrotmin",
    }


def write_synthetic_assets(out_dir: str | Path, seed: int = 0, resolution: str = "small") -> dict[str, Path]:
    """Write the four synthetic face-rig files into ``out_dir``; returns ``{kind: path}`` with kinds
    ``flame``, ``template``, ``landmarks``, ``texture`` (file names as the real ones).

    The same ``seed`` and ``resolution`` give byte-identical files. ``resolution`` is ``"tiny"``
    (~600 vertices, 32x32 texture: tests), ``"small"`` (~2k vertices, 64x64) or ``"medium"``.
    """
    if resolution not in RESOLUTIONS:
        raise InputError(f"unknown resolution {resolution!r}; use one of {', '.join(RESOLUTIONS)}")
    res = RESOLUTIONS[resolution]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mesh = build_head(res)
    rng = np.random.default_rng(seed)
    flame = build_flame_dict(mesh, rng)
    mean, tex_dir = _texture_space(mesh, res.tex_size, np.random.default_rng([seed, 1]))
    paths = {kind: out / name for kind, name in FILE_NAMES.items()}
    _write_bytes(paths["flame"], PickleWriter(protocol=2, py2=True).dumps(flame))
    _write_bytes(paths["template"], _obj_text(mesh).encode("ascii"))
    _write_bytes(paths["landmarks"], _npy_bytes_object(_landmark_embedding(mesh)))
    _write_bytes(paths["texture"], _npz_bytes({
        "mean": mean, "tex_dir": tex_dir, "vt": mesh.uv.astype(np.float64),
        "ft": mesh.uv_faces.astype(np.uint32)}))
    return paths
