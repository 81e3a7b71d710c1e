"""timm's RandAugment (`rand_augment_transform`, e.g. "rand-m9-mstd0.5-inc1") in TensorFlow, stateless.

Written by hand: timm is PyTorch/PIL, and the maintained TF implementations (tensorflow-models'
`augment.RandAugment`, keras-cv's `RandAugment`) use other op lists and magnitude rules, and come with very
large packages. Semantics follow timm 0.9 `auto_augment.py`:
  * "rand-m{M}-n{N}-mstd{S}-mmax{X}-inc{0|1}": N ops (default 2) chosen uniformly *with* replacement, each
    applied with probability 0.5, at magnitude M (out of 10) plus Gaussian noise of std S, clipped to
    [0, mmax=10]. "inc1" selects the "increasing" op set (stronger with M for every op).
  * ops (inc1): AutoContrast, Equalize, Invert, Rotate (30 deg * M/10), PosterizeIncreasing
    (4 - int(4 M/10) bits), SolarizeIncreasing (threshold 256 - int(256 M/10)), SolarizeAdd (+int(110 M/10)
    below 128), Color/Contrast/Brightness/SharpnessIncreasing (factor 1 +- 0.9 M/10), ShearX/Y (0.3 M/10),
    TranslateXRel/YRel (0.45 M/10 of the side); signed magnitudes are negated with probability 0.5.
  * geometric ops fill with the ImageNet mean colour (124, 116, 104), as timm's `img_mean` hparam.
Deviations: geometric ops interpolate bilinearly (timm: the pipeline's bicubic; TF's projective transform
has no bicubic) on integer pixel centres; the images are float32 in [0, 255] rounded after every op, as
PIL's uint8 images.
"""

import math

from simmim_jax.data._tensorflow import tf

LEVEL_DENOMINATOR = 10.0
FILL_COLOR = (124.0, 116.0, 104.0)  # round(255 * IMAGENET_MEAN)
OP_PROBABILITY = 0.5


def parse_config(config_str: str) -> dict:
  """"rand-m9-mstd0.5-inc1" -> {"magnitude": 9.0, "num_ops": 2, "magnitude_std": 0.5, "magnitude_max": 10.0,
  "increasing": True}. Raises ValueError on anything else."""
  parts = config_str.split("-")
  if parts[0] != "rand":
    raise ValueError(f"RandAugment config {config_str!r} must start with 'rand-' (timm syntax)")
  parsed = {"magnitude": 10.0, "num_ops": 2, "magnitude_std": 0.0, "magnitude_max": LEVEL_DENOMINATOR,
            "increasing": False}
  fields = (("mstd", "magnitude_std", float), ("mmax", "magnitude_max", float),
            ("inc", "increasing", lambda v: bool(int(v))), ("m", "magnitude", float), ("n", "num_ops", int))
  for part in parts[1:]:
    matches = [(prefix, key, cast) for prefix, key, cast in fields if part.startswith(prefix)]
    if not matches:
      raise ValueError(f"RandAugment config {config_str!r}: unknown part {part!r}")
    prefix, key, cast = matches[0]
    parsed[key] = cast(part[len(prefix):])
  if not parsed["increasing"]:
    raise ValueError(f"RandAugment config {config_str!r}: only the 'inc1' op set (official SimMIM) is implemented")
  return parsed


def _round(image):
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def _blend(degenerate, image, factor):  # PIL ImageEnhance: degenerate + factor * (image - degenerate)
  return _round(degenerate + factor * (image - degenerate))


def _grayscale(image):
  return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def _sharpness_degenerate(image):
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = _round(smooth)
  # PIL's SMOOTH filter leaves the one-pixel border unchanged.
  return tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]) * _interior_mask(image) + image * (1 - _interior_mask(image))


def _interior_mask(image):
  shape = tf.shape(image)
  inner = tf.ones([shape[0] - 2, shape[1] - 2, 3])
  return tf.pad(inner, [[1, 1], [1, 1], [0, 0]])


def _autocontrast(image):
  low = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  high = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scaled = (image - low) * 255.0 / tf.maximum(high - low, 1.0)
  return _round(tf.where(high > low, scaled, image))


def _equalize(image):
  def channel(values):  # PIL ImageOps.equalize on one channel
    values = tf.cast(values, tf.int32)
    histogram = tf.histogram_fixed_width(values, [0, 255], nbins=256)
    nonzero = tf.boolean_mask(histogram, histogram > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.cast(tf.where(step == 0, values, tf.gather(lut, values)), tf.float32)

  return tf.stack([channel(image[..., c]) for c in range(3)], axis=-1)


def _affine(image, matrix):
  """Output pixel (x, y) samples the input at (a0 x + a1 y + a2, b0 x + b1 y + b2) (PIL AFFINE data);
  outside the image: FILL_COLOR (TF fills with a scalar, so the fill is shifted to 0 and back)."""
  fill = tf.constant(FILL_COLOR, tf.float32)
  transform = tf.concat([tf.cast(tf.stack(matrix), tf.float32), tf.zeros([2])], 0)[None]
  shape = tf.shape(image)[:2]
  out = tf.raw_ops.ImageProjectiveTransformV3(images=(image - fill)[None], transforms=transform,
                                              output_shape=shape, fill_value=0.0, interpolation="BILINEAR",
                                              fill_mode="CONSTANT")[0]
  return _round(out + fill)


def _rotate(image, degrees):
  height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  angle = -degrees * math.pi / 180.0  # PIL rotates counter-clockwise; the matrix maps output -> input
  cx, cy = width / 2.0, height / 2.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  return _affine(image, [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])


def _posterize(image, bits):
  shift = tf.cast(8 - bits, tf.int32)
  as_int = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(as_int, shift), shift), tf.float32)


def _solarize(image, threshold):
  return tf.where(image < threshold, image, 255.0 - image)


def _ops(image, magnitude, sign):
  """The 15 "increasing" ops as zero-argument branches for tf.switch_case (timm _RAND_INCREASING_TRANSFORMS)."""
  level = magnitude / LEVEL_DENOMINATOR
  signed = lambda v: v * sign
  width = tf.cast(tf.shape(image)[1], tf.float32)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  enhance = 1.0 + signed(level * 0.9)
  return [
      lambda: _autocontrast(image),
      lambda: _equalize(image),
      lambda: 255.0 - image,                                                        # Invert
      lambda: _rotate(image, signed(level * 30.0)),
      lambda: _posterize(image, 4 - tf.cast(level * 4.0, tf.int32)),                # PosterizeIncreasing
      lambda: _solarize(image, 256.0 - tf.floor(level * 256.0)),                    # SolarizeIncreasing
      lambda: tf.where(image < 128.0, tf.minimum(image + tf.floor(level * 110.0), 255.0), image),  # SolarizeAdd
      lambda: _blend(_grayscale(image), image, enhance),                            # ColorIncreasing
      lambda: _blend(tf.fill(tf.shape(image), tf.round(tf.reduce_mean(_grayscale(image)))), image, enhance),
      lambda: _blend(tf.zeros_like(image), image, enhance),                         # BrightnessIncreasing
      lambda: _blend(_sharpness_degenerate(image), image, enhance),                 # SharpnessIncreasing
      lambda: _affine(image, [1.0, signed(level * 0.3), 0.0, 0.0, 1.0, 0.0]),       # ShearX
      lambda: _affine(image, [1.0, 0.0, 0.0, signed(level * 0.3), 1.0, 0.0]),       # ShearY
      lambda: _affine(image, [1.0, 0.0, signed(level * 0.45) * width, 0.0, 1.0, 0.0]),   # TranslateXRel
      lambda: _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, signed(level * 0.45) * height]),  # TranslateYRel
  ]


NUM_OPS = 15


def rand_augment(image: tf.Tensor, seed: tf.Tensor, config_str: str) -> tf.Tensor:
  """float32 [H, W, 3] in [0, 255] -> the same after timm's RandAugment `config_str`; seed: int [2]."""
  params = parse_config(config_str)
  image = tf.ensure_shape(tf.cast(image, tf.float32), [None, None, 3])
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, params["num_ops"])):
    op_seed, apply_seed, magnitude_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 4))
    op = tf.random.stateless_uniform([], op_seed, 0, NUM_OPS, dtype=tf.int32)
    magnitude = params["magnitude"] + params["magnitude_std"] * tf.random.stateless_normal([], magnitude_seed)
    magnitude = tf.clip_by_value(magnitude, 0.0, params["magnitude_max"])
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) > 0.5, -1.0, 1.0)
    augmented = tf.switch_case(op, _ops(image, magnitude, sign))
    apply = tf.random.stateless_uniform([], apply_seed) < OP_PROBABILITY
    image = tf.ensure_shape(tf.where(apply, augmented, image), [None, None, 3])
  return image
