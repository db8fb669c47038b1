"""FLAME as DECA runs it: linear blend skinning, 68 landmarks with the dynamic jaw contour, albedo space.

Operation order follows DECA's code path closely (einsum for the blend shapes, per-joint Rodrigues
with 1e-8 added to every component, the kinematic chain as a product of 4x4 matrices) so float32
results equal the official ones bit for bit (spec 4.2).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_SHAPE, N_EXP, N_TEX = 100, 50, 50


def batch_rodrigues(rot_vecs: torch.Tensor) -> torch.Tensor:
    """Axis-angle (N,3) -> rotation matrices (N,3,3), DECA's formula (1e-8 added before the norm)."""
    n = rot_vecs.shape[0]
    angle = torch.norm(rot_vecs + 1e-8, dim=1, keepdim=True)
    rot_dir = rot_vecs / angle
    cos = torch.unsqueeze(torch.cos(angle), dim=1)
    sin = torch.unsqueeze(torch.sin(angle), dim=1)
    rx, ry, rz = torch.split(rot_dir, 1, dim=1)
    zeros = torch.zeros((n, 1), dtype=rot_vecs.dtype, device=rot_vecs.device)
    k = torch.cat([zeros, -rz, ry, rz, zeros, -rx, -ry, rx, zeros], dim=1).view(n, 3, 3)
    ident = torch.eye(3, dtype=rot_vecs.dtype, device=rot_vecs.device).unsqueeze(0)
    return ident + sin * k + (1 - cos) * torch.bmm(k, k)


def _transform_mat(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.pad(r, [0, 0, 0, 1]), F.pad(t, [0, 0, 0, 1], value=1)], dim=2)


def _rigid_transform(rot_mats: torch.Tensor, joints: torch.Tensor, parents: list[int]) -> torch.Tensor:
    """Relative joint transforms A (B,J,4,4): world transform with the rest joint position removed."""
    joints = joints.unsqueeze(-1)
    rel_joints = joints.clone()
    rel_joints[:, 1:] -= joints[:, parents[1:]]
    local = _transform_mat(rot_mats.reshape(-1, 3, 3), rel_joints.reshape(-1, 3, 1))
    local = local.reshape(-1, joints.shape[1], 4, 4)
    chain = [local[:, 0]]
    for i in range(1, len(parents)):
        chain.append(torch.matmul(chain[parents[i]], local[:, i]))
    transforms = torch.stack(chain, dim=1)
    joints_homogen = F.pad(joints, [0, 0, 0, 1])
    return transforms - F.pad(torch.matmul(transforms, joints_homogen), [3, 0, 0, 0, 0, 0, 0, 0])


def vertices2landmarks(vertices: torch.Tensor, faces: torch.Tensor, lmk_faces_idx: torch.Tensor,
                       lmk_bary: torch.Tensor) -> torch.Tensor:
    """Barycentric points on the mesh: (B,L,3) from face indices (B,L) and barycentrics (B,L,3)."""
    b, n_v = vertices.shape[:2]
    lmk_faces = torch.index_select(faces, 0, lmk_faces_idx.reshape(-1)).view(b, -1, 3)
    lmk_faces = lmk_faces + torch.arange(b, dtype=torch.long, device=vertices.device).view(-1, 1, 1) * n_v
    lmk_vertices = vertices.reshape(-1, 3)[lmk_faces].view(b, -1, 3, 3)
    return torch.einsum("blfi,blf->bli", lmk_vertices, lmk_bary)


def rot_mat_to_yaw(rot: torch.Tensor) -> torch.Tensor:
    """DECA's yaw (radians) of rotation matrices (B,3,3): atan2(-R20, sqrt(R00^2 + R10^2))."""
    sy = torch.sqrt(rot[:, 0, 0] * rot[:, 0, 0] + rot[:, 1, 0] * rot[:, 1, 0])
    return torch.atan2(-rot[:, 2, 0], sy)


class FLAME(nn.Module):
    """FLAME head model: ``forward(shape (B,100), exp (B,50), pose (B,6))``.

    Returns ``(verts (B,V,3), landmarks2d (B,68,3), landmarks3d (B,68,3))`` in FLAME's world frame
    (metres; x right, y up, z towards the viewer). ``landmarks2d`` are 3-D points despite the name:
    17 pose-dependent jaw-contour points followed by 51 fixed ones (iBUG-68 order).
    """

    def __init__(self, flame: Mapping[str, np.ndarray], landmarks: Mapping[str, np.ndarray]):
        super().__init__()
        f32 = torch.float32
        shapedirs = np.asarray(flame["shapedirs"], dtype=np.float32)
        self.n_vertices = int(flame["v_template"].shape[0])
        self.register_buffer("v_template", torch.tensor(np.asarray(flame["v_template"]), dtype=f32))
        self.register_buffer("shapedirs", torch.cat([
            torch.tensor(shapedirs[:, :, :N_SHAPE]), torch.tensor(shapedirs[:, :, 300:300 + N_EXP])], 2))
        posedirs = np.asarray(flame["posedirs"], dtype=np.float32)
        self.register_buffer("posedirs", torch.tensor(posedirs.reshape(-1, posedirs.shape[-1]).T.copy()))
        self.register_buffer("J_regressor", torch.tensor(np.asarray(flame["J_regressor"]), dtype=f32))
        self.register_buffer("lbs_weights", torch.tensor(np.asarray(flame["weights"]), dtype=f32))
        self.register_buffer("faces_tensor", torch.tensor(np.asarray(flame["f"]).astype(np.int64)))
        parents = [int(p) for p in np.asarray(flame["kintree_table"])[0]]
        parents[0] = -1  # DECA overwrites the root's stored parent (2**32 - 1)
        self.parents = parents
        # the chain from the neck up to the root, as DECA walks it for the contour
        chain, idx = [], 1
        while idx != -1:
            chain.append(idx)
            idx = parents[idx]
        self.register_buffer("neck_kin_chain", torch.tensor(chain, dtype=torch.long))
        self.register_buffer("neck_pose", torch.zeros(1, 3))
        self.register_buffer("eye_pose", torch.zeros(1, 6))
        lm = landmarks
        self.register_buffer("lmk_faces_idx", torch.tensor(np.asarray(lm["static_lmk_faces_idx"]), dtype=torch.long))
        self.register_buffer("lmk_bary_coords", torch.tensor(np.asarray(lm["static_lmk_bary_coords"]), dtype=f32))
        self.register_buffer("dynamic_lmk_faces_idx",
                             torch.tensor(np.asarray(lm["dynamic_lmk_faces_idx"]), dtype=torch.long))
        self.register_buffer("dynamic_lmk_bary_coords",
                             torch.tensor(np.asarray(lm["dynamic_lmk_bary_coords"]), dtype=f32))
        self.register_buffer("full_lmk_faces_idx",
                             torch.tensor(np.asarray(lm["full_lmk_faces_idx"]), dtype=torch.long))
        self.register_buffer("full_lmk_bary_coords",
                             torch.tensor(np.asarray(lm["full_lmk_bary_coords"]), dtype=f32))

    def full_pose(self, pose: torch.Tensor) -> torch.Tensor:
        """(B,6) [global, jaw] -> (B,15) [global, neck=0, jaw, eyes=0]."""
        b = pose.shape[0]
        return torch.cat([pose[:, :3], self.neck_pose.expand(b, -1), pose[:, 3:],
                          self.eye_pose.expand(b, -1)], dim=1)

    def dynamic_rows(self, full_pose: torch.Tensor) -> torch.Tensor:
        """Row of the dynamic contour table for each pose (DECA's method: +yaw, clamp at 39)."""
        b = full_pose.shape[0]
        aa = torch.index_select(full_pose.view(b, -1, 3), 1, self.neck_kin_chain)
        rot = batch_rodrigues(aa.reshape(-1, 3)).view(b, -1, 3, 3)
        rel = torch.eye(3, device=full_pose.device, dtype=full_pose.dtype).unsqueeze(0).expand(b, -1, -1)
        for i in range(len(self.neck_kin_chain)):
            rel = torch.bmm(rot[:, i], rel)
        y = torch.round(torch.clamp(rot_mat_to_yaw(rel) * 180.0 / np.pi, max=39)).to(torch.long)
        neg_mask = y.lt(0).to(torch.long)
        mask = y.lt(-39).to(torch.long)
        neg_vals = mask * 78 + (1 - mask) * (39 - y)
        return neg_mask * neg_vals + (1 - neg_mask) * y

    def skin(self, shape: torch.Tensor, exp: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """Vertices (B,V,3) only (no landmarks)."""
        b = shape.shape[0]
        betas = torch.cat([shape, exp], dim=1)
        full_pose = self.full_pose(pose)
        v_shaped = self.v_template.unsqueeze(0).expand(b, -1, -1) + torch.einsum("bl,mkl->bmk", betas,
                                                                                  self.shapedirs)
        joints = torch.einsum("bik,ji->bjk", v_shaped, self.J_regressor)
        rot_mats = batch_rodrigues(full_pose.reshape(-1, 3)).view(b, -1, 3, 3)
        ident = torch.eye(3, dtype=shape.dtype, device=shape.device)
        pose_feature = (rot_mats[:, 1:, :, :] - ident).view(b, -1)
        v_posed = torch.matmul(pose_feature, self.posedirs).view(b, -1, 3) + v_shaped
        a = _rigid_transform(rot_mats, joints, self.parents)
        n_j = self.J_regressor.shape[0]
        w = self.lbs_weights.unsqueeze(0).expand(b, -1, -1)
        t = torch.matmul(w, a.view(b, n_j, 16)).view(b, -1, 4, 4)
        ones = torch.ones([b, v_posed.shape[1], 1], dtype=shape.dtype, device=shape.device)
        v_homo = torch.matmul(t, torch.cat([v_posed, ones], dim=2).unsqueeze(-1))
        return v_homo[:, :, :3, 0]

    def forward(self, shape: torch.Tensor, exp: torch.Tensor, pose: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = shape.shape[0]
        verts = self.skin(shape, exp, pose)
        rows = self.dynamic_rows(self.full_pose(pose))
        faces_idx = torch.cat([torch.index_select(self.dynamic_lmk_faces_idx, 0, rows),
                               self.lmk_faces_idx.unsqueeze(0).expand(b, -1)], 1)
        bary = torch.cat([torch.index_select(self.dynamic_lmk_bary_coords, 0, rows),
                          self.lmk_bary_coords.unsqueeze(0).expand(b, -1, -1)], 1)
        landmarks2d = vertices2landmarks(verts, self.faces_tensor, faces_idx, bary)
        landmarks3d = vertices2landmarks(verts, self.faces_tensor, self.full_lmk_faces_idx.repeat(b, 1),
                                         self.full_lmk_bary_coords.repeat(b, 1, 1))
        return verts, landmarks2d, landmarks3d


class FlameTexture(nn.Module):
    """Albedo space: ``forward(tex (B,50)) -> (B,3,256,256)`` RGB UV map, unclamped (spec 4.4).

    Any H x W space is accepted; the 256 x 256 map takes texel (floor(i*H/256), floor(j*W/256)),
    which for DECA's 512 x 512 space is exactly its nearest-neighbour downsampling. Only the 256-map
    texels are kept, so memory is a quarter of DECA's.
    """

    def __init__(self, mean: np.ndarray, basis: np.ndarray, size: int = 256):
        super().__init__()
        h, w = mean.shape[:2]
        rows = (np.arange(size) * h) // size
        cols = (np.arange(size) * w) // size
        mean_s = np.asarray(mean, dtype=np.float32)[rows][:, cols]  # (S,S,3), file channel order (BGR)
        basis_s = np.asarray(basis, dtype=np.float32)[rows][:, cols]  # (S,S,3,K)
        self.size = size
        self.n_tex = basis_s.shape[-1]
        self.register_buffer("mean", torch.tensor(mean_s.reshape(1, -1)))
        self.register_buffer("basis", torch.tensor(basis_s.reshape(-1, self.n_tex)))

    def forward(self, tex: torch.Tensor) -> torch.Tensor:
        b = tex.shape[0]
        t = self.mean + tex[:, : self.n_tex] @ self.basis.T
        t = t.reshape(b, self.size, self.size, 3).permute(0, 3, 1, 2)
        return t[:, [2, 1, 0], :, :]


def mean_shape(shapes: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Mean identity code over an album, (1,100) (``create_data.py --use_meanshape``)."""
    if isinstance(shapes, (list, tuple)):
        shapes = torch.cat([s.reshape(-1, s.shape[-1]) for s in shapes], 0)
    if shapes.ndim != 2 or shapes.shape[0] == 0:
        raise ValueError(f"expected (N,100) shape codes, got {tuple(shapes.shape)}")
    return shapes.mean(dim=0, keepdim=True)


def ffhq_center(landmarks2d: torch.Tensor) -> torch.Tensor:
    """The official re-centring point (B,3): eyes' centre moved 10% toward the mouth (spec 5.5)."""
    lm = landmarks2d
    eye_left = lm[:, 36:42].mean(dim=1)
    eye_right = lm[:, 42:48].mean(dim=1)
    eye_avg = (eye_left + eye_right) / 2
    mouth_avg = (lm[:, 48] + lm[:, 54]) / 2
    return eye_avg + 0.1 * (mouth_avg - eye_avg)

