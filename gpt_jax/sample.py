"""Sampling: KV-cache decoding, logit processors, and the `python -m gpt_jax.sample` CLI.

    python -m gpt_jax.sample --workdir=runs/tiny --prompt="def " --temperature=0.8 \\
        --top_p=0.95 --num_samples=4 [--stream] [--prompt_file=prompts.txt]
    python -m gpt_jax.sample --workdir=runs/gpt2 --prompt="Q: ...\\nA:" --num_beams=4 \\
        --length_penalty=0.6

Decoding: prompts are left-padded to a bucket of P <= context slots (row b's real tokens
start at slot pad_B[b], its first one at position 0), prefilled in one pass, then one token
per step inside `jax.lax.while_loop`, all jitted with fixed shapes: the token buffer holds
P + max_new_tokens slots and the KV cache min(that, context), so nothing recompiles per
prompt length. Any number of tokens can be generated: once the cache is full, every step
re-prefills the last `context` slots (what nanoGPT's cropping `generate` computes); a
prompt longer than the context keeps its last `context` tokens, with a notice on stderr.
A row stops at `eot_id` (later slots are filled with it); the loop stops when every row
has. Beam search (`beam_generate`) is Hugging Face's, on the same prefill and steps.

Logit processors are pure functions, applied in HF transformers' order (PAPERS.md):
repetition penalty, no-repeat n-gram, temperature, top-k, top-p; temperature 0 is greedy.
Padding never counts for the penalty or n-grams. Randomness: row r's token number i is
drawn with `fold_in(fold_in(key(seed), r), i)`, so a seed fixes every row's tokens
whatever the batch, the prompt bucket or streaming.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpt_jax import attention, cli
from gpt_jax import model as model_lib

Array = jax.Array
BUCKET = 32  # prompt slots are rounded up to a multiple of this


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Logit processing; the defaults leave the model's distribution unchanged."""

    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    no_repeat_ngram_size: int = 0  # 0: off

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size={self.no_repeat_ngram_size} must be >= 0")


# ---------------------------------------------------------------- logit processors
# Row b's sequence so far is seq_BxS[b, start_B[b]:end]: slots before start_B are padding.

def _valid_BxS(seq_BxS: Array, start_B: Array, end: Array | int) -> Array:
    slot_S = jnp.arange(seq_BxS.shape[1])
    return (slot_S[None, :] >= start_B[:, None]) & (slot_S[None, :] < end)


def _scatter_any(tokens_BxN: Array, flags_BxN: Array, vocab: int) -> Array:
    """B x V: True at every token whose flag is set."""
    rows_Bx1 = jnp.arange(tokens_BxN.shape[0])[:, None]
    counts_BxV = jnp.zeros((tokens_BxN.shape[0], vocab), jnp.int32)
    return counts_BxV.at[rows_Bx1, tokens_BxN].add(flags_BxN.astype(jnp.int32)) > 0


def repetition_penalty(logits_BxV: Array, seq_BxS: Array, start_B: Array, end: Array | int,
                       theta: float) -> Array:
    """CTRL: every distinct token of the sequence gets logit / theta if positive, else * theta."""
    seen_BxV = _scatter_any(seq_BxS, _valid_BxS(seq_BxS, start_B, end), logits_BxV.shape[-1])
    penalised_BxV = jnp.where(logits_BxV > 0, logits_BxV / theta, logits_BxV * theta)
    return jnp.where(seen_BxV, penalised_BxV, logits_BxV)


def no_repeat_ngram(logits_BxV: Array, seq_BxS: Array, start_B: Array, end: Array | int,
                    n: int) -> Array:
    """Bans the n-th token of every earlier n-gram whose first n-1 tokens equal the last n-1."""
    b, s = seq_BxS.shape
    m = s - n + 1  # candidate n-gram starts j = 0 .. s-n
    if n <= 0 or m <= 0:
        return logits_BxV
    start_M = jnp.arange(m)
    match_BxM = (start_M[None, :] >= start_B[:, None]) & (start_M[None, :] + n - 1 < end)
    if n > 1:
        last_BxN = jax.lax.dynamic_slice_in_dim(seq_BxS, jnp.maximum(end - (n - 1), 0), n - 1, 1)
        match_BxM &= (end - start_B >= n - 1)[:, None]  # the last n-1 tokens are all real
        for k in range(n - 1):
            match_BxM &= seq_BxS[:, k:k + m] == last_BxN[:, k:k + 1]
    banned_BxV = _scatter_any(seq_BxS[:, n - 1:], match_BxM, logits_BxV.shape[-1])
    return jnp.where(banned_BxV, -jnp.inf, logits_BxV)


def temperature(logits_BxV: Array, t: float) -> Array:
    return logits_BxV / t


def top_k(logits_BxV: Array, k: int) -> Array:
    """Keeps logits >= the k-th largest (ties with it included); k = 0 keeps all."""
    if k <= 0 or k >= logits_BxV.shape[-1]:
        return logits_BxV
    kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
    return jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)


def top_p(logits_BxV: Array, p: float) -> Array:
    """Nucleus: keeps the most likely tokens until their mass reaches p, the token that
    crosses p included (so at least one), plus any tied with it; p = 1 keeps all."""
    if p >= 1.0:
        return logits_BxV
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the more likely ones
    count_Bx1 = jnp.maximum(jnp.sum(before_BxV < p, axis=-1, keepdims=True), 1)
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, count_Bx1 - 1, axis=-1)
    return jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)


def process_logits(logits_BxV: Array, seq_BxS: Array, start_B: Array, end: Array | int,
                   cfg: SamplingConfig) -> Array:
    """All processors in the conventional order (temperature/top-k/top-p skipped if greedy)."""
    if cfg.repetition_penalty != 1.0:
        logits_BxV = repetition_penalty(logits_BxV, seq_BxS, start_B, end, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size:
        logits_BxV = no_repeat_ngram(logits_BxV, seq_BxS, start_B, end, cfg.no_repeat_ngram_size)
    if cfg.temperature > 0:
        logits_BxV = top_p(top_k(temperature(logits_BxV, cfg.temperature), cfg.top_k), cfg.top_p)
    return logits_BxV


def choose(logits_BxV: Array, keys_B: Array, cfg: SamplingConfig) -> Array:
    """Next tokens (int32 B) from processed logits: argmax if greedy, else one draw per row."""
    if cfg.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


# ---------------------------------------------------------------- KV-cache decoding

class DecodeState(NamedTuple):
    """The loop carry. Slots [0, P) hold the left-padded prompts, generated tokens follow."""

    seq_BxS: Array  # int32 token buffer, S = P + max_new_tokens
    pad_B: Array  # padding slots before each row's first real token
    length: Array  # slots filled so far (int32 scalar)
    done_B: Array  # the row has produced eot
    cache: Any  # the model's 'cache' collection
    keys_B: Array  # per-row base PRNG keys


class Forward(NamedTuple):
    """The model's two decoding calls, shared by sampling and beam search.

    prefill(params, tokens_BxT, pad_B) -> (logits of the last slot BxV, a fresh cache with
    the T slots filled). next_logits(params, seq_BxS, pad_B, length, cache) -> (logits of
    slot `length` BxV, cache): feeds slot length - 1 through the cache while it has room;
    past `model.context` slots it re-prefills the last `context` slots instead (positions
    0 .. context - 1), so the model sees what nanoGPT's cropping `generate` shows it.
    """

    prefill: Callable[..., tuple[Array, Any]]
    next_logits: Callable[..., tuple[Array, Any]]
    cache_slots: int


def make_forward(model_cfg: ml_collections.ConfigDict, total_slots: int) -> Forward:
    """Prefill and one-token steps for sequences of up to `total_slots` slots; the cache
    holds min(total_slots, model.context) of them."""
    net, context = model_lib.GPT(model_cfg), model_cfg.context
    slots = min(total_slots, context)

    def prefill(params: Any, tokens_BxT: Array, pad_B: Array) -> tuple[Array, Any]:
        step = attention.DecodeStep(jnp.zeros((), jnp.int32), pad_B)
        logits_BxTxV, out = net.apply(
            {"params": params, "cache": model_lib.init_cache(model_cfg, tokens_BxT.shape[0],
                                                             slots)},
            tokens_BxT, decode_step=step, mutable=["cache"])
        return logits_BxTxV[:, -1], out["cache"]

    def cached(params: Any, seq_BxS: Array, pad_B: Array, length: Array, cache: Any
               ) -> tuple[Array, Any]:
        last = length - 1
        tok_Bx1 = jax.lax.dynamic_slice_in_dim(seq_BxS, last, 1, axis=1)
        logits_Bx1xV, out = net.apply(
            {"params": params, "cache": cache}, tok_Bx1,
            decode_step=attention.DecodeStep(last, pad_B), mutable=["cache"])
        return logits_Bx1xV[:, 0], out["cache"]

    def window(params: Any, seq_BxS: Array, pad_B: Array, length: Array, cache: Any
               ) -> tuple[Array, Any]:
        del cache
        first = length - context
        tokens_BxC = jax.lax.dynamic_slice_in_dim(seq_BxS, first, context, axis=1)
        return prefill(params, tokens_BxC, jnp.maximum(pad_B - first, 0))

    def next_logits(params: Any, seq_BxS: Array, pad_B: Array, length: Array, cache: Any
                    ) -> tuple[Array, Any]:
        if total_slots <= context:  # never slides
            return cached(params, seq_BxS, pad_B, length, cache)
        return jax.lax.cond(length - 1 < slots, cached, window, params, seq_BxS, pad_B,
                            length, cache)

    return Forward(prefill, next_logits, slots)


def _mask_vocab(logits_BxV: Array, vocab: int | None) -> Array:
    if vocab is None or vocab >= logits_BxV.shape[-1]:
        return logits_BxV
    return jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab, logits_BxV, -jnp.inf)


class Decoder(NamedTuple):
    """Jitted functions for one (model, processors, P, max_new_tokens, eot) choice.

    start(params, tokens_BxP, pad_B, keys_B) -> state: prefill + the first token.
    advance(params, state, until) -> state: generates until `until` tokens (dynamic) exist.
    generate(params, tokens_BxP, pad_B, keys_B) -> state: both, max_new_tokens in all.
    """

    start: Callable[..., DecodeState]
    advance: Callable[..., DecodeState]
    generate: Callable[..., DecodeState]
    prompt_len: int
    max_new_tokens: int


def make_decoder(model_cfg: ml_collections.ConfigDict, cfg: SamplingConfig, prompt_len: int,
                 max_new_tokens: int, eot_id: int, vocab: int | None = None) -> Decoder:
    """A KV-cache decoder for P = `prompt_len` <= context prompt slots and any number of new
    tokens (the window slides past the context). Only ids < `vocab` (the tokenizer's;
    default all the model's) are ever chosen."""
    p, n = prompt_len, max_new_tokens
    if not 1 <= p <= model_cfg.context or n < 1:
        raise ValueError(f"prompt slots {p} must be in [1, context={model_cfg.context}] and "
                         f"max_new_tokens {n} >= 1")
    fwd = make_forward(model_cfg, p + n)

    def emit(state: DecodeState, logits_BxV: Array) -> DecodeState:
        """Chooses the token of slot `length` from the logits of slot `length - 1`."""
        logits_BxV = process_logits(_mask_vocab(logits_BxV, vocab), state.seq_BxS, state.pad_B,
                                    state.length, cfg)
        keys_B = jax.vmap(jax.random.fold_in, (0, None))(state.keys_B, state.length - p)
        tok_B = jnp.where(state.done_B, eot_id, choose(logits_BxV, keys_B, cfg))
        seq_BxS = jax.lax.dynamic_update_slice(state.seq_BxS, tok_B[:, None], (0, state.length))
        return state._replace(seq_BxS=seq_BxS, length=state.length + 1,
                              done_B=state.done_B | (tok_B == eot_id))

    def start(params: Any, tokens_BxP: Array, pad_B: Array, keys_B: Array) -> DecodeState:
        b = tokens_BxP.shape[0]
        logits_BxV, cache = fwd.prefill(params, tokens_BxP, pad_B)
        seq_BxS = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(tokens_BxP)
        state = DecodeState(seq_BxS, pad_B, jnp.asarray(p, jnp.int32), jnp.zeros(b, bool),
                            cache, keys_B)
        return emit(state, logits_BxV)

    def step(params: Any, state: DecodeState) -> DecodeState:
        logits_BxV, cache = fwd.next_logits(params, state.seq_BxS, state.pad_B, state.length,
                                            state.cache)
        return emit(state._replace(cache=cache), logits_BxV)

    def advance(params: Any, state: DecodeState, until: Array | int) -> DecodeState:
        stop = p + jnp.minimum(until, n)
        return jax.lax.while_loop(
            lambda s: (s.length < stop) & ~jnp.all(s.done_B),
            lambda s: step(params, s), state)

    def generate(params: Any, tokens_BxP: Array, pad_B: Array, keys_B: Array) -> DecodeState:
        return advance(params, start(params, tokens_BxP, pad_B, keys_B), n)

    return Decoder(jax.jit(start), jax.jit(advance), jax.jit(generate), p, n)


def decoder(model_cfg: ml_collections.ConfigDict, cfg: SamplingConfig, prompt_len: int,
            max_new_tokens: int, eot_id: int, vocab: int | None = None) -> Decoder:
    """`make_decoder`, memoised so repeated calls reuse the compiled functions."""
    return _decoder(model_cfg.to_json(), cfg, prompt_len, max_new_tokens, eot_id, vocab)


@functools.lru_cache(maxsize=16)
def _decoder(model_json: str, cfg: SamplingConfig, prompt_len: int, max_new_tokens: int,
             eot_id: int, vocab: int | None) -> Decoder:
    model_cfg = ml_collections.ConfigDict(json.loads(model_json))
    return make_decoder(model_cfg, cfg, prompt_len, max_new_tokens, eot_id, vocab)


# ---------------------------------------------------------------- beam search
# Hugging Face transformers' beam search (generation/utils.py `_beam_search`, v4.50+),
# step for step: per row, the 2K best continuations of the K running beams by summed
# log-probability; those of the top K that end in eot (or reach max length) become
# hypotheses scored sum / generated_len ** length_penalty (eot counted), the best K
# others keep running; the K best hypotheses are kept. `early_stopping`: True stops a row
# once it has K hypotheses; False (HF's default) once the best running beam, scored at
# its current length, cannot beat the worst hypothesis; "never" scores it at max length
# (when length_penalty > 0), the canonical stopping rule.

MAX_BEAMS = 64
NEG = -1.0e9  # HF's "impossible" score


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Beam search settings; GPT-3 evaluated free-form answers with 4 beams, penalty 0.6."""

    num_beams: int = 4
    length_penalty: float = 1.0  # HF's default; GPT-3 used 0.6
    early_stopping: bool | str = False  # True, False or "never", as in HF

    def __post_init__(self) -> None:
        if not 1 <= self.num_beams <= MAX_BEAMS:
            raise ValueError(f"num_beams={self.num_beams} must be in [1, {MAX_BEAMS}]")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping={self.early_stopping!r} must be True, False or "
                             "'never'")


class BeamState(NamedTuple):
    """Per row b and beam k: running sequences and scores; the K best hypotheses."""

    seq_BKxS: Array  # running beams, row-major (b * K + k)
    score_BxK: Array  # their summed log-probabilities
    hyp_BxKxS: Array  # hypotheses, best first
    hyp_score_BxK: Array  # length-penalised scores (NEG: empty slot)
    hyp_len_BxK: Array  # generated tokens, eot included
    hyp_done_BxK: Array  # the slot holds a hypothesis (HF's is_sent_finished)
    open_B: Array  # a running beam may still beat a hypothesis (HF's heuristic)
    all_hit: Array  # every candidate of the last step stopped: the loop ends
    length: Array  # slots filled
    logits_BKxV: Array  # next-token logits of every running beam
    cache: Any
    pad_BK: Array  # each running beam's prompt padding (its row's)


def _cache_batch_axes(model_cfg: ml_collections.ConfigDict, slots: int) -> Any:
    """Per cache leaf, its batch axis (0, or 1 when layers are scanned)."""
    one, two = (jax.eval_shape(lambda b=b: model_lib.init_cache(model_cfg, b, slots))
                for b in (1, 2))
    return jax.tree.map(lambda a, b: next(i for i, (x, y) in enumerate(zip(a.shape, b.shape))
                                          if x != y), one, two)


def make_beam_search(model_cfg: ml_collections.ConfigDict, beam: BeamConfig, prompt_len: int,
                     max_new_tokens: int, eot_id: int, vocab: int | None = None
                     ) -> Callable[..., BeamState]:
    """search(params, tokens_BxP, pad_B) -> final BeamState (jitted); the prefill and
    one-token steps are the sampler's (`make_forward`), over B x K rows."""
    p, n, k = prompt_len, max_new_tokens, beam.num_beams
    if not 1 <= p <= model_cfg.context or n < 1:
        raise ValueError(f"prompt slots {p} must be in [1, context={model_cfg.context}] and "
                         f"max_new_tokens {n} >= 1")
    if 2 * k > (vocab or model_cfg.vocab_size):
        raise ValueError(f"num_beams={k} needs 2 * num_beams <= the vocabulary")
    s, lp = p + n, beam.length_penalty
    fwd = make_forward(model_cfg, s)
    axes = _cache_batch_axes(model_cfg, fwd.cache_slots)
    top_mask_2K = jnp.arange(2 * k) < k

    def penalised(score: Array, gen_len: Array) -> Array:
        return score / gen_len.astype(jnp.float32) ** lp

    def step(params: Any, st: BeamState) -> BeamState:
        b = st.score_BxK.shape[0]
        logp_BKxV = _mask_vocab(jax.nn.log_softmax(st.logits_BKxV.astype(jnp.float32), -1), vocab)
        v = logp_BKxV.shape[-1]
        total_BxKV = (logp_BKxV.reshape(b, k, v) + st.score_BxK[:, :, None]).reshape(b, k * v)
        cand_score_Bx2K, cand_idx_Bx2K = jax.lax.top_k(total_BxKV, 2 * k)
        src_Bx2K, tok_Bx2K = cand_idx_Bx2K // v, cand_idx_Bx2K % v
        seq_BxKxS = st.seq_BKxS.reshape(b, k, s)
        cand_Bx2KxS = jnp.take_along_axis(seq_BxKxS, src_Bx2K[:, :, None], axis=1)
        cand_Bx2KxS = jax.lax.dynamic_update_slice_in_dim(
            cand_Bx2KxS, tok_Bx2K[:, :, None], st.length, axis=2)
        hit_Bx2K = (tok_Bx2K == eot_id) | (st.length + 1 >= s)
        # e. the K best continuations that did not stop keep running
        run_Bx2K = cand_score_Bx2K + hit_Bx2K.astype(jnp.float32) * NEG
        score_BxK, keep_BxK = jax.lax.top_k(run_Bx2K, k)
        seq_BxKxS = jnp.take_along_axis(cand_Bx2KxS, keep_BxK[:, :, None], axis=1)
        src_BxK = jnp.take_along_axis(src_Bx2K, keep_BxK, axis=1)
        # f. stopped ones among the top K become hypotheses if they rank in the best K
        new_Bx2K = hit_Bx2K & top_mask_2K[None, :]
        gen_len = st.length + 1 - p
        hyp_Bx2K = penalised(cand_score_Bx2K, gen_len)
        full_B = jnp.all(st.hyp_done_BxK, axis=-1) & (beam.early_stopping is True)
        hyp_Bx2K = hyp_Bx2K + full_B[:, None].astype(jnp.float32) * NEG
        hyp_Bx2K = hyp_Bx2K + (~st.open_B)[:, None].astype(jnp.float32) * NEG
        hyp_Bx2K = hyp_Bx2K + (~new_Bx2K).astype(jnp.float32) * NEG
        merged_Bx3K = jnp.concatenate([st.hyp_score_BxK, hyp_Bx2K], axis=1)
        hyp_score_BxK, pick_BxK = jax.lax.top_k(merged_Bx3K, k)

        def pick(old: Array, new: Array) -> Array:
            both = jnp.concatenate([old, new], axis=1)
            idx = pick_BxK.reshape(pick_BxK.shape + (1,) * (both.ndim - 2))
            return jnp.take_along_axis(both, idx, axis=1)

        hyp_BxKxS = pick(st.hyp_BxKxS, cand_Bx2KxS)
        hyp_len_BxK = pick(st.hyp_len_BxK, jnp.full((b, 2 * k), gen_len, jnp.int32))
        hyp_done_BxK = pick(st.hyp_done_BxK, new_Bx2K)
        # g. reorder the cache to the running beams' sources; HF's early-stop heuristic
        rows_BK = (jnp.arange(b)[:, None] * k + src_BxK).reshape(-1)
        cache = jax.tree.map(lambda x, ax: jnp.take(x, rows_BK, axis=ax), st.cache, axes)
        length = st.length + 1
        best_len = (s - p) if (beam.early_stopping == "never" and lp > 0) else length - p
        best_B = penalised(score_BxK[:, 0], jnp.asarray(best_len))
        worst_BxK = jnp.where(hyp_done_BxK, jnp.min(hyp_score_BxK, axis=1, keepdims=True), NEG)
        open_B = st.open_B & jnp.any(best_B[:, None] > worst_BxK, axis=-1)
        seq_BKxS = seq_BxKxS.reshape(b * k, s)
        logits_BKxV, cache = fwd.next_logits(params, seq_BKxS, st.pad_BK, length, cache)
        return BeamState(seq_BKxS, score_BxK, hyp_BxKxS, hyp_score_BxK, hyp_len_BxK,
                         hyp_done_BxK, open_B, jnp.all(hit_Bx2K), length, logits_BKxV, cache,
                         st.pad_BK)

    def search(params: Any, tokens_BxP: Array, pad_B: Array) -> BeamState:
        b = tokens_BxP.shape[0]
        pad_BK = jnp.repeat(pad_B, k)
        logits_BKxV, cache = fwd.prefill(params, jnp.repeat(tokens_BxP, k, axis=0), pad_BK)
        seq_BKxS = jnp.zeros((b * k, s), jnp.int32).at[:, :p].set(jnp.repeat(tokens_BxP, k, 0))
        score_BxK = jnp.where(jnp.arange(k) == 0, 0.0, NEG) * jnp.ones((b, 1), jnp.float32)
        st = BeamState(seq_BKxS, score_BxK, seq_BKxS.reshape(b, k, s),
                       jnp.full((b, k), NEG, jnp.float32), jnp.zeros((b, k), jnp.int32),
                       jnp.zeros((b, k), bool), jnp.ones(b, bool), jnp.asarray(False),
                       jnp.asarray(p, jnp.int32), logits_BKxV, cache, pad_BK)

        def more(st: BeamState) -> Array:
            exists_open = ~(jnp.all(st.hyp_done_BxK) & (beam.early_stopping is True))
            return jnp.any(st.open_B) & exists_open & ~st.all_hit

        return jax.lax.while_loop(more, lambda st: step(params, st), st)

    return jax.jit(search)


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens BxP, pad_B): each prompt's last `length` tokens, right-aligned in P slots."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    pad = np.zeros(len(prompts), np.int32)
    for i, ids in enumerate(prompts):
        ids = list(ids)[-length:]
        tokens[i, length - len(ids):] = ids
        pad[i] = length - len(ids)
    return tokens, pad


def plan(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int) -> tuple[int, int]:
    """(prompt slots P, new tokens N = max_new_tokens): P is the longest prompt rounded up to
    BUCKET, at most the context. A longer prompt keeps its last `context` tokens (all the
    model can see) and a one-line notice goes to stderr."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    for i, ids in enumerate(prompts):
        if len(ids) > context:
            print(f"note: prompt {i} has {len(ids)} tokens; the model sees its last {context} "
                  f"(model.context)", file=sys.stderr)
    longest = max(1, max(len(ids) for ids in prompts))
    return min(-(-longest // BUCKET) * BUCKET, context), max_new_tokens


def row_keys(seed: int, rows: int, first_row: int = 0) -> Array:
    return jax.vmap(jax.random.fold_in, (None, 0))(
        jax.random.key(seed), jnp.arange(first_row, first_row + rows))


def generated(state: DecodeState, prompt_len: int, eot_id: int) -> list[list[int]]:
    """Each row's generated tokens so far, up to (not including) its eot."""
    out = []
    for row in np.asarray(jax.device_get(state.seq_BxS))[:, prompt_len:int(state.length)]:
        ids = row.tolist()
        out.append(ids[:ids.index(eot_id)] if eot_id in ids else ids)
    return out


def generate_stream(model_cfg: ml_collections.ConfigDict, params: Any,
                    prompts: Sequence[Sequence[int]], cfg: SamplingConfig, max_new_tokens: int,
                    eot_id: int, seed: int = 0, chunk: int = 8, first_row: int = 0,
                    vocab: int | None = None) -> Iterator[list[list[int]]]:
    """Yields every row's generated tokens so far after the first token and every `chunk`
    more (one compiled chunk function, called in a Python loop). Rows draw with the keys of
    rows `first_row ..` of a batch, so streaming one prompt of a batch gives its tokens."""
    prompts = [list(ids) or [eot_id] for ids in prompts]
    p, n = plan(prompts, max_new_tokens, model_cfg.context)
    dec = decoder(model_cfg, cfg, p, n, eot_id, vocab)
    tokens_BxP, pad_B = pad_prompts(prompts, p)
    state = dec.start(params, tokens_BxP, pad_B, row_keys(seed, len(prompts), first_row))
    yield generated(state, p, eot_id)
    made = 1
    while made < n and not bool(jnp.all(state.done_B)):
        made = min(made + chunk, n)
        state = dec.advance(params, state, made)
        yield generated(state, p, eot_id)


def generate(model_cfg: ml_collections.ConfigDict, params: Any,
             prompts: Sequence[Sequence[int]], cfg: SamplingConfig, max_new_tokens: int,
             eot_id: int, seed: int = 0, vocab: int | None = None) -> list[list[int]]:
    """Generated token ids (without the eot) for each prompt, in one jitted call."""
    prompts = [list(ids) or [eot_id] for ids in prompts]
    p, n = plan(prompts, max_new_tokens, model_cfg.context)
    dec = decoder(model_cfg, cfg, p, n, eot_id, vocab)
    tokens_BxP, pad_B = pad_prompts(prompts, p)
    return generated(dec.generate(params, tokens_BxP, pad_B, row_keys(seed, len(prompts))),
                     p, eot_id)


def beam_generate(model_cfg: ml_collections.ConfigDict, params: Any,
                  prompts: Sequence[Sequence[int]], beam: BeamConfig, max_new_tokens: int,
                  eot_id: int, vocab: int | None = None) -> list[list[int]]:
    """Each prompt's best beam-search continuation (without the eot), in one jitted call;
    `num_beams=1` is greedy decoding, as in Hugging Face."""
    if beam.num_beams == 1:
        return generate(model_cfg, params, prompts, SamplingConfig(temperature=0.0),
                        max_new_tokens, eot_id, vocab=vocab)
    prompts = [list(ids) or [eot_id] for ids in prompts]
    p, n = plan(prompts, max_new_tokens, model_cfg.context)
    search = _beam_search(model_cfg.to_json(), beam, p, n, eot_id, vocab)
    tokens_BxP, pad_B = pad_prompts(prompts, p)
    st = jax.device_get(search(params, tokens_BxP, pad_B))
    out = []
    for row, length in zip(st.hyp_BxKxS[:, 0], st.hyp_len_BxK[:, 0]):
        ids = row[p:p + int(length)].tolist()
        out.append(ids[:ids.index(eot_id)] if eot_id in ids else ids)
    return out


@functools.lru_cache(maxsize=16)
def _beam_search(model_json: str, beam: BeamConfig, prompt_len: int, max_new_tokens: int,
                 eot_id: int, vocab: int | None) -> Callable[..., BeamState]:
    model_cfg = ml_collections.ConfigDict(json.loads(model_json))
    return make_beam_search(model_cfg, beam, prompt_len, max_new_tokens, eot_id, vocab)


def sample_text(model_cfg: ml_collections.ConfigDict, params: Any, tokenizer: Any,
                prompt: str, max_new_tokens: int, cfg: SamplingConfig, seed: int = 0) -> str:
    """Prompt + one sampled continuation (KV-cache decoding, stops at end of text)."""
    ids = tokenizer.encode(prompt)
    new = generate(model_cfg, params, [ids], cfg, max_new_tokens, tokenizer.eot_id, seed=seed,
                   vocab=tokenizer.vocab_size)[0]
    return tokenizer.decode(ids + new)


def greedy_text(model_cfg: ml_collections.ConfigDict, params: Any, tokenizer: Any,
                prompt: str, max_new_tokens: int) -> str:
    """Prompt + its greedy continuation."""
    return sample_text(model_cfg, params, tokenizer, prompt, max_new_tokens,
                       SamplingConfig(temperature=0.0))


# ---------------------------------------------------------------- CLI

def define_flags() -> None:
    """CLI flags, defined only when run as a program so importing this module is free."""
    from absl import flags
    flags.DEFINE_string("workdir", None, "Training run directory (config, tokenizer, checkpoints).")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
    flags.DEFINE_string("prompt", "", "Prompt text.")
    flags.DEFINE_string("prompt_file", None, "File of prompts, one per line (overrides --prompt).")
    flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
    flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate (>= 1; may exceed the "
                         "context: the window then slides over the last context tokens).")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0 = off).")
    flags.DEFINE_float("repetition_penalty", 1.0, "CTRL repetition penalty (1.0 = off).")
    flags.DEFINE_integer("no_repeat_ngram_size", 0, "Never repeat an n-gram of this size.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_bool("save", False, "Also write the samples into the workdir's samples/.")
    flags.DEFINE_bool("stream", False, "Print tokens as they are produced (sample by sample).")
    flags.DEFINE_integer("stream_chunk", 4, "Tokens per jitted call when streaming.")
    flags.DEFINE_integer("num_beams", 1, f"Beam search with this many beams (1-{MAX_BEAMS}; 1 = "
                         "sampling as set above); the processors above do not apply to it.")
    flags.DEFINE_float("length_penalty", 1.0, "Beam search: hypotheses score sum log p / "
                       "length ** this (GPT-3: 0.6 with 4 beams).")
    flags.DEFINE_enum("early_stopping", "false", ["false", "true", "never"],
                      "Beam search stopping rule, as in Hugging Face.")
    flags.mark_flags_as_required(["workdir"])


def check_flags(f: Any) -> tuple[SamplingConfig, BeamConfig | None]:
    """The sampling and beam-search flags as configs (beam None for sampling), checked
    before anything is loaded: a bad value raises `cli.UsageError` naming the flag."""
    for name, low in (("max_new_tokens", 1), ("num_samples", 1), ("stream_chunk", 1),
                      ("step", 0)):
        if f[name].value is not None and f[name].value < low:
            raise cli.UsageError(f"--{name}={f[name].value} must be >= {low}")
    if f.prompt_file and not f.prompt_file.startswith("gs://"):
        cli.check_input_file("--prompt_file", f.prompt_file)
    try:
        sampling = SamplingConfig(f.temperature, f.top_k, f.top_p, f.repetition_penalty,
                                  f.no_repeat_ngram_size)
        beam = BeamConfig(f.num_beams, f.length_penalty,
                          {"false": False, "true": True}.get(f.early_stopping, "never"))
    except ValueError as e:
        raise cli.UsageError(f"--{e}") from None
    if beam.num_beams > 1 and f.stream:
        raise cli.UsageError("--stream does not apply to beam search (--num_beams > 1)")
    return sampling, beam if beam.num_beams > 1 else None


def continuation(tok: Any, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text `new_ids` add after the prompt. Decoded together with the prompt, so a
    tokenizer whose pieces carry the space at the end of a word (GPT-1's `</w>`) does not
    glue the first new word to the prompt's last one."""
    head = tok.decode(list(prompt_ids))
    full = tok.decode(list(prompt_ids) + list(new_ids))
    return full[len(head):] if full.startswith(head) else tok.decode(list(new_ids))


def main(argv: list[str]) -> None:
    from absl import flags, logging
    del argv
    f = flags.FLAGS
    sampling, beam = check_flags(f)  # bad values fail before anything is loaded
    if not f["verbosity"].present:  # orbax logs every file at INFO
        logging.set_verbosity("warning")
    from etils import epath

    from gpt_jax.workdir import SAMPLES_DIR, open_run
    run = open_run(f.workdir, step=f.step)
    cfg, params, tok = run.cfg, run.params, run.tokenizer
    if f.prompt_file:
        texts = [line for line in epath.Path(f.prompt_file).read_text().splitlines()
                 if line.strip()]
    else:
        texts = [f.prompt.replace("\\n", "\n")]  # a literal \n in --prompt is a newline
    rows = [(text, tok.encode(text)) for text in texts for _ in range(f.num_samples)]
    if not f.stream:
        outs = generate(cfg.model, params, [ids for _, ids in rows], sampling,
                        f.max_new_tokens, tok.eot_id, f.seed, tok.vocab_size) \
            if beam is None else beam_generate(cfg.model, params, [ids for _, ids in rows],
                                               beam, f.max_new_tokens, tok.eot_id,
                                               tok.vocab_size)
        shown = "".join(f"--- sample {i} ---\n{text}{continuation(tok, ids, new)}\n"
                        for i, ((text, ids), new) in enumerate(zip(rows, outs)))
        print(shown, end="")
        if f.save:  # into the run: samples/step<step>-seed<seed>.txt
            path = run.workdir.write_text(f"{SAMPLES_DIR}/step{run.step}-seed{f.seed}.txt", shown)
            print(f"saved: {path}", file=sys.stderr)
        return
    for i, (text, ids) in enumerate(rows):  # one row at a time; row keys as in a batch
        print(f"--- sample {i} ---\n{text}", end="", flush=True)
        shown = ""
        for outs in generate_stream(cfg.model, params, [ids], sampling, f.max_new_tokens,
                                    tok.eot_id, f.seed, f.stream_chunk, first_row=i,
                                    vocab=tok.vocab_size):
            piece = continuation(tok, ids, outs[0])
            sys.stdout.write(piece[len(shown):])
            sys.stdout.flush()
            shown = piece
        print()


if __name__ == "__main__":
    define_flags()
    cli.run(main)
