"""Loading and saving DiffusionRig models.

Two formats:
* the official ``modelNNNNNN.pt``: ``torch.save(model.state_dict())``, a plain dict of tensors with no
  configuration. It is read with ``torch.load(weights_only=True)`` and the configuration is inferred
  from the keys and shapes (``infer_config``); attention heads are not recoverable from weights and
  default to the official 1 head (override with ``num_heads`` / ``num_head_channels``).
* our ``.safetensors``: the same state dict, the configuration as JSON in the metadata key
  ``diffusionrig_config``, other metadata as JSON in ``diffusionrig_metadata``, and optionally the
  album mean shape as the tensor ``mean_shape``.

Every failure a user can cause (wrong path, truncated download, an optimizer state or a DECA tar
given instead of a model, another architecture) raises CheckpointError saying what the file is and
what was expected.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CheckpointError
from .files import Written, atomic_save_safetensors
from .model import DEFAULT_CHANNEL_MULT, DiffusionRig, ModelConfig

__all__ = ["infer_config", "load_model", "save_model", "convert_checkpoint", "load_state_dict", "CONFIG_KEY"]

CONFIG_KEY = "diffusionrig_config"
METADATA_KEY = "diffusionrig_metadata"
MEAN_SHAPE_KEY = "mean_shape"
_UNET = "denoisingUNet."
_SAFETENSORS_MAGIC_MAX_HEADER = 100 * 1024 * 1024

# Image size whose default multipliers have this many levels (official defaults).
_SIZE_FOR_LEVELS = {len(m): s for s, m in DEFAULT_CHANNEL_MULT.items()}


# ---------------------------------------------------------------------------------------------
# configuration from a state dict
# ---------------------------------------------------------------------------------------------
def _clean(x: float) -> float:
    return int(x) if float(x).is_integer() else float(x)


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    num_head_channels: int | None = None,
    use_new_attention_order: bool | None = None,
    image_size: int | None = None,
) -> ModelConfig:
    """The ModelConfig of an official-layout state dict, from its keys and shapes (spec section 8).

    ``image_size`` is not stored in a checkpoint; without it, the size whose default channel
    multipliers match is used, else the official size with as many levels (64 for 4 or fewer, 128,
    256, 512 for 5, 6, 7). Attention levels are stored as feature-map sizes of that image size.
    """
    sd = _strip_prefix(dict(state_dict))
    if _UNET + "input_blocks.0.0.weight" not in sd or _UNET + "time_embed.0.weight" not in sd:
        raise CheckpointError(
            f"this state dict is not a DiffusionRig model: it has no '{_UNET}input_blocks.0.0.weight' / "
            f"'{_UNET}time_embed.0.weight' (first keys: {_few(sd)})"
        )
    if "encoder.fc.weight" not in sd:
        raise CheckpointError(
            "this state dict has the DiffusionRig UNet but no global encoder ('encoder.fc.weight' is missing); "
            "expected a whole DiffusionRig state dict (denoisingUNet.* and encoder.*)"
        )

    def shape(key: str) -> tuple[int, ...]:
        return tuple(sd[_UNET + key].shape)

    ch0, in_channels = shape("input_blocks.0.0.weight")[:2]
    C = shape("time_embed.0.weight")[1]
    latent_dim = sd["encoder.fc.weight"].shape[0]
    encoder_type = "resnet50" if "encoder.layer1.0.conv3.weight" in sd else "resnet18"
    encoder_width = int(sd["encoder.conv1.weight"].shape[0]) if "encoder.conv1.weight" in sd else 64
    out_ch = shape("out.2.weight")[0]
    if out_ch not in (3, 6):
        raise CheckpointError(f"the UNet outputs {out_ch} channels; DiffusionRig models output 3 (or 6 with learn_sigma)")

    idx = re.compile(r"^" + re.escape(_UNET) + r"(input|output)_blocks\.(\d+)\.(\d+)\.")
    blocks: dict[str, dict[int, set[int]]] = {"input": {}, "output": {}}
    for k in sd:
        m = idx.match(k)
        if m:
            blocks[m[1]].setdefault(int(m[2]), set()).add(int(m[3]))
    if any(k.startswith(_UNET + "input_blocks.") and k.endswith(".op.weight") for k in sd):
        raise CheckpointError("this model downsamples with convolutions (resblock_updown=False); only the official "
                              "resblock_updown=True layout is supported")
    n_in, n_out = len(blocks["input"]), len(blocks["output"])
    # Up-sampling ResBlocks sit after the (ResBlock[, Attention]) of the last block of every level but 0.
    ups = [i for i, subs in blocks["output"].items()
           if any(_UNET + f"output_blocks.{i}.{j}.in_layers.0.weight" in sd for j in subs if j >= 1)]
    levels = len(ups) + 1
    if n_out % levels or n_in != n_out:
        raise CheckpointError(
            f"inconsistent UNet layout: {n_in} input blocks, {n_out} output blocks, {levels} levels"
        )
    R = n_out // levels - 1
    widths = [shape(f"input_blocks.{1 + l * (R + 1)}.0.out_layers.3.weight")[0] for l in range(levels)]
    if widths[0] != ch0:
        raise CheckpointError(f"inconsistent UNet layout: first conv has {ch0} channels, first level {widths[0]}")
    mult = tuple(_clean(w / C) for w in widths)
    attention_levels = [l for l in range(levels)
                        if _UNET + f"input_blocks.{1 + l * (R + 1)}.1.qkv.weight" in sd]
    emb_out = shape("input_blocks.1.0.emb_layers.1.weight")[0]
    scale_shift = emb_out == 2 * widths[0]

    if image_size is None:
        matches = [s for s, m in DEFAULT_CHANNEL_MULT.items() if m == mult]
        image_size = matches[0] if matches else _SIZE_FOR_LEVELS.get(levels, 64 * 2 ** max(0, levels - 4))
    if image_size % 2 ** (levels - 1):
        raise CheckpointError(f"image size {image_size} cannot be halved {levels - 1} times (the model has {levels} levels)")

    config = ModelConfig(
        image_size=image_size,
        num_channels=C,
        num_res_blocks=R,
        channel_mult=mult,
        attention_resolutions=tuple(image_size // 2 ** l for l in attention_levels),
        num_heads=1 if num_heads is None else num_heads,
        num_head_channels=-1 if num_head_channels is None else num_head_channels,
        use_scale_shift_norm=scale_shift,
        use_new_attention_order=bool(use_new_attention_order),
        latent_dim=latent_dim,
        in_channels=in_channels,
        encoder_type=encoder_type,
        learn_sigma=out_ch == 6,
        encoder_width=encoder_width,
    )
    check_state_dict(sd, config)
    return config


def check_state_dict(sd: Mapping[str, torch.Tensor], config: ModelConfig, what: str = "this state dict",
                     model: DiffusionRig | None = None) -> None:
    """Raise CheckpointError unless ``sd`` has exactly the keys and shapes of ``config``'s model
    (``model``: one already built from ``config``, e.g. on the meta device)."""
    if model is None:
        with torch.device("meta"):
            model = DiffusionRig(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{what} does not match the DiffusionRig architecture {_describe(config)}: "
            f"{len(missing)} missing keys (e.g. {missing[:4]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:4]})"
        )
    wrong = [f"{k}: {tuple(sd[k].shape)} instead of {s}" for k, s in expected.items() if tuple(sd[k].shape) != s]
    if wrong:
        raise CheckpointError(
            f"{what} has {len(wrong)} tensors of the wrong shape for {_describe(config)}, e.g. " + "; ".join(wrong[:3])
        )


def _describe(config: ModelConfig) -> str:
    return (f"(image {config.image_size}, channels {config.num_channels}, mult {config.channel_mult}, "
            f"res blocks {config.num_res_blocks}, attention {config.attention_resolutions}, "
            f"latent {config.latent_dim}, {config.encoder_type})")


def _few(sd: Mapping[str, Any], n: int = 4) -> list[str]:
    return [str(k) for k in list(sd)[:n]]


def _strip_prefix(sd: dict[str, Any]) -> dict[str, Any]:
    # DistributedDataParallel wraps the model: its state dict keys start with "module.".
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------
def _kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < _SAFETENSORS_MAGIC_MAX_HEADER and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle: torch's legacy (non-zip) format
        return "torch-legacy"
    return "other"


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"model file not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"{p} is a directory, not a model file; give the path of a .pt or .safetensors file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes); the download or copy did not finish")
    return p


def _torch_load(p: Path) -> Any:
    if _kind(p) == "torch-zip":
        try:
            with zipfile.ZipFile(p) as z:
                z.namelist()
        except zipfile.BadZipFile:
            raise CheckpointError(
                f"{p} is a truncated or corrupt PyTorch checkpoint (its zip directory is missing or damaged, "
                f"size {p.stat().st_size:,} bytes); download or copy it again"
            ) from None
    kind = _kind(p)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if kind == "other":
            raise CheckpointError(
                f"{p} is neither a PyTorch checkpoint nor a safetensors file ({msg}); expected a DiffusionRig "
                "model (.pt from the official training, or .safetensors from this project)"
            ) from None
        if isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e).lower().replace(" ", "_"):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = f" (it contains {found[1]})" if found else ""
            raise CheckpointError(
                f"{p} holds Python objects other than tensors, which are not loaded for safety{what}; "
                "expected a model state dict saved with torch.save(model.state_dict())"
            ) from None
        raise CheckpointError(f"{p} is a truncated or corrupt PyTorch checkpoint ({msg}); download or copy it again") from None


def _as_state_dict(obj: Any, p: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a state dict; expected a dict of tensors")
    if "state" in obj and "param_groups" in obj:
        raise CheckpointError(
            f"{p} is an optimizer state (keys 'state', 'param_groups'), e.g. the official optNNNNNN.pt; "
            "give the modelNNNNNN.pt saved beside it"
        )
    # Not official, but common: a training checkpoint wrapping the state dict.
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:6]
        hint = " (this looks like the DECA model deca_model.tar, which goes in the face-rig assets folder)" \
            if any(str(k).startswith(("E_flame", "E_detail", "D_detail")) for k in obj) else ""
        raise CheckpointError(
            f"{p} holds a dict with non-tensor entries (keys {keys}), not a model state dict{hint}; "
            "expected a DiffusionRig state dict (denoisingUNet.* and encoder.* tensors)"
        )
    return _strip_prefix(dict(obj))


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict on CPU, safetensors metadata or {}) of an official .pt or one of our .safetensors."""
    p = _check_path(path)
    if _kind(p) == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{p} is a truncated or corrupt safetensors file ({str(e)[:200]}); copy it again") from None
        return sd, meta
    return _as_state_dict(_torch_load(p), p), {}


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               **overrides: Any) -> DiffusionRig:
    """A DiffusionRig in eval mode from an official ``.pt`` or our ``.safetensors``.

    ``overrides`` go to ``infer_config`` for official files (``num_heads``, ``num_head_channels``,
    ``use_new_attention_order``, ``image_size``) and replace fields of a stored configuration.
    """
    p = Path(path)
    sd, meta = load_state_dict(p)
    mean_shape = sd.pop(MEAN_SHAPE_KEY, None)
    if CONFIG_KEY in meta:
        try:
            config = ModelConfig.from_json(meta[CONFIG_KEY])
        except Exception as e:
            raise CheckpointError(f"{p} has an unreadable '{CONFIG_KEY}' metadata entry ({e})") from None
        if overrides:
            config = ModelConfig.from_dict({**config.to_dict(), **overrides})
    else:
        try:
            config = infer_config(sd, **overrides)  # (checks the state dict against the config it infers)
        except CheckpointError as e:
            raise CheckpointError(f"{p}: {e}") from None
    with torch.device("meta"):
        model = DiffusionRig(config)
    if CONFIG_KEY in meta:
        check_state_dict(sd, config, what=str(p), model=model)
    sd = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    if mean_shape is not None:
        model.mean_shape = mean_shape.float()
    model.metadata = _read_metadata(meta)
    return model


def _read_metadata(meta: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if k in (CONFIG_KEY, "format"):
            continue
        if k == METADATA_KEY:
            try:
                out.update(json.loads(v))
            except json.JSONDecodeError:
                out[k] = v
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
class ModelFile:
    """The ``.safetensors`` file of a model as it was at one moment, not yet serialised.

    ``copy=True`` copies the tensors where they live (on a GPU ~2 ms for the 256 model), so training
    can go on while another thread writes the copy (``save``)."""

    def __init__(self, model: DiffusionRig, metadata: dict[str, Any] | None = None, copy: bool = False):
        # Accept the wrappers a training loop holds: DDP (.module), torch.compile (._orig_mod), FastDenoiser (.model).
        for attr in ("module", "_orig_mod", "model"):
            inner = getattr(model, attr, None)
            if isinstance(inner, torch.nn.Module) and not isinstance(model, DiffusionRig):
                model = inner
        if not isinstance(model, DiffusionRig):
            raise CheckpointError(f"save_model needs a DiffusionRig model, got {type(model).__name__}")
        take = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
        self.tensors = {k: take(v) for k, v in model.state_dict().items()}
        if getattr(model, "mean_shape", None) is not None:
            self.tensors[MEAN_SHAPE_KEY] = take(model.mean_shape).float()
        meta = {**getattr(model, "metadata", {}), **(metadata or {})}
        self.header = {"format": "pt", CONFIG_KEY: model.config.to_json()}
        if meta:
            self.header[METADATA_KEY] = json.dumps(meta, default=str)

    def save(self, path: str | os.PathLike) -> Written:
        """Write the file atomically (a checkpoint writes ``tensors`` and ``header`` into its own
        temporary folder instead)."""
        return atomic_save_safetensors(self.tensors, path, self.header)


def save_model(model: DiffusionRig, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as .safetensors with its config (and mean shape, metadata), atomically."""
    p = Path(path)
    ModelFile(model, metadata).save(p)
    return p


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, metadata: dict[str, Any] | None = None,
                       **overrides: Any) -> ModelConfig:
    """Official ``.pt`` (or ours) -> our ``.safetensors``; returns the configuration written."""
    model = load_model(src, **overrides)
    meta = {"converted_from": Path(src).name, **(metadata or {})}
    save_model(model, dst, metadata=meta)
    return model.config
