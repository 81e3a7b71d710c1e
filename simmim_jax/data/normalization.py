"""ImageNet mean/std normalization, in numpy and free of TensorFlow (the visualizer uses it on GPU hosts).

The official SimMIM transform ends with `Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)` (timm constants),
and the reconstruction target is this normalized image (microsoft/SimMIM `data/data_simmim.py`:55; the L1 loss of
`models/simmim.py`:119 compares the reconstruction with that input).
"""

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images) -> np.ndarray:
  """RGB images [..., 3] to ImageNet-normalized float32.

  uint8 input is read as [0, 255]; floating-point input as already scaled to [0, 1].
  """
  images = np.asarray(images)
  if images.shape[-1:] != (3,):
    raise ValueError(f"normalize expects RGB images [..., 3], got shape {images.shape}")
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 255.0
  elif np.issubdtype(images.dtype, np.floating):
    images = images.astype(np.float32)
  else:
    raise ValueError(f"normalize expects uint8 (0-255) or float (0-1) images, got dtype {images.dtype}")
  return (images - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


def denormalize(normalized) -> np.ndarray:
  """Inverse of `normalize`: float32 RGB in [0, 1], clipped (model reconstructions can overshoot)."""
  normalized = np.asarray(normalized, dtype=np.float32)
  if normalized.shape[-1:] != (3,):
    raise ValueError(f"denormalize expects RGB images [..., 3], got shape {normalized.shape}")
  return np.clip(normalized * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN), 0.0, 1.0)
