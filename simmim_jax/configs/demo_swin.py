"""Demo with a Swin encoder: SimMIM pretraining of a tiny Swin on the embedded demo dataset, on CPU.

Run:
  simmim-pretrain --config=demo_swin --workdir=workdir/demo_swin

A toy Swin at 32 px: patch 4, width 32, depths (2, 2, 2), window 4 (stage 1 uses shifted windows, the
later stages are single windows), encoder stride 16; 8 px mask blocks at ratio 0.6, peak lr 2e-3 per 512
images; otherwise the run of configs/demo.py. Expected: the loss falls from about 0.8-0.9 within the 300
steps, as configs/demo.py.
"""

import functools

from simmim_jax.configs import demo

get_config = functools.partial(demo.get_config, "swin")
