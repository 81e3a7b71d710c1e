"""Every user file simmim_jax reads (images, weight files, a transformers config.json) is opened here, bounded:

  * **Regular files only.** A FIFO, a socket, a device (a link to /dev/zero or /dev/urandom) or a folder is
    refused (`NotARegularFileError`, a ValueError naming the file and what it is), before it is opened: the
    name is stat'ed first (following links: a link to a regular file is read, a link to a device is not), so
    a device is never opened. The name is then opened with `O_NONBLOCK` (opening a FIFO never blocks, even if
    one was swapped in after the stat), and the open descriptor is fstat'ed: what is read is what was checked.
  * **A size bound before reading** (`max_bytes`): a larger file is refused (`FileTooLargeError`) without
    reading a byte of it, so a sparse 2 GB file named `.jpg` costs nothing.
  * URLs (`gs://bucket/...`) are read through `tf.io.gfile` (object stores have no special files); their size
    is checked from the object's metadata before reading.

The readers built on it: `data.decode.open_image` (pretraining folders, fine-tuning folders,
`simmim-reconstruct --image`), `torch_files.load_state_dict`, `hf_export.from_hf`'s config.json.
"""

import contextlib
import io
import os
import stat
from typing import BinaryIO, Iterator


class NotARegularFileError(ValueError):
  """A path that is not a regular file (a FIFO, socket, device or folder): refused before reading."""


class FileTooLargeError(ValueError):
  """A file larger than the bound of what it may hold: refused before reading."""


def _kind(mode: int) -> str:
  if stat.S_ISDIR(mode):
    return "a folder"
  if stat.S_ISFIFO(mode):
    return "a FIFO (named pipe)"
  if stat.S_ISCHR(mode):
    return "a character device"
  if stat.S_ISBLK(mode):
    return "a block device"
  if stat.S_ISSOCK(mode):
    return "a socket"
  return "not a regular file"


def _check(path: str, info: os.stat_result, max_bytes: int | None, what: str) -> None:
  if not stat.S_ISREG(info.st_mode):
    link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
    raise NotARegularFileError(f"{what} {path!r} is {_kind(info.st_mode)}{link}, not a regular file: not read")
  if max_bytes is not None and info.st_size > max_bytes:
    raise FileTooLargeError(f"{what} {path!r} holds {info.st_size:,} bytes, more than the {max_bytes:,} it may "
                            "hold: not read")


@contextlib.contextmanager
def open_regular(path: str, max_bytes: int | None = None, what: str = "file") -> Iterator[BinaryIO]:
  """The binary file at `path`, open for reading, if it is a regular file of at most `max_bytes` bytes (None:
  no bound); raises NotARegularFileError / FileTooLargeError (ValueErrors naming the file, `what` says what
  it is for), or the OSError of a missing or unreadable file."""
  if "://" in path:
    from simmim_jax.data._tensorflow import tf  # pylint: disable=g-import-not-at-top  (gs:// and other URLs)
    size = tf.io.gfile.stat(path).length
    if max_bytes is not None and size > max_bytes:
      raise FileTooLargeError(f"{what} {path!r} holds {size:,} bytes, more than the {max_bytes:,} it may hold: "
                              "not read")
    with tf.io.gfile.GFile(path, "rb") as f:
      yield io.BytesIO(f.read(size + 1))  # at most one byte more than the metadata said (a growing object)
    return
  _check(path, os.stat(path), max_bytes, what)  # a device is never opened
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO swapped in: no block
  try:
    _check(path, os.fstat(fd), max_bytes, what)  # what is read is what was checked
  except BaseException:
    os.close(fd)
    raise
  with os.fdopen(fd, "rb") as f:  # regular files ignore O_NONBLOCK
    yield f


def read_regular(path: str, max_bytes: int | None = None, what: str = "file") -> bytes:
  """The bytes of `path` (`open_regular`'s rules); at most `max_bytes` are read even if the file grows."""
  with open_regular(path, max_bytes, what) as f:
    data = f.read() if max_bytes is None else f.read(max_bytes + 1)
  if max_bytes is not None and len(data) > max_bytes:
    raise FileTooLargeError(f"{what} {path!r} grew past the {max_bytes:,} bytes it may hold while it was read")
  return data
