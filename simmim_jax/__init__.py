"""simmim_jax: SimMIM (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022)
in JAX / Flax Linen.

`simmim_jax.models`, `simmim_jax.masking` and `simmim_jax.losses` import and run without TensorFlow;
only `simmim_jax.data` (the input pipeline) and what writes TensorBoard need it.
"""

__version__ = "0.1.0"
