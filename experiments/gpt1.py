"""GPT-1 (Radford et al. 2018): 12-layer post-norm decoder, 512 context, 40,478-token BPE.

`--config=experiments/gpt1.py`. Pretraining: Adam 2.5e-4, linear warmup over
2,000 updates then cosine to 0, batch 64 x 512, 100 epochs of BooksCorpus
(train.steps below is 100 epochs of the ~800M-token corpus at 32,768 tokens/step).

The released weights instead: `python -m gpt_jax.convert --from_hf=<HF openai-gpt dir>
--workdir=runs/gpt1` writes a workdir with this config, the checkpoint and GPT-1's BPE
(`data.tokenizer='gpt1'`); fine-tune it with `gpt_jax.finetune --init_from=runs/gpt1`
(docs/gpt1.md).
"""

from gpt_jax.config import base_config


def get_config():
    cfg = base_config()
    cfg.name = "gpt1"
    m = cfg.model
    m.vocab_size, m.context = 40478, 512
    m.n_layer, m.n_head, m.d_model, m.d_ff = 12, 12, 768, 3072
    m.norm = "post"  # LN after each residual add, no final LN
    m.scale_residual_init = False  # GPT-1 inits everything N(0, 0.02)
    m.embd_pdrop = m.resid_pdrop = m.attn_pdrop = 0.1
    o = cfg.optim
    o.schedule, o.peak_lr, o.warmup_steps, o.final_lr_frac = "cosine", 2.5e-4, 2000, 0.0
    # Betas/eps unstated for pretraining; the released fine-tuning code's values.
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.weight_decay, o.grad_clip = 0.01, 1.0
    cfg.train.batch_size = 64
    cfg.train.steps = 2_441_406  # 100 epochs x 800M tokens / (64 x 512)
    return cfg
