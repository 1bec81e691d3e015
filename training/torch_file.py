"""Tensors from a PyTorch file in the legacy (pre-1.6, non-zip) format, with numpy alone.

The format is five pickles in a row — a magic number, the protocol version, system information,
the object (here a state dict whose tensors name their storages by a persistent id), the list
of storage keys — followed by each storage's raw bytes (an 8-byte element count, then the
little-endian data). Reading it needs no PyTorch: the pickle's references to torch are mapped
to small stand-ins here, and no other class may be loaded (the file cannot run code).
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: type


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    return _Tensor(storage, int(offset), tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid[:5]
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid[:2]}")
        return _Storage(str(key), DTYPES[storage_type.name])


def without_counters(state: dict) -> dict:
    """``state`` less BatchNorm's ``num_batches_tracked``: a count of training steps, not a
    weight, which a model built from these tensors (PyTorch or Keras) neither needs nor has."""
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def read_state_dict(path: Path, counters: bool = True) -> dict[str, np.ndarray]:
    """The state dict in ``path`` as numpy arrays (copies, C-contiguous); ``counters=False``
    leaves out BatchNorm's step counters (:func:`without_counters`)."""
    with open(path, "rb") as fh:
        if _Unpickler(fh).load() != MAGIC:
            raise ValueError(f"{path.name}: not a legacy PyTorch file (newer files are zips: "
                             "load them with torch)")
        _Unpickler(fh).load()  # protocol version
        _Unpickler(fh).load()  # system info (endianness, type sizes)
        state = _Unpickler(fh).load()
        keys = _Unpickler(fh).load()
        types = {t.storage.key: t.storage.dtype for t in state.values()
                 if isinstance(t, _Tensor)}
        raw: dict[str, np.ndarray] = {}
        for key in keys:
            count = int(np.frombuffer(fh.read(8), dtype="<i8")[0])
            dtype = np.dtype(types.get(str(key), np.float32)).newbyteorder("<")
            raw[str(key)] = np.frombuffer(fh.read(count * dtype.itemsize), dtype=dtype)
    out = {}
    for name, t in state.items():
        if not isinstance(t, _Tensor):
            continue
        data = raw[t.storage.key]
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[t.offset:], shape=t.size, strides=tuple(s * item for s in t.stride))
        out[name] = np.ascontiguousarray(view)
    return out if counters else without_counters(out)
