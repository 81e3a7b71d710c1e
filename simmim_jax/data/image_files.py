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

  Local paths are walked with os.walk; URLs such as gs://bucket/images with tf.io.gfile.
  Raises ValueError naming the path if it is missing, not a folder, or holds no images.
  """
  if not data_dir:
    raise ValueError("data.source='folder' reads images from data.data_dir, which is empty; "
                     "set it to your image folder (flat or with class sub-folders)")
  if "://" in data_dir:
    from simmim_jax.data._tensorflow import tf  # TF's file system layer reads gs:// and other URLs
    if not tf.io.gfile.isdir(data_dir):
      raise ValueError(f"image folder {data_dir!r} (data.data_dir) does not exist or is not a folder")
    walk = tf.io.gfile.walk(data_dir)
  else:
    if not os.path.isdir(data_dir):
      raise ValueError(f"image folder {data_dir!r} (data.data_dir) does not exist or is not a folder")
    walk = os.walk(data_dir, followlinks=True)
  files = [os.path.join(root, name) for root, _, names in walk for name in names if _is_image(name)]
  if not files:
    raise ValueError(f"image folder {data_dir!r} (data.data_dir) holds no images "
                     f"(searched recursively for {', '.join(IMAGE_EXTENSIONS)}, any letter case)")
  return sorted(files)
