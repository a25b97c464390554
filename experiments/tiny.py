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
    # Tuned for bits per byte after a fixed time on 2 CPU cores (benchmarks/README.md):
    # a step's time is about linear in the batch here, so smaller batches cost little per
    # token and learn more from it (32 x 128 for 600 steps, 1.852 bpb; 16 x 128 for
    # 1,200, 1.767; with AdamW at 3e-3 decaying to 0 and the overlap below, 1.732). Muon
    # (Jordan et al. 2024) on the hidden matrices, AdamW on the rest, then took 1,200
    # steps to 1.506 (muon_lr 1e-2: 1.511; 2e-2: 1.566) at 1.3x AdamW's step time (203 vs
    # 155 ms); 1,100 steps (1.534) keep the run inside 5 minutes. Wider or deeper models,
    # a 4,096-token vocabulary, 256-token windows and scanned layers all lose here.
    o.optimizer, o.muon_lr = "muon", 6e-3
    o.schedule, o.peak_lr, o.warmup_steps, o.final_lr_frac = "cosine", 3e-3, 100, 0.0
    o.weight_decay = 0.1
    t = cfg.train
    t.batch_size, t.steps = 16, 1100
    t.log_every, t.eval_every, t.eval_batches, t.ckpt_every, t.keep = 20, 400, 16, 400, 2
    # A model this small loops at temperature 0.8; cooler, with CTRL's repetition penalty,
    # it writes Python-shaped test code. The prompt ends without a space: the tokenizer's
    # words carry their leading space, so "def " would force an unusual next token.
    t.sample_tokens, t.sample_prompt = 96, "import os\nimport sys\n\n\ndef"
    t.sample_temperature, t.sample_top_p, t.sample_repetition_penalty = 0.6, 0.9, 1.3
    t.final_full_eval = True  # every validation token, beside gzip -9 and xz -9
    t.full_eval_overlap = 0.5  # each scored token sees 64..127 tokens before it
    d = cfg.data
    d.source, d.tokenizer = "stdlib", ("sentencepiece" if variant == "bpe" else "char")
    d.tokenizer_train_chars = 4_000_000
    # Data-parallel over a CPU host's 2 cores (no effect on GPUs/TPUs): ~1.2x faster
    # steps than one XLA CPU device here (benchmarks/README.md).
    cfg.mesh.cpu_devices = 2
    return cfg
