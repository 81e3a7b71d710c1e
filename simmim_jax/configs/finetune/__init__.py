"""Packaged finetune configs (see simmim_jax/configs/__init__.py)."""
