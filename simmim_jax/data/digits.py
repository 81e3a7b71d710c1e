"""A real labelled dataset that is available offline: scikit-learn's handwritten digits (UCI optdigits test
set: 1,797 images of 8x8 pixels, 16 grey levels, 10 classes), RGB grey.

Two forms of the same images, labels and split:
  * `data.source="digits"` (fine-tuning and linear probing): rendered in memory at the run's `img_size`, no
    files and no data step; `data.eval_split` "test" or "val" picks the holdout below.
  * a tfds ImageFolder `root/{train,test}/<digit>/<n>.png` for `data.source="folder"` (the benchmark):
      python -m simmim_jax.data.digits workdir/digits    # or write_digits_folder(root, size, holdout="val")

Each digit is drawn at 7/8 of `image_size` (nearest) and centred on a black canvas (MNIST frames its digits
the same way), so at 32 px a digit pixel is 3.5 px wide and the 4-px patches of a ViT straddle its edges.
Drawn at 4 px per digit pixel, every 4-px patch would be one constant grey level: an official-layout ViT (no
absolute position embedding, zero-initialized relative position bias) then starts as a bag of grey levels and
barely learns in a short run.

The split is fixed (a seeded permutation, 80% train / 20% test, stratified by class), so every run and the
benchmark see the same test images. Holdout "val" replaces the test split by a validation split: `train` is
80% of that train split and `val` the other 20% (stratified, seeded), and no test image is used; choose
recipes there, never on the test split. Both forms list a split in the folder's file order (by class, then by
image number), so "digits" and "folder" on the written folder yield the same batches. Needs scikit-learn
(`pip install 'simmim_jax[data]'`), whose wheel ships the digits.
"""

import functools
import os
import sys

import numpy as np
from PIL import Image

SPLIT_SEED = 0
VAL_SPLIT_SEED = 1
TEST_FRACTION = 0.2
VAL_FRACTION = 0.2
DIGIT_FRACTION = 7 / 8  # of the image side; the rest is a black frame
HOLDOUTS = ("test", "val")
NUM_CLASSES = 10


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Bool [N]: True for the held-out round(fraction * n_c) members of each class c (a seeded choice)."""
  rng = np.random.default_rng(seed)
  held_out = np.zeros(len(labels), bool)
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    held_out[members[:int(round(len(members) * fraction))]] = True
  return held_out


def render(image: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 [8, 8] -> uint8 [S, S]: nearest resize to round(7/8 S), centred on black."""
  digit_size = int(round(image_size * DIGIT_FRACTION))
  canvas = np.zeros((image_size, image_size), np.uint8)
  offset = (image_size - digit_size) // 2
  canvas[offset:offset + digit_size, offset:offset + digit_size] = np.asarray(
      Image.fromarray(image).resize((digit_size, digit_size), Image.NEAREST))
  return canvas


@functools.cache
def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [1797, 8, 8] images on 0-255, int64 [1797] labels) from scikit-learn's wheel (no download)."""
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("the digits ship inside scikit-learn's wheel: pip install scikit-learn "
                      "(or pip install 'simmim_jax[data]')") from None
  digits = datasets.load_digits()
  images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
  images.flags.writeable = False
  labels = digits.target.astype(np.int64)
  labels.flags.writeable = False
  return images, labels


def split_of(labels: np.ndarray, holdout: str = "test") -> np.ndarray:
  """object [N]: the split name of each image ("train", `holdout`), None where holdout="val" drops a test image."""
  if holdout not in HOLDOUTS:
    raise ValueError(f"holdout={holdout!r}: use one of {HOLDOUTS}")
  split = np.where(stratified_split(labels, TEST_FRACTION, SPLIT_SEED), "test", "train").astype(object)
  if holdout == "val":
    train = np.flatnonzero(split == "train")
    split[train[stratified_split(labels[train], VAL_FRACTION, VAL_SPLIT_SEED)]] = "val"
    split[split == "test"] = None  # never used
  return split


def holdout_of(split: str) -> str:
  """The holdout that defines `split`: "val" for "val", else "test"."""
  return "val" if split == "val" else "test"


def split_indices(split: str, holdout: str | None = None) -> np.ndarray:
  """int64 indices (into `load_digits()`) of `split` ("train", "test" or "val") in the folder's file order:
  by class, then by image number. `holdout` defaults to the one `split` implies ("train" -> "test")."""
  holdout = holdout or holdout_of(split)
  if split not in ("train", holdout):
    raise ValueError(f"split {split!r}: the digits have 'train' and {holdout!r} (holdout {holdout!r})")
  _, labels = load_digits()
  members = np.flatnonzero(split_of(labels, holdout) == split)
  return members[np.lexsort((members, labels[members]))]


@functools.lru_cache(maxsize=4)
def digits_split(split: str, image_size: int, holdout: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [n, S, S, 1] grey images, int64 [n] labels) of `split`, rendered at `image_size`, in the folder's
  file order (see `split_indices`). Cached; read-only."""
  images, labels = load_digits()
  index = split_indices(split, holdout)
  rendered = np.stack([render(images[i], image_size) for i in index])[..., None]
  rendered.flags.writeable = False
  return rendered, labels[index]


def write_digits_folder(root: str, image_size: int = 32, holdout: str = "test") -> dict[str, int]:
  """Writes the folder (skipped if its completion marker exists); returns {"train": n, holdout: n}."""
  images, labels = load_digits()
  counts = {s: len(split_indices(s, holdout)) for s in ("train", holdout)}
  marker = os.path.join(root, f".complete_{image_size}px_v2")  # v2: the framed rendering above
  if not os.path.exists(marker):
    for split in counts:
      for i in split_indices(split, holdout):
        folder = os.path.join(root, split, str(labels[i]))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(render(images[i], image_size)).convert("RGB").save(os.path.join(folder, f"{i:04d}.png"))
    open(marker, "w").close()
  return counts


if __name__ == "__main__":
  print(write_digits_folder(sys.argv[1] if len(sys.argv) > 1 else "workdir/digits"))
