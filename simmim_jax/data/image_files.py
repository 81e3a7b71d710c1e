"""The image files of a user's folder (source="folder"): any layout, labels ignored, like the official ImageFolder."""

import os

# What the pipeline decodes (with Pillow, see decode.py); case-insensitive. Other files are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _is_image(name: str) -> bool:
  # Dot-files are skipped: macOS writes "._photo.jpg" metadata files next to real ones.
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(data_dir: str) -> list[str]:
  """All image files under `data_dir`, recursively, sorted by path (so the list, and with it the sample order,
  is the same on every host). Flat folders and class sub-folders (root/<class>/<image>) both work.

  Local paths: each real file is listed once, under one path. Symlinked folders are followed, but a folder
  already walked (same device and inode) is not walked again, so symlink loops (`l -> .`) end; a file reached
  by several paths (a symlink to a file, a hard link, a folder linked twice) is listed once. Real folders are
  walked before symlinked ones, each in sorted name order, and a file keeps the first path the walk finds
  (a real file name before a symlink to it): the same choice on every host. Unreadable folders are skipped
  (as os.walk does); a name that cannot be stat'ed (a broken link) is kept, so decoding skips and counts it,
  and so is a FIFO, device or socket named like an image (a link to /dev/zero): `decode.load_image_file` refuses
  it before opening it (only regular files of a bounded size are read).
  URLs such as gs://bucket/images are walked with tf.io.gfile (object stores have no links).
  Raises ValueError naming the path if it is missing, not a folder, or holds no images.
  """
  if not data_dir:
    raise ValueError("data.source='folder' reads images from data.data_dir, which is empty; "
                     "set it to your image folder (flat or with class sub-folders)")
  if "://" in data_dir:
    from simmim_jax.data._tensorflow import tf  # TF's file system layer reads gs:// and other URLs
    if not tf.io.gfile.isdir(data_dir):
      raise ValueError(f"image folder {data_dir!r} (data.data_dir) does not exist or is not a folder")
    files = [os.path.join(root, name) for root, _, names in tf.io.gfile.walk(data_dir)
             for name in names if _is_image(name)]
  else:
    if not os.path.isdir(data_dir):
      raise ValueError(f"image folder {data_dir!r} (data.data_dir) does not exist or is not a folder")
    files = _walk_local(data_dir)
  if not files:
    raise ValueError(f"image folder {data_dir!r} (data.data_dir) holds no images "
                     f"(searched recursively for {', '.join(IMAGE_EXTENSIONS)}, any letter case)")
  return sorted(files)


def _walk_local(data_dir: str) -> list[str]:
  """The image files under a local folder, each (device, inode) once; see `list_image_files`."""
  root = os.stat(data_dir)
  walked = set()  # folders by (st_dev, st_ino): each is walked at most once, which ends symlink loops
  found, linked_files = {}, {}  # file (st_dev, st_ino) (or path) -> path; files reached through a file symlink
  frontier = [(data_dir, (root.st_dev, root.st_ino))]
  while frontier:  # one round: every real folder below the frontier; the symlinked folders met start the next
    next_frontier, stack = [], list(reversed(frontier))
    while stack:
      folder, key = stack.pop()
      if key in walked:
        continue
      walked.add(key)
      try:
        with os.scandir(folder) as it:
          entries = sorted(it, key=lambda entry: entry.name)
      except OSError:
        continue  # unreadable folder: skipped, as os.walk does
      subfolders = []
      for entry in entries:
        try:
          is_dir = entry.is_dir()  # follows links
        except OSError:
          is_dir = False
        if not is_dir and not _is_image(entry.name):
          continue
        try:
          info = entry.stat()  # of a link's target
          key = (info.st_dev, info.st_ino)
        except OSError:  # a broken link or a vanished entry
          if is_dir:
            continue
          key = entry.path
        if is_dir:
          if key not in walked:
            (next_frontier if entry.is_symlink() else subfolders).append((entry.path, key))
        else:  # an image name; one that cannot be stat'ed is kept by path: decoding skips and counts it
          (linked_files if entry.is_symlink() else found).setdefault(key, entry.path)
      stack.extend(reversed(subfolders))  # depth first, in sorted order
    frontier = next_frontier
  for key, path in linked_files.items():
    found.setdefault(key, path)
  return list(found.values())
