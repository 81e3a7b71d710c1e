"""Folder listing (data.source='folder'): each real file once, symlink loops cut, no hang, sorted order."""

import os
import threading

import pytest

from simmim_jax.data import image_files


def list_with_timeout(folder, seconds=20.0):
  """list_image_files in a daemon thread: a hang fails the test instead of hanging the suite."""
  result = {}

  def run():
    try:
      result["files"] = image_files.list_image_files(str(folder))
    except Exception as e:  # pylint: disable=broad-except
      result["error"] = e

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"list_image_files({str(folder)!r}) did not finish in {seconds} s"
  if "error" in result:
    raise result["error"]
  return result["files"]


def test_two_symlink_loops_list_each_file_once_promptly(tmp_path):
  (tmp_path / "sub" / "deeper").mkdir(parents=True)
  for name in ("a.jpg", "sub/b.png", "sub/deeper/c.JPEG"):
    (tmp_path / name).write_bytes(b"x")
  os.symlink(".", tmp_path / "l1")       # root/l1 -> root
  os.symlink("..", tmp_path / "sub" / "l2")  # root/sub/l2 -> root (os.walk(followlinks=True) hung here)
  files = list_with_timeout(tmp_path)
  assert files == [str(tmp_path / n) for n in ("a.jpg", "sub/b.png", "sub/deeper/c.JPEG")]


def test_a_file_reached_by_several_paths_is_listed_once_under_its_real_path(tmp_path):
  (tmp_path / "real").mkdir()
  (tmp_path / "real" / "x.png").write_bytes(b"x")
  (tmp_path / "y.jpg").write_bytes(b"y")
  os.symlink("real", tmp_path / "a_link")        # sorts before "real": the real folder still wins
  os.symlink("y.jpg", tmp_path / "a_copy.jpg")   # a symlink to a file
  os.link(tmp_path / "y.jpg", tmp_path / "z_hard.jpg")  # a hard link: same (st_dev, st_ino)
  os.symlink("missing.jpg", tmp_path / "broken.jpg")    # kept: decoding skips and counts it
  files = list_with_timeout(tmp_path)
  assert files == sorted(files) == [str(tmp_path / n) for n in ("broken.jpg", "real/x.png", "y.jpg")]


def test_a_folder_only_reached_through_a_link_is_walked(tmp_path):
  (tmp_path / "elsewhere" / "pics").mkdir(parents=True)
  (tmp_path / "elsewhere" / "pics" / "p.png").write_bytes(b"p")
  (tmp_path / "data").mkdir()
  os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")
  os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked_again")
  assert list_with_timeout(tmp_path / "data") == [str(tmp_path / "data" / "linked" / "pics" / "p.png")]


def test_listing_is_the_same_from_any_path_spelling(tmp_path):
  (tmp_path / "c1").mkdir()
  for name in ("c1/b.png", "c1/a.png", "top.gif", ".hidden.jpg", "notes.txt"):
    (tmp_path / name).write_bytes(b"x")
  assert list_with_timeout(tmp_path) == [str(tmp_path / n) for n in ("c1/a.png", "c1/b.png", "top.gif")]
  assert list_with_timeout(str(tmp_path) + "/") == list_with_timeout(tmp_path)


def test_a_loop_only_folder_holds_no_images(tmp_path):
  os.symlink(".", tmp_path / "self")
  with pytest.raises(ValueError, match="holds no images"):
    list_with_timeout(tmp_path)
