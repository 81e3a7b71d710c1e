"""Reading and writing PyTorch weight files without PyTorch and without running code from them.

* `.pth` / `.pt` / `.bin` (`torch.save`'s zip format, PyTorch >= 1.6): `data.pkl` is unpickled by a
  *restricted* unpickler that knows only the globals a tensor needs (`torch._utils._rebuild_tensor_v2`,
  the storage types, `collections.OrderedDict`, ...) and reads each storage from the archive's `data/<key>`
  record. Metadata objects that training checkpoints carry next to the weights (the official SimMIM
  checkpoints pickle a yacs `CfgNode` config; numpy scalars, `argparse.Namespace`) become inert
  placeholders, never constructed. Any other global (`os.system`, `builtins.eval`, `subprocess.*`, ...) is
  refused before anything is called: a malicious checkpoint raises `UnsafeCheckpointError`, naming it.
  `torch.load(weights_only=True)` is not used even where torch exists: it would refuse the official
  checkpoints' pickled config, and this reader gives one code path with and without torch.
* `.safetensors`: a JSON header and raw little-endian buffers; read and written here (no package needed).
* `.npz`: numpy, loaded with `allow_pickle=False`.

`load_state_dict(path)` returns `{key: numpy array}`: the entry "model" of a training checkpoint (official
SimMIM), "state_dict" (Lightning / others), or the top-level dict when it already maps keys to tensors.
"""

import collections
import json
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# torch storage class name -> numpy dtype (torch.save records one per storage)
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
# Top-level modules whose objects are metadata next to the weights: replaced by inert placeholders.
_METADATA_MODULES = ("yacs", "argparse", "numpy", "_codecs", "torch.cuda.amp", "torch.amp", "apex")
# safetensors dtype tags
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_SAFETENSORS_TAGS = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


class UnsafeCheckpointError(pickle.UnpicklingError):
  """A checkpoint's pickle references code that is not part of a tensor: refused, nothing was run."""


class Skipped:
  """Placeholder for a metadata object (e.g. the yacs config) that was not constructed."""

  global_name = "?"

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __setitem__(self, key, value):
    del key, value

  def append(self, value):
    del value

  def extend(self, values):
    del values

  def __repr__(self):
    return f"<skipped {self.global_name}>"


class _TensorType:
  """Stands for torch.Tensor / torch.nn.Parameter in `_rebuild_from_type_v2` (never instantiated)."""


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if any(s < 0 for s in size + stride) or offset < 0:
    raise pickle.UnpicklingError(f"malformed tensor: offset {offset}, size {size}, stride {stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(f"malformed tensor: size {size} / stride {stride} at offset {offset} "
                                 f"reads past its storage of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * storage.itemsize for s in stride])
  return np.array(view)  # a copy, C-contiguous


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state
  return func(*args)


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED_GLOBALS` (+ inert placeholders for metadata); storages from the zip archive."""

  def __init__(self, file, archive: zipfile.ZipFile, root: str, path: str):
    super().__init__(file)
    self._archive, self._root, self._path = archive, root, path
    self._storages: dict[str, np.ndarray] = {}
    self._big_endian = False
    byteorder = f"{root}byteorder"
    if byteorder in archive.namelist():
      self._big_endian = archive.read(byteorder).decode().strip() == "big"

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return np.dtype(_STORAGE_DTYPES[name])
    if any(module == m or module.startswith(m + ".") for m in _METADATA_MODULES):
      return type(name, (Skipped,), {"global_name": f"{module}.{name}"})
    raise UnsafeCheckpointError(
        f"{self._path}: refusing to load this checkpoint: its pickle references {module}.{name}, which is "
        "neither a tensor nor known metadata. Nothing was executed. If you trust the file, re-save its "
        "state dict with torch.save(checkpoint['model'], path) or as .safetensors.")

  def persistent_load(self, pid) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise UnsafeCheckpointError(f"{self._path}: unexpected persistent id {pid!r}")
    _, dtype, key, _, numel = pid
    if not isinstance(dtype, np.dtype):
      raise UnsafeCheckpointError(f"{self._path}: storage {key} has no known storage type ({dtype!r})")
    if key not in self._storages:
      data = self._archive.read(f"{self._root}data/{key}")
      storage = np.frombuffer(data, dtype.newbyteorder(">") if self._big_endian else dtype)
      self._storages[key] = storage.astype(dtype)
    storage = self._storages[key]
    if storage.size < int(numel):
      raise pickle.UnpicklingError(f"{self._path}: storage {key} holds {storage.size} < {numel} elements")
    return storage


def _read_torch_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: not a torch.save archive (expected one <name>/data.pkl, found {pickles})")
    root = pickles[0][:-len("data.pkl")]
    with archive.open(pickles[0]) as f:
      return _RestrictedUnpickler(f, archive, root, path).load()


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    (header_size,) = struct.unpack("<Q", f.read(8))
    if header_size > 100_000_000:
      raise ValueError(f"{path}: not a safetensors file (header of {header_size} bytes)")
    header = json.loads(f.read(header_size))
    data = f.read()
  arrays = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name} has the unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    arrays[name] = np.frombuffer(data[start:end], dtype).reshape(info["shape"]).copy()
  return arrays


def write_safetensors(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes `{key: array}` as .safetensors (PyTorch: `safetensors.torch.load_file(path)`)."""
  header, chunks, offset = {}, [], 0
  for name in sorted(arrays):
    array = np.ascontiguousarray(arrays[name])
    if array.dtype not in _SAFETENSORS_TAGS:
      raise ValueError(f"{name}: dtype {array.dtype} cannot be written to safetensors")
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": _SAFETENSORS_TAGS[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)) + encoded)
    for chunk in chunks:
      f.write(chunk)


def _select_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
  if isinstance(obj, dict):
    for entry in ("model", "state_dict"):
      if isinstance(obj.get(entry), dict):
        obj = obj[entry]
        break
  if not isinstance(obj, dict) or not obj:
    raise ValueError(f"{path}: expected a state dict (or a checkpoint with one under 'model'); found "
                     f"{type(obj).__name__}")
  not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, np.ndarray))
  if not_tensors:
    raise ValueError(f"{path}: the state dict has entries that are not tensors: {not_tensors[:10]}")
  return dict(obj)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """`{PyTorch key: numpy array}` from a .pth/.pt/.bin (torch.save zip), .safetensors or .npz file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  with open(path, "rb") as f:
    magic = f.read(8)
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  if magic.startswith(b"PK"):
    return _select_state_dict(_read_torch_zip(path), path)
  raise ValueError(f"{path}: not a torch.save zip archive, .safetensors or .npz file (a legacy pre-1.6 "
                   "torch pickle or an arbitrary pickle is not read: re-save it with a recent PyTorch)")
