"""The offline demo dataset: random crops of the real photographs that ship inside scikit-image's wheel.

No download and no TensorFlow: the photos are read with Pillow straight from the installed `skimage/data`
folder (never through `skimage.data`'s pooch fetcher), so `source="demo"` runs anywhere scikit-image is installed.
"""

import concurrent.futures
import importlib.util
import os

import numpy as np
from PIL import Image

# Photographs (not drawings or synthetic test patterns) that scikit-image >= 0.22 ships in its wheel.
# Grayscale ones become RGB with equal channels.
DEMO_PHOTOS = (
    "astronaut.png",          # Eileen Collins, NASA portrait (RGB)
    "brick.png",              # brick wall texture (gray)
    "camera.png",             # cameraman (gray)
    "cell.png",               # cell microscopy (gray)
    "chelsea.png",            # Chelsea the cat (RGB)
    "coffee.png",             # cup of coffee (RGB)
    "coins.png",              # Greek coins (gray)
    "grass.png",              # grass texture (gray)
    "gravel.png",             # gravel texture (gray)
    "hubble_deep_field.jpg",  # Hubble eXtreme Deep Field (RGB)
    "ihc.png",                # immunohistochemistry stain (RGB)
    "moon.png",               # lunar surface (gray)
    "motorcycle_left.png",    # Middlebury stereo motorcycle, left view (RGB)
    "retina.jpg",             # human retina fundus photograph (RGB)
    "rocket.jpg",             # SpaceX Falcon 9 launch (RGB)
)
DEMO_SEED = 0                  # the demo dataset is one fixed dataset, the same for every run seed
MIN_CROP_FRACTION = 0.2        # crop side as a fraction of the photo's shorter side: uniform in [0.2, 1]
MAX_PHOTO_SIDE = 512           # photos are first shrunk to this shorter side, which keeps building fast


def skimage_data_dir() -> str:
  """The `skimage/data` folder of the installed scikit-image wheel (found without importing skimage)."""
  spec = importlib.util.find_spec("skimage")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("data.source='demo' builds its images from scikit-image's sample photos: "
                      "pip install scikit-image (or pip install 'simmim_jax[data]')")
  return os.path.join(list(spec.submodule_search_locations)[0], "data")


def load_demo_photos() -> list[Image.Image]:
  """The DEMO_PHOTOS as RGB Pillow images, shrunk to a shorter side of at most MAX_PHOTO_SIDE."""
  data_dir = skimage_data_dir()
  missing = [name for name in DEMO_PHOTOS if not os.path.isfile(os.path.join(data_dir, name))]
  if missing:
    raise FileNotFoundError(f"scikit-image's wheel at {data_dir} lacks the demo photos {missing}; "
                            "install scikit-image >= 0.22 from its wheel")
  photos = []
  for name in DEMO_PHOTOS:
    with Image.open(os.path.join(data_dir, name)) as photo:
      photo.draft("RGB", (MAX_PHOTO_SIDE, MAX_PHOTO_SIDE))  # JPEGs: decode at a reduced scale (fast)
      photo = photo.convert("RGB")
    shrink = MAX_PHOTO_SIDE / min(photo.size)
    if shrink < 1:
      photo = photo.resize((round(photo.width * shrink), round(photo.height * shrink)), Image.Resampling.BICUBIC)
    photos.append(photo)
  return photos


def _pyramid(photo: Image.Image, image_size: int) -> list[Image.Image]:
  """[photo, photo / 2, photo / 4, ...] down to a shorter side of 2 * image_size: crops resize from a level
  at most twice their output size, which is as sharp as resizing from full resolution and much faster."""
  levels = [photo]
  while min(levels[-1].size) // 2 >= 2 * image_size:
    levels.append(levels[-1].reduce(2))
  return levels


def make_demo_images(num_images: int, image_size: int = 96) -> np.ndarray:
  """`num_images` square uint8 RGB crops [num_images, image_size, image_size, 3] of the demo photos.

  Crop k takes a uniformly chosen photo, a side uniform in [MIN_CROP_FRACTION, 1] x the photo's shorter side and
  a uniform position, and resizes it (bicubic, antialiased) to image_size. Deterministic: the same arrays on every
  call and machine for a given scikit-image wheel, and the first n images do not depend on num_images.
  """
  if num_images < 1 or image_size < 1:
    raise ValueError(f"num_images and image_size must be positive, got {num_images} and {image_size}")
  pyramids = [_pyramid(photo, image_size) for photo in load_demo_photos()]
  # All random draws first, in a fixed order; the crops are then independent (and run in threads: Pillow
  # releases the GIL while resizing).
  # Row k holds crop k's draws, so a smaller dataset is a prefix of a larger one.
  draws = np.random.default_rng(DEMO_SEED).random((num_images, 4))  # [N, (photo, side, left, top)]
  photo_index = (draws[:, 0] * len(pyramids)).astype(np.int64)
  side_fraction = MIN_CROP_FRACTION + (1.0 - MIN_CROP_FRACTION) * draws[:, 1]
  left_fraction, top_fraction = draws[:, 2], draws[:, 3]

  def crop(k: int) -> np.ndarray:
    pyramid = pyramids[photo_index[k]]
    width, height = pyramid[0].size
    side = side_fraction[k] * min(width, height)
    left, top = left_fraction[k] * (width - side), top_fraction[k] * (height - side)
    level = 0
    while level + 1 < len(pyramid) and side / 2 ** (level + 1) >= 2 * image_size:
      level += 1
    box = tuple(v / 2 ** level for v in (left, top, left + side, top + side))
    return np.asarray(pyramid[level].resize((image_size, image_size), Image.Resampling.BICUBIC, box=box))

  with concurrent.futures.ThreadPoolExecutor() as pool:
    return np.stack(list(pool.map(crop, range(num_images))))
