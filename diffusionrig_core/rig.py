"""FaceRig: photo -> DECA parameters -> the three physical buffers, as the official pipeline does.

    rig = FaceRig.load()                       # files from the assets folder (see `diffusionrig assets`)
    fit = rig.fit("photo.jpg")                 # params (shape, tex, exp, pose, cam, light) + crop tform
    buffers = rig.render(fit.params, fit.tform, size=256)   # (B, 9, H, W) rendered | normal | albedo

``fit`` follows DiffusionRig's ``TestData``: the photo is squashed to S x S with scikit-image's
anti-aliased resize (re-implemented), landmarks are found on that resized image (or read from a
``.txt`` / ``.mat`` next to the photo, or given), and DECA encodes the 224 crop. Landmarks passed
to ``fit`` are in the coordinates of the resized S x S image, as the official ``.txt`` files are.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import render as R
from .assets import (default_assets_dir, load_flame_model, load_landmark_embedding, load_obj,
                     load_texture_space)
from .deca import DECAEncoder, crop_from_landmarks, decompose_code, resize_like_testdata
from .errors import AssetError, InputError, NoFaceError
from .flame import FLAME, FlameTexture, ffhq_center as _ffhq_center

PARAM_SHAPES = {"shape": (100,), "tex": (50,), "exp": (50,), "pose": (6,), "cam": (3,), "light": (9, 3)}


@dataclass
class Fit:
    """DECA's reading of one or more photos.

    params: {shape (B,100), tex (B,50), exp (B,50), pose (B,6), cam (B,3), light (B,9,3)};
    tform (B,3,3): resized photo pixels -> 224 crop pixels; image (B,3,S,S) in [0,1] (the photo as
    TestData resizes it; what the diffusion model sees); crop (B,3,224,224); landmarks (B,68,2) in
    resized-photo pixels (None for images fitted with ``no_face="full"`` and no face).
    """

    params: dict[str, torch.Tensor]
    tform: torch.Tensor
    image: torch.Tensor
    crop: torch.Tensor
    landmarks: list[np.ndarray | None] = field(default_factory=list)

    def __len__(self) -> int:
        return self.tform.shape[0]

    @property
    def size(self) -> int:
        return int(self.image.shape[-1])

    def select(self, index: int | slice | Sequence[int]) -> "Fit":
        idx = [index] if isinstance(index, int) else index
        lms = ([self.landmarks[i] for i in idx] if not isinstance(idx, slice) else self.landmarks[idx])
        return Fit({k: v[idx] for k, v in self.params.items()}, self.tform[idx], self.image[idx],
                   self.crop[idx], lms)


def check_params(params: Mapping[str, torch.Tensor], needed: Sequence[str] = tuple(PARAM_SHAPES)) -> int:
    """Batch size of a params dict; InputError naming the first missing or mis-shaped entry."""
    batch = None
    for name in needed:
        if name not in params:
            raise InputError(f"face parameters lack {name!r}; expected {', '.join(PARAM_SHAPES)}")
        t = params[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape[1:]) != PARAM_SHAPES[name]:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"face parameter {name!r} has shape {shape}; expected (B, "
                             f"{', '.join(map(str, PARAM_SHAPES[name]))})")
        if batch is None:
            batch = t.shape[0]
        elif t.shape[0] != batch:
            raise InputError(f"face parameters disagree on the batch size ({name!r} has {t.shape[0]}, "
                             f"others {batch})")
    return int(batch or 0)


def _texture_arrays(space: Mapping[str, Any], n_tex: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(mean (H,W,3), basis (H,W,3,50)) in 0..1 from ``load_texture_space``'s dict or a raw npz dict
    (FLAME's ``mean``/``tex_dir`` in 0..255)."""
    if "basis" in space:
        return np.asarray(space["mean"], dtype=np.float32), np.asarray(space["basis"], dtype=np.float32)[..., :n_tex]
    if "tex_dir" in space:
        return (np.asarray(space["mean"], dtype=np.float32) / np.float32(255),
                np.asarray(space["tex_dir"], dtype=np.float32)[..., :n_tex] / np.float32(255))
    raise InputError(f"texture space needs 'mean' and 'basis' (or FLAME's 'tex_dir'); got {sorted(space)}")


def _sidecar_landmarks(path: Path) -> np.ndarray | None:
    """Official TestData: ``<stem>.mat`` (pt3d_68) or ``<stem>.txt`` next to the photo, taken as-is."""
    mat = path.with_suffix(".mat")
    if mat.is_file():
        from scipy.io import loadmat
        return np.asarray(loadmat(str(mat))["pt3d_68"]).T[:, :2].astype(np.float64)
    txt = path.with_suffix(".txt")
    if txt.is_file():
        lm = np.loadtxt(str(txt))
        if lm.shape[0] != 68 or lm.ndim != 2:
            raise InputError(f"{txt} should hold 68 lines 'x y'; found shape {lm.shape}")
        return lm[:, :2]
    return None


class FaceRig:
    """FLAME + texture space + head template (+ DECA encoder) on one device."""

    def __init__(self, flame: FLAME, texture: FlameTexture, faces: np.ndarray, uvcoords: np.ndarray,
                 uvfaces: np.ndarray, encoder: DECAEncoder | None = None, device: str | torch.device = "cpu",
                 deca_source: str | None = None):
        self.device = torch.device(device)
        self.flame = flame.to(self.device).eval()
        self.texture = texture.to(self.device).eval()
        self.faces = torch.as_tensor(np.asarray(faces), dtype=torch.long, device=self.device)
        self.uvcoords = torch.as_tensor(np.asarray(uvcoords), dtype=torch.float32, device=self.device)
        self.uvfaces = torch.as_tensor(np.asarray(uvfaces), dtype=torch.long, device=self.device)
        self.encoder = encoder.to(self.device).eval() if encoder is not None else None
        self.deca_source = deca_source
        if int(self.faces.max()) >= flame.n_vertices:
            raise AssetError(f"the head template's faces index vertex {int(self.faces.max())} but the FLAME model "
                             f"has {flame.n_vertices} vertices: the OBJ and the FLAME model do not belong together.")
        if self.uvfaces.shape != self.faces.shape:
            raise AssetError("the head template OBJ has different numbers of faces and UV faces")

    # ------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def load(cls, flame: str | Path | None = None, texture: str | Path | None = None,
             template: str | Path | None = None, landmarks: str | Path | None = None,
             deca: str | Path | None = None, assets_dir: str | Path | None = None,
             device: str | torch.device = "cpu") -> "FaceRig":
        """Load the assets; every path defaults to the assets folder. ``deca`` is optional: without
        ``deca_model.tar`` the rig renders given parameters but cannot fit photos."""
        root = Path(assets_dir) if assets_dir is not None else default_assets_dir()
        flame_dict = load_flame_model(flame or root / "generic_model.pkl")
        embedding = load_landmark_embedding(landmarks or root / "landmark_embedding.npy")
        tex = load_texture_space(texture or root / "FLAME_texture.npz")
        faces, uv, uvf = load_obj(template or root / "head_template.obj")
        encoder, source = None, None
        deca_path = Path(deca) if deca is not None else root / "deca_model.tar"
        if deca is not None or deca_path.is_file():
            encoder = DECAEncoder.from_checkpoint(deca_path)
            source = str(deca_path)
        return cls.from_arrays(flame_dict, embedding, tex, (faces, uv, uvf), encoder, device, source)

    @classmethod
    def from_arrays(cls, flame_dict: Mapping[str, np.ndarray], landmark_embedding: Mapping[str, np.ndarray],
                    texture_space: Mapping[str, Any], template: tuple[np.ndarray, np.ndarray, np.ndarray],
                    deca_encoder: DECAEncoder | None = None, device: str | torch.device = "cpu",
                    deca_source: str | None = None) -> "FaceRig":
        """Build from in-memory arrays: the FLAME dict (as ``load_flame_model`` returns), the landmark
        embedding, the texture space (``mean`` (H,W,3), ``basis`` (H,W,3,K) in 0..1, file channel
        order) and the template's (faces, uvcoords, uvfaces)."""
        faces, uv, uvf = template
        mean, basis = _texture_arrays(texture_space)
        return cls(FLAME(flame_dict, landmark_embedding), FlameTexture(mean, basis), faces, uv, uvf,
                   deca_encoder, device, deca_source)

    def to(self, device: str | torch.device) -> "FaceRig":
        self.device = torch.device(device)
        for name in ("flame", "texture", "encoder"):
            m = getattr(self, name)
            if m is not None:
                m.to(self.device)
        self.faces, self.uvcoords, self.uvfaces = (t.to(self.device) for t in
                                                   (self.faces, self.uvcoords, self.uvfaces))
        return self

    # ------------------------------------------------------------------------------------------
    # fitting

    def prepare(self, image: Any, landmarks: np.ndarray | None = None, size: int = 256, detector: str = "dlib",
                face_index: int = 0, no_face: str = "error") -> tuple[np.ndarray, torch.Tensor, torch.Tensor,
                                                                      np.ndarray | None]:
        """One photo -> (resized uint8 SxS, crop (3,224,224), tform (3,3), landmarks in resized pixels)."""
        from .image_io import load_image

        if no_face not in ("error", "full"):
            raise InputError(f"no_face must be 'error' or 'full', not {no_face!r}")
        lm = landmarks
        if lm is None and isinstance(image, (str, Path)):
            lm = _sidecar_landmarks(Path(image))
        resized = resize_like_testdata(load_image(image), size)
        if lm is None:
            from .detect import detect_landmarks, pick_face
            try:
                lm = pick_face(detect_landmarks(resized, backend=detector, device=str(self.device)), face_index)
            except NoFaceError:
                if no_face == "error":
                    raise
                lm = None  # the official fallback: the whole image as the face box
        else:
            lm = np.asarray(lm, dtype=np.float64)
            if lm.shape != (68, 2):
                raise InputError(f"landmarks must be a (68, 2) array of (x, y); got {lm.shape}")
        crop, tform = crop_from_landmarks(resized, lm)
        return resized, crop, tform, lm

    @torch.no_grad()
    def encode(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """DECA parameters of 224 crops (B,3,224,224) in [0,1]."""
        if self.encoder is None:
            from .assets import ASSET_NAMES
            info = ASSET_NAMES["deca_model.tar"]
            raise AssetError(f"fitting a photo needs DECA's weights (deca_model.tar), which were not loaded. "
                             f"Get it from {info.source} and put it at {default_assets_dir() / info.name} "
                             "(or pass deca=PATH to FaceRig.load), or supply the parameters yourself.")
        return decompose_code(self.encoder(crops.to(self.device, torch.float32)))

    def fit(self, image: Any, landmarks: np.ndarray | Sequence[np.ndarray | None] | None = None, size: int = 256,
            detector: str = "dlib", face_index: int = 0, no_face: str = "error", batch_size: int = 8) -> Fit:
        """Fit DECA to a photo (path, bytes, array, PIL image) or a list of photos.

        The largest face is used (``face_index`` picks another, 0 = largest). ``no_face="full"``
        reproduces the official fallback (treat the whole photo as the face) instead of raising
        NoFaceError. ``landmarks`` (68,2) per photo, in resized S x S pixel coordinates, skip detection.
        """
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            raise InputError("no photos given to fit")
        if landmarks is None:
            lms: list = [None] * len(images)
        elif single:
            lms = [landmarks]
        else:
            lms = list(landmarks)
            if len(lms) != len(images):
                raise InputError(f"{len(images)} photos but {len(lms)} landmark sets")
        prepared = [self.prepare(img, lm, size, detector, face_index, no_face) for img, lm in zip(images, lms)]
        crops = torch.stack([p[1] for p in prepared])
        parts = [self.encode(crops[i:i + batch_size]) for i in range(0, len(prepared), batch_size)]
        params = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return Fit(params=params,
                   tform=torch.stack([p[2] for p in prepared]).to(self.device),
                   image=torch.stack([torch.from_numpy(p[0]).permute(2, 0, 1) for p in prepared]).float()
                   .div(255.0).to(self.device),
                   crop=crops.to(self.device),
                   landmarks=[p[3] for p in prepared])

    # ------------------------------------------------------------------------------------------
    # geometry and rendering

    def _p(self, params: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        return params[name].to(self.device, torch.float32)

    @torch.no_grad()
    def flame_forward(self, params: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(verts, landmarks2d, landmarks3d) in FLAME's world frame."""
        check_params(params, ("shape", "exp", "pose"))
        return self.flame(self._p(params, "shape"), self._p(params, "exp"), self._p(params, "pose"))

    def ffhq_center(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The official re-centring point (B,3) (``decode(return_ffhq_center=True)``). Compute it from the
        photo's own fit, before swapping in a mean shape, as ``inference.py`` does."""
        return _ffhq_center(self.flame_forward(params)[1])

    @torch.no_grad()
    def albedo_map(self, tex: torch.Tensor) -> torch.Tensor:
        return self.texture(tex.to(self.device, torch.float32))

    @torch.no_grad()
    def render_all(self, params: Mapping[str, torch.Tensor], tform: torch.Tensor, size: int = 256,
                   align_center: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every buffer of :func:`render.render_buffers` (rendered, normal, albedo, alpha, shading, ...).

        ``tform`` (B,3,3) maps resized-photo pixels to the crop (``Fit.tform``); ``size`` is that photo's
        side S. ``align_center`` (B,3) or (1,3): shift the head so its re-centring point lands there
        (the official ``align_ffhq`` used for edits; pass ``ffhq_center`` of the unedited fit).
        """
        b = check_params(params)
        verts, lm2d, _ = self.flame(self._p(params, "shape"), self._p(params, "exp"), self._p(params, "pose"))
        if align_center is not None:
            center = _ffhq_center(lm2d)
            verts = verts + (align_center.to(self.device, torch.float32) - center).unsqueeze(1)
        tform = torch.as_tensor(tform, dtype=torch.float32, device=self.device)
        if tform.ndim == 2:
            tform = tform.unsqueeze(0)
        if tform.shape[0] != b:
            if tform.shape[0] != 1:
                raise InputError(f"tform has batch {tform.shape[0]} but the parameters have {b}")
            tform = tform.expand(b, -1, -1)
        out = R.render_buffers(verts, self._p(params, "cam"), self._p(params, "light"),
                               self.albedo_map(params["tex"]), self.faces, self.uvcoords, self.uvfaces,
                               R.inverse_tform_T(tform), size)
        out["verts"] = verts
        out["landmarks2d_world"] = lm2d
        return out

    def render(self, params: Mapping[str, torch.Tensor], tform: torch.Tensor, size: int = 256,
               align_center: torch.Tensor | None = None) -> torch.Tensor:
        """The diffusion model's conditioning: (B,9,H,W) = rendered | normal | albedo, unnormalised."""
        out = self.render_all(params, tform, size, align_center)
        return torch.cat([out["rendered"], out["normal"], out["albedo"]], dim=1)


# ----------------------------------------------------------------------------------------------
# Benchmark (file -> buffers)


def _benchmark_rig(device: str, seed: int = 0) -> FaceRig:
    """A rig with FLAME 2020's sizes (5023 vertices, 9976 faces) and random weights: the real files
    are licensed, and the cost does not depend on the values."""
    rng = np.random.default_rng(seed)
    n_lon, n_lat = 96, 52  # 96 * 52 + 2 = 4994 vertices, 96 * 2 * 52 = 9984 faces (close to FLAME's)
    lat = np.linspace(0, np.pi, n_lat + 2)[1:-1]
    lon = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    ring = np.stack([0.08 * np.sin(la) * np.sin(lo), 0.11 * np.cos(la), 0.09 * np.sin(la) * np.cos(lo)], -1)
    verts = np.concatenate([[[0, 0.11, 0]], ring.reshape(-1, 3), [[0, -0.11, 0]]]).astype(np.float32)
    n_v = verts.shape[0]
    faces = []
    for i in range(n_lat - 1):
        for j in range(n_lon):
            a, b_ = 1 + i * n_lon + j, 1 + i * n_lon + (j + 1) % n_lon
            c, d = a + n_lon, b_ + n_lon
            faces += [(a, c, b_), (b_, c, d)]
    for j in range(n_lon):
        faces += [(0, 1 + j, 1 + (j + 1) % n_lon)]
        last = 1 + (n_lat - 1) * n_lon
        faces += [(n_v - 1, last + (j + 1) % n_lon, last + j)]
    faces = np.array(faces, dtype=np.int64)
    uv = rng.uniform(0, 1, (n_v, 2)).astype(np.float32)
    weights = rng.dirichlet(np.ones(5), n_v)
    flame = {"v_template": verts, "shapedirs": rng.normal(0, 1e-3, (n_v, 3, 400)).astype(np.float32),
             "posedirs": rng.normal(0, 1e-4, (n_v, 3, 36)).astype(np.float32),
             "J_regressor": (rng.dirichlet(np.ones(n_v), 5)).astype(np.float32),
             "weights": weights.astype(np.float32), "kintree_table": np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
             "f": faces}
    emb = {"static_lmk_faces_idx": rng.integers(0, len(faces), 51),
           "static_lmk_bary_coords": rng.dirichlet(np.ones(3), 51).astype(np.float32),
           "dynamic_lmk_faces_idx": rng.integers(0, len(faces), (79, 17)),
           "dynamic_lmk_bary_coords": rng.dirichlet(np.ones(3), (79, 17)).astype(np.float32),
           "full_lmk_faces_idx": rng.integers(0, len(faces), (1, 68)),
           "full_lmk_bary_coords": rng.dirichlet(np.ones(3), (1, 68)).astype(np.float32)}
    # 256 x 256 texels: FlameTexture keeps a 256 x 256 selection of any space, so the cost is the same
    tex = {"mean": rng.uniform(0.3, 0.7, (256, 256, 3)).astype(np.float32),
           "basis": rng.normal(0, 0.01, (256, 256, 3, 50)).astype(np.float32)}
    return FaceRig.from_arrays(flame, emb, tex, (faces, uv, faces.copy()), DECAEncoder(), device)


def bench_rig(device: str = "cpu", n: int = 16, size: int = 256, batch_size: int = 8,
              rig: FaceRig | None = None, detect: bool = True) -> dict[str, float]:
    """Photos per second from PNG file to the (B,9,S,S) buffers.

    Uses FLAME-sized random assets unless ``rig`` is given, 512x512 PNG photos written to a temp
    folder with ``.txt`` landmarks beside them (so face detection, which runs on the CPU only, is
    timed separately as ``detect_s_per_photo`` when dlib is present). Returns timings in seconds.
    """
    import tempfile
    from PIL import Image

    dev = torch.device(device)
    rig = rig or _benchmark_rig(device)
    rng = np.random.default_rng(0)
    lm = np.stack([np.linspace(80, 176, 68), 128 + 40 * np.sin(np.linspace(0, 6.0, 68))], 1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):
            p = Path(tmp) / f"photo_{i:03d}.png"
            Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(p)
            np.savetxt(p.with_suffix(".txt"), lm)
            paths.append(str(p))

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        rig.fit(paths[:1], size=size)  # warm-up (allocations, cuDNN algorithm choice)
        t_prep = t_enc = t_render = 0.0
        t0 = time.perf_counter()
        for s in range(0, n, batch_size):
            a = time.perf_counter()
            prepared = [rig.prepare(p, None, size) for p in paths[s:s + batch_size]]
            crops = torch.stack([q[1] for q in prepared]).to(dev)
            tform = torch.stack([q[2] for q in prepared]).to(dev)
            sync()
            b = time.perf_counter()
            params = rig.encode(crops)
            sync()
            c = time.perf_counter()
            rig.render(params, tform, size)
            sync()
            d = time.perf_counter()
            t_prep, t_enc, t_render = t_prep + b - a, t_enc + c - b, t_render + d - c
        total = time.perf_counter() - t0
    out = {"device": str(dev), "photos": n, "size": size, "batch_size": batch_size,
           "photos_per_s": n / total, "load_resize_crop_s": t_prep / n, "encode_s": t_enc / n,
           "flame_render_s": t_render / n}
    if not detect:
        return out
    try:  # dlib's detector (CPU only; what fit() runs when no landmarks are given)
        from .detect import detect_landmarks
        img = (rng.integers(0, 255, (size, size, 3))).astype(np.uint8)
        for attempt in range(2):  # the first call loads the 100 MB predictor
            a = time.perf_counter()
            try:
                detect_landmarks(img)
            except NoFaceError:
                pass
        out["detect_s_per_photo"] = time.perf_counter() - a
    except AssetError:
        pass
    return out
