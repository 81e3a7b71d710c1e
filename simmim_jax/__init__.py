"""simmim_jax: SimMIM (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022)
in JAX / Flax Linen.

`simmim_jax.models`, `simmim_jax.masking` and `simmim_jax.losses` import and run without TensorFlow;
only `simmim_jax.data` (the input pipeline) and what writes TensorBoard need it.
"""

__version__ = "0.1.0"


def load_model(workdir: str, step: int | None = None):
  """(model, variables, config) of a trained workdir, read only: the module the workdir's recipe trained (a
  `models.SimMIM` for simmim-pretrain / simmim-convert, a `Classifier` for simmim-finetune), its parameters from
  the latest complete checkpoint that restores (or `step`) and its config. See `storage.workdir.load_model`."""
  from simmim_jax.storage import workdir as workdir_lib  # pylint: disable=g-import-not-at-top  (import stays light)
  return workdir_lib.load_model(workdir, step)
