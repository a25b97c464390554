"""InstructGPT: the pairwise RM loss, GAE and the KL-penalised reward against direct
computations; SFT -> RM -> PPO end to end with held-out evaluation and the policy EMA;
PPO(-ptx) raising a programmatic reward on a tiny character-level model, resumed exactly
after SIGKILL; bad input rejected in one line before any compile."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_python
from test_optim import experiment

from gpt_jax import checkpoint, data, metrics, sharding, train
from gpt_jax import model as model_lib
from gpt_jax.config import ConfigError
from gpt_jax.rlhf import common, ppo, reward, rl, sft
from gpt_jax.tokenizer import load_tokenizer
from gpt_jax.workdir import Workdir

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
    adv, ret = rl.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 1.0, lam)
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
    got = rl.kl_penalty_rewards(logp, logp_ref, jnp.array([10.0, 20.0]), mask, 0.1)
    want = -0.1 * (logp - logp_ref) * mask
    want = want.at[0, 2].add(10.0).at[1, 3].add(20.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_right_align_and_losses():
    eot = 9
    # prompt slots 3 (left-padded), then 4 generated: row 0 stops at its second token.
    seq = jnp.array([[0, 5, 6, 1, 9, 9, 9], [4, 5, 6, 1, 2, 3, 4]])
    tokens, mask, ended = rl.right_align(seq, jnp.array([1, 0]), 3, eot)
    assert tokens.tolist() == [[5, 6, 1, 9, 9, 9, 9], [4, 5, 6, 1, 2, 3, 4]]
    assert mask.tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert ended.tolist() == [True, False]  # row 1 hit the length limit
    scores = rl.missing_eot_scores(jnp.array([2.0, 11.0]), ended, 10.0)
    np.testing.assert_allclose(np.asarray(scores), [2.0, 1.0])
    frac = rl.target_token_fraction(tokens, mask, 1, eot)
    np.testing.assert_allclose(np.asarray(frac), [1.0, 0.25])
    ones = jnp.ones((1, 3))
    loss, clipped = rl.policy_loss(jnp.log(jnp.array([[1.5, 1.0, 0.5]])), 0 * ones, ones,
                                    ones, 0.2)
    np.testing.assert_allclose(float(loss), -(1.2 + 1.0 + 0.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(clipped), 2 / 3, rtol=1e-6)
    vf = rl.value_loss(jnp.array([[1.0, 0.0]]), jnp.zeros((1, 2)), jnp.array([[0.0, 1.0]]),
                        jnp.ones((1, 2)), 0.5)
    np.testing.assert_allclose(float(vf), 0.5 * (1.0 + 1.0) / 2, rtol=1e-6)


def test_ema_and_the_toy_rule():
    avg = {"w": jnp.array([1.0, 2.0])}
    got = rl.ema(avg, {"w": jnp.array([3.0, 0.0])}, 0.75)
    np.testing.assert_allclose(np.asarray(got["w"]), [1.5, 1.5])
    rule = ppo.RULES["python_function"]
    assert rule("def f(x, y):\n", "    return x * y + 1\n")
    assert rule("def f(x, y):\n", "    return x * y")  # complete, if without its newline
    assert not rule("def f(x, y):\n", "    return 3\n\ndef f(k, k):\n    r")  # the issue's
    assert not rule("def f(x, y):\n", "    return x *")
    assert not rule("def f(x, y):\n", "return x\n")  # not indented: not the body


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
    heldout = [json.loads(line) for line in open(paths["valid_prompts.jsonl"])][:8]
    with open(root / "heldout.jsonl", "w") as f:
        for row in heldout:
            f.write(json.dumps({"prompt": row["prompt"] + "    return "}) + "\n")
    return {"root": root, "pre": str(root / "pre"), **paths,
            "return_prompts": str(root / "return_prompts.jsonl"),
            "heldout": str(root / "heldout.jsonl")}


def _rows(workdir, key):
    return [r for r in metrics.read_metrics(workdir) if key in r]


def test_sft_reward_ppo_chain_with_held_out_evaluation(world, tmp_path):
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

    c = experiment("rlhf/ppo", "tiny")
    # The test report on the validation file itself: it must repeat the last validation
    # evaluation exactly, so it is the final policy (and EMA, and SFT) on the named file.
    c.ppo.update(dict(prompts_jsonl=world["return_prompts"], reward_workdir=rm_dir,
                      eval_prompts_jsonl=world["heldout"], test_prompts_jsonl=world["heldout"],
                      eval_samples=2, iterations=2,
                      rollout_batch=8, minibatches=2, max_prompt_len=32, response_len=8,
                      ptx_batch_size=4, ptx_context=16))
    c.train.update(dict(ckpt_every=1, eval_every=2))
    ppo.train_ppo(c, str(tmp_path / "sft"), str(tmp_path / "ppo"))
    rows = _rows(str(tmp_path / "ppo"), "reward")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at first
    assert all(np.isfinite(r[k]) for r in rows for k in ("reward", "score", "kl", "policy_loss",
                                                           "value_loss", "ptx_loss", "loss"))
    # Held-out evaluation at 0 (the SFT policy itself: KL 0) and 2, of the policy and its EMA.
    evals = _rows(str(tmp_path / "ppo"), "eval_reward")
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval_kl"] == pytest.approx(0.0, abs=1e-4)
    assert evals[0]["ema_eval_kl"] == pytest.approx(0.0, abs=1e-4)
    for key in ("ended", "well_formed"):
        assert all(0 <= r[f"eval_{key}"] <= 1 for r in evals)
    # The policy moved (a sampled KL estimate: either sign).
    assert evals[1]["eval_kl"] != pytest.approx(0.0, abs=1e-3)
    e = evals[1]  # eval_loss: -(penalised score - beta KL), :tiny's beta 3 and penalty 10
    want = -(e["eval_reward"] - 10.0 * (1.0 - e["eval_ended"]) - 3.0 * e["eval_kl"])
    assert e["eval_loss"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert e["eval_target_count"] >= 0
    assert os.path.isdir(tmp_path / "ppo" / "policy" / "checkpoints")
    assert os.path.isdir(tmp_path / "ppo" / "policy_ema" / "checkpoints")
    report = json.loads(open(tmp_path / "ppo" / ppo.TEST_REPORT).read())
    assert report["test_prompts_jsonl"] == world["heldout"] and report["iterations"] == 2
    for key in ("reward", "kl", "ended", "well_formed", "target_count", "loss"):
        assert report[f"test_{key}"] == pytest.approx(evals[1][f"eval_{key}"], abs=1e-5), key
        assert report[f"ema_test_{key}"] == pytest.approx(evals[1][f"ema_eval_{key}"],
                                                          abs=1e-5), key
        assert report[f"sft_test_{key}"] == pytest.approx(evals[0][f"eval_{key}"], abs=1e-5), key


def test_prompt_splits_are_disjoint_and_ppo_tiny_tunes_on_validation_reports_on_test(tmp_path):
    """make_data's train / validation / test prompts share no prompt and are the files in
    experiments/rlhf/data; :tiny evaluates (tunes) on validation and reports on test."""
    paths = _make_data().write(str(tmp_path))
    split = {name: [json.loads(line)["prompt"] for line in open(paths[f"{name}.jsonl"])]
             for name in ("prompts", "valid_prompts", "test_prompts")}
    sets = {k: set(v) for k, v in split.items()}
    assert len(sets["valid_prompts"]) == len(split["valid_prompts"]) == 75
    assert len(sets["test_prompts"]) == len(split["test_prompts"]) == 75
    for a, b in itertools.combinations(sets, 2):
        assert not sets[a] & sets[b], (a, b)
    assert set.union(*sets.values()) == set(_make_data().all_headers(with_x=True))
    for name in ("prompts.jsonl", "valid_prompts.jsonl", "test_prompts.jsonl"):
        shipped = os.path.join(REPO, "experiments", "rlhf", "data", name)
        assert open(paths[name]).read() == open(shipped).read(), name  # deterministic
    assert not os.path.exists(os.path.join(REPO, "experiments", "rlhf", "data",
                                           "heldout_prompts.jsonl"))
    p = experiment("rlhf/ppo", "tiny").ppo
    assert p.prompts_jsonl.endswith("/prompts.jsonl")
    assert p.eval_prompts_jsonl.endswith("/valid_prompts.jsonl")
    assert p.test_prompts_jsonl.endswith("/test_prompts.jsonl")


def test_ppo_raises_a_programmatic_reward_and_ptx_limits_drift(world, tmp_path):
    """Reward: the fraction of "x" in 8 new tokens after "    return " (about 2% at first)."""
    runs = {}
    for ptx_coef in (0.0, 0.5):  # the second run reuses the first one's compiled steps
        cfg = experiment("rlhf/ppo", "tiny")
        cfg.ppo.update(dict(prompts_jsonl=world["return_prompts"], reward="target_token_fraction",
                            target_token="x", iterations=12, rollout_batch=32, minibatches=2,
                            max_prompt_len=32, response_len=8, kl_coef=0.02, ptx_coef=ptx_coef,
                            ptx_batch_size=8, ptx_context=32, value_lr=3e-3,
                            # 8 tokens rarely finish a body: no end-of-text penalty here
                            missing_eot_penalty=0.0, eval_prompts_jsonl="", ema_decay=0.0))
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


# SIGKILL during iteration 3, once the (asynchronous) iteration-2 checkpoint is committed.
KILL_AT_3 = """
import os, signal, sys, time
from gpt_jax import cli, loop
from gpt_jax.rlhf import ppo
run = loop.run
workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
def run_and_kill(cfg, wd, mesh, task, **options):
    make = task.make_step
    def make_killing(trainer):
        step = make(trainer)
        def killing(state, it):
            if it == 3:
                done = os.path.join(workdir, "checkpoints", "2", "commit_success.txt")
                deadline = time.time() + 120
                while not os.path.exists(done):
                    assert time.time() < deadline, "checkpoint 2 never completed"
                    time.sleep(0.1)
                os.kill(os.getpid(), signal.SIGKILL)
            return step(state, it)
        return killing
    task.make_step = make_killing
    return run(cfg, wd, mesh, task, **options)
loop.run = run_and_kill
cli.define_run_flags("PPO", init_from=True)
from absl import app
app.run(ppo.main, argv=["ppo"] + sys.argv[1:])
"""


def _ppo_args(world, workdir):
    overrides = dict(prompts_jsonl=world["return_prompts"], reward="target_token_fraction",
                     target_token="x", iterations=4, rollout_batch=8, minibatches=2,
                     max_prompt_len=32, response_len=8, ptx_batch_size=4, ptx_context=16,
                     eval_prompts_jsonl=world["heldout"], eval_samples=1,
                     missing_eot_penalty=0.5)
    return (["-m", "gpt_jax.rlhf.ppo", "--config=experiments/rlhf/ppo.py:tiny",
             f"--init_from={world['pre']}", f"--workdir={workdir}",
             "--config.train.ckpt_every=2", "--config.train.eval_every=2"]
            + [f"--config.ppo.{k}={v}" for k, v in overrides.items()])


def _exported(workdir, name):
    cfg = Workdir(os.path.join(workdir, name)).read_config()
    shapes = model_lib.unbox(model_lib.abstract_params(cfg.model))
    params, meta = checkpoint.restore_params(os.path.join(workdir, name), shapes)
    return meta["step"], jax.tree.leaves(params)


def test_ppo_resumes_exactly_after_sigkill(world, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    # The three processes share compiled steps through JAX's persistent cache (CI time).
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    done = run_python(_ppo_args(world, straight), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run_python(["-c", KILL_AT_3] + _ppo_args(world, resumed)[2:], env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    again = run_python(_ppo_args(world, resumed), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step 2" in again.stdout
    a = {r["step"]: r for r in metrics.read_metrics(straight) if "loss" in r}
    b = {r["step"]: r for r in metrics.read_metrics(resumed) if "loss" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):  # iterations after the resume: rollouts, scores and updates
        for key in ("loss", "reward", "score", "kl", "policy_loss", "value_loss", "ptx_loss",
                    "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    evals = [{r["step"]: r for r in metrics.read_metrics(w) if "eval_reward" in r}
             for w in (straight, resumed)]
    assert [e[4]["eval_reward"] for e in evals] == [e[4]["eval_reward"] for e in evals[::-1]]
    for key in evals[0][4]:
        if key.startswith(("eval_", "ema_eval_")):
            assert evals[0][4][key] == evals[1][4][key], key
    for name in ("policy", "policy_ema"):
        (step_a, params_a), (step_b, params_b) = _exported(straight, name), _exported(resumed, name)
        assert step_a == step_b == 4
        for x, y in zip(params_a, params_b):
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------- bad input


def _ppo_config(world, **ppo_fields):
    cfg = experiment("rlhf/ppo", "tiny")
    cfg.ppo.update({**dict(prompts_jsonl=world["return_prompts"],
                           reward="target_token_fraction", target_token="x",
                           eval_prompts_jsonl="", max_prompt_len=32, response_len=8),
                    **ppo_fields})
    return cfg


def _one_line_error(fn, *args, match):
    with pytest.raises(ConfigError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)


def test_ppo_bad_input_is_one_line_before_compiling(world, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _one_line_error(ppo.train_ppo, _ppo_config(world, prompts_jsonl=str(empty)), world["pre"],
                    str(tmp_path / "a"), match=r"ppo\.prompts_jsonl=.*empty\.jsonl.*no examples")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "def f(x):\n    return x\n" * 3}) + "\n")
    _one_line_error(ppo.train_ppo, _ppo_config(world, eval_prompts_jsonl=str(long)),
                    world["pre"], str(tmp_path / "b"),
                    match=r"ppo\.eval_prompts_jsonl=.*long\.jsonl.*prompt 1 has \d+ tokens.*"
                          r"ppo\.max_prompt_len=32")
    # A reward model on another base model (here: another vocabulary).
    rm = Workdir(tmp_path / "rm")
    rm_cfg = Workdir(world["pre"]).read_config()
    rm_cfg.model.vocab_size += 16
    rm.write_config(rm_cfg)
    _one_line_error(ppo.train_ppo, _ppo_config(world, reward="model", reward_workdir=str(rm)),
                    world["pre"], str(tmp_path / "c"),
                    match=r"ppo\.reward_workdir=.*vocab_size=64.*48")
    for name in "abc":  # nothing was written: no run started
        assert not os.path.exists(tmp_path / name / "config.json")


def test_rankings_with_one_response_is_one_line(world, tmp_path):
    bad = tmp_path / "rankings.jsonl"
    lines = open(world["rankings.jsonl"]).read().splitlines()
    row = json.loads(lines[3])
    lines[3] = json.dumps({**row, "responses": row["responses"][:1], "ranking": [0]})
    bad.write_text("\n".join(lines) + "\n")
    cfg = experiment("rlhf/reward", "tiny")
    cfg.reward.update(dict(train_jsonl=str(bad), demo_jsonl=world["sft.jsonl"]))
    _one_line_error(reward.train_reward, cfg, world["pre"], str(tmp_path / "rm"),
                    match=r"reward\.train_jsonl=.*rankings\.jsonl.*prompt 4 has 1 response")
