"""KV-cache decoding against full recompute, logit processors by hand, the sampling CLI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python, tiny_config

from gpt_jax import attention, sample
from gpt_jax import model as model_lib
from gpt_jax.sample import SamplingConfig
from gpt_jax.workdir import Workdir

INF = float("inf")
GREEDY = SamplingConfig(temperature=0.0)


def _params(model_cfg, seed=0):
    init = jax.jit(lambda key: model_lib.unbox(model_lib.init_params(model_cfg, key)))
    return init(jax.random.key(seed))


def _logits(model_cfg, params, tokens_BxT):
    return jax.jit(lambda t: model_lib.GPT(model_cfg).apply({"params": params}, t))(tokens_BxT)


# ---------------------------------------------------------------- cache == recompute

@pytest.mark.parametrize("pattern,scan,remat", [
    ("dense", False, "none"), ("alternating", False, "full"), ("alternating", True, "none")])
def test_cached_logits_equal_full_recompute(pattern, scan, remat):
    """Prefill then one token a step; row 1 is left-padded by 4 slots. Window 3 < length;
    with scan, layer_0 is dense and layer_1 banded. The dense case is post-norm (GPT-1)."""
    cfg = tiny_config(attention_pattern=pattern, window=3, scan_layers=scan, remat=remat,
                      norm="post" if pattern == "dense" else "pre").model
    params, net = _params(cfg), model_lib.GPT(cfg)
    s, p, pad = 12, 5, 4
    tokens_BxS = jax.random.randint(jax.random.key(1), (2, s), 0, cfg.vocab_size)
    pad_B = jnp.array([0, pad], jnp.int32)
    # reference: row 1 without its padding (zeros after it are hidden by the causal mask)
    full_BxSxV = _logits(cfg, params, tokens_BxS.at[1].set(jnp.roll(tokens_BxS[1], -pad)))

    @jax.jit
    def run(index, toks_BxT, cache):
        step = attention.DecodeStep(jnp.asarray(index, jnp.int32), pad_B)
        logits, out = net.apply({"params": params, "cache": cache}, toks_BxT,
                                decode_step=step, mutable=["cache"])
        return logits, out["cache"]

    logits_BxPxV, cache = run(0, tokens_BxS[:, :p], model_lib.init_cache(cfg, 2, s))
    got = [logits_BxPxV[:, i] for i in range(p)]
    for i in range(p, s):
        logits_Bx1xV, cache = run(i, tokens_BxS[:, i:i + 1], cache)
        got.append(logits_Bx1xV[:, 0])
    got_SxBxV = jnp.stack(got)
    np.testing.assert_allclose(got_SxBxV[:, 0], full_BxSxV[0], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got_SxBxV[pad:, 1], full_BxSxV[1, :s - pad], atol=2e-5, rtol=2e-5)


def test_banded_cache_is_a_ring_of_window_slots():
    cfg = tiny_config(attention_pattern="alternating", window=3, scan_layers=True).model
    shapes = jax.tree.map(lambda x: x.shape, model_lib.init_cache(cfg, 2, 12))
    assert shapes["h"]["layer_0"]["attn"]["cached_key"] == (1, 2, 12, 2, 16)
    assert shapes["h"]["layer_1"]["attn"]["cached_key"] == (1, 2, 3, 2, 16)


def _greedy_recompute(cfg, params, prompts, n, length=16):
    """Reference: each whole (unpadded) sequence through the model for every new token, in
    a fixed buffer whose causal mask hides the unfilled tail."""
    apply = jax.jit(lambda b: model_lib.GPT(cfg).apply({"params": params}, b))
    out = []
    for ids in prompts:
        buf = np.zeros((1, length), np.int32)
        buf[0, :len(ids)] = ids
        for i in range(len(ids), len(ids) + n):
            buf[0, i] = int(jnp.argmax(apply(buf)[0, i - 1]))
        out.append(buf[0, len(ids):len(ids) + n].tolist())
    return out


def test_batched_greedy_matches_recompute_and_stops_at_eot():
    cfg = tiny_config(attention_pattern="alternating", window=3, context=40).model
    params = _params(cfg)
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    ref = _greedy_recompute(cfg, params, prompts, 6)
    eot = ref[2][2]  # make row 2's third token the end of text
    got = sample.generate(cfg, params, prompts, GREEDY, 6, eot_id=eot)
    assert got == [r[:r.index(eot)] if eot in r else r for r in ref]


# ---------------------------------------------------------------- processors by hand

def _row(*xs):
    return jnp.asarray([xs], jnp.float32)


def _seq(*ids):
    return jnp.asarray([ids], jnp.int32)


def test_repetition_penalty():
    logits = _row(2.0, -1.0, 0.5, 3.0)
    out = sample.repetition_penalty(logits, _seq(0, 1, 1), jnp.array([0]), 3, 2.0)
    np.testing.assert_allclose(out, _row(1.0, -2.0, 0.5, 3.0))
    # slot 0 is padding (token 3): not penalised; slot 3 is past the end: ignored
    out = sample.repetition_penalty(logits, _seq(3, 1, 2, 0), jnp.array([1]), 3, 2.0)
    np.testing.assert_allclose(out, _row(2.0, -2.0, 0.25, 3.0))


def _banned(seq, n, start=0, end=None, vocab=10):
    end = seq.shape[1] if end is None else end
    out = sample.no_repeat_ngram(jnp.zeros((1, vocab)), seq, jnp.array([start]), end, n)
    return [int(i) for i in np.flatnonzero(np.isinf(np.asarray(out[0])))]


def test_no_repeat_ngram():
    assert _banned(_seq(1, 2, 3, 1, 2), 3) == [3]
    assert _banned(_seq(1, 2, 3, 1, 2), 2) == [3]
    assert _banned(_seq(1, 2, 3, 1, 2), 1) == [1, 2, 3]
    assert _banned(_seq(1, 2, 3, 1, 2), 4) == []
    assert _banned(_seq(1, 2, 3, 1, 2, 9, 9), 3, end=5) == [3]  # slots past the end ignored
    assert _banned(_seq(1, 2), 4) == []  # shorter than n - 1
    assert _banned(_seq(4, 2, 4, 2, 4), 2) == [2]  # the prompt's own n-grams count
    # padding: with slot 0 real, (2, 7) bans 7; with slot 0 padding nothing is banned
    assert _banned(_seq(2, 7, 2), 2) == [7]
    assert _banned(_seq(2, 7, 2), 2, start=1) == []
    assert _banned(_seq(5, 5, 5), 3, start=1) == []  # the last n-1 must be real too


def test_temperature_and_top_k():
    logits = _row(1.0, 3.0, 3.0, 2.0)
    np.testing.assert_allclose(sample.temperature(logits, 0.5), _row(2.0, 6.0, 6.0, 4.0))
    np.testing.assert_array_equal(sample.top_k(logits, 0), logits)
    np.testing.assert_array_equal(sample.top_k(logits, 4), logits)
    np.testing.assert_array_equal(sample.top_k(logits, 1), _row(-INF, 3.0, 3.0, -INF))  # ties
    np.testing.assert_array_equal(sample.top_k(logits, 3), _row(-INF, 3.0, 3.0, 2.0))


def test_top_p():
    logits = jnp.log(_row(0.05, 0.5, 0.15, 0.3))
    kept = lambda p: np.flatnonzero(np.isfinite(sample.top_p(logits, p)[0])).tolist()  # noqa: E731
    assert kept(0.4) == [1]  # the first token already crosses p
    assert kept(0.6) == [1, 3]  # 0.5 < 0.6: the token that crosses p is kept
    assert kept(0.85) == [1, 2, 3]
    assert kept(0.99) == [0, 1, 2, 3]
    with_inf = _row(-INF, 1.0, 2.0)
    np.testing.assert_array_equal(sample.top_p(with_inf, 1.0), with_inf)  # off
    ties = _row(2.0, 1.0, 1.0, 0.0)  # probs .534 .197 .197 .072: crossing token has a twin
    np.testing.assert_array_equal(sample.top_p(ties, 0.6), _row(2.0, 1.0, 1.0, -INF))


def test_processor_order_and_greedy():
    # repetition penalty before top-k: token 0 is penalised out of the top 1
    cfg = SamplingConfig(repetition_penalty=10.0, top_k=1)
    out = sample.process_logits(_row(3.0, 2.0, 1.0), _seq(0), jnp.array([0]), 1, cfg)
    np.testing.assert_array_equal(out, _row(-INF, 2.0, -INF))
    # temperature before top-p: T = 4 flattens [.5 .3 .2] enough that p = 0.4 keeps two
    logits = jnp.log(_row(0.5, 0.3, 0.2))
    out = sample.process_logits(logits, _seq(0), jnp.array([0]), 0,
                                SamplingConfig(temperature=4.0, top_p=0.4))
    assert np.isfinite(out[0]).tolist() == [True, True, False]
    # greedy: argmax of the processed logits, sampling filters skipped
    out = sample.process_logits(logits, _seq(0), jnp.array([0]), 1,
                                SamplingConfig(temperature=0.0, repetition_penalty=2.0))
    assert int(sample.choose(out, None, GREEDY)[0]) == 1
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


# ---------------------------------------------------------------- sampling runs

def test_same_seed_same_tokens_whatever_the_batch_or_streaming():
    cfg = tiny_config(context=48).model
    params = _params(cfg)
    sc = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2,
                        no_repeat_ngram_size=2)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    a = sample.generate(cfg, params, prompts, sc, 12, eot_id=-1, seed=7)
    assert a == sample.generate(cfg, params, prompts, sc, 12, eot_id=-1, seed=7)
    assert a != sample.generate(cfg, params, prompts, sc, 12, eot_id=-1, seed=8)
    for ids, new in zip(prompts, a):  # no_repeat_ngram_size=2: no bigram twice
        seq = ids + new
        bigrams = [tuple(seq[i:i + 2]) for i in range(len(seq) - 1)]
        assert len(set(bigrams)) == len(bigrams)
    *_, last = sample.generate_stream(cfg, params, prompts[1:2], sc, 12, eot_id=-1, seed=7,
                                      chunk=5, first_row=1)
    assert last == a[1:2]  # row 1 alone, streamed in chunks: the same tokens


def test_greedy_text_with_char_tokenizer():
    from gpt_jax.tokenizer import CharTokenizer
    tok = CharTokenizer("def ():\nabcxyz")
    cfg = tiny_config(context=32).model
    text = sample.greedy_text(cfg, _params(cfg), tok, "def ", 10)
    assert text.startswith("def ") and len(text) <= 14


def test_cli_restores_sharded_and_streams(tmp_path):
    """A 4-device CPU mesh with model=2: restore onto it, stream, match the in-process run."""
    from gpt_jax import checkpoint
    from gpt_jax.tokenizer import CharTokenizer
    cfg = tiny_config(vocab_size=64, context=48, n_head=2)
    cfg.mesh.model = 2
    tok = CharTokenizer("def ():\nabcxyz_")
    params = _params(cfg.model, seed=3)
    workdir = str(tmp_path)
    Workdir(workdir).write_config(cfg)
    tok.save(workdir)
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    ckpt.save(1, params, {"dummy": jnp.zeros(())}, {"step": 1})
    ckpt.close()
    sc = SamplingConfig(temperature=0.8, top_p=0.95)
    prompts = ["def ", "x"]
    want = sample.generate(cfg.model, params, [tok.encode(p) for p in prompts for _ in (0, 1)],
                           sc, 20, tok.eot_id, seed=5, vocab=tok.vocab_size)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    res = run_python(["-m", "gpt_jax.sample", f"--workdir={workdir}", "--temperature=0.8",
                      "--top_p=0.95", "--num_samples=2", "--max_new_tokens=20", "--seed=5",
                      f"--prompt_file={tmp_path / 'prompts.txt'}", "--stream",
                      "--stream_chunk=7"], env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = "".join(f"--- sample {i} ---\n{prompts[i // 2]}{tok.decode(new)}\n"
                       for i, new in enumerate(want))
    assert res.stdout == expected
