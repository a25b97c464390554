"""A tiny GPT-2-style model for CPUs: the README's main job.

Trains on the embedded default corpus (the Python standard library's source)
with a 2,048-token sentencepiece vocabulary, in a few minutes on 2 cores.
`--config=experiments/tiny.py:char` uses a character-level vocabulary instead.
"""

from gpt_jax.config import base_config

VARIANTS = ("bpe", "char")


def get_config(variant: str = "bpe"):
    if variant not in VARIANTS:
        raise ValueError(f"experiments/tiny.py:{variant} is not one of {list(VARIANTS)}")
    cfg = base_config()
    cfg.name = f"tiny-{variant}"
    m = cfg.model
    m.vocab_size = 2048 if variant == "bpe" else 512
    m.context, m.n_layer, m.n_head, m.d_model, m.d_ff = 128, 4, 4, 128, 512
    m.embd_pdrop = m.resid_pdrop = m.attn_pdrop = 0.0
    o = cfg.optim
    o.schedule, o.peak_lr, o.warmup_steps, o.final_lr_frac = "cosine", 2e-3, 100, 0.1
    o.weight_decay = 0.1
    t = cfg.train
    t.batch_size, t.steps = 32, 600
    t.log_every, t.eval_every, t.eval_batches, t.ckpt_every, t.keep = 20, 200, 8, 200, 2
    t.sample_tokens, t.sample_prompt = 96, "def "
    t.final_full_eval = True  # every validation token, beside gzip -9 and xz -9
    d = cfg.data
    d.source, d.tokenizer = "stdlib", ("sentencepiece" if variant == "bpe" else "char")
    d.tokenizer_train_chars = 4_000_000
    # Data-parallel over a CPU host's 2 cores (no effect on GPUs/TPUs): ~1.2x faster
    # steps than one XLA CPU device here (benchmarks/README.md).
    cfg.mesh.cpu_devices = 2
    return cfg
