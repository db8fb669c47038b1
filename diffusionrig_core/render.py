"""DECA's renderer in plain PyTorch: projection, a z-buffer rasterizer, and the three physical buffers.

The rasterizer reproduces pytorch3d 0.7.4's ``rasterize_meshes`` as DECA calls it (one face per
pixel, no blur, no culling, screen-space barycentrics; spec 4.8) with float32 arithmetic in the same
order, so coverage and face indices match pytorch3d exactly. It is vectorised over (face, pixel)
pairs: every face proposes the pixels of its bounding box, the exact inside test filters them, and a
scatter-min on a packed (depth, face index) key keeps the nearest face per pixel (ties go to the
lower face index, as in pytorch3d). Works on CPU and GPU; pytorch3d is never needed.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

CROP_SIZE = 224  # DECA's encoder crop; the way back to the photo uses 224 (not 223), spec 4.7
_EPS = 1e-8  # pytorch3d's kEpsilon

# First-order SH of the official renderer (spec 4.10), float32 as in the model.
_PI = np.pi
SH_CONSTANTS = torch.tensor([
    1 / np.sqrt(4 * _PI),
    ((2 * _PI) / 3) * np.sqrt(3 / (4 * _PI)),
    ((2 * _PI) / 3) * np.sqrt(3 / (4 * _PI)),
    ((2 * _PI) / 3) * np.sqrt(3 / (4 * _PI)),
    (_PI / 4) * 3 * np.sqrt(5 / (12 * _PI)),
    (_PI / 4) * 3 * np.sqrt(5 / (12 * _PI)),
    (_PI / 4) * 3 * np.sqrt(5 / (12 * _PI)),
    (_PI / 4) * (3 / 2) * np.sqrt(5 / (12 * _PI)),
    (_PI / 4) * (1 / 2) * np.sqrt(5 / (4 * _PI)),
], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Camera and frames


def orthographic_project(verts: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """DECA's ``trans_verts``: (s(x+tx), -s(y+ty), -s z) in the 224-crop NDC (y down)."""
    cam = cam.reshape(-1, 1, 3)
    xy = verts[:, :, :2] + cam[:, :, 1:]
    p = cam[:, :, 0:1] * torch.cat([xy, verts[:, :, 2:]], 2)
    return torch.cat([p[:, :, :1], -p[:, :, 1:]], 2)


def transform_points(points: torch.Tensor, tform: torch.Tensor, points_scale: int | None = CROP_SIZE,
                     out_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """DECA's ``transform_points``: NDC of a ``points_scale`` crop -> pixels -> row-vector ``@ tform``
    -> NDC of an ``out_hw`` image. z passes through unchanged."""
    p2d = points[:, :, :2]
    if points_scale:
        p2d = (p2d * 0.5 + 0.5) * points_scale
    b, n, _ = points.shape
    ones = torch.ones([b, n, 1], device=points.device, dtype=points.dtype)
    out = torch.bmm(torch.cat([p2d, ones], dim=-1), tform)
    if out_hw:
        out = torch.stack([out[:, :, 0] / out_hw[1] * 2 - 1, out[:, :, 1] / out_hw[0] * 2 - 1], -1)
    else:
        out = out[:, :, :2]
    return torch.cat([out, points[:, :, 2:]], dim=-1)


def transform_to_photo_frame(trans_verts: torch.Tensor, tform_inv: torch.Tensor, height: int,
                             width: int) -> torch.Tensor:
    """Crop NDC -> NDC of the S x S photo, as DiffusionRig's ``decode(render_orig=True)`` does.

    ``tform_inv`` is inverse(tform) transposed (B,3,3), the matrix the official code passes. The
    crop is scaled by 224 although it was fitted to 0..223, and pixel centres mix two conventions;
    both quirks are kept on purpose (spec 4.7).
    """
    return transform_points(trans_verts, tform_inv, CROP_SIZE, (height, width))


def inverse_tform_T(tform: torch.Tensor) -> torch.Tensor:
    """inverse(tform)^T in float32: the matrix :func:`transform_to_photo_frame` expects."""
    return torch.inverse(tform.float()).transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# Mesh helpers


def face_vertices(values: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Per-face corner values (B,F,3,D) of per-vertex values (B,V,D); faces (F,3) or (B,F,3)."""
    b = values.shape[0]
    if faces.ndim == 2:
        return values[:, faces]
    idx = torch.arange(b, device=values.device).view(-1, 1, 1)
    return values[idx, faces]


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals (B,V,3), normalised with eps 1e-6 (DECA's corner-wise sums)."""
    b, n_v = verts.shape[:2]
    faces = faces.expand(b, -1, -1) if faces.ndim == 3 else faces.unsqueeze(0).expand(b, -1, -1)
    faces = faces + (torch.arange(b, device=verts.device) * n_v).view(-1, 1, 1)
    vf = verts.reshape(b * n_v, 3)[faces.long()].reshape(-1, 3, 3)
    faces = faces.reshape(-1, 3)
    normals = torch.zeros(b * n_v, 3, dtype=verts.dtype, device=verts.device)
    normals.index_add_(0, faces[:, 1], torch.cross(vf[:, 2] - vf[:, 1], vf[:, 0] - vf[:, 1], dim=1))
    normals.index_add_(0, faces[:, 2], torch.cross(vf[:, 0] - vf[:, 2], vf[:, 1] - vf[:, 2], dim=1))
    normals.index_add_(0, faces[:, 0], torch.cross(vf[:, 1] - vf[:, 0], vf[:, 2] - vf[:, 0], dim=1))
    return F.normalize(normals, eps=1e-6, dim=1).reshape(b, n_v, 3)


def uv_ndc(uvcoords: torch.Tensor) -> torch.Tensor:
    """UV (T,2) -> DECA's per-vertex UV 'NDC' (T,3) = (2u-1, 1-2v, 1)."""
    uv = torch.cat([uvcoords, uvcoords[:, 0:1] * 0.0 + 1.0], -1)
    uv = uv * 2 - 1
    return torch.stack([uv[:, 0], -uv[:, 1], uv[:, 2]], -1)


# ----------------------------------------------------------------------------------------------
# Rasterizer


def _pixel_centres(n: int, other: int, device: torch.device) -> torch.Tensor:
    """pytorch3d's NDC of pixel index i along an axis of n pixels (float32, i counted from +1 side)."""
    rng = np.float32(2.0) if n <= other else np.float32(n * np.float32(2.0)) / np.float32(other)
    i = np.arange(n, dtype=np.float32)
    centres = -(rng / np.float32(2.0)) + (rng * i + rng / np.float32(2.0)) / np.float32(n)
    return torch.tensor(centres.astype(np.float32), device=device), float(rng)


def _edge(px, py, ax, ay, bx, by):
    return (px - ax) * (by - ay) - (py - ay) * (bx - ax)


def _barycentrics(px, py, fv):
    """pytorch3d's screen-space barycentrics of points (N,) in triangles fv (N,3,3) (x, y used)."""
    x0, y0 = fv[:, 0, 0], fv[:, 0, 1]
    x1, y1 = fv[:, 1, 0], fv[:, 1, 1]
    x2, y2 = fv[:, 2, 0], fv[:, 2, 1]
    area = _edge(x2, y2, x0, y0, x1, y1) + _EPS
    w0 = _edge(px, py, x1, y1, x2, y2) / area
    w1 = _edge(px, py, x2, y2, x0, y0) / area
    w2 = _edge(px, py, x0, y0, x1, y1) / area
    return w0, w1, w2



def _to_pytorch3d_frame(verts: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A copy of DECA-frame vertices in pytorch3d's frame: +X left, +Y up (DECA negates x and y),
    the longer image axis stretched as pytorch3d does for non-square images."""
    v = verts.float().clone()
    v[..., :2] = -v[..., :2]
    if h > w:
        v[..., 1] = v[..., 1] * h / w
    else:
        v[..., 0] = v[..., 0] * w / h
    return v

def rasterize(verts: torch.Tensor, faces: torch.Tensor, height: int, width: int,
              max_pairs: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rasterize meshes given in DECA's image frame (x right, y down, NDC; z already shifted by +10).

    verts (B,V,3), faces (F,3) shared by the batch. Returns ``pix_to_face`` (B,H,W) int64 per-mesh
    face index (-1 = background), ``bary`` (B,H,W,3) (-1 on background) and ``zbuf`` (B,H,W)
    (-1 on background), equal to pytorch3d's ``rasterize_meshes(..., faces_per_pixel=1)``.
    """
    b, n_v, _ = verts.shape
    n_f = faces.shape[0]
    device = verts.device
    h, w = int(height), int(width)
    v = _to_pytorch3d_frame(verts, h, w)
    fv = v[:, faces].reshape(b * n_f, 3, 3)  # packed faces: index = b * F + f
    xs, x_range = _pixel_centres(w, h, device)  # NDC of x index j (j counts from the left in p3d = right in image)
    ys, y_range = _pixel_centres(h, w, device)

    x0, y0, z0 = fv[:, 0, 0], fv[:, 0, 1], fv[:, 0, 2]
    x1, y1, z1 = fv[:, 1, 0], fv[:, 1, 1], fv[:, 1, 2]
    x2, y2, z2 = fv[:, 2, 0], fv[:, 2, 1], fv[:, 2, 2]
    xmin, xmax = fv[:, :, 0].amin(1), fv[:, :, 0].amax(1)
    ymin, ymax = fv[:, :, 1].amin(1), fv[:, :, 1].amax(1)
    zmin = fv[:, :, 2].amin(1)
    area = _edge(x0, y0, x1, y1, x2, y2)
    usable = (area.abs() > _EPS) & (zmin >= _EPS) & torch.isfinite(fv).all(2).all(1)
    # Per-face terms of pytorch3d's edge functions; the same float32 operations as per pixel,
    # computed once per face (bit-identical results, less work per candidate pixel).
    face_data = torch.stack([
        x1, y1, y2 - y1, x2 - x1,          # edge(p, v1, v2) -> w0
        x2, y2, y0 - y2, x0 - x2,          # edge(p, v2, v0) -> w1
        x0, y0, y1 - y0, x1 - x0,          # edge(p, v0, v1) -> w2
        _edge(x2, y2, x0, y0, x1, y1) + _EPS,
        z0, z1, z2, xmin, xmax, ymin, ymax], 0)  # (20, faces): gathered rows stay contiguous

    # candidate pixels: centres inside the face's bounding box (a hair wider; the exact test follows)
    def index_range(lo, hi, n, rng):
        a = torch.ceil((lo + rng / 2) * n / rng - 0.5 - 1e-3).clamp(0, n)
        z = torch.floor((hi + rng / 2) * n / rng - 0.5 + 1e-3).clamp(-1, n - 1)
        return a.long(), z.long()

    x0i, x1i = index_range(xmin, xmax, w, x_range)
    y0i, y1i = index_range(ymin, ymax, h, y_range)
    nx = (x1i - x0i + 1).clamp(min=0)
    ny = (y1i - y0i + 1).clamp(min=0)
    counts = torch.where(usable, nx * ny, torch.zeros_like(nx))

    init = torch.iinfo(torch.int64).max
    best = torch.full((b * h * w,), init, dtype=torch.int64, device=device)
    face_ids_all = torch.nonzero(counts > 0).squeeze(1)
    if max_pairs is None:
        max_pairs = (1 << 23) if device.type == "cuda" else (1 << 20)
    if face_ids_all.numel():
        cum = torch.cumsum(counts[face_ids_all], 0)
        total = int(cum[-1])
        # split the face list where the running pair count crosses multiples of max_pairs
        n_chunks = max(1, math.ceil(total / max_pairs))
        bounds = torch.searchsorted(cum, torch.arange(1, n_chunks, device=device) * max_pairs).tolist()
        starts = [0] + bounds
        ends = bounds + [face_ids_all.numel()]
        for s, e in zip(starts, ends):
            if e <= s:
                continue
            fids = face_ids_all[s:e]
            cnt = counts.index_select(0, fids)
            pair_face = torch.repeat_interleave(fids, cnt)
            first = torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
            k = torch.arange(pair_face.numel(), device=device) - first
            nxf = nx.index_select(0, pair_face)
            row_in_box = torch.div(k, nxf, rounding_mode="floor")
            ix = x0i.index_select(0, pair_face) + (k - row_in_box * nxf)
            iy = y0i.index_select(0, pair_face) + row_in_box
            px, py = xs.index_select(0, ix), ys.index_select(0, iy)
            g = face_data.index_select(1, pair_face).unbind(0)
            w0 = ((px - g[0]) * g[2] - (py - g[1]) * g[3]) / g[12]
            w1 = ((px - g[4]) * g[6] - (py - g[5]) * g[7]) / g[12]
            w2 = ((px - g[8]) * g[10] - (py - g[9]) * g[11]) / g[12]
            pz = w0 * g[13] + w1 * g[14] + w2 * g[15]
            ok = ((w0 > 0) & (w1 > 0) & (w2 > 0) & (pz >= 0) &
                  (px >= g[16]) & (px <= g[17]) & (py >= g[18]) & (py <= g[19]))
            sel = torch.nonzero(ok).squeeze(1)
            if sel.numel() == 0:
                continue
            pair_face, ix, iy, pz = (t.index_select(0, sel) for t in (pair_face, ix, iy, pz))
            batch = torch.div(pair_face, n_f, rounding_mode="floor")
            # pytorch3d's pixel (yidx, xidx) counts from the bottom/right: flip to image rows/cols
            pix = batch * (h * w) + (h - 1 - iy) * w + (w - 1 - ix)
            zbits = (pz + 0.0).view(torch.int32).to(torch.int64)  # +0.0 turns -0.0 into 0.0
            key = (zbits << 32) | pair_face
            best.scatter_reduce_(0, pix, key, reduce="amin")

    covered = best != init
    packed = torch.where(covered, best & 0xFFFFFFFF, torch.zeros_like(best))
    pix_idx = torch.nonzero(covered).squeeze(1)
    bary = torch.full((b * h * w, 3), -1.0, device=device)
    zbuf = torch.full((b * h * w,), -1.0, device=device)
    if pix_idx.numel():
        fidx = packed[pix_idx]
        rem = pix_idx % (h * w)
        row, col = torch.div(rem, w, rounding_mode="floor"), rem % w
        px, py = xs[w - 1 - col], ys[h - 1 - row]
        f = fv[fidx]
        w0, w1, w2 = _barycentrics(px, py, f)
        bary[pix_idx] = torch.stack([w0, w1, w2], 1)
        zbuf[pix_idx] = w0 * f[:, 0, 2] + w1 * f[:, 1, 2] + w2 * f[:, 2, 2]
    per_mesh = packed - torch.div(torch.arange(b * h * w, device=device), h * w, rounding_mode="floor") * n_f
    pix_to_face = torch.where(covered, per_mesh, torch.full_like(per_mesh, -1))
    return pix_to_face.view(b, h, w), bary.view(b, h, w, 3), zbuf.view(b, h, w)


def interpolate_face_attributes(pix_to_face: torch.Tensor, bary: torch.Tensor,
                                face_attrs: torch.Tensor) -> torch.Tensor:
    """Per-pixel attributes (B,D,H,W) from per-face-corner attributes (B,F,3,D); background = 0."""
    b, h, w = pix_to_face.shape
    d = face_attrs.shape[-1]
    out = torch.zeros(b * h * w, d, dtype=face_attrs.dtype, device=face_attrs.device)
    flat = pix_to_face.reshape(-1)
    idx = torch.nonzero(flat >= 0).squeeze(1)
    if idx.numel():
        batch = torch.div(idx, h * w, rounding_mode="floor")
        vals = face_attrs[batch, flat[idx]]  # (N,3,D)
        out[idx] = (bary.reshape(-1, 3)[idx][..., None] * vals).sum(dim=-2)
    return out.view(b, h, w, d).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# Shading and buffers


def sh_shading(normals: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """Second-order SH shading (B,3,H,W) of raw normal images (B,3,H,W) under light (B,9,3)."""
    n = normals
    basis = torch.stack([
        n[:, 0] * 0.0 + 1.0, n[:, 0], n[:, 1], n[:, 2],
        n[:, 0] * n[:, 1], n[:, 0] * n[:, 2], n[:, 1] * n[:, 2],
        n[:, 0] ** 2 - n[:, 1] ** 2, 3 * (n[:, 2] ** 2) - 1,
    ], 1)
    basis = basis * SH_CONSTANTS.to(n.device, n.dtype)[None, :, None, None]
    return torch.sum(light[:, :, :, None, None] * basis[:, :, None, :, :], 1)


def render_buffers(verts: torch.Tensor, cam: torch.Tensor, light: torch.Tensor, albedo_map: torch.Tensor,
                   faces: torch.Tensor, uvcoords: torch.Tensor, uvfaces: torch.Tensor,
                   tform_inv: torch.Tensor, size: int | tuple[int, int]) -> dict[str, torch.Tensor]:
    """The official physical buffers (spec 4.10) of FLAME vertices in the photo frame.

    verts (B,V,3) world; cam (B,3); light (B,9,3); albedo_map (B,3,256,256) RGB; faces (F,3) and
    uvfaces (F,3) from the head template OBJ, uvcoords (T,2); ``tform_inv`` = inverse(tform)^T
    (B,3,3) as the official decode receives it; size = S or (H,W) of the photo.

    Returns float32 tensors: ``rendered``, ``normal``, ``albedo`` (B,3,H,W), ``alpha`` (B,1,H,W),
    ``shading`` (unmasked), ``grid`` (B,H,W,2), ``pix_to_face`` (B,H,W) (-1 background), ``bary``,
    ``trans_verts`` (crop NDC), ``photo_verts`` (photo NDC, before the rasterizer's +10 on z),
    ``vertex_normals`` (B,V,3) world.
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    b = verts.shape[0]
    device = verts.device
    faces = faces.to(device).long()
    trans_verts = orthographic_project(verts, cam)
    photo_verts = transform_to_photo_frame(trans_verts, tform_inv.to(device, verts.dtype), h, w)
    raster_verts = torch.cat([photo_verts[..., :2], photo_verts[..., 2:] + 10], -1)
    pix_to_face, bary, _ = rasterize(raster_verts, faces, h, w)

    normals = vertex_normals(verts, faces)
    face_uv = uv_ndc(uvcoords.to(device, verts.dtype))[uvfaces.to(device).long()]  # (F,3,3)
    attrs = torch.cat([face_uv.unsqueeze(0).expand(b, -1, -1, -1), face_vertices(normals, faces)], -1)
    vals = interpolate_face_attributes(pix_to_face, bary, attrs)
    alpha = (pix_to_face >= 0).to(verts.dtype).unsqueeze(1)
    grid = vals[:, :3].permute(0, 2, 3, 1)[:, :, :, :2]
    albedo = F.grid_sample(albedo_map.to(device, verts.dtype), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    normal = vals[:, 3:6]
    shading = sh_shading(normal, light)
    return {
        "rendered": albedo * shading * alpha,
        "normal": normal * alpha,
        "albedo": albedo * alpha,
        "alpha": alpha,
        "shading": shading,
        "grid": grid,
        "pix_to_face": pix_to_face,
        "bary": bary,
        "trans_verts": trans_verts,
        "photo_verts": photo_verts,
        "vertex_normals": normals,
    }


def pytorch3d_available() -> bool:
    """True if pytorch3d is importable (an optional cross-check backend, never required)."""
    import importlib.util
    return importlib.util.find_spec("pytorch3d") is not None


def rasterize_pytorch3d(verts: torch.Tensor, faces: torch.Tensor, height: int, width: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same contract as :func:`rasterize`, computed by pytorch3d's ``rasterize_meshes`` (if installed),
    called exactly as DECA calls it. Useful to cross-check :func:`rasterize` on new hardware."""
    try:
        from pytorch3d.renderer.mesh import rasterize_meshes
        from pytorch3d.structures import Meshes
    except ImportError as exc:
        raise ImportError("rasterize_pytorch3d needs pytorch3d; the built-in rasterize() does not") from exc
    b, h, w = verts.shape[0], int(height), int(width)
    v = _to_pytorch3d_frame(verts, h, w)
    meshes = Meshes(verts=v, faces=faces.long().unsqueeze(0).expand(b, -1, -1))
    p2f, zbuf, bary, _ = rasterize_meshes(meshes, image_size=(h, w), blur_radius=0.0, faces_per_pixel=1,
                                          bin_size=None, max_faces_per_bin=None, perspective_correct=False)
    p2f = p2f[..., 0].long()
    n_f = faces.shape[0]
    per_mesh = torch.where(p2f >= 0, p2f - torch.arange(b, device=p2f.device).view(-1, 1, 1) * n_f, p2f)
    return per_mesh, bary[..., 0, :], zbuf[..., 0]
