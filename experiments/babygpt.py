"""The baby GPT of the design notes: vocabulary {0, 1}, context 3, 50 steps.

Trained on every window of the sequence 111101111011110, it becomes a finite
state Markov chain over the 2^3 = 8 contexts; `python -m gpt_jax.babygpt`
prints its transition table next to the sequence's empirical frequencies.
"""

from gpt_jax.config import base_config


def get_config():
    cfg = base_config()
    cfg.name = "babygpt"
    m = cfg.model
    m.vocab_size, m.context = 2, 3
    m.n_layer, m.n_head, m.d_model, m.d_ff = 4, 4, 16, 64
    m.embd_pdrop = m.resid_pdrop = m.attn_pdrop = 0.0
    o = cfg.optim
    # 1e-2: at the notebook's 1e-3, 50 steps have not yet separated state 111 from the rest.
    o.schedule, o.peak_lr, o.warmup_steps = "constant", 1e-2, 0
    o.weight_decay, o.b1, o.b2 = 0.1, 0.9, 0.999
    cfg.train.steps = 50
    cfg.train.batch_size = 12  # every window of 4 tokens of the 15-token sequence
    cfg.data.sequence = "111101111011110"
    return cfg
