"""The one place simmim_jax.data imports TensorFlow: CPU only, so that TF never takes GPU/TPU memory from JAX.

Import TensorFlow as `from simmim_jax.data._tensorflow import tf` in this package.
"""

try:
  import tensorflow as tf
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError("The simmim_jax input pipeline (tf.data) needs TensorFlow: "
                    "pip install 'simmim_jax[data]' (tensorflow-cpu, tensorflow-datasets)") from e


def hide_accelerators_from_tensorflow() -> None:
  """Makes TF see no GPU/TPU; must run before TF's first op (later, TF keeps the devices it has initialized)."""
  for device_type in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], device_type)
    except RuntimeError:  # TF already initialized its devices (an op ran first); nothing left to change.
      pass


hide_accelerators_from_tensorflow()
