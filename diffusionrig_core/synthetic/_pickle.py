"""A tiny opcode-level pickle writer for the synthetic assets.

The real FLAME and DECA files were written by old software: ``generic_model.pkl`` by Python 2
(byte strings as ``BINSTRING``, a chumpy ``Ch`` and an old-SciPy ``scipy.sparse.csc`` matrix),
``landmark_embedding.npy`` by Python 3 with pickled torch tensors. Our loaders must read exactly
those layouts, so the synthetic files must use them too -- but without chumpy installed and
without the nondeterminism of ``torch.save`` (its legacy storage keys are memory addresses).
Writing the opcodes ourselves gives byte-identical files for a given seed and names exactly the
globals the real files name.

Only what the assets need is supported: None, bool, int, float, str, bytes, tuple, list, dict,
set, numpy arrays and the small wrapper classes below.
"""
from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ChumpyCh:
    """Stands for a leaf ``chumpy.ch.Ch`` holding ``x``; pickled with chumpy's state layout."""

    x: np.ndarray


@dataclass
class ScipyCsc:
    """Stands for an old-SciPy ``scipy.sparse.csc.csc_matrix``; pickled with its ``__dict__`` state."""

    shape: tuple[int, int]
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> "ScipyCsc":
        rows, cols = dense.shape
        data, indices, indptr = [], [], [0]
        for c in range(cols):
            nz = np.nonzero(dense[:, c])[0]
            data.extend(dense[nz, c].tolist())
            indices.extend(nz.tolist())
            indptr.append(len(indices))
        return cls((rows, cols), np.asarray(data, np.float64), np.asarray(indices, np.int32),
                   np.asarray(indptr, np.int32))


@dataclass
class TorchTensor:
    """Stands for a CPU torch tensor, pickled as torch does (``_rebuild_tensor_v2`` over a
    legacy ``_load_from_bytes`` storage) but with a fixed storage key."""

    array: np.ndarray
    storage_class: str = field(init=False)

    def __post_init__(self) -> None:
        classes = {np.dtype(np.int64): "LongStorage", np.dtype(np.float32): "FloatStorage",
                   np.dtype(np.float64): "DoubleStorage", np.dtype(np.int32): "IntStorage"}
        self.array = np.ascontiguousarray(self.array)
        self.storage_class = classes[self.array.dtype]


class PickleWriter:
    """Writes pickle opcodes. ``py2=True`` emits text and bytes as Python-2 ``str`` (BINSTRING),
    so the result needs ``encoding='latin1'`` to load, exactly like a Python-2 pickle."""

    def __init__(self, protocol: int = 2, py2: bool = False) -> None:
        self.protocol = protocol
        self.py2 = py2
        self.out = bytearray()
        self._memo: dict[tuple[str, str], int] = {}

    # -- primitives ---------------------------------------------------------------------------
    def _op(self, code: bytes, payload: bytes = b"") -> None:
        self.out += code + payload

    def _put(self) -> int:
        # memo slots are used for globals only; no other object is shared
        index = len(self._memo)
        if index < 256:
            self._op(pickle.BINPUT, bytes([index]))
        else:
            self._op(pickle.LONG_BINPUT, struct.pack("<I", index))
        return index

    def global_(self, module: str, name: str) -> None:
        key = (module, name)
        if key in self._memo:
            index = self._memo[key]
            if index < 256:
                self._op(pickle.BINGET, bytes([index]))
            else:
                self._op(pickle.LONG_BINGET, struct.pack("<I", index))
            return
        self._op(pickle.GLOBAL, f"{module}\n{name}\n".encode("ascii"))
        self._memo[key] = self._put()

    def dumps(self, obj: Any) -> bytes:
        self._op(pickle.PROTO, bytes([self.protocol]))
        self.save(obj)
        self._op(pickle.STOP)
        return bytes(self.out)

    # -- values -------------------------------------------------------------------------------
    def save(self, obj: Any) -> None:
        if obj is None:
            self._op(pickle.NONE)
        elif isinstance(obj, bool):
            self._op(pickle.NEWTRUE if obj else pickle.NEWFALSE)
        elif isinstance(obj, int):
            self._save_int(obj)
        elif isinstance(obj, float):
            self._op(pickle.BINFLOAT, struct.pack(">d", obj))
        elif isinstance(obj, str):
            self._save_str(obj)
        elif isinstance(obj, (bytes, bytearray)):
            self._save_bytes(bytes(obj))
        elif isinstance(obj, tuple):
            self._save_tuple(obj)
        elif isinstance(obj, list):
            self._op(pickle.EMPTY_LIST)
            if obj:
                self._op(pickle.MARK)
                for item in obj:
                    self.save(item)
                self._op(pickle.APPENDS)
        elif isinstance(obj, dict):
            self._op(pickle.EMPTY_DICT)
            if obj:
                self._op(pickle.MARK)
                for key, value in obj.items():
                    self.save(key)
                    self.save(value)
                self._op(pickle.SETITEMS)
        elif isinstance(obj, set):
            # Python 2 pickles a set as set([...]) through the builtins module.
            self.global_("__builtin__" if self.py2 else "builtins", "set")
            self.save(sorted(obj))
            self._op(pickle.TUPLE1)
            self._op(pickle.REDUCE)
        elif isinstance(obj, np.ndarray):
            self._save_ndarray(obj)
        elif isinstance(obj, ChumpyCh):
            state = {"_dirty_vars": {"x"}, "_itr": None, "_make_dense": False,
                     "_make_sparse": False, "_depends_on_deps": {}, "x": obj.x}
            self._save_newobj("chumpy.ch", "Ch", state)
        elif isinstance(obj, ScipyCsc):
            state = {"_shape": tuple(obj.shape), "maxprint": 50, "indices": obj.indices,
                     "indptr": obj.indptr, "data": obj.data}
            self._save_newobj("scipy.sparse.csc", "csc_matrix", state)
        elif isinstance(obj, TorchTensor):
            self._save_tensor(obj)
        else:
            raise TypeError(f"synthetic pickle writer cannot write {type(obj).__name__}")

    def _save_int(self, value: int) -> None:
        if 0 <= value < 256:
            self._op(pickle.BININT1, bytes([value]))
        elif 0 <= value < 65536:
            self._op(pickle.BININT2, struct.pack("<H", value))
        elif -(2 ** 31) <= value < 2 ** 31:
            self._op(pickle.BININT, struct.pack("<i", value))
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self._op(pickle.LONG1, bytes([len(raw)]) + raw)

    def _save_str(self, text: str) -> None:
        if self.py2:
            self._save_bytes(text.encode("ascii"))
            return
        raw = text.encode("utf-8")
        self._op(pickle.BINUNICODE, struct.pack("<I", len(raw)) + raw)

    def _save_bytes(self, raw: bytes) -> None:
        if self.py2:  # a Python-2 str: decoded by latin1 on load
            if len(raw) < 256:
                self._op(pickle.SHORT_BINSTRING, bytes([len(raw)]) + raw)
            else:
                self._op(pickle.BINSTRING, struct.pack("<i", len(raw)) + raw)
        elif len(raw) < 256:
            self._op(pickle.SHORT_BINBYTES, bytes([len(raw)]) + raw)
        else:
            self._op(pickle.BINBYTES, struct.pack("<I", len(raw)) + raw)

    def _save_tuple(self, items: tuple) -> None:
        if not items:
            self._op(pickle.EMPTY_TUPLE)
            return
        if len(items) <= 3:
            for item in items:
                self.save(item)
            self._op([pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3][len(items) - 1])
            return
        self._op(pickle.MARK)
        for item in items:
            self.save(item)
        self._op(pickle.TUPLE)

    def _save_newobj(self, module: str, name: str, state: dict) -> None:
        self.global_(module, name)
        self._op(pickle.EMPTY_TUPLE)
        self._op(pickle.NEWOBJ)
        self.save(state)
        self._op(pickle.BUILD)

    def _save_ndarray(self, array: np.ndarray) -> None:
        # numpy's own reduce protocol: _reconstruct(ndarray, (0,), 'b') then
        # __setstate__((1, shape, dtype, is_fortran, raw_bytes)); the module is the
        # pre-2.0 path that the real files name (numpy 2 still resolves it).
        array = np.ascontiguousarray(array)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        self.global_("numpy.core.multiarray", "_reconstruct")
        self.global_("numpy", "ndarray")
        self._save_tuple((0,))
        self._save_bytes(b"b")
        self._op(pickle.TUPLE3)
        self._op(pickle.REDUCE)
        self._op(pickle.MARK)
        self.save(1)
        self.save(tuple(int(n) for n in array.shape))
        self._save_dtype(array.dtype)
        self.save(False)
        self._save_bytes(array.tobytes())
        self._op(pickle.TUPLE)
        self._op(pickle.BUILD)

    def _save_dtype(self, dtype: np.dtype) -> None:
        self.global_("numpy", "dtype")
        self.save((f"{dtype.kind}{dtype.itemsize}", False, True))
        self._op(pickle.REDUCE)
        order = "|" if dtype.itemsize == 1 else "<"
        self.save((3, order, None, None, None, -1, -1, 0))
        self._op(pickle.BUILD)

    def _save_tensor(self, tensor: TorchTensor) -> None:
        array = tensor.array
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self._op(pickle.MARK)
        self.global_("torch.storage", "_load_from_bytes")
        self._save_bytes(legacy_storage_bytes(array, tensor.storage_class))
        self._op(pickle.TUPLE1)
        self._op(pickle.REDUCE)
        self.save(0)
        self.save(tuple(int(n) for n in array.shape))
        strides = tuple(int(s // array.itemsize) for s in array.strides)
        self.save(strides)
        self.save(False)
        self.global_("collections", "OrderedDict")
        self._op(pickle.EMPTY_TUPLE)
        self._op(pickle.REDUCE)
        self._op(pickle.TUPLE)
        self._op(pickle.REDUCE)


# torch's legacy (pre-zip) serialisation magic number and protocol version
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_LEGACY_PROTOCOL = 1001


def legacy_storage_bytes(array: np.ndarray, storage_class: str) -> bytes:
    """The bytes ``torch.storage._load_from_bytes`` reads: torch's legacy stream for one storage
    (magic, protocol, sys info, the storage as a persistent id, the key list, raw data)."""
    numel = int(array.size)
    out = bytearray()
    out += PickleWriter(2).dumps(_TORCH_LEGACY_MAGIC)
    out += PickleWriter(2).dumps(_TORCH_LEGACY_PROTOCOL)
    out += PickleWriter(2).dumps({"protocol_version": _TORCH_LEGACY_PROTOCOL, "little_endian": True,
                                  "type_sizes": {"short": 2, "int": 4, "long": 4}})
    out += _persistent_storage_pickle(storage_class, numel)
    out += PickleWriter(2).dumps(["0"])
    out += struct.pack("<q", numel)
    out += np.ascontiguousarray(array).tobytes()
    return bytes(out)


def _persistent_storage_pickle(storage_class: str, numel: int) -> bytes:
    w = PickleWriter(2)
    w._op(pickle.PROTO, b"\x02")
    w._op(pickle.MARK)
    w.save("storage")
    w.global_("torch", storage_class)
    w.save("0")
    w.save("cpu")
    w.save(numel)
    w.save(None)
    w._op(pickle.TUPLE)
    w._op(pickle.BINPERSID)
    w._op(pickle.STOP)
    return bytes(w.out)
