"""GPT-2 (Radford et al. 2019): pre-norm, 1024 context, 50,257-token byte-level BPE.

`--config=experiments/gpt2.py:small|medium|large|xl`. The paper gives batch 512
but not the learning rates ("hand-tuned"); we use GPT-3's rate for the
nearest size and GPT-3's optimizer (betas 0.9/0.95, decay 0.1, clip 1.0) with
a 2,000-step warmup and cosine decay to 10%: a documented choice.
"""

from gpt_jax.config import base_config

SIZES = {  # name: (n_layer, d_model, n_head, peak_lr)
    "small": (12, 768, 12, 6e-4),
    "medium": (24, 1024, 16, 3e-4),
    "large": (36, 1280, 20, 2.5e-4),
    "xl": (48, 1600, 25, 2e-4),
}
VARIANTS = tuple(SIZES)


def get_config(size: str = "small"):
    if size not in VARIANTS:
        raise ValueError(f"experiments/gpt2.py:{size} is not one of {list(VARIANTS)}")
    n_layer, d_model, n_head, lr = SIZES[size]
    cfg = base_config()
    cfg.name = f"gpt2-{size}"
    m = cfg.model
    m.vocab_size, m.context = 50257, 1024
    m.n_layer, m.n_head, m.d_model, m.d_ff = n_layer, n_head, d_model, 4 * d_model
    m.norm = "pre"
    m.dtype = "bfloat16"  # compute on accelerators; params and Adam state stay float32
    o = cfg.optim
    o.schedule, o.peak_lr, o.warmup_steps, o.final_lr_frac = "cosine", lr, 2000, 0.1
    cfg.train.batch_size = 512
    cfg.train.steps = 600_000
    return cfg
