"""A real labelled dataset that is available offline: scikit-learn's handwritten digits (UCI optdigits test
set: 1,797 images of 8x8 pixels, 16 grey levels, 10 classes) written as a tfds ImageFolder
`root/{train,test}/<digit>/<n>.png`, upsampled to `image_size` (nearest) and tinted to RGB as grey.

  python -m simmim_jax.data.digits workdir/digits        # then data.source="folder", data.data_dir=...

The split is fixed (a seeded permutation, 80% train / 20% test, stratified by class), so every run and the
benchmark see the same test images. Needs scikit-learn (`pip install 'simmim_jax[benchmarks]'`).
"""

import os
import sys

import numpy as np
from PIL import Image

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def write_digits_folder(root: str, image_size: int = 32) -> dict[str, int]:
  """Writes the folder (skipped if `root/.complete` exists); returns {"train": n, "test": n}."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()  # ships inside the scikit-learn wheel; no download
  images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # [N, 8, 8]
  labels = digits.target
  rng = np.random.default_rng(SPLIT_SEED)
  split = np.empty(len(labels), dtype=object)
  for digit in range(10):
    members = rng.permutation(np.flatnonzero(labels == digit))
    num_test = int(round(len(members) * TEST_FRACTION))
    split[members[:num_test]], split[members[num_test:]] = "test", "train"
  marker = os.path.join(root, ".complete")
  if not os.path.exists(marker):
    factor = image_size // 8
    for i, (image, label) in enumerate(zip(images, labels)):
      folder = os.path.join(root, split[i], str(label))
      os.makedirs(folder, exist_ok=True)
      big = np.repeat(np.repeat(image, factor, 0), factor, 1)
      Image.fromarray(big).convert("RGB").save(os.path.join(folder, f"{i:04d}.png"))
    open(marker, "w").close()
  return {s: int(np.sum(split == s)) for s in ("train", "test")}


if __name__ == "__main__":
  print(write_digits_folder(sys.argv[1] if len(sys.argv) > 1 else "workdir/digits"))
