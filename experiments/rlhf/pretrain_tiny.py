"""The CPU example's pretrained model: a 2-layer character-level GPT on the toy corpus of
`experiments/rlhf/make_data.py` (one-line Python functions), about two minutes on 2 busy cores.

    python -m gpt_jax.train --config=experiments/rlhf/pretrain_tiny.py --workdir=runs/rlhf/pre
"""

from gpt_jax.config import base_config

DATA = "experiments/rlhf/data"


def get_config():
    cfg = base_config()
    cfg.name = "rlhf-tiny-pre"
    m = cfg.model
    m.vocab_size = 48  # the corpus has 32 characters (+ eot, unk = 34 ids)
    m.context, m.n_layer, m.n_head, m.d_model, m.d_ff = 64, 2, 2, 64, 256
    m.embd_pdrop = m.resid_pdrop = m.attn_pdrop = 0.0
    o = cfg.optim
    o.schedule, o.peak_lr, o.warmup_steps, o.final_lr_frac = "cosine", 3e-3, 20, 0.1
    t = cfg.train
    t.batch_size, t.steps = 32, 600
    t.log_every, t.eval_every, t.eval_batches, t.ckpt_every, t.keep = 50, 200, 4, 200, 1
    t.sample_tokens, t.sample_prompt = 48, "def mix(x, y):\n"
    d = cfg.data
    d.source, d.text_glob, d.tokenizer = "text", f"{DATA}/corpus/*.txt", "char"
    return cfg
