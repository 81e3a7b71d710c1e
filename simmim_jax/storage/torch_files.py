"""Reading and writing PyTorch weight files without PyTorch, without running code from them, in bounded memory.

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
* `.npz`: numpy's zip of `.npy` members, read member by member without pickles.

What is refused (`WeightFileError`, a `ValueError`: one line naming the file, the member or tensor, and
what is wrong), so that a file cannot ask for more memory than it holds or change the reader:
* a folder (the message says what it is: a transformers model folder -> its model.safetensors; a simmim_jax
  workdir), a FIFO, socket or device (`input_files`: checked before it is opened, never blocked on);
* every zip (`.pth`, `.npz`): compressed or encrypted members (torch.save and np.savez write stored
  members), duplicate names, members that declare more bytes than the file has, members whose byte ranges
  (local header + data) overlap (nested members: a zip bomb) or run into the central directory;
* `.pth`: a storage record whose size is not the element count its pickle declares times the element size;
  a tensor whose elements lie outside its storage, or that has more elements than its storage (1x:
  stride-0 "expanded" views such as `torch.zeros(1).expand(n)` are refused; `expand` of size-1 dims, e.g.
  Hugging Face's `position_ids` [1, n] with stride (0, 1), reads each element once and is accepted);
  tensors that together hold more than `_TENSOR_BYTES_ALLOWANCE` (4) times the bytes of the archive's
  storages (several keys may share one storage: tied weights); BUILD (the pickle opcode that sets an
  object's state / attributes) on anything but a state dict (`OrderedDict`, whose `_metadata` is dropped)
  or a metadata placeholder, so a pickle cannot change the reader's own allowed callables; a pickle that runs
  more than 200 000 + (file bytes / 64) opcodes (each makes at most one small object);
* `.npz`: members that are not `.npy` arrays, object arrays, a data size that does not match the header;
* `.safetensors`: a header that is not a JSON object or is larger than the file (or 8 MiB), unknown
  dtypes, shapes that are not lists of non-negative integers, `data_offsets` that are not
  0 <= begin <= end <= data size with end - begin = element count x element size, or that overlap,
  leave gaps or do not cover the data section exactly (the safetensors package's own rule).
Peak memory of a load is the file's bytes (read once) plus the output tensors (a contiguous `.pth` tensor
is a view of its storage, as in torch: no copy). A malformed pickle or zip (truncated, bad CRC, stray
opcodes) is reported as `WeightFileError` too.

`load_state_dict(path)` returns `{key: numpy array}`: the entry "model" of a training checkpoint (official
SimMIM), "state_dict" (Lightning / others), or the top-level dict when it already maps keys to tensors.
"""

import collections
import json
import math
import operator
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from simmim_jax.data import input_files

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
# The safetensors package accepts headers up to 100 MB; parsing JSON costs up to ~24x its bytes in Python objects
# (lists of empty lists), so 100 MB could cost 2.4 GB. 8 MiB holds ~60 000 tensor entries (~130 bytes each):
# 60x the ~1 000 tensors of SwinV2-G (3 B parameters, a ~150 KB header); parsing it costs at most ~200 MB.
_SAFETENSORS_MAX_HEADER = 8 << 20
# All tensors of a .pth together hold at most this many times the bytes of its storages.
_TENSOR_BYTES_ALLOWANCE = 4
# A .pth pickle runs at most 200 000 + (file bytes / 64) opcodes: one opcode makes at most one ~250-byte
# object, so the pickle's own objects stay under ~50 MB + 4x the file (torch: ~0.35 opcode per pickle byte,
# ~30 per tensor, and the pickle is a small part of the file).
_PICKLE_OPS_BASE, _PICKLE_OPS_PER_FILE_BYTE = 200_000, 1 / 64
_MAX_METADATA_GLOBALS = 1000  # distinct skipped metadata classes (each a ~2 KB type object)


class WeightFileError(ValueError):
  """A weight file that is refused or cannot be read; the message names the file and what is wrong."""


class UnsafeCheckpointError(WeightFileError, pickle.UnpicklingError):
  """A checkpoint's pickle references code that is not part of a tensor, or sets the state of one: refused,
  nothing was run."""


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


class _Storage:
  """A storage record of the archive (made only by `persistent_load`): its key and its elements."""

  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array


def _one_line(text: str) -> str:
  return " ".join(str(text).split("\n"))


def _stored_zip(path: str) -> zipfile.ZipFile:
  """Opens a zip whose members are all stored (uncompressed), unencrypted, uniquely named, inside the file."""
  file_size = os.path.getsize(path)
  archive = zipfile.ZipFile(path)
  names = set()
  for info in archive.infolist():
    name = repr(info.filename)
    if info.compress_type != zipfile.ZIP_STORED:
      archive.close()
      raise WeightFileError(f"{path}: member {name} is compressed (zip method {info.compress_type}); only stored "
                            "members are read (torch.save and np.savez write them; re-save without compression)")
    if info.flag_bits & 0x1:
      archive.close()
      raise WeightFileError(f"{path}: member {name} is encrypted")
    if info.file_size != info.compress_size or info.file_size > file_size:
      archive.close()
      raise WeightFileError(f"{path}: member {name} declares {info.file_size} bytes ({info.compress_size} stored) "
                            f"in a file of {file_size} bytes")
    if info.filename in names:
      archive.close()
      raise WeightFileError(f"{path}: member {name} appears twice")
    names.add(info.filename)
  try:
    _check_disjoint_members(path, archive, file_size)
  except BaseException:
    archive.close()
    raise
  return archive


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header (APPNOTE 4.3.7): 30 bytes, then name + extra


def _check_disjoint_members(path: str, archive: zipfile.ZipFile, file_size: int) -> None:
  """Refuses members whose byte ranges (local header + data) overlap or run into the central directory.

  Nested members (each one's data holding the next ones) would let a small file declare its bytes many times
  over: 2 000 such members in 1.5 MB read as 2.3 GB. CPython's zipfile checks this from 3.12.2 on ("Overlapped
  entries", https://github.com/python/cpython/pull/110016); 3.12.0 / 3.12.1 do not.
  Disjoint stored members inside the file also add up to no more than the file's size.
  """
  ranges = []
  with open(path, "rb") as f:
    for info in archive.infolist():
      f.seek(info.header_offset)
      header = f.read(_LOCAL_HEADER.size)
      if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise WeightFileError(f"{path}: member {info.filename!r} has no local header at byte {info.header_offset}")
      fields = _LOCAL_HEADER.unpack(header)
      data_start = info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]  # + name + extra field
      ranges.append((info.header_offset, data_start + info.compress_size, info.filename))
  ranges.sort()
  end_of_members = getattr(archive, "start_dir", file_size)  # where the central directory begins
  previous_end, previous_name = 0, None
  for begin, end, name in ranges:
    if begin < previous_end:
      raise WeightFileError(f"{path}: member {name!r} (bytes {begin}-{end}) overlaps member {previous_name!r}, which "
                            f"ends at byte {previous_end}; zip members must not share bytes (a zip bomb)")
    previous_end, previous_name = end, name
  if previous_end > end_of_members:
    raise WeightFileError(f"{path}: member {previous_name!r} ends at byte {previous_end}, inside the zip's central "
                          f"directory (byte {end_of_members})")
  if sum(info.compress_size for info in archive.infolist()) > file_size:  # implied by the above; stated for clarity
    raise WeightFileError(f"{path}: the members declare more bytes than the file's {file_size}")


# ----------------------------------------------------------------------------------------------------
# .pth (torch.save zip)


def _is_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
  """Row-major without gaps (the stride of a size-1 dim does not matter, as in torch's is_contiguous)."""
  expected = 1
  for n, s in reversed(list(zip(size, stride))):
    if n != 1 and s != expected:
      return False
    expected *= n
  return True


def _counted(load):
  """An unpickler opcode that first takes one from the pickle's opcode budget (`_PICKLE_OPS_BASE`...)."""
  def counted(unpickler):
    unpickler.ops_left -= 1
    if unpickler.ops_left < 0:
      raise WeightFileError(f"{unpickler.path}: the pickle runs more opcodes than a file of this size may "
                            f"({_PICKLE_OPS_BASE} + 1 per {int(1 / _PICKLE_OPS_PER_FILE_BYTE)} bytes)")
    load(unpickler)
  return counted


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Resolves only the globals a tensor needs (+ inert placeholders for metadata); storages from the archive.

  The pure-Python unpickler, because its opcodes can be overridden: BUILD is checked (the C unpickler would
  set the state / attributes of whatever the pickle names, including the allowed callables themselves).
  """

  dispatch = {op: _counted(load) for op, load in pickle._Unpickler.dispatch.items()}  # pylint: disable=protected-access

  def __init__(self, file, archive: zipfile.ZipFile, root: str, path: str):
    super().__init__(file)
    self._archive, self._root, self.path = archive, root, path
    self.ops_left = _PICKLE_OPS_BASE + int(os.path.getsize(path) * _PICKLE_OPS_PER_FILE_BYTE)  # see _counted
    self._metadata_types: dict[str, type] = {}
    self._storages: dict[str, _Storage] = {}
    storage_bytes = sum(i.file_size for i in archive.infolist() if i.filename.startswith(f"{root}data/"))
    self._tensor_bytes_left = _TENSOR_BYTES_ALLOWANCE * storage_bytes
    self._big_endian = False
    byteorder = f"{root}byteorder"
    if byteorder in archive.namelist():
      order = archive.read(byteorder)[:16].decode("ascii", "replace").strip()
      if order not in ("little", "big"):
        raise WeightFileError(f"{path}: member {byteorder} says {order!r}, expected 'little' or 'big'")
      self._big_endian = order == "big"
    self._rebuild_functions = (self._rebuild_tensor, self._rebuild_parameter)
    self._allowed_globals = {
        ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
        ("torch", "Tensor"): _TensorType,
        ("torch.nn.parameter", "Parameter"): _TensorType,
        ("torch", "Size"): tuple,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
    }

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._allowed_globals:
      return self._allowed_globals[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return np.dtype(_STORAGE_DTYPES[name])
    if any(module == m or module.startswith(m + ".") for m in _METADATA_MODULES):
      global_name = f"{module}.{name}"
      if global_name not in self._metadata_types:
        if len(self._metadata_types) >= _MAX_METADATA_GLOBALS:
          raise WeightFileError(f"{self.path}: the pickle names more than {_MAX_METADATA_GLOBALS} metadata globals")
        self._metadata_types[global_name] = type(name, (Skipped,), {"global_name": global_name})
      return self._metadata_types[global_name]
    raise UnsafeCheckpointError(
        f"{self.path}: refusing to load this checkpoint: its pickle references {module}.{name}, which is "
        "neither a tensor nor known metadata. Nothing was executed. If you trust the file, re-save its "
        "state dict with torch.save(checkpoint['model'], path) or as .safetensors.")

  def load_build(self):
    """BUILD (set an object's state): only state dicts (torch pickles OrderedDict's `_metadata` this way) and
    metadata placeholders receive it, and the state is dropped; anything else is refused."""
    state = self.stack.pop()
    target = self.stack[-1]
    if isinstance(target, Skipped) or (type(target) is collections.OrderedDict and isinstance(state, dict)):
      return
    what = getattr(target, "__qualname__", None) or type(target).__name__
    raise UnsafeCheckpointError(
        f"{self.path}: refusing to load this checkpoint: its pickle sets the state of {what} (BUILD); only "
        "state dicts and skipped metadata may receive one. Nothing was executed.")

  dispatch[pickle.BUILD[0]] = _counted(load_build)

  def persistent_load(self, pid) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise UnsafeCheckpointError(f"{self.path}: unexpected persistent id {_one_line(repr(pid))[:200]}")
    _, dtype, key, _, numel = pid
    if not isinstance(dtype, np.dtype) or not isinstance(key, str) or type(numel) is not int or numel < 0:
      raise WeightFileError(f"{self.path}: malformed storage id {_one_line(repr(pid))[:200]}")
    if key in self._storages:
      storage = self._storages[key]
      if storage.array.dtype != dtype or storage.array.size != numel:
        raise WeightFileError(f"{self.path}: storage {key!r} is declared as {storage.array.size} "
                              f"{storage.array.dtype} and as {numel} {dtype} elements")
      return storage
    member = f"{self._root}data/{key}"
    try:
      info = self._archive.getinfo(member)
    except KeyError:
      raise WeightFileError(f"{self.path}: storage {key!r} has no record {member!r}") from None
    if info.file_size != numel * dtype.itemsize:
      raise WeightFileError(f"{self.path}: member {member!r} holds {info.file_size} bytes, but its storage "
                            f"declares {numel} {dtype} elements ({numel * dtype.itemsize} bytes)")
    buffer = bytearray(info.file_size)
    with self._archive.open(info) as f:
      if f.readinto(buffer) != len(buffer):
        raise WeightFileError(f"{self.path}: member {member!r} is truncated")
    array = np.frombuffer(buffer, dtype.newbyteorder(">") if self._big_endian else dtype)
    self._storages[key] = _Storage(key, array.astype(dtype) if self._big_endian else array)
    return self._storages[key]

  def _rebuild_tensor(self, storage, offset, size, stride, *unused) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: the view (offset, size, stride) of a storage, checked; a contiguous view
    shares the storage's memory (as in torch), any other is copied."""
    del unused
    if not isinstance(storage, _Storage):
      raise WeightFileError(f"{self.path}: a tensor is built on {type(storage).__name__}, not a storage")
    try:
      offset = operator.index(offset)
      size, stride = tuple(map(operator.index, size)), tuple(map(operator.index, stride))
    except TypeError:
      raise WeightFileError(f"{self.path}: storage {storage.key!r}: malformed tensor (offset, size, stride)") from None
    array, where = storage.array, f"{self.path}: tensor on storage {storage.key!r}"
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
      raise WeightFileError(f"{where}: malformed view: offset {offset}, size {list(size)}, stride {list(stride)}")
    numel = math.prod(size)
    if numel > array.size:
      raise WeightFileError(f"{where}: size {list(size)} (stride {list(stride)}) has {numel} elements, more than "
                            f"its storage's {array.size} (expanded / stride-0 views are not read)")
    if numel and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= array.size:
      raise WeightFileError(f"{where}: size {list(size)} / stride {list(stride)} at offset {offset} reads past "
                            f"its storage of {array.size} elements")
    self._tensor_bytes_left -= numel * array.itemsize
    if self._tensor_bytes_left < 0:
      raise WeightFileError(f"{where}: the tensors would hold more than {_TENSOR_BYTES_ALLOWANCE}x the bytes of "
                            "the file's storages")
    if not numel:
      return np.zeros(size, array.dtype)
    if _is_contiguous(size, stride):  # a view of the storage, as in torch (tied weights share it)
      return array[offset:offset + numel].reshape(size)
    view = np.lib.stride_tricks.as_strided(array[offset:], size, [s * array.itemsize for s in stride],
                                           writeable=False)
    return np.array(view)  # a copy, C-contiguous

  def _rebuild_parameter(self, data, *unused):
    del unused
    return data

  def _rebuild_from_type_v2(self, func, new_type, args, state):
    del new_type, state
    if not any(func == f for f in self._rebuild_functions):
      raise UnsafeCheckpointError(f"{self.path}: refusing to load this checkpoint: _rebuild_from_type_v2 of "
                                  f"{getattr(func, '__qualname__', type(func).__name__)}")
    return func(*args)


def _read_torch_zip(path: str) -> Any:
  with _stored_zip(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise WeightFileError(f"{path}: not a torch.save archive (expected one <name>/data.pkl, found {pickles[:5]})")
    root = pickles[0][:-len("data.pkl")]
    with archive.open(pickles[0]) as f:
      return _RestrictedUnpickler(f, archive, root, path).load()


def _select_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
  if isinstance(obj, dict):
    for entry in ("model", "state_dict"):
      if isinstance(obj.get(entry), dict):
        obj = obj[entry]
        break
  if not isinstance(obj, dict) or not obj:
    raise WeightFileError(f"{path}: expected a state dict (or a checkpoint with one under 'model'); found "
                          f"{type(obj).__name__}")
  not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, np.ndarray))
  if not_tensors:
    raise WeightFileError(f"{path}: the state dict has entries that are not tensors: {not_tensors[:10]}")
  return dict(obj)


# ----------------------------------------------------------------------------------------------------
# .npz


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """np.load(path, allow_pickle=False), but only stored `.npy` members whose data size matches their header."""
  header_readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
  arrays = {}
  with _stored_zip(path) as archive:
    for info in archive.infolist():
      member = repr(info.filename)
      if not info.filename.endswith(".npy"):
        raise WeightFileError(f"{path}: member {member} is not a .npy array (an .npz holds only .npy members)")
      with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in header_readers:
          raise WeightFileError(f"{path}: member {member} has .npy format version {version}; 1.0 and 2.0 are read")
        shape, fortran_order, dtype = header_readers[version](f)
        if dtype.hasobject:
          raise WeightFileError(f"{path}: member {member} is an object array (a pickle); not read")
        nbytes = math.prod(shape) * dtype.itemsize
        if info.file_size - f.tell() != nbytes:
          raise WeightFileError(f"{path}: member {member} holds {info.file_size - f.tell()} data bytes, but its "
                                f"header declares {list(shape)} {dtype} ({nbytes} bytes)")
        buffer = bytearray(nbytes)
        if f.readinto(buffer) != nbytes:
          raise WeightFileError(f"{path}: member {member} is truncated")
      arrays[info.filename[:-len(".npy")]] = np.frombuffer(buffer, dtype).reshape(
          shape, order="F" if fortran_order else "C")
  return arrays


# ----------------------------------------------------------------------------------------------------
# .safetensors


def _unique_keys(pairs):
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    raise WeightFileError(f"the header repeats a key ({sorted(k for k in set(keys) if keys.count(k) > 1)[:5]})")
  return dict(pairs)


def _is_int(value) -> bool:
  return type(value) is int  # not bool


def _safetensors_layout(path: str, header: dict, data_size: int) -> list[tuple[int, int, str, np.dtype, list]]:
  """The tensors as (begin, end, name, dtype, shape), sorted by offset, after checking the header's rules."""
  tensors = []
  for name, info in header.items():
    where = f"{path}: tensor {name!r}"
    if name == "__metadata__":
      if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
        raise WeightFileError(f"{path}: __metadata__ must map strings to strings")
      continue
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      raise WeightFileError(f"{where}: expected {{dtype, shape, data_offsets}}, found {_one_line(repr(info))[:200]}")
    if not isinstance(info["dtype"], str) or info["dtype"] not in _SAFETENSORS_DTYPES:
      raise WeightFileError(f"{where} has the unsupported dtype {_one_line(repr(info['dtype']))[:50]} (known: "
                            f"{', '.join(_SAFETENSORS_DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
      raise WeightFileError(f"{where}: shape {_one_line(repr(shape))[:200]} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and 0 <= offsets[0] <= offsets[1] <= data_size):
      raise WeightFileError(f"{where}: data_offsets {_one_line(repr(offsets))[:200]} are not [begin, end] with "
                            f"0 <= begin <= end <= {data_size} (the data section's size)")
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
      raise WeightFileError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but shape "
                            f"{shape} of {info['dtype']} needs {math.prod(shape) * dtype.itemsize}")
    tensors.append((offsets[0], offsets[1], name, dtype, shape))
  tensors.sort(key=lambda t: t[:2])
  covered = 0
  for begin, end, name, _, _ in tensors:
    if begin != covered:
      raise WeightFileError(f"{path}: tensor {name!r} starts at byte {begin} of the data section, where the tensors "
                            f"before it end at {covered} ({'overlap' if begin < covered else 'gap'})")
    covered = end
  if covered != data_size:
    raise WeightFileError(f"{path}: the tensors cover {covered} of the data section's {data_size} bytes")
  return tensors


def _read_safetensors_header(f, path: str, file_size: int) -> tuple[dict, int]:
  """(the parsed JSON header, where the data section starts) of the open .safetensors file `f`."""
  prefix = f.read(8)
  if len(prefix) != 8:
    raise WeightFileError(f"{path}: not a safetensors file ({file_size} bytes, no header length)")
  (header_size,) = struct.unpack("<Q", prefix)
  if header_size > file_size - 8:
    raise WeightFileError(f"{path}: not a safetensors file (a header of {header_size} bytes in a file of "
                          f"{file_size})")
  if header_size > _SAFETENSORS_MAX_HEADER:
    raise WeightFileError(f"{path}: a safetensors header of {header_size:,} bytes, more than the "
                          f"{_SAFETENSORS_MAX_HEADER:,} this reader parses (real headers are under 1 MB)")
  try:
    header = json.loads(f.read(header_size), object_pairs_hook=_unique_keys)
  except WeightFileError as e:
    raise WeightFileError(f"{path}: {e}") from None
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise WeightFileError(f"{path}: the safetensors header is not JSON ({_one_line(e)})") from None
  if not isinstance(header, dict):
    raise WeightFileError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
  return header, 8 + header_size


def read_safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """`{name: shape}` of a .safetensors file from its header alone (checked by the same rules; no tensor read)."""
  with input_files.open_regular(path, what="weight file") as f:
    file_size = os.fstat(f.fileno()).st_size
    header, data_start = _read_safetensors_header(f, path, file_size)
  return {name: tuple(shape) for _, _, name, _, shape in _safetensors_layout(path, header, file_size - data_start)}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """`{name: array}` of a .safetensors file, each tensor read once into its own buffer (rules: module doc)."""
  with input_files.open_regular(path, what="weight file") as f:
    file_size = os.fstat(f.fileno()).st_size
    header, data_start = _read_safetensors_header(f, path, file_size)
    arrays = {}
    for begin, end, name, dtype, shape in _safetensors_layout(path, header, file_size - data_start):
      buffer = bytearray(end - begin)
      f.seek(data_start + begin)
      if f.readinto(buffer) != len(buffer):
        raise WeightFileError(f"{path}: tensor {name!r} is truncated")
      arrays[name] = np.frombuffer(buffer, dtype).reshape(shape)
  return {name: arrays[name] for name in header if name != "__metadata__"}


def write_safetensors(path: str, arrays: dict[str, np.ndarray], *, overwrite: bool = True,
                      inside: str | None = None) -> None:
  """Writes `{key: array}` as .safetensors (PyTorch: `safetensors.torch.load_file(path)`), atomically and never
  through a link (`safe_files.atomic_file`: `overwrite=False` refuses an existing file)."""
  from simmim_jax.storage import safe_files  # pylint: disable=g-import-not-at-top

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
  with safe_files.atomic_file(path, overwrite=overwrite, inside=inside) as f:
    f.write(struct.pack("<Q", len(encoded)) + encoded)
    for chunk in chunks:
      f.write(chunk)


# ----------------------------------------------------------------------------------------------------


def _folder_message(path: str) -> str:
  """What the folder `path` given as a weight file is, and what to give instead."""
  weights = os.path.join(path, "model.safetensors")
  if os.path.isfile(weights) and os.path.isfile(os.path.join(path, "config.json")):
    return (f"{path} is a folder (a Hugging Face transformers model: config.json + model.safetensors), not a "
            f"weight file: give its weights file, {weights}")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return (f"{path} is a folder (a simmim_jax workdir), not a weight file: simmim-pretrain / simmim-reconstruct "
            "read it as it is, and simmim-convert --export --checkpoint=WORKDIR --out=FILE writes its weights")
  return f"{path} is a folder, not a weight file: give a .pth / .pt / .bin, .safetensors or .npz file"


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """`{PyTorch key: numpy array}` from a .pth/.pt/.bin (torch.save zip), .safetensors or .npz file.

  Raises FileNotFoundError for a missing file and `WeightFileError` (a ValueError) for any file that is
  refused or cannot be read (the rules are in the module docstring), a folder or a special file included."""
  if not os.path.lexists(path):
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  if os.path.isdir(path):
    raise WeightFileError(_folder_message(path))
  try:
    with input_files.open_regular(path, what="checkpoint"):
      pass  # a FIFO or a device is refused here, before zipfile or open() could block on it or read it
  except ValueError as e:
    raise WeightFileError(str(e)) from None
  try:
    if path.endswith(".safetensors"):
      return read_safetensors(path)
    if path.endswith(".npz"):
      return _read_npz(path)
    with open(path, "rb") as f:
      magic = f.read(8)
    if magic.startswith(b"PK"):
      return _select_state_dict(_read_torch_zip(path), path)
  except (WeightFileError, MemoryError):
    raise
  except Exception as e:  # a malformed zip / pickle / npy: truncated, bad CRC, stray opcodes, wrong types
    raise WeightFileError(_one_line(f"{path}: cannot read this weight file ({type(e).__name__}: {e})")) from e
  raise WeightFileError(f"{path}: not a torch.save zip archive, .safetensors or .npz file (a legacy pre-1.6 "
                        "torch pickle or an arbitrary pickle is not read: re-save it with a recent PyTorch)")
