"""Reward model (InstructGPT appendix C): `python -m gpt_jax.rlhf.reward
--config=experiments/rlhf/reward.py --init_from=SFT_WORKDIR --workdir=runs/rm
--config.reward.train_jsonl=rankings.jsonl`.

Paper: 1 epoch, lr 9e-6 cosine to 10%, batch 64 prompts each with K = 4..9 ranked
responses, all C(K, 2) comparisons of a prompt one batch element; bias so that
demonstrations score mean 0. (unstated) no dropout, Adam(0.9, 0.95), no weight decay,
head init std 1/sqrt(d_model + 1). `:tiny` is the CPU example on experiments/rlhf/data
("more x's is better"), with a higher learning rate and 2 epochs.
"""

from gpt_jax.rlhf import reward_base

DATA = "experiments/rlhf/data"
VARIANTS = ("paper", "tiny")


def get_config(variant: str = "paper"):
    cfg = reward_base()
    if variant == "tiny":
        cfg.name = "reward-tiny"
        r = cfg.reward
        r.train_jsonl, r.max_len, r.max_k, r.epochs = f"{DATA}/rankings.jsonl", 48, 9, 2
        r.demo_jsonl = f"{DATA}/sft.jsonl"  # the demonstrations score mean 0
        cfg.optim.peak_lr = 1e-3
        cfg.train.update(dict(batch_size=8, log_every=5, eval_every=20, ckpt_every=20))
    elif variant != "paper":
        raise ValueError(f"experiments/rlhf/reward.py:{variant} is not one of {list(VARIANTS)}")
    return cfg
