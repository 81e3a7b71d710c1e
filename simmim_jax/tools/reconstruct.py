"""simmim-reconstruct: the SimMIM reconstruction of any image, from a converted or a trained model.

  simmim-reconstruct --checkpoint=WORKDIR --image=photo.jpg --out=grid.png [--mask_ratio=0.6 --seed=0]
  simmim-reconstruct --checkpoint=simmim_pretrain.pth --encoder=vit_base_patch16 --image=... --out=...

The image is resized (shorter side, bicubic) and centre-cropped to the model's input size, normalized with
the ImageNet mean / std, masked with a random SimMIM block mask (`--mask_patch_size`, default the run's),
and reconstructed; the PNG shows original | masked | prediction | prediction pasted into the visible
pixels (`visualize.reconstruction_grid`). `--checkpoint` is a `simmim-pretrain` / `simmim-convert` workdir,
or a PyTorch SimMIM checkpoint file converted on the fly (`--encoder` then names the encoder).
TF-free: numpy, pillow and JAX.
"""

import functools
import os

import jax
import numpy as np
from PIL import Image

from simmim_jax import models
from simmim_jax.storage import visualize
from simmim_jax.storage import workdir as workdir_lib
from simmim_jax.data import decode, normalization


def load_image(path: str, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: RGB, shorter side resized to `size` (bicubic), centre crop. The file is read as
  the training data is (`decode.load_image_file`: a regular file of bounded size, at most
  `decode.max_image_pixels(size)` pixels declared, refused before decoding); a refusal is a ValueError."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"image file {path} does not exist")
  try:
    image = Image.fromarray(decode.load_image_file(path, min_side=size, max_pixels=decode.max_image_pixels(size)))
  except decode.DECODE_ERRORS as e:
    raise ValueError(f"cannot read the image {path}: {type(e).__name__}: {decode.one_line(e)}") from None
  width, height = image.size
  scale = size / min(width, height)
  resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
  left, top = (resized.width - size) // 2, (resized.height - size) // 2
  return np.asarray(resized.crop((left, top, left + size, top + size)))


def load_simmim(checkpoint_path: str, encoder: str | None = None, **overrides):
  """(SimMIM model, variables, mask_patch_size) from a workdir or a PyTorch SimMIM checkpoint file."""
  if os.path.isdir(checkpoint_path):
    if not os.path.exists(os.path.join(checkpoint_path, workdir_lib.CONFIG_FILENAME)):
      raise FileNotFoundError(f"{checkpoint_path} has no {workdir_lib.CONFIG_FILENAME}: not a simmim-pretrain or "
                              "simmim-convert workdir")
    model, variables, config = workdir_lib.load_model(checkpoint_path, recipes=workdir_lib.SIMMIM_RECIPES)
    return model, variables, int(config.mask_patch_size)
  if not os.path.exists(checkpoint_path):
    raise FileNotFoundError(f"checkpoint {checkpoint_path} does not exist (give a workdir or a .pth / "
                            ".safetensors / .npz file)")
  from simmim_jax.storage import convert, torch_files  # pylint: disable=g-import-not-at-top

  if not encoder:
    raise ValueError(f"--checkpoint={checkpoint_path} is a file: name its encoder with --encoder=NAME")
  model, variables = convert.from_torch(torch_files.load_state_dict(checkpoint_path), encoder=encoder, **overrides)
  if not isinstance(model, models.SimMIM):
    raise ValueError(f"{checkpoint_path} holds no SimMIM decoder (decoder.0.*): it cannot reconstruct images")
  return model, variables, 32  # the paper's mask patch size


def reconstruct(model: models.SimMIM, variables: dict, image: np.ndarray, *, mask_patch_size: int,
                mask_ratio: float, seed: int, scale: int = 1) -> np.ndarray:
  """The uint8 reconstruction grid of one uint8 image [H, W, 3] at the model's size, upscaled `scale` times,
  with its column labels (`visualize.reconstruction_grid`)."""
  size = model.encoder.img_size
  if mask_patch_size % model.encoder.patch_size or size % mask_patch_size:
    raise ValueError(f"--mask_patch_size={mask_patch_size} must divide the image size {size} and be a multiple "
                     f"of the model patch size {model.encoder.patch_size}")
  images = normalization.normalize(image[None])
  run = jax.jit(functools.partial(models.reconstruct_masked, model, mask_patch_size=mask_patch_size,
                                  mask_ratio=mask_ratio))
  mask, prediction = jax.device_get(run(variables["params"], images, jax.random.key(seed)))
  shown = (images, mask, prediction)
  return visualize.reconstruction_grid(*shown, scale=scale)
