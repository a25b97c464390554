"""InstructGPT: the pairwise RM loss, GAE and the KL-penalised reward against direct
computations; SFT -> RM -> PPO end to end (with an exact resume) and PPO(-ptx) raising a
programmatic reward on a tiny character-level model."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from test_optim import experiment

from gpt_jax import data, metrics, sharding, train
from gpt_jax.rlhf import common, ppo, reward, sft
from gpt_jax.tokenizer import load_tokenizer

# ---------------------------------------------------------------------------- pure functions


def test_pairwise_loss_matches_explicit_pairs_with_ties_and_padding():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 6)).astype(np.float32)
    rank = np.array([[0, 1, 1, 2, 3, 0], [2, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    k = [6, 3, 3]  # responses per prompt; the rest is padding (whatever its rank)
    valid = (np.arange(6)[None] < np.array(k)[:, None]).astype(np.float32)
    losses = []
    for n in range(3):
        pairs = [(i, j) for i, j in itertools.permutations(range(k[n]), 2)
                 if rank[n, i] < rank[n, j]]  # ties dropped
        if pairs:
            losses.append(-sum(math.log(1 / (1 + math.exp(-(r[n, i] - r[n, j]))))
                               for i, j in pairs) / len(pairs))
    assert len(losses) == 2  # prompt 2 is all ties: no pairs, not averaged in
    got = reward.pairwise_loss(jnp.asarray(r), jnp.asarray(rank), jnp.asarray(valid))
    np.testing.assert_allclose(float(got), np.mean(losses), rtol=1e-5)
    _, pairs_n, _ = reward.pairwise_terms(jnp.asarray(r), jnp.asarray(rank), jnp.asarray(valid))
    assert pairs_n.tolist() == [13, 3, 0]  # C(6,2) = 15 minus two ties; C(3,2); none


def test_gae_matches_a_reverse_loop():
    rng = np.random.default_rng(1)
    b, a, lam = 3, 9, 0.9
    rewards, values = rng.normal(size=(2, b, a)).astype(np.float32)
    mask = np.zeros((b, a), np.float32)
    for row, (lo, hi) in enumerate([(2, 9), (0, 4), (5, 6)]):  # one contiguous episode each
        mask[row, lo:hi] = 1
    adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 1.0, lam)
    want = np.zeros((b, a))
    for row in range(b):
        nxt_adv, nxt_value = 0.0, 0.0
        for t in reversed(range(a)):
            if not mask[row, t]:
                nxt_adv, nxt_value = 0.0, 0.0
                continue
            delta = rewards[row, t] + nxt_value - values[row, t]
            want[row, t] = nxt_adv = delta + lam * nxt_adv
            nxt_value = values[row, t]
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ret), (want + values) * mask, rtol=1e-5, atol=1e-6)


def test_kl_penalty_per_token_and_score_at_the_last_response_token():
    logp = jnp.array([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    logp_ref = jnp.array([[-1.5, -1.0, -0.5, -1.0], [-2.0, -2.0, -2.0, -2.0]])
    mask = jnp.array([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    got = ppo.kl_penalty_rewards(logp, logp_ref, jnp.array([10.0, 20.0]), mask, 0.1)
    want = -0.1 * (logp - logp_ref) * mask
    want = want.at[0, 2].add(10.0).at[1, 3].add(20.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_right_align_and_losses():
    eot = 9
    # prompt slots 3 (left-padded), then 4 generated: row 0 stops at its second token.
    seq = jnp.array([[0, 5, 6, 1, 9, 9, 9], [4, 5, 6, 1, 2, 3, 4]])
    tokens, mask = ppo.right_align(seq, jnp.array([1, 0]), 3, eot)
    assert tokens.tolist() == [[5, 6, 1, 9, 9, 9, 9], [4, 5, 6, 1, 2, 3, 4]]
    assert mask.tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]]
    frac = ppo.target_token_fraction(tokens, mask, 1, eot)
    np.testing.assert_allclose(np.asarray(frac), [1.0, 0.25])
    ones = jnp.ones((1, 3))
    loss, clipped = ppo.policy_loss(jnp.log(jnp.array([[1.5, 1.0, 0.5]])), 0 * ones, ones,
                                    ones, 0.2)
    np.testing.assert_allclose(float(loss), -(1.2 + 1.0 + 0.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(clipped), 2 / 3, rtol=1e-6)
    vf = ppo.value_loss(jnp.array([[1.0, 0.0]]), jnp.zeros((1, 2)), jnp.array([[0.0, 1.0]]),
                        jnp.ones((1, 2)), 0.5)
    np.testing.assert_allclose(float(vf), 0.5 * (1.0 + 1.0) / 2, rtol=1e-6)


# ---------------------------------------------------------------------------- end to end


def _make_data():
    spec = importlib.util.spec_from_file_location(
        "make_data", os.path.join(REPO, "experiments", "rlhf", "make_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy data of experiments/rlhf/make_data.py and a tiny char GPT pretrained on it."""
    root = tmp_path_factory.mktemp("rlhf")
    paths = _make_data().write(str(root / "data"))
    # PPO prompts end in "    return " so that 8 new tokens are an expression.
    rows = [json.loads(line) for line in open(paths["prompts.jsonl"])]
    with open(root / "return_prompts.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({"prompt": row["prompt"] + "    return "}) + "\n")
    cfg = experiment("rlhf/pretrain_tiny")
    cfg.model.update(dict(context=48, d_model=32, d_ff=128))
    cfg.data.update(dict(text_glob=str(root / "data" / "corpus" / "*.txt"),
                         data_dir=str(root / "cache"), num_workers=1))
    cfg.train.update(dict(steps=150, batch_size=16, eval_every=150, ckpt_every=150,
                          sample_tokens=0))
    train.train(cfg, str(root / "pre"))
    return {"root": root, "pre": str(root / "pre"), **paths,
            "return_prompts": str(root / "return_prompts.jsonl")}


def _rows(workdir, key):
    return [r for r in metrics.read_metrics(workdir) if key in r]


class _StopAfterFirst:
    """A Preemption whose SIGTERM 'arrives' during the first iteration."""

    requested = True

    def reached(self, step):
        return True


def test_sft_reward_ppo_chain_and_exact_resume(world, tmp_path, monkeypatch):
    cfg = experiment("rlhf/sft", "tiny")
    cfg.sft.update(dict(train_jsonl=world["sft.jsonl"], max_len=40, epochs=1))
    cfg.train.update(dict(eval_every=5, ckpt_every=100, log_every=5))
    final = sft.sft(cfg, world["pre"], str(tmp_path / "sft"))
    evals = [r["eval_loss"] for r in _rows(str(tmp_path / "sft"), "eval_loss")]
    assert np.isfinite(final["loss"]) and evals[-1] < evals[0], evals

    cfg = experiment("rlhf/reward", "tiny")
    cfg.reward.update(dict(train_jsonl=world["rankings.jsonl"], demo_jsonl=world["sft.jsonl"],
                           max_len=40, epochs=1))
    cfg.train.update(dict(eval_every=100, ckpt_every=100))
    rm_dir = str(tmp_path / "rm")
    final = reward.train_reward(cfg, str(tmp_path / "sft"), rm_dir)
    assert final["accuracy"] > 0.75, final  # held-out pairs; chance is 0.5
    # The stored offset makes the demonstrations' mean reward 0.
    mesh = sharding.make_mesh(cfg)
    model_cfg, params = reward.load(rm_dir, mesh, cfg)
    tok = load_tokenizer(rm_dir)
    demos = common.pad_examples([common.encode_example(
        tok.encode, tok.eot_id, r["prompt"], r["response"], 40) for r in
        data.read_jsonl(world["sft.jsonl"], ("prompt", "response"))], 40, tok.eot_id)
    assert abs(reward.mean_reward(model_cfg, params, demos, 8, mesh)) < 1e-3

    def ppo_cfg():
        c = experiment("rlhf/ppo", "tiny")
        c.ppo.update(dict(prompts_jsonl=world["return_prompts"], reward_workdir=rm_dir,
                          iterations=2, rollout_batch=8, minibatches=2, max_prompt_len=32,
                          response_len=8, ptx_batch_size=4, ptx_context=16))
        c.train.ckpt_every = 1
        return c

    ppo.train_ppo(ppo_cfg(), str(tmp_path / "sft"), str(tmp_path / "ppo"))
    straight = _rows(str(tmp_path / "ppo"), "reward")
    assert [r["step"] for r in straight] == [1, 2]
    assert straight[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at first
    assert all(np.isfinite(r[k]) for r in straight for k in ("reward", "kl", "policy_loss",
                                                               "value_loss", "ptx_loss"))
    assert os.path.isdir(tmp_path / "ppo" / "policy" / "checkpoints")
    # Interrupted after iteration 1, then resumed: the same iteration 2.
    monkeypatch.setattr(ppo.loop, "Preemption", _StopAfterFirst)
    ppo.train_ppo(ppo_cfg(), str(tmp_path / "sft"), str(tmp_path / "resumed"))
    monkeypatch.undo()
    ppo.train_ppo(ppo_cfg(), str(tmp_path / "sft"), str(tmp_path / "resumed"))
    resumed = _rows(str(tmp_path / "resumed"), "reward")
    for key in ("reward", "kl", "policy_loss", "value_loss", "ptx_loss", "entropy"):
        np.testing.assert_allclose(resumed[1][key], straight[1][key], rtol=1e-5, err_msg=key)


def test_ppo_raises_a_programmatic_reward_and_ptx_limits_drift(world, tmp_path):
    """Reward: the fraction of "x" in 8 new tokens after "    return " (about 2% at first)."""
    runs = {}
    for ptx_coef in (0.0, 0.5):  # the second run reuses the first one's compiled steps
        cfg = experiment("rlhf/ppo", "tiny")
        cfg.ppo.update(dict(prompts_jsonl=world["return_prompts"], reward="target_token_fraction",
                            target_token="x", iterations=12, rollout_batch=32, minibatches=2,
                            max_prompt_len=32, response_len=8, kl_coef=0.02, ptx_coef=ptx_coef,
                            ptx_batch_size=8, ptx_context=32, value_lr=3e-3))
        cfg.optim.peak_lr = 1e-3
        workdir = str(tmp_path / f"ptx{ptx_coef}")
        ppo.train_ppo(cfg, world["pre"], workdir)
        runs[ptx_coef] = _rows(workdir, "reward")
    for rows in runs.values():
        rewards = [r["reward"] for r in rows]
        assert np.mean(rewards[-3:]) > np.mean(rewards[:2]) + 0.07, rewards
        assert all(np.isfinite(r["kl"]) and r["kl"] < 20 for r in rows)
    # The pretraining loss (of each update's fresh pretraining batch, before the update):
    # plain PPO drifts away from the pretrained model, PPO-ptx much less.
    ptx_last = {c: np.mean([r["ptx_loss"] for r in rows[-3:]]) for c, rows in runs.items()}
    assert ptx_last[0.5] < ptx_last[0.0] - 0.2, ptx_last
