"""Supervised fine-tuning (InstructGPT appendix C): `python -m gpt_jax.rlhf.sft
--config=experiments/rlhf/sft.py --init_from=PRETRAINED --workdir=runs/sft
--config.sft.train_jsonl=demos.jsonl`.

Paper: 16 epochs, residual dropout 0.2, cosine decay to 10% of lr 9.65e-6 with no warmup,
batch 32. (unstated) Adam(0.9, 0.95) as in PPO, no weight decay, no embedding/attention
dropout, examples truncated to 512 tokens. `:tiny` is the CPU example (README) on
experiments/rlhf/data, with a higher learning rate and 6 epochs (2 leave 7% of its
held-out PPO-style samples malformed, 6 under 2%).
"""

from gpt_jax.rlhf import sft_base

DATA = "experiments/rlhf/data"
VARIANTS = ("paper", "tiny")


def get_config(variant: str = "paper"):
    cfg = sft_base()
    if variant == "tiny":
        cfg.name = "sft-tiny"
        cfg.sft.train_jsonl, cfg.sft.max_len, cfg.sft.epochs = f"{DATA}/sft.jsonl", 48, 6
        cfg.model.resid_pdrop = 0.1
        cfg.optim.peak_lr = 1e-3
        cfg.train.update(dict(batch_size=16, log_every=5, eval_every=20, ckpt_every=20))
    elif variant != "paper":
        raise ValueError(f"experiments/rlhf/sft.py:{variant} is not one of {list(VARIANTS)}")
    return cfg
