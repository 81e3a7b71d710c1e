"""The run core and its recipes: `run.py` runs a recipe (mesh, keys, restore-or-init, the loop, preemption);
`pretrain.py`, `finetune.py` and `linear_probe.py` are the recipes; optimizer, sharding, evaluation and the
checks that run before anything is written sit beside them."""
