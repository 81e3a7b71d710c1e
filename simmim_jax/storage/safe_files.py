"""Every file simmim_jax writes on a local disk goes through this module: never through a symbolic link, never
left torn, always valid JSON.

  * **No links.** The file we write is opened with `O_NOFOLLOW`: a symbolic link at its name is refused
    (`PathRefusedError`, exit 2, naming the link), never followed. Below a root folder (`inside=`: the workdir)
    every folder is opened, or created, one component at a time with `O_NOFOLLOW`, so a link anywhere below
    the root is refused too. The root and the folders above it are the user's choice and may be links.
  * **Regular files only.** A folder, FIFO or device where a file goes is refused without blocking on it.
  * **Whole files are atomic** (`atomic_file`, `write_atomic`): written to a temporary file in the same folder,
    fsynced, renamed over the name, then the folder is fsynced. A reader or a crash sees the old file or the
    new one, never a torn one. Inside a workdir the temporary name is `NAME.tmp`: a stale one (a file or a
    link left by a killed run) is unlinked, then the name is created with `O_CREAT | O_EXCL | O_NOFOLLOW`.
    Elsewhere (exports into the user's folders) the name is new and unique, so nothing of the user's is ever
    unlinked. `overwrite=False` refuses an existing file (`FileExistsError`).
  * **New folders are atomic** (`new_folder`): filled under a temporary name beside them, renamed at the end.
  * **Appends** (`open_append`: metrics.jsonl, run.log) use `O_APPEND | O_NOFOLLOW`.
  * **Failures are one line.** A write that fails (a full disk, an I/O error) removes its temporary file and
    raises `WriteFailedError` (exit 1) naming the file; no permission to open a file is a `PathRefusedError`.
  * **JSON** (`json_text`) is strict: a non-finite float (NaN, inf, -inf) is written as `null`, as JavaScript
    and pandas do (pandas reads a null back as NaN); every reader of this repository accepts it.

URLs (`gs://...`) are not local files: object stores have no links, so a URL is written with Python's own
`open` and `os.replace`, as before this module existed.
"""

import contextlib
import errno
import fcntl
import io
import json
import math
import os
import secrets
import shutil
import stat
from typing import Any, Iterator

TMP_SUFFIX = ".tmp"


class PathRefusedError(ValueError):
  """A path simmim_jax will not write: a symbolic link, a folder or special file where a file goes, or a
  file it has no permission to open. Bad input: exit 2."""


class WriteFailedError(RuntimeError):
  """A write that failed (a full disk, an I/O error); its temporary file is removed. A runtime failure: exit 1."""


def is_local(path: str) -> bool:
  return "://" not in path


def json_text(value: Any, **kwargs) -> str:
  """`json.dumps(value)` as strict JSON: NaN and +-inf become null (JSON has no NaN)."""
  return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)


def _finite_or_none(value: Any) -> Any:
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: _finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(v) for v in value]
  return value


def _what_is(path: str) -> str:
  """Why `path` is refused, for a message."""
  try:
    if os.path.islink(path):
      return f"{path} is a symbolic link (to {os.readlink(path)}): simmim_jax never writes through a link; remove it"
    mode = os.lstat(path).st_mode
  except OSError:
    return f"{path} cannot be opened"
  if stat.S_ISDIR(mode):
    return f"{path} is a folder, not a file"
  if not stat.S_ISREG(mode):
    return f"{path} is not a regular file (a FIFO, socket or device); remove it"
  return f"{path} cannot be opened"


def refuse_links(paths) -> None:
  """PathRefusedError naming the first of `paths` that is a symbolic link (dangling or not)."""
  for path in paths:
    if os.path.islink(path):
      raise PathRefusedError(_what_is(path))


def _refused(path: str, error: OSError) -> Exception:
  """The exception for an OSError from opening `path`."""
  if isinstance(error, PermissionError):
    return PathRefusedError(f"{path}: permission denied: make it writable, or use another folder")
  if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO, errno.EEXIST):
    return PathRefusedError(_what_is(path))
  return WriteFailedError(f"cannot write {path}: {error.strerror or error}")


def _open_folder(folder: str, inside: str | None) -> int:
  """A file descriptor of `folder`, created if missing. With `inside`, `folder` must lie in it and each of its
  components below `inside` is opened (or made) without following a link."""
  try:
    if inside is None:
      os.makedirs(folder, exist_ok=True)
      return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    relative = os.path.relpath(folder, inside)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
      raise ValueError(f"{folder} is not inside {inside}")
    os.makedirs(inside, exist_ok=True)
    fd = os.open(inside, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
  except OSError as e:
    raise _refused(folder, e) from None
  path = inside
  for part in [] if relative == os.curdir else relative.split(os.sep):
    path = os.path.join(path, part)
    try:
      try:
        child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
      except FileNotFoundError:
        os.mkdir(part, 0o755, dir_fd=fd)
        child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError as e:
      os.close(fd)
      raise _refused(path, e) from None
    os.close(fd)
    fd = child
  return fd


def _open_regular(name: str, flags: int, dir_fd: int, path: str) -> int:
  """os.open(name, flags) in `dir_fd` without following a link or blocking on a FIFO; refuses what is not a
  regular file."""
  try:
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
  except OSError as e:
    raise _refused(path, e) from None
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    os.close(fd)
    raise PathRefusedError(_what_is(path))
  fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
  return fd


def open_file(path: str, flags: int, *, inside: str | None = None) -> int:
  """A file descriptor of the regular file `path` opened with `flags` (e.g. O_RDWR | O_CREAT for a lock file),
  never through a link."""
  if not is_local(path):
    return os.open(path, flags, 0o644)
  folder, name = os.path.split(os.path.abspath(path))
  dir_fd = _open_folder(folder, _absolute(inside))
  try:
    return _open_regular(name, flags, dir_fd, path)
  finally:
    os.close(dir_fd)


def make_folder(path: str, *, inside: str) -> None:
  """Creates the folder `path` below `inside` (its parents too), refusing a link on the way."""
  if not is_local(path):
    os.makedirs(path, exist_ok=True)
    return
  os.close(_open_folder(os.path.abspath(path), _absolute(inside)))


def _absolute(inside: str | None) -> str | None:
  return None if inside is None else os.path.abspath(inside)


def _write(fd: int, data) -> int:
  """os.write: every byte this module writes goes through here (tests inject a full disk)."""
  return os.write(fd, data)


class _RawFile(io.RawIOBase):
  """A writable, seekable raw file over a descriptor, writing through `_write`."""

  def __init__(self, fd: int):
    super().__init__()
    self._fd = fd

  def writable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def write(self, data) -> int:
    return _write(self._fd, data)

  def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
    return os.lseek(self._fd, offset, whence)

  def tell(self) -> int:
    return os.lseek(self._fd, 0, os.SEEK_CUR)

  def fsync(self) -> None:
    os.fsync(self._fd)

  def close(self) -> None:
    if not self.closed:
      super().close()
      os.close(self._fd)


def open_append(path: str, *, inside: str | None = None) -> io.TextIOWrapper:
  """`path` opened for appending text (UTF-8), created if missing, never through a link. Writes that fail
  raise OSError: the caller decides (metrics.jsonl stops the run, run.log stops logging)."""
  if not is_local(path):
    return open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
  fd = open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, inside=inside)
  return io.TextIOWrapper(io.BufferedWriter(_RawFile(fd)), encoding="utf-8", newline="\n")


def close_quietly(file) -> None:
  """Closes `file`, ignoring the OSError of flushing what a failed write left in its buffer."""
  try:
    file.close()
  except OSError:
    pass  # the close of a file whose write already failed


@contextlib.contextmanager
def atomic_file(path: str, *, inside: str | None = None, overwrite: bool = True) -> Iterator[io.BufferedWriter]:
  """A binary file to fill; when the block ends without an error it replaces `path` atomically (see the
  module docstring), else it is removed. `overwrite=False` refuses an existing `path` (FileExistsError)."""
  if not is_local(path):
    with open(path + TMP_SUFFIX, "wb") as f:
      yield f
    os.replace(path + TMP_SUFFIX, path)
    return
  folder, name = os.path.split(os.path.abspath(path))
  dir_fd = _open_folder(folder, _absolute(inside))
  try:
    _check_target(name, dir_fd, path, overwrite)
    if inside is not None:  # a workdir: the known temporary name; a stale one is ours to remove
      tmp = name + TMP_SUFFIX
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)  # a file or a link: unlinking a link never touches its target
    else:  # the user's folder: a new name, so nothing there is ever unlinked
      tmp = f".{name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = _open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dir_fd, os.path.join(folder, tmp))
    raw = _RawFile(fd)
    file = io.BufferedWriter(raw)
    try:
      yield file
      file.flush()
      raw.fsync()
      file.close()
      _check_target(name, dir_fd, path, overwrite)  # again: something may have appeared meanwhile
      os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
      os.fsync(dir_fd)
    except BaseException as e:
      close_quietly(file)
      with contextlib.suppress(OSError):
        os.unlink(tmp, dir_fd=dir_fd)
      if isinstance(e, OSError) and not isinstance(e, FileExistsError):
        raise WriteFailedError(f"cannot write {path}: {e.strerror or e}") from None
      raise
  finally:
    os.close(dir_fd)


def _check_target(name: str, dir_fd: int, path: str, overwrite: bool) -> None:
  try:
    mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
  except FileNotFoundError:
    return
  if not stat.S_ISREG(mode):
    raise PathRefusedError(_what_is(path))
  if not overwrite:
    raise FileExistsError(f"{path} already exists (nothing is overwritten)")


def write_atomic(path: str, data: bytes | str, *, inside: str | None = None, overwrite: bool = True) -> None:
  """Writes `data` (str: UTF-8) as the whole of `path`, atomically (`atomic_file`)."""
  with atomic_file(path, inside=inside, overwrite=overwrite) as f:
    f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def new_folder(path: str) -> Iterator[str]:
  """A temporary folder beside `path` to fill (with `atomic_file(..., inside=it)`); renamed to `path` when the
  block ends without an error, else removed. `path` must be missing or an empty folder, never a link. Local
  folders only."""
  if not is_local(path):
    raise ValueError(f"{path}: write the folder locally, then copy it (gsutil cp -r, gcloud storage cp -r)")
  parent, name = os.path.split(os.path.abspath(path))
  if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
    raise PathRefusedError(_what_is(path))
  if os.path.isdir(path) and os.listdir(path):
    raise FileExistsError(f"{path} exists and is not an empty folder (nothing is overwritten)")
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    os.mkdir(tmp, 0o755)
  except OSError as e:
    raise _refused(parent, e) from None
  try:
    yield tmp
    dir_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)
    os.rename(tmp, path)  # replaces an empty folder; a folder that filled up meanwhile: ENOTEMPTY
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
      os.fsync(parent_fd)
    finally:
      os.close(parent_fd)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)  # ours: created above by this process
    if isinstance(e, OSError) and not isinstance(e, FileExistsError):
      raise WriteFailedError(f"cannot write {path}: {e.strerror or e}") from None
    raise
