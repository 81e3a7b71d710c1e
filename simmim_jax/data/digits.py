"""A real labelled dataset that is available offline: scikit-learn's handwritten digits (UCI optdigits test
set: 1,797 images of 8x8 pixels, 16 grey levels, 10 classes) written as a tfds ImageFolder
`root/{train,test}/<digit>/<n>.png`, RGB grey.

  python -m simmim_jax.data.digits workdir/digits        # then data.source="folder", data.data_dir=...

Each digit is drawn at 7/8 of `image_size` (nearest) and centred on a black canvas (MNIST frames its digits
the same way), so at 32 px a digit pixel is 3.5 px wide and the 4-px patches of a ViT straddle its edges.
Drawn at 4 px per digit pixel, every 4-px patch would be one constant grey level: an official-layout ViT (no
absolute position embedding, zero-initialized relative position bias) then starts as a bag of grey levels and
barely learns in a short run.

The split is fixed (a seeded permutation, 80% train / 20% test, stratified by class), so every run and the
benchmark see the same test images. `holdout="val"` writes a validation folder instead: `train` is 80% of
that train split and `val` the other 20% (stratified, seeded), and no test image is written; choose recipes
there, never on the test split. Needs scikit-learn (`pip install 'simmim_jax[benchmarks]'`).
"""

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


def write_digits_folder(root: str, image_size: int = 32, holdout: str = "test") -> dict[str, int]:
  """Writes the folder (skipped if its completion marker exists); returns {"train": n, holdout: n}."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  if holdout not in HOLDOUTS:
    raise ValueError(f"holdout={holdout!r}: use one of {HOLDOUTS}")
  digits = datasets.load_digits()  # ships inside the scikit-learn wheel; no download
  images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # [N, 8, 8]
  labels = digits.target
  split = np.where(stratified_split(labels, TEST_FRACTION, SPLIT_SEED), "test", "train").astype(object)
  if holdout == "val":
    train = np.flatnonzero(split == "train")
    split[train[stratified_split(labels[train], VAL_FRACTION, VAL_SPLIT_SEED)]] = "val"
    split[split == "test"] = None  # never written
  marker = os.path.join(root, f".complete_{image_size}px_v2")  # v2: the framed rendering above
  if not os.path.exists(marker):
    for i, (image, label) in enumerate(zip(images, labels)):
      if split[i] is None:
        continue
      folder = os.path.join(root, split[i], str(label))
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(render(image, image_size)).convert("RGB").save(os.path.join(folder, f"{i:04d}.png"))
    open(marker, "w").close()
  return {s: int(np.sum(split == s)) for s in ("train", holdout)}


if __name__ == "__main__":
  print(write_digits_folder(sys.argv[1] if len(sys.argv) > 1 else "workdir/digits"))
