"""Image decoding that survives real folders: any mode PIL reads becomes 8-bit RGB, and a file that cannot
be decoded is skipped, counted and logged once (or, in strict mode, stops the run naming the file).

TF-free (Pillow + numpy). The tf.data pipeline calls `load_image_file` through `tf.numpy_function`.
Modes: RGB as is; grayscale (L, 1), palette (P, PA), CMYK, YCbCr, LAB, HSV through Pillow's RGB
conversion; alpha (RGBA, LA) dropped; 16-bit and 32-bit integer grayscale (I;16, I) and float (F) scaled
from their 0-65535 / 0-1 ranges. Huge JPEGs are decoded at a reduced scale (JPEG draft mode), never below
`min_side` pixels on the short side.

Size bound: a file declares its width and height in its header, and a few bytes can declare 30000 x 30000
pixels (gigabytes once decoded). `decode_rgb` reads the header first (PIL.Image.open decodes nothing) and
refuses, before decoding, an image of more than `max_pixels` pixels (`max_image_pixels`: by default
max(64 x the output area, 40 M pixels), `config.data.max_image_pixels` overrides it). A JPEG is judged at
the size it is decoded at (after draft mode), so a 50-megapixel camera JPEG passes. A refused image is an
undecodable one: skipped and counted, or an error naming it in strict mode. Pillow's own bomb check stays at
its default (it refuses images over 2 x PIL.Image.MAX_IMAGE_PIXELS, about 179 M pixels, whatever the bound);
this module does not change that global. The fine-tuning folder source decodes with TensorFlow at the full size;
`read_image_file` applies the same bound to the declared size there (no draft: a 50-megapixel JPEG needs a
higher `config.data.max_image_pixels`), and a refused file stops the run naming it.

Files: `load_image_file` (the pretraining folder source, `simmim-reconstruct --image`) and `read_image_file`
(the fine-tuning folder source) read only regular files (`simmim_jax.data.input_files`): a FIFO, a device, a link
to /dev/zero or a folder named like an image is refused before it is opened, never read or waited on, and so
is a file larger than `max_image_bytes(max_pixels)` (8 bytes per allowed pixel, the most any uncompressed
format Pillow reads stores, + 16 MiB of metadata) before a byte of it is read: a sparse 2 GB `.jpg` costs
nothing. Such a file is an undecodable one (skipped and counted, or an error naming it in strict mode).
`load_image_file` hands Pillow the open file: it reads the header, the pixel bound applies, then it decodes.
"""

import io
import threading
from typing import BinaryIO

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from simmim_jax.data import input_files

OUTPUT_AREA_FACTOR = 64         # default bound: 64 x img_size ** 2 pixels ...
MIN_DEFAULT_MAX_PIXELS = 40_000_000  # ... and never below 40 M pixels (a 7300 x 5500 photo)
# Bytes a file may hold per allowed pixel: 16-bit RGBA / CMYK stored uncompressed (TIFF, BMP, PNG at level 0)
# is the most Pillow reads; compressed formats take far less. Plus room for metadata (EXIF, ICC, XMP).
MAX_BYTES_PER_PIXEL, MAX_METADATA_BYTES = 8, 16 << 20

# DecompressionBombWarning (Pillow, 89-179 M pixels) is an exception where warnings are errors (-W error).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError,
                 Image.DecompressionBombWarning, EOFError, MemoryError)


class UndecodableImageError(ValueError):
  """An image file could not be decoded (raised in strict mode)."""


class ImageTooLargeError(ValueError):
  """An image declares more pixels than the configured bound (refused before decoding)."""


class DataError(RuntimeError):
  """The input pipeline stopped (e.g. an undecodable image in strict mode); the message names the cause."""


def max_image_pixels(image_size: int, configured: int = 0) -> int:
  """The most pixels an image may declare: `configured` (config.data.max_image_pixels) when > 0, else
  max(OUTPUT_AREA_FACTOR * image_size ** 2, MIN_DEFAULT_MAX_PIXELS). Raises ValueError if `configured` < 0."""
  configured = int(configured or 0)
  if configured < 0:
    raise ValueError(f"data.max_image_pixels must be >= 0 (0 = max({OUTPUT_AREA_FACTOR} x img_size**2, "
                     f"{MIN_DEFAULT_MAX_PIXELS:,}) pixels), got {configured}")
  return configured or max(OUTPUT_AREA_FACTOR * int(image_size) ** 2, MIN_DEFAULT_MAX_PIXELS)


def max_image_bytes(max_pixels: int) -> int:
  """The most bytes an image file may hold: MAX_BYTES_PER_PIXEL x `max_pixels` (0: Pillow's own bound,
  2 x Image.MAX_IMAGE_PIXELS) + MAX_METADATA_BYTES; a larger file is refused before it is read."""
  pixels = max_pixels or 2 * (Image.MAX_IMAGE_PIXELS or MIN_DEFAULT_MAX_PIXELS)
  return MAX_BYTES_PER_PIXEL * pixels + MAX_METADATA_BYTES


def check_size(size: tuple[int, int], max_pixels: int) -> None:
  """Raises ImageTooLargeError if a (width, height) holds more than `max_pixels` pixels (0 = no bound)."""
  width, height = size
  if max_pixels and width * height > max_pixels:
    raise ImageTooLargeError(f"image declares {width}x{height} = {width * height:,} pixels, more than the bound "
                             f"of {max_pixels:,} (config.data.max_image_pixels; 0 = max({OUTPUT_AREA_FACTOR} x "
                             f"img_size**2, {MIN_DEFAULT_MAX_PIXELS:,}))")


def one_line(text: str) -> str:
  """`text` with control characters escaped (a file name or error with a newline cannot forge a log line)."""
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class SkipCounter:
  """The files one input iterator skipped as undecodable (a run's own count, not the process's): each is logged
  the first time and counted once. Thread-safe (tf.data calls the loaders from its threads)."""

  def __init__(self):
    self._reasons: dict[str, str] = {}
    self._lock = threading.Lock()

  @property
  def count(self) -> int:
    with self._lock:
      return len(self._reasons)

  def record(self, name: str, reason: str, strict: bool = False) -> None:
    """Counts a skipped file and logs it once; raises UndecodableImageError when `strict`. The name is logged
    as repr(name) and the reason with control characters escaped: one log line per skip, whatever the name."""
    if strict:
      raise undecodable(name, reason)
    with self._lock:
      first_time = name not in self._reasons
      self._reasons[name] = reason
    if first_time:
      logging.warning("Skipping undecodable image %r: %s", name, one_line(reason))

  def record_carried(self, carried) -> None:
    """Records the skips that samples carry from other processes (Grain workers): `skip_note` strings."""
    for note in carried:
      for line in filter(None, bytes(note).split(b"\n")):
        name, _, reason = line.decode(errors="replace").partition("\t")
        self.record(name, reason)


def undecodable(name: str, reason: str) -> UndecodableImageError:
  """The strict mode's error for the file `name` (config.data.strict)."""
  return UndecodableImageError(f"cannot decode image {name!r}: {one_line(reason)} (config.data.strict=True; set "
                               "it to False to skip undecodable images)")


def skip_note(name: str, reason: str) -> bytes:
  """A skip as a sample carries it out of a worker process (`SkipCounter.record_carried`)."""
  return f"{name}\t{one_line(reason)}".replace("\n", " ").encode()


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


def decode_rgb(data: bytes | BinaryIO, min_side: int = 0, max_pixels: int = MIN_DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Encoded image bytes (or an open binary file) -> uint8 [H, W, 3]. Raises one of DECODE_ERRORS if the bytes
  are not an image, are truncated, or declare more than `max_pixels` pixels (ImageTooLargeError, before any
  decoding; 0 = no bound of ours, Pillow's own still applies)."""
  if isinstance(data, (bytes, bytearray, memoryview)):
    if not data:
      raise ValueError("empty file")
    data = io.BytesIO(data)
  try:
    image = Image.open(data)  # reads the header only
  except UnidentifiedImageError:
    raise UnidentifiedImageError("not an image format Pillow reads") from None  # not "<_io.BytesIO at 0x...>"
  with image:
    if min_side and image.format == "JPEG":
      image.draft("RGB", (min_side, min_side))  # DCT-domain downscale of huge JPEGs, >= min_side per side
    check_size(image.size, max_pixels)  # the size load() would allocate (a JPEG's after draft)
    image.load()  # decodes fully: truncated files fail here
    if image.width == 0 or image.height == 0:
      raise ValueError(f"image of size {image.width}x{image.height}")
    return to_rgb(image)


def load_image_file(path: str, min_side: int = 0, max_pixels: int = MIN_DEFAULT_MAX_PIXELS) -> np.ndarray:
  """The image file at `path` -> uint8 [H, W, 3], bounded (module docstring): only a regular file of at most
  `max_image_bytes(max_pixels)` bytes is opened, and Pillow reads its header from the open file, so the pixel
  bound applies before decoding. Raises one of DECODE_ERRORS (a missing file: OSError)."""
  with input_files.open_regular(path, max_image_bytes(max_pixels), "image file") as f:
    if not f.read(1):
      raise ValueError("empty file")
    f.seek(0)
    return decode_rgb(f, min_side, max_pixels)


def read_image_file(path: str, max_pixels: int = MIN_DEFAULT_MAX_PIXELS) -> bytes:
  """The bytes of the image file at `path`, for a decoder other than Pillow (TensorFlow's, at the full size):
  `load_image_file`'s file rules, then Pillow reads the header: bytes it cannot identify, or that declare more
  than `max_pixels` pixels, are refused. Raises one of DECODE_ERRORS."""
  data = input_files.read_regular(path, max_image_bytes(max_pixels), "image file")
  if not data:
    raise ValueError("empty file")
  try:
    with Image.open(io.BytesIO(data)) as image:  # the header only
      size = image.size
  except UnidentifiedImageError:
    raise UnidentifiedImageError("not an image format Pillow reads") from None
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageTooLargeError(str(e)) from None
  check_size(size, max_pixels)
  return data


def first_readable(files: list[str], folder: str, *, strict: bool = False,
                   max_pixels: int = MIN_DEFAULT_MAX_PIXELS, skips: SkipCounter | None = None) -> int:
  """Index of the first decodable file (checked at start, so a folder of broken files fails early); the files
  before it are skipped into `skips`."""
  skips = SkipCounter() if skips is None else skips
  for index, path in enumerate(files):
    try:
      load_image_file(path, min_side=256, max_pixels=max_pixels)
      return index
    except DECODE_ERRORS as e:
      skips.record(path, f"{type(e).__name__}: {e}", strict)
  raise ValueError(f"image folder {folder!r} (data.data_dir) holds {len(files)} image file(s), and none can "
                   "be decoded")
