"""Packaged pretrain configs (see simmim_jax/configs/__init__.py)."""
