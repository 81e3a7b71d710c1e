"""safe_files: no write follows a symbolic link, whole files and folders appear complete or not at all (a full
disk removes the temporary file and keeps the old one), existing files are kept unless asked, JSON is strict."""

import errno
import hashlib
import os
import pathlib
import threading

import numpy as np
import pytest

from simmim_jax.storage import safe_files, visualize
from helpers import full_disk


def digest(path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.fixture
def outside(tmp_path):
  """A file outside the workdir that links point at, and the workdir."""
  target = tmp_path / "outside.txt"
  target.write_text("the user's file\n")
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  return target, workdir


WRITES = {
    "write_atomic": lambda path, workdir: safe_files.write_atomic(str(path), "new\n", inside=str(workdir)),
    "open_append": lambda path, workdir: safe_files.open_append(str(path), inside=str(workdir)).close(),
    "open_file": lambda path, workdir: os.close(safe_files.open_file(str(path), os.O_RDWR | os.O_CREAT,
                                                                     inside=str(workdir))),
    "save_png": lambda path, workdir: visualize.save_png(np.zeros((4, 4, 3), np.uint8), str(path),
                                                         inside=str(workdir)),
}


@pytest.mark.parametrize("write", WRITES, ids=str)
def test_a_link_at_the_written_name_is_refused_naming_it_and_its_target_is_unchanged(outside, write):
  target, workdir = outside
  before = digest(target)
  (workdir / "name").symlink_to(target)
  with pytest.raises(safe_files.PathRefusedError, match=r"name is a symbolic link \(to .*outside.txt\)"):
    WRITES[write](workdir / "name", workdir)
  assert digest(target) == before and (workdir / "name").is_symlink()


@pytest.mark.parametrize("write", ["write_atomic", "open_append", "open_file"])
def test_a_dangling_link_is_refused_and_never_creates_its_target(outside, write):
  target, workdir = outside
  (workdir / "name").symlink_to(target.parent / "created_by_the_link")
  with pytest.raises(safe_files.PathRefusedError, match="symbolic link"):
    WRITES[write](workdir / "name", workdir)
  assert not (target.parent / "created_by_the_link").exists()


@pytest.mark.parametrize("write", ["write_atomic", "save_png"])
def test_a_linked_folder_below_the_workdir_is_refused(outside, write):
  target, workdir = outside
  (workdir / "reconstructions").symlink_to(target.parent)
  before = sorted(os.listdir(target.parent))
  with pytest.raises(safe_files.PathRefusedError, match="reconstructions is a symbolic link"):
    WRITES[write](workdir / "reconstructions" / "step_2.png", workdir)
  assert sorted(os.listdir(target.parent)) == before


def test_a_stale_temporary_link_is_removed_not_followed(outside):
  """A link at NAME.tmp (config.json.tmp, metrics.jsonl.tmp, wandb_run_id.tmp): unlinked, then NAME.tmp is
  created exclusively, so neither the write nor the rename reaches the target."""
  target, workdir = outside
  before = digest(target)
  (workdir / "config.json.tmp").symlink_to(target)
  safe_files.write_atomic(str(workdir / "config.json"), "{}", inside=str(workdir))
  assert digest(target) == before
  assert sorted(os.listdir(workdir)) == ["config.json"] and (workdir / "config.json").read_text() == "{}"
  safe_files.write_atomic(str(workdir / "config.json"), "{}", inside=str(workdir))  # again: nothing stale left


def test_a_fifo_is_refused_without_blocking(outside):
  _, workdir = outside
  os.mkfifo(workdir / "run.log")
  result = []
  thread = threading.Thread(target=lambda: result.append(
      pytest.raises(safe_files.PathRefusedError, WRITES["open_append"], workdir / "run.log", workdir)))
  thread.start()
  thread.join(timeout=5)
  assert not thread.is_alive() and "not a regular file" in str(result[0].value)


def test_a_folder_where_a_file_goes_is_refused(tmp_path):
  (tmp_path / "model.safetensors").mkdir()
  with pytest.raises(safe_files.PathRefusedError, match="is a folder, not a file"):
    safe_files.write_atomic(str(tmp_path / "model.safetensors"), b"x")


def test_no_permission_is_refused_in_one_line(tmp_path, monkeypatch):
  original = os.open

  def denied(path, flags, *args, **kwargs):
    if path == "run.lock":
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return original(path, flags, *args, **kwargs)

  monkeypatch.setattr(os, "open", denied)
  with pytest.raises(safe_files.PathRefusedError, match="run.lock: permission denied"):
    safe_files.open_file(str(tmp_path / "run.lock"), os.O_RDWR | os.O_CREAT, inside=str(tmp_path))


@pytest.mark.parametrize("inside", [True, False], ids=["workdir", "user_folder"])
def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch, inside):
  path = tmp_path / "config.json"
  path.write_text("old")
  full_disk(monkeypatch, after_bytes=3)
  with pytest.raises(safe_files.WriteFailedError, match="cannot write .*config.json: No space left on device"):
    safe_files.write_atomic(str(path), "a new and longer text", inside=str(tmp_path) if inside else None)
  assert os.listdir(tmp_path) == ["config.json"] and path.read_text() == "old"


def test_an_existing_file_is_kept_unless_overwrite(tmp_path):
  path = tmp_path / "model.npz"
  path.write_text("old")
  with pytest.raises(FileExistsError, match="already exists"):
    safe_files.write_atomic(str(path), "new", overwrite=False)
  assert os.listdir(tmp_path) == ["model.npz"] and path.read_text() == "old"
  safe_files.write_atomic(str(path), "new", overwrite=True)
  assert path.read_text() == "new"


def test_overwrite_refuses_a_link_in_the_users_folder_too(outside):
  target, workdir = outside
  before = digest(target)
  (workdir / "model.npz").symlink_to(target)
  with pytest.raises(safe_files.PathRefusedError, match="symbolic link"):
    safe_files.write_atomic(str(workdir / "model.npz"), "new", overwrite=True)
  assert digest(target) == before and (workdir / "model.npz").is_symlink()
  assert sorted(os.listdir(workdir)) == ["model.npz"]  # no temporary file left


def test_a_new_folder_appears_whole_or_not_at_all(tmp_path, monkeypatch):
  out = tmp_path / "hf"
  with monkeypatch.context() as patch:
    full_disk(patch, after_bytes=10)
    with pytest.raises(safe_files.WriteFailedError, match="No space left"):
      with safe_files.new_folder(str(out)) as folder:
        safe_files.write_atomic(os.path.join(folder, "a.bin"), b"0123456789", inside=folder)
        safe_files.write_atomic(os.path.join(folder, "b.bin"), b"x", inside=folder)
  assert os.listdir(tmp_path) == []  # neither the folder nor its temporary name
  with safe_files.new_folder(str(out)) as folder:  # a rerun works
    safe_files.write_atomic(os.path.join(folder, "a.bin"), b"0123456789", inside=folder)
  assert os.listdir(tmp_path) == ["hf"] and os.listdir(out) == ["a.bin"]
  with pytest.raises(FileExistsError, match="not an empty folder"):
    with safe_files.new_folder(str(out)):
      pass


def test_json_text_writes_non_finite_floats_as_null():
  text = safe_files.json_text({"loss": float("nan"), "lr": [float("inf"), -float("inf"), 0.5], "step": 3})
  assert text == '{"loss": null, "lr": [null, null, 0.5], "step": 3}'
