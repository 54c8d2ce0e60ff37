"""Reading PyTorch checkpoints (`torch.save` files) without torch, and without running their code.

A `.pth` file is a pickle that rebuilds tensors from raw storages. Unpickling it with Python's
own `pickle` would import and call whatever the file names, so a checkpoint downloaded from the
internet could run code. This reader replays the pickle with a restricted `find_class`: it
resolves only the names `torch.save` uses for tensors, storages and plain containers (the same
kind of allow-list as `torch.load(weights_only=True)`, torch's default since 2.6) and refuses
every other name before anything is imported or called.

Two layouts are read:

* the zip layout (torch 1.6 and later): `<archive>/data.pkl` plus one file per storage under
  `<archive>/data/`;
* the legacy layout (`_use_new_zipfile_serialization=False`): a magic-number pickle, a protocol
  pickle, a system-info pickle, the object pickle, a pickle listing the storage keys, then each
  storage as an 8-byte element count followed by its bytes.

Tensors come back as [`LazyTensor`]s: a storage reference with offset, shape and stride. Only
the ones a caller asks for are read (`LazyTensor.numpy()`), so the optimizer state of a training
checkpoint, often twice the weights' size, is never loaded.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    pass


# Storage classes `torch.save` names, and the element type of each. bfloat16 has no numpy type:
# it is kept as its raw 16 bits and widened to float32 on read.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"), "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
_TORCH_DTYPES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# The zip layout's pickle describes tensors; their bytes are separate entries. Real ones are
# kilobytes to a few megabytes.
MAX_PICKLE_BYTES = 256 << 20


@dataclass(frozen=True)
class StorageType:
    """A storage class named by the pickle (`torch.FloatStorage`, …)."""
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass(frozen=True)
class TorchDtype:
    """`torch.float32` and friends, as they appear in pickled metadata."""
    name: str


@dataclass
class Storage:
    key: str
    type: StorageType
    numel: int


class LazyTensor:
    """A tensor of the checkpoint, read only when `numpy()` is called."""

    def __init__(self, checkpoint: "_Source", storage: Storage, offset: int, shape: tuple, stride: tuple):
        self._source, self.storage, self.offset = checkpoint, storage, int(offset)
        self.shape, self.stride = tuple(int(s) for s in shape), tuple(int(s) for s in stride)

    @property
    def bfloat16(self) -> bool:
        return self.storage.type.name == "BFloat16Storage"

    def numpy(self) -> np.ndarray:
        """The tensor's values (a copy), float32 for bfloat16 storages."""
        dtype = self.storage.type.dtype
        # A view never holds more elements than its storage (weights are not broadcast): a
        # hostile shape with zero strides cannot make the copy below exhaust memory.
        if any(n < 0 for n in self.shape) or int(np.prod(self.shape, dtype=object)) > max(self.storage.numel, 1):
            raise CheckpointError(f"a tensor of shape {self.shape} claims more elements than its storage {self.storage.key} holds")
        raw = self._source.storage_bytes(self.storage)
        if len(raw) < self.storage.numel * dtype.itemsize:
            raise CheckpointError(f"storage {self.storage.key} holds {len(raw)} bytes, "
                                  f"its header promises {self.storage.numel} × {dtype.itemsize}")
        flat = np.frombuffer(raw, dtype=dtype, count=self.storage.numel)
        extent = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) if all(self.shape) else 0
        if any(s < 0 for s in self.stride) or self.offset < 0 or self.offset + extent > flat.size:
            raise CheckpointError(f"a tensor of shape {self.shape} reaches beyond its storage {self.storage.key}")
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.shape,
                                               strides=[s * dtype.itemsize for s in self.stride], writeable=False)
        out = np.array(view)
        if self.bfloat16:
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    def __repr__(self) -> str:
        return f"LazyTensor({self.storage.type.name}, shape={self.shape})"


def _rebuild_tensor(storage, offset, shape, stride, *_rest):
    if not isinstance(storage, _StorageRef):
        raise CheckpointError("a tensor refers to something that is not a storage")
    return LazyTensor(storage.source, storage.storage, offset, shape, stride)


def _rebuild_parameter(data, *_rest):
    # nn.Parameter: the tensor inside is all a reader needs.
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


@dataclass
class _StorageRef:
    source: "_Source"
    storage: Storage


# Every name the restricted unpickler resolves, and what it becomes. Nothing here runs code
# from the file: the rebuilders only record where a tensor's bytes are.
_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
}


class _Unpickler(pickle.Unpickler):
    """Reads one pickle from `stream` and stops right after it (the legacy layout has several
    in a row)."""

    def __init__(self, stream, source: "_Source", path: Path):
        super().__init__(stream)
        self._source, self._path = source, path

    def read(self):
        try:
            return self.load()
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{self._path}: the checkpoint's pickle is damaged ({e})") from e

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return TorchDtype(name)
        raise CheckpointError(
            f"refusing to load: the checkpoint's pickle names {module}.{name}, which is neither a tensor "
            "nor a plain container, and loading it could run code from the file. Re-save only the "
            "state dict (torch.save(model.state_dict(), path)) or convert it to safetensors")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"unknown persistent reference {str(pid)[:80]} in the checkpoint")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, StorageType):
            raise CheckpointError(f"a storage of unknown type {storage_type!r}")
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"storage {key} has an invalid element count {numel!r}")
        return _StorageRef(self._source, self._source.storage(str(key), storage_type, numel))


class _Source:
    """Where storages' bytes live; read on demand."""

    def __init__(self) -> None:
        self._storages: dict[str, Storage] = {}

    def storage(self, key: str, type_: StorageType, numel: int) -> Storage:
        s = self._storages.get(key)
        if s is None:
            s = self._storages[key] = Storage(key, type_, numel)
        return s

    def known(self, key: str) -> Storage | None:
        return self._storages.get(key)

    def storage_bytes(self, storage: Storage) -> bytes:
        raise NotImplementedError


class _ZipSource(_Source):
    def __init__(self, zf: zipfile.ZipFile, prefix: str):
        super().__init__()
        self._zf, self._prefix = zf, prefix

    def storage_bytes(self, storage: Storage) -> bytes:
        name = f"{self._prefix}data/{storage.key}"
        try:
            info = self._zf.getinfo(name)
        except KeyError as e:
            raise CheckpointError(f"the checkpoint lacks {name}, which a tensor refers to") from e
        # Read no more than the storage's header promises (torch stores entries uncompressed;
        # a compressed one must not inflate past that).
        if info.file_size > storage.numel * storage.type.dtype.itemsize:
            raise CheckpointError(f"{name} holds {info.file_size} bytes, more than its {storage.numel} elements need")
        return self._zf.read(info)


class _LegacySource(_Source):
    def __init__(self, offsets: dict[str, tuple[int, int]], path: Path):
        super().__init__()
        self._offsets, self._path = offsets, path

    def place(self, key: str, start: int, size: int) -> None:
        self._offsets[key] = (start, size)

    def storage_bytes(self, storage: Storage) -> bytes:
        if storage.key not in self._offsets:
            raise CheckpointError(f"{self._path} lacks storage {storage.key}, which a tensor refers to")
        start, size = self._offsets[storage.key]
        with open(self._path, "rb") as f:
            f.seek(start)
            return f.read(size)


def load(path) -> object:
    """The checkpoint's object (usually a dict), with every tensor a [`LazyTensor`].

    Raises CheckpointError naming the problem: a name the pickle asks for that is not allowed,
    a truncated file, a tensor outside its storage."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    return _load_legacy(path)


def _load_zip(path: Path) -> object:
    zf = zipfile.ZipFile(path)
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise CheckpointError(f"{path} is a zip file but not a torch.save checkpoint (no <archive>/data.pkl)")
    if zf.getinfo(pkl[0]).file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: {pkl[0]} is over {MAX_PICKLE_BYTES >> 20} MiB; a checkpoint's pickle holds names and shapes, not data")
    prefix = pkl[0][: -len("data.pkl")]
    order = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in zf.namelist() else "little"
    if order != "little":
        raise CheckpointError(f"{path} was saved on a {order}-endian machine; only little-endian checkpoints are read")
    return _Unpickler(io.BytesIO(zf.read(pkl[0])), _ZipSource(zf, prefix), path).read()


def _load_legacy(path: Path) -> object:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if _plain_pickle(f, path) != _LEGACY_MAGIC:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (no zip archive, no legacy magic number)")
        _plain_pickle(f, path)  # protocol version
        sys_info = _plain_pickle(f, path)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise CheckpointError(f"{path} was saved on a big-endian machine; only little-endian checkpoints are read")
        source = _LegacySource({}, path)
        obj = _Unpickler(f, source, path).read()
        keys = _plain_pickle(f, path)
        if not isinstance(keys, list):
            raise CheckpointError(f"{path}: the storage key list is missing")
        for key in keys:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated before storage {key}")
            (numel,) = struct.unpack("<q", head)
            s = source.known(str(key))
            if s is None:
                raise CheckpointError(f"{path}: storage {key} is listed but no tensor uses it")
            nbytes = numel * s.type.dtype.itemsize
            if numel < 0 or f.tell() + nbytes > size:
                raise CheckpointError(f"{path} is truncated inside storage {key}")
            source.place(str(key), f.tell(), nbytes)
            f.seek(nbytes, io.SEEK_CUR)
    return obj


def _plain_pickle(f: io.BytesIO, path: Path):
    """One of the legacy header pickles: plain values only (no names allowed at all)."""

    class _Plain(pickle.Unpickler):
        def find_class(self, module, name):
            raise CheckpointError(f"{path}: unexpected {module}.{name} in a checkpoint header")

    try:
        return _Plain(f).load()
    except (pickle.UnpicklingError, EOFError, IndexError) as e:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({e})") from e


# ---- state dicts ----------------------------------------------------------------------------

_STATE_KEYS = ("model", "state_dict", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


def state_dict(obj, path) -> dict:
    """The model weights in a loaded checkpoint: the object itself when it is a mapping of names
    to tensors, else its `model` (or `state_dict`, `model_state_dict`, `module`) entry. Training
    state beside it (optimizer, scheduler, step counters) is ignored and never read. Names lose
    the `module.` (DistributedDataParallel) and `_orig_mod.` (torch.compile) prefixes."""
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict) and _is_state_dict(obj[key]):
                obj = obj[key]
                break
        else:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise CheckpointError(f"{path} holds no state dict: its entries are {keys}; "
                                  f"expected tensors by name or one of {', '.join(_STATE_KEYS)}")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for name, tensor in obj.items():
        clean = str(name)
        while clean.startswith(_PREFIXES):
            clean = clean.split(".", 1)[1]
        if clean in out:
            raise CheckpointError(f"{path}: {name} and another entry both name {clean}")
        out[clean] = tensor
    return out


def _is_state_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, LazyTensor) for v in d.values())
