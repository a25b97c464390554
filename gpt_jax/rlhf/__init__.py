"""InstructGPT (Ouyang et al. 2022): SFT -> reward model -> PPO-ptx, on the shared loop.

    python -m gpt_jax.rlhf.sft    --config=experiments/rlhf/sft.py    --init_from=PRE --workdir=SFT
    python -m gpt_jax.rlhf.reward --config=experiments/rlhf/reward.py --init_from=SFT --workdir=RM
    python -m gpt_jax.rlhf.ppo    --config=experiments/rlhf/ppo.py    --init_from=SFT \\
        --config.ppo.reward_workdir=RM --workdir=PPO

This module holds only the config defaults of the three stages (light to import from
`experiments/`); `common.py` the shared data and model pieces. Each stage takes the
`model` section from the workdir it starts from (so only dropout is set here), and the
`data` section too, which names the pretraining corpus PPO-ptx draws from.
"""

from __future__ import annotations

import ml_collections

from gpt_jax import config as config_lib
from gpt_jax.config import ConfigError

REWARDS = ("model", "target_token_fraction")
EVAL_RULES = ("python_function",)  # ppo.RULES


def _stage_base(name: str) -> ml_collections.ConfigDict:
    cfg = config_lib.base_config()
    cfg.name = name
    o = cfg.optim  # InstructGPT appendix C: Adam(0.9, 0.95), cosine to 10%, no warmup
    o.schedule, o.warmup_steps, o.final_lr_frac, o.b1, o.b2 = "cosine", 0, 0.1, 0.9, 0.95
    o.weight_decay = 0.0  # (unstated) none: fine-tuning from a pretrained model
    t = cfg.train
    t.log_every, t.eval_every, t.ckpt_every, t.sample_tokens = 10, 100, 100, 0
    return cfg


def sft_base() -> ml_collections.ConfigDict:
    """SFT: 16 epochs, residual dropout 0.2, cosine decay to 10%, lr 9.65e-6, batch 32."""
    cfg = _stage_base("sft")
    cfg.model.resid_pdrop = 0.2
    cfg.model.embd_pdrop = cfg.model.attn_pdrop = 0.0  # (unstated) only residual dropout
    cfg.optim.peak_lr = 9.65e-6
    cfg.train.batch_size = 32
    cfg.sft = s = ml_collections.ConfigDict()
    s.train_jsonl = ""  # {"prompt": ..., "response": ...} per line
    s.val_jsonl = ""  # empty: every 10th training example is held out instead
    s.max_len = 512  # tokens per example: prompt + response + eot (prompt cut from the left)
    s.epochs = 16  # sets train.steps from the number of training examples
    return cfg


def reward_base() -> ml_collections.ConfigDict:
    """Reward model: 1 epoch, lr 9e-6, cosine to 10%, 64 prompts (each K responses) a batch."""
    cfg = _stage_base("reward")
    cfg.model.embd_pdrop = cfg.model.resid_pdrop = cfg.model.attn_pdrop = 0.0  # (unstated)
    cfg.optim.peak_lr = 9e-6
    cfg.train.batch_size = 64  # prompts; each is one batch element of K forward passes
    cfg.reward = r = ml_collections.ConfigDict()
    r.train_jsonl = ""  # {"prompt", "responses": [K texts], "ranking": [K ranks]} per line
    r.val_jsonl = ""  # empty: every 10th training prompt is held out instead
    r.demo_jsonl = ""  # SFT-format demonstrations for the bias; empty: top-ranked responses
    r.max_len = 512
    r.max_k = 9  # responses per prompt are padded to this (the paper's K is 4..9)
    r.epochs = 1
    return cfg


def ppo_base() -> ml_collections.ConfigDict:
    """PPO-ptx: beta 0.02, clip 0.2, gamma_ptx 27.8, 512 episodes/iteration in minibatches
    of 64, one inner epoch, temperature-1 rollouts, value model initialised from the RM,
    policy EMA 0.992; (unstated) responses without an eot lose 10 (TRL's missing_eos_penalty)."""
    cfg = _stage_base("ppo")
    # No dropout: the ratio pi/pi_old must be exactly 1 on the first minibatch.
    cfg.model.embd_pdrop = cfg.model.resid_pdrop = cfg.model.attn_pdrop = 0.0
    cfg.optim.schedule = "constant"  # (unstated)
    cfg.optim.peak_lr = 9.65e-6  # the policy's; (unstated) the SFT peak
    cfg.train.ckpt_every = 10  # in PPO iterations; train.steps is set to the optimizer updates
    cfg.ppo = p = ml_collections.ConfigDict()
    p.prompts_jsonl = ""  # {"prompt": ...} per line (SFT files work: other keys are ignored)
    p.reward = "model"  # 'model' (ppo.reward_workdir) or a programmatic reward, see REWARDS
    p.reward_workdir = ""
    p.target_token = ""  # 'target_token_fraction': text of exactly one token
    p.iterations = 256
    p.rollout_batch = 512  # episodes per iteration
    p.minibatches = 8  # 512 / 8 = 64 episodes per update
    p.epochs = 1  # passes over each iteration's episodes
    p.max_prompt_len = 256  # prompt slots (longer prompts keep their last tokens)
    p.response_len = 256  # (unstated) new tokens per episode
    p.temperature = 1.0
    p.kl_coef = 0.02  # beta: per-token penalty beta * (log pi - log pi_SFT)
    p.clip = 0.2  # policy ratio clip
    p.value_clip = 0.2  # value clip, around the rollout's values
    p.value_coef = 1.0  # weight of the value loss (separate params: only scales its grads)
    p.value_lr = 9e-6  # (unstated) the RM's
    p.gamma = 1.0  # no discount
    p.gae_lambda = 0.95  # (unstated)
    p.whiten_advantages = True
    p.ptx_coef = 27.8  # gamma of PPO-ptx; 0 = plain PPO
    p.ptx_batch_size = 8  # pretraining windows per update (0: no ptx term, no ptx metric)
    p.ptx_context = 0  # tokens per pretraining window; 0 = model.context
    p.ptx_data = "init"  # 'init': the init workdir's data section; 'config': this config's
    # A response that reaches response_len without an eot is read by the reward model at a
    # token it never scored in training: its score loses this much (TRL's missing_eos_penalty).
    p.missing_eot_penalty = 10.0
    p.ema_decay = 0.992  # policy EMA per update, evaluated alongside; 0 = none
    # Validation every train.eval_every iterations (and of the SFT policy first).
    p.eval_prompts_jsonl = ""  # {"prompt": ...} per line, the validation split; '' = none
    # The test split: evaluated once, after the last iteration (test_report.json), so no
    # choice made while tuning (and no best-checkpoint pick) ever sees it; '' = none.
    p.test_prompts_jsonl = ""
    p.eval_samples = 4  # responses per held-out prompt (temperature ppo.temperature)
    p.eval_rule = ""  # '' or one of ppo.RULES: the task's own well-formedness check
    p.eval_target = ""  # text whose count per response is reported (the toy's objective)
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.validate` plus the stage sections; errors name the field."""
    config_lib.validate(cfg)
    for stage in ("sft", "reward"):
        if stage in cfg:
            s = cfg[stage]
            if s.max_len < 2 or s.max_len > cfg.model.context:
                raise ConfigError(f"{stage}.max_len={s.max_len} must be in [2, model.context="
                                  f"{cfg.model.context}]")
            if s.epochs < 1:
                raise ConfigError(f"{stage}.epochs={s.epochs} must be >= 1")
    if "reward" in cfg and cfg.reward.max_k < 2:
        raise ConfigError(f"reward.max_k={cfg.reward.max_k} must be >= 2")
    if "ppo" in cfg:
        _validate_ppo(cfg)
    return cfg


def _validate_ppo(cfg: ml_collections.ConfigDict) -> None:
    p = cfg.ppo
    if p.reward not in REWARDS:
        raise ConfigError(f"ppo.reward={p.reward!r} is not one of {list(REWARDS)}")
    if p.reward == "model" and not p.reward_workdir:
        raise ConfigError("ppo.reward_workdir='' must name a reward-model workdir when "
                          "ppo.reward='model'")
    if p.reward == "target_token_fraction" and not p.target_token:
        raise ConfigError("ppo.target_token='' must be set when "
                          "ppo.reward='target_token_fraction'")
    if not p.prompts_jsonl:
        raise ConfigError("ppo.prompts_jsonl='' must name a JSONL file of prompts")
    for field in ("iterations", "rollout_batch", "minibatches", "epochs", "max_prompt_len",
                  "response_len"):
        if not isinstance(p[field], int) or p[field] < 1:
            raise ConfigError(f"ppo.{field}={p[field]!r} must be a positive integer")
    if p.rollout_batch % p.minibatches:
        raise ConfigError(f"ppo.rollout_batch={p.rollout_batch} is not divisible by "
                          f"ppo.minibatches={p.minibatches}")
    if p.max_prompt_len + p.response_len > cfg.model.context:
        raise ConfigError(f"ppo.max_prompt_len + ppo.response_len = "
                          f"{p.max_prompt_len + p.response_len} exceeds model.context="
                          f"{cfg.model.context}")
    if p.ptx_data not in ("init", "config"):
        raise ConfigError(f"ppo.ptx_data={p.ptx_data!r} is not one of ['init', 'config']")
    if p.ptx_context > cfg.model.context:
        raise ConfigError(f"ppo.ptx_context={p.ptx_context} exceeds model.context="
                          f"{cfg.model.context}")
    if p.eval_rule not in ("", *EVAL_RULES):
        raise ConfigError(f"ppo.eval_rule={p.eval_rule!r} is not one of ['', "
                          f"{', '.join(map(repr, EVAL_RULES))}]")
    if not isinstance(p.eval_samples, int) or p.eval_samples < 1:
        raise ConfigError(f"ppo.eval_samples={p.eval_samples!r} must be a positive integer")
    if not 0.0 <= p.ema_decay < 1.0:
        raise ConfigError(f"ppo.ema_decay={p.ema_decay} must be in [0, 1)")
    for field in ("kl_coef", "ptx_coef", "clip", "value_clip", "value_lr", "ptx_batch_size",
                  "missing_eot_penalty"):
        if p[field] < 0:
            raise ConfigError(f"ppo.{field}={p[field]} must be >= 0")
    if not 0.0 <= p.gae_lambda <= 1.0 or not 0.0 <= p.gamma <= 1.0:
        raise ConfigError(f"ppo.gamma={p.gamma} and ppo.gae_lambda={p.gae_lambda} must be "
                          "in [0, 1]")
    if p.temperature <= 0:
        raise ConfigError(f"ppo.temperature={p.temperature} must be > 0 (PPO needs the "
                          "sampling distribution's log-probabilities)")
