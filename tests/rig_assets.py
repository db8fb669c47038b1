"""Tiny face-rig assets in the official file formats, made by the tests themselves.

A lat-long ellipsoid "head" (42 vertices, 80 faces) with smooth random bases, written as:
* ``generic_model.pkl``: a Python-2-style protocol-2 pickle (byte strings as BINSTRING, so it needs
  ``encoding='latin1'``), ``shapedirs`` as a chumpy-style ``chumpy.ch.Ch`` object and ``J_regressor``
  as a ``scipy.sparse.csc.csc_matrix`` -- written without chumpy or scipy, and without putting fake
  modules into ``sys.modules`` (the pickler writes the class paths itself);
* ``head_template.obj`` with a UV seam (more UVs than vertices);
* ``landmark_embedding.npy``: an ``np.save``'d dict holding two torch tensors;
* ``FLAME_texture.npz``: an 8x8 BGR texture space in 0..255 with 60 components.
"""
from __future__ import annotations

import copyreg
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

N_LON, N_LAT = 8, 4  # 8 * 4 + 2 = 34 vertices, 8 * 2 * 4 = 64 faces


class _Ch:  # pickled as chumpy.ch.Ch
    def __init__(self, x):
        self.x = x

    def __reduce_ex__(self, protocol):
        state = {"_dirty_vars": {"x"}, "_itr": None, "_make_dense": False, "_make_sparse": False,
                 "_depends_on_deps": {}, "x": self.x}
        return (copyreg.__newobj__, (_Ch,), state)


class _Csc:  # pickled as scipy.sparse.csc.csc_matrix
    def __init__(self, dense: np.ndarray):
        rows, cols = dense.shape
        data, indices, indptr = [], [], [0]
        for c in range(cols):
            nz = np.nonzero(dense[:, c])[0]
            indices += nz.tolist()
            data += dense[nz, c].tolist()
            indptr.append(len(indices))
        self.state = {"_shape": (rows, cols), "maxprint": 50, "indices": np.array(indices, dtype=np.int32),
                      "indptr": np.array(indptr, dtype=np.int32), "data": np.array(data, dtype=np.float64)}

    def __reduce_ex__(self, protocol):
        return (copyreg.__newobj__, (_Csc,), self.state)


_GLOBALS = {_Ch: ("chumpy.ch", "Ch"), _Csc: ("scipy.sparse.csc", "csc_matrix")}


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with Python-2 byte strings and chosen class paths for the stand-in classes."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_global(self, obj, name=None):
        if obj in _GLOBALS:
            module, qual = _GLOBALS[obj]
            self.write(pickle.GLOBAL + f"{module}\n{qual}\n".encode("ascii"))
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _head(seed: int = 0):
    rng = np.random.default_rng(seed)
    lat = np.linspace(0, np.pi, N_LAT + 2)[1:-1]
    lon = np.linspace(0, 2 * np.pi, N_LON, endpoint=False)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    ring = np.stack([0.08 * np.sin(la) * np.sin(lo), 0.11 * np.cos(la), 0.09 * np.sin(la) * np.cos(lo)], -1)
    verts = np.concatenate([[[0, 0.11, 0]], ring.reshape(-1, 3), [[0, -0.11, 0]]])
    n_v = len(verts)
    faces = []
    for i in range(N_LAT - 1):
        for j in range(N_LON):
            a, b = 1 + i * N_LON + j, 1 + i * N_LON + (j + 1) % N_LON
            faces += [(a, b, a + N_LON), (b, b + N_LON, a + N_LON)]
    last = 1 + (N_LAT - 1) * N_LON
    for j in range(N_LON):
        faces += [(0, 1 + (j + 1) % N_LON, 1 + j), (n_v - 1, last + j, last + (j + 1) % N_LON)]
    faces = np.array(faces, dtype=np.uint32)
    # orient every face outwards (counter-clockwise seen from outside)
    v = verts[faces]
    normal = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    flip = (normal * v.mean(1)).sum(1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return rng, verts, faces


def make_flame_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of the tiny FLAME model (float64 as in the real file)."""
    rng, verts, faces = _head(seed)
    n_v = len(verts)
    smooth = np.stack([np.sin(verts @ rng.normal(0, 20, 3) + rng.uniform(0, 6)) for _ in range(400 * 3)], 1)
    shapedirs = (smooth.reshape(n_v, 3, 400) * 2e-3)
    posedirs = rng.normal(0, 1e-3, (n_v, 3, 36))
    groups = [verts[:, 1] < -0.05, verts[:, 1] < -0.02, (verts[:, 1] < 0) & (verts[:, 2] > 0.03),
              (verts[:, 0] < 0) & (verts[:, 2] > 0.05) & (verts[:, 1] > 0), (verts[:, 0] > 0) & (verts[:, 2] > 0.05) & (verts[:, 1] > 0)]
    j_reg = np.zeros((5, n_v))
    for k, g in enumerate(groups):
        idx = np.nonzero(g)[0] if g.any() else np.array([k])
        j_reg[k, idx] = 1.0 / len(idx)
    weights = rng.dirichlet(np.ones(5) * 2, n_v)
    return {"f": faces, "J_regressor": j_reg, "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
            "J": j_reg @ verts, "bs_style": "lbs", "weights": weights, "posedirs": posedirs,
            "v_template": verts, "shapedirs": shapedirs, "bs_type": "lrotmin"}


def write_flame_pickle(path: Path, flame: dict[str, np.ndarray]) -> Path:
    obj = dict(flame)
    obj["shapedirs"] = _Ch(flame["shapedirs"])
    obj["J_regressor"] = _Csc(flame["J_regressor"])
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())
    return path


def uv_layout(faces: np.ndarray, verts: np.ndarray):
    """UVs with a seam at the back: vertices on the seam get a second UV for faces that wrap."""
    u = (np.arctan2(verts[:, 0], verts[:, 2]) / (2 * np.pi)) % 1.0
    vv = 0.5 - verts[:, 1] / 0.25
    uvs = [tuple(x) for x in np.stack([u, vv], 1)]
    uvfaces = []
    for f in faces:
        us = u[f]
        corners = []
        for k, vi in enumerate(f):
            if us.max() - us.min() > 0.5 and us[k] < 0.25:  # a face across the seam
                uvs.append((u[vi] + 1.0 - 1e-3, vv[vi]))
                corners.append(len(uvs) - 1)
            else:
                corners.append(int(vi))
        uvfaces.append(corners)
    uv = np.clip(np.array(uvs, dtype=np.float64), 0, 1)
    return uv, np.array(uvfaces, dtype=np.int64)


def write_obj(path: Path, verts: np.ndarray, faces: np.ndarray) -> Path:
    uv, uvfaces = uv_layout(faces, verts)
    lines = ["# tiny test head", "mtllib template.mtl"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts]
    lines.append("usemtl material_1")
    lines += [f"vt {a:.6f} {b:.6f}" for a, b in uv]
    lines.append("s off")
    lines += [f"f {a + 1}/{ta + 1} {b + 1}/{tb + 1} {c + 1}/{tc + 1}"
              for (a, b, c), (ta, tb, tc) in zip(faces.astype(int), uvfaces)]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_embedding(n_faces: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + 1)
    return {
        "static_lmk_faces_idx": rng.integers(0, n_faces, 51).astype(np.int64),
        "static_lmk_bary_coords": rng.dirichlet(np.ones(3), 51).astype(np.float64),
        "dynamic_lmk_faces_idx": torch.tensor(rng.integers(0, n_faces, (79, 17)), dtype=torch.int64),
        "dynamic_lmk_bary_coords": torch.tensor(rng.dirichlet(np.ones(3), (79, 17)), dtype=torch.float32),
        "full_lmk_faces_idx": rng.integers(0, n_faces, (1, 68)).astype(np.int64),
        "full_lmk_bary_coords": rng.dirichlet(np.ones(3), (1, 68)).astype(np.float32),
    }


def write_embedding(path: Path, emb: dict) -> Path:
    np.save(path, emb, allow_pickle=True)
    return path


def make_texture(seed: int = 0, side: int = 8, n_comp: int = 60) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 2)
    return {"mean": rng.uniform(60, 200, (side, side, 3)).astype(np.float32),
            "tex_dir": rng.normal(0, 20, (side, side, 3, n_comp)).astype(np.float32),
            "vt": rng.uniform(0, 1, (10, 2)), "ft": np.zeros((4, 3), dtype=np.uint32)}


def write_assets(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write all four files into ``folder``; returns their paths by asset name."""
    folder.mkdir(parents=True, exist_ok=True)
    flame = make_flame_dict(seed)
    paths = {
        "generic_model.pkl": write_flame_pickle(folder / "generic_model.pkl", flame),
        "head_template.obj": write_obj(folder / "head_template.obj", flame["v_template"], flame["f"]),
        "landmark_embedding.npy": write_embedding(folder / "landmark_embedding.npy",
                                                  make_embedding(len(flame["f"]), seed)),
    }
    np.savez(folder / "FLAME_texture.npz", **make_texture(seed))
    paths["FLAME_texture.npz"] = folder / "FLAME_texture.npz"
    return paths
