"""Bounded weight readers (torch_files): crafted .pth / .npz / .safetensors files are refused with one line naming
the file and the fault, before they can ask for memory; `simmim-convert` exits 2 on them without a traceback.

The crafted files are built by hand (pickle opcodes, zipfile, struct), the way an attacker would, each one a
valid file with a single fault; `test_hand_built_*_loads` shows the valid versions are read.
"""

import io
import json
import os
import re
import struct
import sys
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

from simmim_jax.storage import torch_files
from helpers import run_process
MB = 1 << 20

# ----------------------------------------------------------------------------------------------------
# .pth: torch.save's zip layout with a hand-written protocol-2 pickle


def _global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _str(text: str) -> bytes:
  return b"X" + struct.pack("<I", len(text.encode())) + text.encode()  # BINUNICODE


def _int(value: int) -> bytes:
  return b"J" + struct.pack("<i", value)  # BININT


def _tuple(*items: bytes) -> bytes:
  return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _call(func: bytes, *args: bytes) -> bytes:
  return func + _tuple(*args) + b"R"  # REDUCE


def _dict(**items: bytes) -> bytes:
  return b"}(" + b"".join(_str(k) + v for k, v in items.items()) + b"u"  # EMPTY_DICT MARK ... SETITEMS


def _tensor(key: str, numel: int, size, stride, offset: int = 0, storage_type: str = "FloatStorage") -> bytes:
  """torch._utils._rebuild_tensor_v2(('storage', torch.FloatStorage, key, 'cpu', numel), offset, size, stride,
  False, OrderedDict()), as torch.save writes a float32 tensor."""
  storage = _tuple(_str("storage"), _global("torch", storage_type), _str(key), _str("cpu"), _int(numel)) + b"Q"
  return _call(_global("torch._utils", "_rebuild_tensor_v2"), storage, _int(offset), _tuple(*map(_int, size)),
               _tuple(*map(_int, stride)), b"\x89", _call(_global("collections", "OrderedDict")))


def _state_dict(**tensors: bytes) -> bytes:
  """OrderedDict with the tensors, then BUILD {'_metadata': OrderedDict()}: what torch's state_dict() pickles."""
  items = b"".join(_str(k) + v for k, v in tensors.items())
  return (_call(_global("collections", "OrderedDict")) + b"(" + items + b"u"
          + _dict(_metadata=_call(_global("collections", "OrderedDict"))) + b"b")


def _pickle(body: bytes) -> bytes:
  return b"\x80\x02" + body + b"."


def _write_pth(path, data_pkl: bytes, storages: dict[str, bytes], compression=zipfile.ZIP_STORED):
  with zipfile.ZipFile(path, "w", compression=compression) as archive:
    archive.writestr("archive/data.pkl", data_pkl)
    archive.writestr("archive/byteorder", "little")
    for key, data in storages.items():
      archive.writestr(f"archive/data/{key}", data)
  return path


SIX_FLOATS = np.arange(6, dtype=np.float32).tobytes()


def _valid_pth(path):
  return _write_pth(path, _pickle(_state_dict(w=_tensor("0", 6, (2, 3), (3, 1)))), {"0": SIX_FLOATS})


def _stride_zero_pth(path):
  """[100000, 1000] with stride [0, 0] over a 1-element storage: 400 MB of output from a 400-byte file."""
  return _write_pth(path, _pickle(_state_dict(w=_tensor("0", 1, (100000, 1000), (0, 0)))), {"0": b"\0" * 4})


def _compressed_pth(path):
  """A deflated storage of 25 M zeros (100 MB) in a file of about 100 KB."""
  numel = 25 * MB
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
    archive.writestr("archive/data.pkl", _pickle(_state_dict(w=_tensor("0", numel, (numel,), (1,)))))
    with archive.open("archive/data/0", "w") as f:
      for _ in range(numel * 4 // (4 * MB)):
        f.write(bytes(4 * MB))
  return path


def _size_lie_pth(path):
  """The storage id declares 25 M elements; its record holds 6."""
  return _write_pth(path, _pickle(_state_dict(w=_tensor("0", 25 * MB, (2, 3), (3, 1)))), {"0": SIX_FLOATS})


def _build_pth(path, target=_global("torch._utils", "_rebuild_tensor_v2")):
  """BUILD with (None, {'__defaults__': ...}) on an allowed callable: setattr on the reader's own function."""
  attack = target + _tuple(b"N", _dict(__defaults__=_tuple(_int(1)))) + b"b0"  # BUILD, POP
  return _write_pth(path, _pickle(attack + _state_dict(w=_tensor("0", 6, (2, 3), (3, 1)))), {"0": SIX_FLOATS})


def _local_header(name: str, size: int, crc: int = 0) -> bytes:
  """A zip local file header of a stored member (no extra field)."""
  return struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0x21, crc, size, size, len(name), 0) + name.encode()


def _nested_zip(path, names: list[str], payload: bytes, prefix=lambda size: b"", others: dict[str, bytes] = None):
  """A zip of stored members nested inside one another, written by hand: member k's data is prefix(size of the
  rest) + the local headers and data of members k+1, k+2, ... + payload. The members declare about
  len(names)**2 / 2 headers + len(names) payloads in a file holding each byte once. Every CRC and size is
  right: only the overlap is wrong. `others` are ordinary members written after the nest."""
  rest, nest = len(payload), []  # nest: (name, prefix, data size), innermost first
  for name in reversed(names):
    head = prefix(rest)
    nest.append((name, head, len(head) + rest))
    rest = 30 + len(name.encode()) + len(head) + rest
  nest.reverse()  # outermost first: each header follows the previous header and its prefix
  body = bytearray(b"".join(_local_header(name, size) + head for name, head, size in nest) + payload)
  directory, offset = [], 0
  for name, head, size in nest:
    directory.append([name, offset, size, 0])
    offset += 30 + len(name.encode()) + len(head)
  for entry in reversed(directory):  # innermost first: a CRC covers the headers after it, patched already
    name, offset, size, _ = entry
    entry[3] = zlib.crc32(memoryview(body)[offset + 30 + len(name.encode()):])
    struct.pack_into("<L", body, offset + 14, entry[3])
  for name, data in (others or {}).items():
    directory.append([name, len(body), len(data), zlib.crc32(data)])
    body += _local_header(name, len(data), zlib.crc32(data)) + data
  central = b"".join(struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0x21, crc, size, size,
                                 len(name.encode()), 0, 0, 0, 0, 0, offset) + name.encode()
                     for name, offset, size, crc in directory)
  end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(directory), len(directory), len(central), len(body), 0)
  path.write_bytes(bytes(body) + central + end)
  return path


def _overlapping_pth(path, members=2000, payload=150_000):
  """A 0.6 MB .pth of `members` nested uint8 storages (each one holds all the later ones): 0.4 GB if read."""
  names = [f"archive/data/{i:04d}" for i in range(members)]  # local header + name: 47 bytes each
  sizes = [payload + 47 * (members - 1 - i) for i in range(members)]
  tensors = {f"w{i}": _tensor(f"{i:04d}", size, (size,), (1,), storage_type="ByteStorage")
             for i, size in enumerate(sizes)}
  return _nested_zip(path, names, bytes(payload), others={"archive/data.pkl": _pickle(_state_dict(**tensors)),
                                                          "archive/byteorder": b"little"})


def _npy_header(size: int) -> bytes:
  """The .npy 1.0 header of a uint8 array of `size` elements."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": (size,)})
  return buffer.getvalue()


def _overlapping_npz(path, members=1500, payload=100_000):
  """A 0.4 MB .npz of `members` nested .npy members (each one holds all the later ones): 0.3 GB if read."""
  return _nested_zip(path, [f"a{i:04d}.npy" for i in range(members)], bytes(payload), prefix=_npy_header)


def test_hand_built_pth_loads(tmp_path):
  state_dict = torch_files.load_state_dict(str(_valid_pth(tmp_path / "ok.pth")))
  np.testing.assert_array_equal(state_dict["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_pth_stride_zero_tensor_larger_than_its_storage_is_refused(tmp_path):
  with pytest.raises(torch_files.WeightFileError, match=r"100000000 elements, more than its storage's 1"):
    torch_files.load_state_dict(str(_stride_zero_pth(tmp_path / "stride0.pth")))


def test_pth_views_that_read_no_element_twice_are_accepted(tmp_path):
  """[1, 6] with stride (0, 1) (Hugging Face's expanded position_ids) and a transpose read each element once."""
  body = _state_dict(pos=_tensor("0", 6, (1, 6), (0, 1)), t=_tensor("0", 6, (3, 2), (1, 3)))
  state_dict = torch_files.load_state_dict(str(_write_pth(tmp_path / "v.pth", _pickle(body), {"0": SIX_FLOATS})))
  np.testing.assert_array_equal(state_dict["pos"], np.arange(6, dtype=np.float32)[None])
  np.testing.assert_array_equal(state_dict["t"], np.arange(6, dtype=np.float32).reshape(2, 3).T)


def test_pth_tensors_sharing_a_storage_beyond_the_allowance_are_refused(tmp_path):
  """Five full views of one storage: more than 4x the storage bytes of the file."""
  tensors = {f"w{i}": _tensor("0", 6, (6,), (1,)) for i in range(5)}
  path = _write_pth(tmp_path / "shared.pth", _pickle(_state_dict(**tensors)), {"0": SIX_FLOATS})
  with pytest.raises(torch_files.WeightFileError, match="more than 4x the bytes"):
    torch_files.load_state_dict(str(path))


def test_pth_compressed_member_is_refused(tmp_path):
  path = _write_pth(tmp_path / "deflated.pth", _pickle(_state_dict(w=_tensor("0", 6, (2, 3), (3, 1)))),
                    {"0": SIX_FLOATS}, compression=zipfile.ZIP_DEFLATED)
  with pytest.raises(torch_files.WeightFileError, match="'archive/data.pkl' is compressed"):
    torch_files.load_state_dict(str(path))


def test_pth_storage_record_smaller_than_its_declared_size_is_refused(tmp_path):
  with pytest.raises(torch_files.WeightFileError, match=r"'archive/data/0' holds 24 bytes, but its storage declares"):
    torch_files.load_state_dict(str(_size_lie_pth(tmp_path / "lie.pth")))


def test_pth_zip_entry_declaring_more_bytes_than_the_file_is_refused(tmp_path):
  path = _valid_pth(tmp_path / "zip_lie.pth")
  raw = bytearray(path.read_bytes())
  entry = raw.index(b"PK\x01\x02")  # the first central directory entry (data.pkl)
  struct.pack_into("<II", raw, entry + 20, 1 << 30, 1 << 30)  # compressed and uncompressed size: 1 GiB
  path.write_bytes(bytes(raw))
  with pytest.raises(torch_files.WeightFileError, match=f"declares {1 << 30} bytes"):
    torch_files.load_state_dict(str(path))


@pytest.mark.parametrize("target", [_global("torch._utils", "_rebuild_tensor_v2"),
                                   _global("collections", "OrderedDict"), _global("torch", "FloatStorage"),
                                   _tensor("0", 6, (6,), (1,))],
                         ids=["function", "class", "storage_type", "tensor"])
def test_pth_build_on_anything_but_a_state_dict_is_refused(tmp_path, target):
  with pytest.raises(torch_files.UnsafeCheckpointError, match=r"sets the state of .* \(BUILD\)"):
    torch_files.load_state_dict(str(_build_pth(tmp_path / "build.pth", target)))
  np.testing.assert_array_equal(torch_files.load_state_dict(str(_valid_pth(tmp_path / "ok.pth")))["w"].ravel(),
                                np.arange(6, dtype=np.float32))  # the reader itself is unchanged


def test_pth_pickle_running_more_opcodes_than_its_file_size_allows_is_refused(tmp_path):
  """300 000 EMPTY_DICT (1 byte each, a 64-byte dict each): over the 200 000 + size / 64 budget."""
  body = b"}0" * 150_000 + _state_dict(w=_tensor("0", 6, (2, 3), (3, 1)))  # EMPTY_DICT, POP
  path = _write_pth(tmp_path / "ops.pth", _pickle(body), {"0": SIX_FLOATS})
  with pytest.raises(torch_files.WeightFileError, match="the pickle runs more opcodes than a file of this size may"):
    torch_files.load_state_dict(str(path))


def test_pth_pickle_naming_too_many_metadata_globals_is_refused(tmp_path):
  body = b"".join(_global("numpy", f"x{i}") + b"0" for i in range(1001)) + _state_dict(w=_tensor("0", 6, (6,), (1,)))
  path = _write_pth(tmp_path / "globals.pth", _pickle(body), {"0": SIX_FLOATS})
  with pytest.raises(torch_files.WeightFileError, match="more than 1000 metadata globals"):
    torch_files.load_state_dict(str(path))


def test_pth_truncated_pickle_is_a_weight_file_error(tmp_path):
  path = _write_pth(tmp_path / "cut.pth", _pickle(_state_dict(w=_tensor("0", 6, (2, 3), (3, 1))))[:-1],
                    {"0": SIX_FLOATS})
  with pytest.raises(torch_files.WeightFileError, match="cut.pth: cannot read this weight file"):
    torch_files.load_state_dict(str(path))


# ----------------------------------------------------------------------------------------------------
# .npz


def _valid_npz(path):
  np.savez(path, w=np.arange(6, dtype=np.float32).reshape(2, 3), i=np.array([1, 2], np.int64))
  return path


def _raw_member_npz(path):
  _valid_npz(path)
  with zipfile.ZipFile(path, "a") as archive:
    archive.writestr("raw", b"\0" * 64)
  return path


def _compressed_npz(path):
  np.savez_compressed(path, w=np.zeros(25 * MB, np.float32))  # 100 MB of zeros in about 100 KB
  return path


def test_hand_built_npz_loads(tmp_path):
  arrays = torch_files.load_state_dict(str(_valid_npz(tmp_path / "ok.npz")))
  np.testing.assert_array_equal(arrays["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
  assert arrays["i"].dtype == np.int64 and arrays["w"].flags.writeable


def test_npz_member_that_is_not_npy_is_refused(tmp_path):
  with pytest.raises(torch_files.WeightFileError, match="member 'raw' is not a .npy array"):
    torch_files.load_state_dict(str(_raw_member_npz(tmp_path / "raw.npz")))


def test_npz_compressed_member_is_refused(tmp_path):
  with pytest.raises(torch_files.WeightFileError, match="member 'w.npy' is compressed"):
    torch_files.load_state_dict(str(_compressed_npz(tmp_path / "deflated.npz")))


def test_npz_header_declaring_more_data_than_the_member_holds_is_refused(tmp_path):
  header = np.lib.format.header_data_from_array_1_0(np.zeros(25 * MB, np.float32))
  with zipfile.ZipFile(tmp_path / "lie.npz", "w") as archive:
    with archive.open("w.npy", "w") as f:
      np.lib.format.write_array_header_1_0(f, header)
      f.write(bytes(24))
  with pytest.raises(torch_files.WeightFileError, match="holds 24 data bytes, but its header declares"):
    torch_files.load_state_dict(str(tmp_path / "lie.npz"))


# ----------------------------------------------------------------------------------------------------
# every zip (.pth, .npz): members are disjoint


@pytest.mark.parametrize("build", [_overlapping_pth, _overlapping_npz], ids=["pth", "npz"])
def test_zip_members_nested_inside_one_another_are_refused(tmp_path, build):
  path = build(tmp_path / f"nested.{build.__name__[-3:]}")
  declared = sum(info.file_size for info in zipfile.ZipFile(path).infolist())
  assert declared > 500 * path.stat().st_size  # what reading every member would cost (peak RSS: the CLI test)
  with pytest.raises(torch_files.WeightFileError, match=r"member '[^']*0001[^']*' \(bytes \d+-\d+\) overlaps member "
                                                        r"'[^']*0000[^']*'.*zip members must not share bytes"):
    torch_files.load_state_dict(str(path))


def test_zip_members_that_are_disjoint_load_with_data_descriptors_and_padding(tmp_path):
  """torch.save writes a data descriptor after each member and pads with extra fields: not an overlap."""

  class Stream:  # write-only, like a pipe: zipfile then follows each member with a data descriptor
    def __init__(self):
      self.buffer = io.BytesIO()

    def write(self, data):
      return self.buffer.write(data)

    def flush(self):
      pass

  stream = Stream()
  with zipfile.ZipFile(stream, "w") as archive:
    for name, array in {"a": np.arange(3), "b": np.ones((2, 2), np.float32)}.items():
      info = zipfile.ZipInfo(f"{name}.npy")
      info.extra = struct.pack("<HH", 0x4246, 12) + bytes(12)  # 'FB' padding, as torch's writer
      with archive.open(info, "w") as f:
        np.lib.format.write_array(f, array)
  (tmp_path / "streamed.npz").write_bytes(stream.buffer.getvalue())
  assert stream.buffer.getvalue().count(b"PK\x07\x08") == 2  # the data descriptors
  arrays = torch_files.load_state_dict(str(tmp_path / "streamed.npz"))
  np.testing.assert_array_equal(arrays["b"], np.ones((2, 2), np.float32))


# ----------------------------------------------------------------------------------------------------
# .safetensors


def _write_safetensors(path, header, data: bytes):
  encoded = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
  return path


EIGHT_FLOATS = np.arange(8, dtype=np.float32).tobytes()  # 32 bytes


def _tensor_info(shape, begin, end, dtype="F32"):
  return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


SAFETENSORS_FAULTS = {  # name: (header over EIGHT_FLOATS, what the refusal says)
    "overlap": ({"a": _tensor_info([4], 0, 16), "b": _tensor_info([4], 8, 24), "c": _tensor_info([2], 24, 32)},
                "'b' starts at byte 8 of the data section, where the tensors before it end at 16 (overlap)"),
    "gap": ({"a": _tensor_info([4], 0, 16), "b": _tensor_info([2], 24, 32)}, "(gap)"),
    "negative_offset": ({"a": _tensor_info([4], -16, 0), "b": _tensor_info([8], 0, 32)},
                        "data_offsets [-16, 0] are not [begin, end]"),
    "end_past_file": ({"a": _tensor_info([16], 0, 64)},
                      "data_offsets [0, 64] are not [begin, end] with 0 <= begin <= end <= 32"),
    "negative_shape": ({"a": _tensor_info([-2, -4], 0, 32)}, "shape [-2, -4] is not a list of non-negative"),
    "unknown_dtype": ({"a": _tensor_info([8], 0, 32, dtype="F8_E9")}, "unsupported dtype 'F8_E9'"),
    "short_cover": ({"a": _tensor_info([4], 0, 16)}, "the tensors cover 16 of the data section's 32 bytes"),
    "list_header": ([_tensor_info([8], 0, 32)], "the safetensors header is a JSON list, not an object"),
}


def test_hand_built_safetensors_loads(tmp_path):
  header = {"__metadata__": {"format": "pt"}, "b": _tensor_info([2, 2], 16, 32), "a": _tensor_info([4], 0, 16)}
  arrays = torch_files.load_state_dict(str(_write_safetensors(tmp_path / "ok.safetensors", header, EIGHT_FLOATS)))
  np.testing.assert_array_equal(arrays["a"], np.arange(4, dtype=np.float32))
  np.testing.assert_array_equal(arrays["b"], np.arange(4, 8, dtype=np.float32).reshape(2, 2))


@pytest.mark.parametrize("fault", list(SAFETENSORS_FAULTS))
def test_safetensors_header_breaking_the_format_rules_is_refused(tmp_path, fault):
  header, message = SAFETENSORS_FAULTS[fault]
  path = _write_safetensors(tmp_path / f"{fault}.safetensors", header, EIGHT_FLOATS)
  with pytest.raises(torch_files.WeightFileError, match=re.escape(message)):
    torch_files.load_state_dict(str(path))


def test_safetensors_header_length_beyond_the_file_is_refused(tmp_path):
  path = tmp_path / "long.safetensors"
  path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
  with pytest.raises(torch_files.WeightFileError, match=f"a header of {1 << 40} bytes in a file of 10"):
    torch_files.load_state_dict(str(path))


def test_safetensors_header_larger_than_8_mib_is_refused_before_it_is_parsed(tmp_path):
  """A 20 MB header of empty lists (the costliest JSON to parse: ~24 bytes of Python objects per byte) would
  cost ~0.5 GB; the header length alone refuses it."""
  path = tmp_path / "long_header.safetensors"
  header = b'{"a":[' + b",".join([b"[]"] * (10 << 20)) + b"]}"
  path.write_bytes(struct.pack("<Q", len(header)) + header)
  tracemalloc.start()
  with pytest.raises(torch_files.WeightFileError, match=f"a safetensors header of {len(header):,} bytes, more than "
                                                        f"the {8 << 20:,} this reader parses"):
    torch_files.load_state_dict(str(path))
  with pytest.raises(torch_files.WeightFileError, match="more than the 8,388,608 this reader parses"):
    torch_files.read_safetensors_shapes(str(path))
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 1 << 20, f"{peak / 2 ** 20:.0f} MB"


def test_a_folder_or_a_special_file_given_as_a_weight_file_is_named(tmp_path):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("{}")
  _valid_pth(tmp_path / "hf" / "model.safetensors")
  with pytest.raises(torch_files.WeightFileError, match=re.escape(
      f"{tmp_path / 'hf'} is a folder (a Hugging Face transformers model: config.json + model.safetensors), not a "
      f"weight file: give its weights file, {tmp_path / 'hf' / 'model.safetensors'}")):
    torch_files.load_state_dict(str(tmp_path / "hf"))
  (tmp_path / "work" / "checkpoints").mkdir(parents=True)
  with pytest.raises(torch_files.WeightFileError, match="is a folder \\(a simmim_jax workdir\\), not a weight file"):
    torch_files.load_state_dict(str(tmp_path / "work"))
  with pytest.raises(torch_files.WeightFileError, match="is a folder, not a weight file: give a .pth"):
    torch_files.load_state_dict(str(tmp_path / "work" / "checkpoints"))
  os.mkfifo(tmp_path / "pipe.pth")  # refused without blocking on it
  with pytest.raises(torch_files.WeightFileError, match=r"pipe.pth' is a FIFO \(named pipe\), not a regular file"):
    torch_files.load_state_dict(str(tmp_path / "pipe.pth"))
  os.symlink("/dev/zero", tmp_path / "zero.safetensors")
  with pytest.raises(torch_files.WeightFileError, match=r"is a character device \(a link to /dev/zero\)"):
    torch_files.load_state_dict(str(tmp_path / "zero.safetensors"))


# ----------------------------------------------------------------------------------------------------
# simmim-convert on the crafted files: exit 2, one line, no traceback, bounded memory

_CHILD_RSS = ("import json, resource, subprocess, sys\n"
              "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
              "print(json.dumps([r.returncode, r.stderr, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")


def _convert_cli(checkpoint, tmp_path) -> tuple[int, str, int]:
  """(exit code, stderr, peak RSS in bytes) of `simmim-convert --checkpoint=...`, measured in a fresh parent."""
  result = run_process([sys.executable, "-c", _CHILD_RSS, sys.executable, "-m", "simmim_jax.cli", "convert",
                        f"--checkpoint={checkpoint}", "--encoder=vit_test_tiny", f"--out={tmp_path}/out.npz"],
                       timeout=300)
  returncode, stderr, max_rss_kb = json.loads(result.stdout)
  return returncode, stderr, max_rss_kb * 1024


@pytest.fixture(scope="module")
def baseline_rss(tmp_path_factory):
  """Peak RSS of simmim-convert refusing a 1-byte file (the cost of importing the converter: ~200 MB)."""
  path = tmp_path_factory.mktemp("baseline") / "x.pth"
  path.write_bytes(b"x")
  returncode, stderr, rss = _convert_cli(path, path.parent)
  assert returncode == 2, stderr
  return rss


CLI_CASES = {  # name: (file name, builder, what stderr says)
    "pth_stride_zero": ("stride0.pth", _stride_zero_pth, "more than its storage's 1"),
    "pth_compressed": ("deflated.pth", _compressed_pth, "is compressed"),
    "pth_size_lie": ("lie.pth", _size_lie_pth, "holds 24 bytes, but its storage declares"),
    "pth_build": ("build.pth", _build_pth, "(BUILD)"),
    "npz_raw_member": ("raw.npz", _raw_member_npz, "'raw' is not a .npy array"),
    "npz_compressed": ("deflated.npz", _compressed_npz, "is compressed"),
    "pth_nested_members": ("nested.pth", _overlapping_pth, "zip members must not share bytes"),
    "npz_nested_members": ("nested.npz", _overlapping_npz, "zip members must not share bytes"),
    **{f"safetensors_{fault}": (f"{fault}.safetensors",
                                lambda path, fault=fault: _write_safetensors(path, SAFETENSORS_FAULTS[fault][0],
                                                                             EIGHT_FLOATS),
                                SAFETENSORS_FAULTS[fault][1])
       for fault in ("overlap", "negative_offset", "end_past_file", "negative_shape", "list_header")},
}


# One per format in the default suite (each CLI run imports the converter, ~1-3 s); the rest with -m slow.
CLI_DEFAULT = ("pth_stride_zero", "pth_compressed", "npz_raw_member", "safetensors_list_header", "pth_nested_members",
               "npz_nested_members")


@pytest.mark.parametrize("case", [c if c in CLI_DEFAULT else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CLI_CASES])
def test_convert_cli_refuses_crafted_files_with_one_line_in_bounded_memory(tmp_path, baseline_rss, case):
  name, build, message = CLI_CASES[case]
  path = build(tmp_path / name)
  assert path.stat().st_size < 1 * MB
  returncode, stderr, rss = _convert_cli(path, tmp_path)
  assert returncode == 2, stderr[-3000:]
  assert "Traceback" not in stderr and stderr.count("\n") == 1 and stderr.endswith("\n"), stderr[-3000:]
  assert stderr.startswith(f"simmim-convert: {path}: ") and message in stderr, stderr
  assert rss - baseline_rss < 50 * MB, f"peak RSS {rss / MB:.0f} MB, {baseline_rss / MB:.0f} MB without the file"
