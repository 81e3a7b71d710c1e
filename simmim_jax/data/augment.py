"""The official SimMIM pretraining transform in TensorFlow, with stateless randomness.

torchvision's RandomResizedCrop(img_size, scale=(0.67, 1), ratio=(3/4, 4/3), bilinear), RandomHorizontalFlip,
ToTensor and Normalize(ImageNet mean, std) (microsoft/SimMIM `data/data_simmim.py`:50-56, `SimMIMTransform`).
Every random choice is a function of a `seed` tensor of shape [2], so a sample's augmentation does not depend on
which host or thread computes it.
"""

import math

from simmim_jax.data import normalization
from simmim_jax.data._tensorflow import tf

CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """[H, W, C] with C in {1, 2, 3, 4} (gray, gray+alpha, RGB, RGBA) to [H, W, 3]; alpha is dropped."""
  channels = tf.shape(image)[-1]
  image = tf.cond(channels < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
  return tf.ensure_shape(image, [None, None, 3])


def sample_crop_window(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor, scale: tuple[float, float],
                       ratio: tuple[float, float]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """torchvision's `RandomResizedCrop.get_params`, stateless: (top, left, crop_height, crop_width), int32.

  Tries CROP_ATTEMPTS windows with area fraction ~ U(scale) and log aspect ratio (width / height) ~ U(log ratio),
  and takes the first that fits in the image, at a uniform position. If none fits, it falls back to the largest
  centred window whose aspect ratio is clamped to the ratio range.
  """
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  height64, width64 = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  target_area = height64 * width64 * tf.random.stateless_uniform(
      [CROP_ATTEMPTS], area_seed, scale[0], scale[1], dtype=tf.float64)
  aspect_ratio = tf.exp(tf.random.stateless_uniform(
      [CROP_ATTEMPTS], ratio_seed, math.log(ratio[0]), math.log(ratio[1]), dtype=tf.float64))
  # tf.round rounds half to even, like Python's round() in torchvision.
  crop_widths = tf.cast(tf.round(tf.sqrt(target_area * aspect_ratio)), tf.int32)
  crop_heights = tf.cast(tf.round(tf.sqrt(target_area / aspect_ratio)), tf.int32)
  fits = (crop_widths > 0) & (crop_widths <= width) & (crop_heights > 0) & (crop_heights <= height)
  first_fit = tf.argmax(tf.cast(fits, tf.int32))  # index of the first fitting attempt (0 if none fits)

  # Fallback: the whole image, cut to the nearest ratio bound if its own ratio is outside the range.
  image_ratio = width64 / height64
  fallback_width = tf.where(image_ratio > ratio[1], tf.cast(tf.round(height64 * ratio[1]), tf.int32), width)
  fallback_height = tf.where(image_ratio < ratio[0], tf.cast(tf.round(width64 / ratio[0]), tf.int32), height)

  any_fit = tf.reduce_any(fits)
  crop_height = tf.where(any_fit, crop_heights[first_fit], fallback_height)
  crop_width = tf.where(any_fit, crop_widths[first_fit], fallback_width)
  random_top = tf.random.stateless_uniform([], top_seed, 0, height - crop_height + 1, dtype=tf.int32)
  random_left = tf.random.stateless_uniform([], left_seed, 0, width - crop_width + 1, dtype=tf.int32)
  top = tf.where(any_fit, random_top, (height - crop_height) // 2)
  left = tf.where(any_fit, random_left, (width - crop_width) // 2)
  return top, left, crop_height, crop_width


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, image_size: int, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> tf.Tensor:
  """[H, W, 3] (any size, any real dtype) to float32 [image_size, image_size, 3] in the input's value range.

  Bilinear with antialiasing when shrinking, as Pillow's bilinear resize in torchvision's PIL path.
  """
  shape = tf.shape(image)
  top, left, crop_height, crop_width = sample_crop_window(seed, shape[0], shape[1], scale, ratio)
  crop = image[top:top + crop_height, left:left + crop_width]
  return tf.image.resize(crop, [image_size, image_size], method="bilinear", antialias=True)


def pretrain_transform(image: tf.Tensor, seed: tf.Tensor, *, image_size: int, crop_scale: tuple[float, float],
                       crop_ratio: tuple[float, float], horizontal_flip: bool) -> tf.Tensor:
  """uint8 [H, W, C] image (gray, RGB or RGBA, any size) to the ImageNet-normalized float32
  [image_size, image_size, 3] model input, as the official SimMIM pretraining transform."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = random_resized_crop(to_rgb(image), crop_seed, image_size, crop_scale, crop_ratio)
  if horizontal_flip:  # RandomHorizontalFlip(p=0.5)
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
  mean = tf.constant(normalization.IMAGENET_MEAN, tf.float32)
  std = tf.constant(normalization.IMAGENET_STD, tf.float32)
  return (image / 255.0 - mean) / std
