"""Image decoding that survives real folders: any mode PIL reads becomes 8-bit RGB, and a file that cannot
be decoded is skipped, counted and logged once (or, in strict mode, stops the run naming the file).

TF-free (Pillow + numpy). The tf.data pipeline calls `decode_rgb` through `tf.numpy_function`.
Modes: RGB as is; grayscale (L, 1), palette (P, PA), CMYK, YCbCr, LAB, HSV through Pillow's RGB
conversion; alpha (RGBA, LA) dropped; 16-bit and 32-bit integer grayscale (I;16, I) and float (F) scaled
from their 0-65535 / 0-1 ranges. Huge JPEGs are decoded at a reduced scale (JPEG draft mode), never below
`min_side` pixels on the short side.
"""

import io
import threading

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

# Pillow refuses images above 2 x MAX_IMAGE_PIXELS as decompression bombs; a real photo can exceed the
# default (89 M pixels). Allow up to 1 G pixels; beyond that the file is skipped like a broken one.
Image.MAX_IMAGE_PIXELS = 500_000_000

DECODE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError,
                 EOFError, MemoryError)


class UndecodableImageError(ValueError):
  """An image file could not be decoded (raised in strict mode)."""


class DataError(RuntimeError):
  """The input pipeline stopped (e.g. an undecodable image in strict mode); the message names the cause."""


_skipped: dict[str, str] = {}  # file name -> reason; this process's undecodable files
_lock = threading.Lock()


def skipped_image_count() -> int:
  """How many distinct files this process skipped as undecodable."""
  with _lock:
    return len(_skipped)


def record_skip(name: str, reason: str, strict: bool) -> None:
  """Counts a skipped file and logs it once; raises UndecodableImageError when `strict`."""
  if strict:
    raise UndecodableImageError(f"cannot decode image {name}: {reason} (config.data.strict=True; set it to "
                                "False to skip undecodable images)")
  with _lock:
    first_time = name not in _skipped
    _skipped[name] = reason
  if first_time:
    logging.warning("Skipping undecodable image %s: %s", name, reason)


def to_rgb(image: Image.Image) -> np.ndarray:
  """A loaded PIL image of any mode -> uint8 [H, W, 3]."""
  mode = image.mode
  if mode.startswith("I;16") or mode == "I":
    gray = np.asarray(image, np.float64) / 257.0  # 0..65535 -> 0..255
    return np.repeat(np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
  if mode == "F":
    gray = np.asarray(image, np.float64)
    if gray.size and gray.max() <= 1.0:
      gray = gray * 255.0
    return np.repeat(np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
  if mode != "RGB":
    image = image.convert("RGB")
  return np.asarray(image, np.uint8)


def decode_rgb(data: bytes, min_side: int = 0) -> np.ndarray:
  """Encoded image bytes -> uint8 [H, W, 3]. Raises one of DECODE_ERRORS if the bytes are not an image
  or are truncated."""
  if not data:
    raise ValueError("empty file")
  with Image.open(io.BytesIO(data)) as image:
    if min_side and image.format == "JPEG":
      image.draft("RGB", (min_side, min_side))  # DCT-domain downscale of huge JPEGs, >= min_side per side
    image.load()  # decodes fully: truncated files fail here
    if image.width == 0 or image.height == 0:
      raise ValueError(f"image of size {image.width}x{image.height}")
    return to_rgb(image)


def read_file(path: str) -> bytes:
  if "://" in path:
    from simmim_jax.data._tensorflow import tf  # pylint: disable=g-import-not-at-top  (gs:// and other URLs)
    return tf.io.gfile.GFile(path, "rb").read()
  with open(path, "rb") as f:
    return f.read()


def first_readable(files: list[str], folder: str, *, strict: bool = False) -> int:
  """Index of the first decodable file (checked at start, so a folder of broken files fails early)."""
  for index, path in enumerate(files):
    try:
      decode_rgb(read_file(path), min_side=256)
      return index
    except DECODE_ERRORS as e:
      record_skip(path, f"{type(e).__name__}: {e}", strict)
  raise ValueError(f"image folder {folder!r} (data.data_dir) holds {len(files)} image file(s), and none can "
                   "be decoded")
