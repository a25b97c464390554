"""Decoding speed with and without the KV cache (random init; not a test).

    python benchmarks/sample_bench.py [--shapes=tiny,gpt2] [--batches=1,8]
        [--prompt_len=32] [--new_tokens=256] [--uncached_steps=32]

With the cache: `sample.make_decoder(...).generate` (prefill + while_loop, greedy, no
end of text), timed end to end (best of two) after a compile run. Without: every step runs the whole
fixed (prompt + new) buffer through the model and unembeds the one position it needs;
each step costs the same, so `--uncached_steps` steps are timed and tokens/s computed
from them. The tiny shape's context (128) is raised to prompt + new tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpt_jax import model as model_lib
from gpt_jax import sample


def experiment(file: str, variant: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", file)
    spec = importlib.util.spec_from_file_location(file[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def shape_config(name: str, length: int) -> ml_collections.ConfigDict:
    if name not in ("tiny", "gpt2"):
        raise ValueError(f"unknown shape {name!r}: tiny or gpt2")
    cfg = (experiment("tiny.py", "bpe") if name == "tiny" else experiment("gpt2.py", "small")).model
    cfg.context = max(cfg.context, length)
    return cfg


def cached_tokens_per_s(cfg: ml_collections.ConfigDict, params: Any, tokens_BxP: np.ndarray,
                        n: int) -> float:
    dec = sample.make_decoder(cfg, sample.SamplingConfig(temperature=0.0), tokens_BxP.shape[1],
                              n, eot_id=-1)
    pad_B = np.zeros(tokens_BxP.shape[0], np.int32)
    keys_B = sample.row_keys(0, tokens_BxP.shape[0])
    jax.block_until_ready(dec.generate(params, tokens_BxP, pad_B, keys_B))  # compile
    seconds = float("inf")
    for _ in range(2):  # best of two: the machine may be shared
        tic = time.perf_counter()
        state = jax.block_until_ready(dec.generate(params, tokens_BxP, pad_B, keys_B))
        seconds = min(seconds, time.perf_counter() - tic)
    assert int(state.length) == tokens_BxP.shape[1] + n
    return tokens_BxP.size / tokens_BxP.shape[1] * n / seconds


def uncached_tokens_per_s(cfg: ml_collections.ConfigDict, params: Any, tokens_BxP: np.ndarray,
                          n: int, steps: int) -> float:
    b, p = tokens_BxP.shape
    net = model_lib.GPT(cfg)

    @jax.jit
    def step(buf_BxS: jax.Array, i: jax.Array) -> jax.Array:
        hidden_BxSxD = net.apply({"params": params}, buf_BxS, return_hidden=True)
        h_BxD = jax.lax.dynamic_index_in_dim(hidden_BxSxD, i - 1, axis=1, keepdims=False)
        logits_BxV = h_BxD.astype(jnp.float32) @ params["wte"]["embedding"].T
        tok_B = jnp.argmax(logits_BxV, -1).astype(jnp.int32)
        return jax.lax.dynamic_update_slice(buf_BxS, tok_B[:, None], (0, i))

    buf = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(tokens_BxP)
    jax.block_until_ready(step(buf, jnp.int32(p)))  # compile
    steps = min(steps, n)
    tic = time.perf_counter()
    for i in range(p, p + steps):
        buf = step(buf, jnp.int32(i))
    jax.block_until_ready(buf)
    return b * steps / (time.perf_counter() - tic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="tiny,gpt2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--uncached_steps", type=int, default=32)
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"prompt {args.prompt_len}, new tokens {args.new_tokens}, greedy, float32")
    print(f"{'shape':6} {'batch':>5} {'cached tok/s':>13} {'uncached tok/s':>15} {'speedup':>8}")
    for name in args.shapes.split(","):
        cfg = shape_config(name, args.prompt_len + args.new_tokens)
        init = jax.jit(lambda key, cfg=cfg: model_lib.unbox(model_lib.init_params(cfg, key)))
        params = init(jax.random.key(0))
        for b in (int(x) for x in args.batches.split(",")):
            rng = np.random.default_rng(b)
            tokens_BxP = rng.integers(0, cfg.vocab_size, (b, args.prompt_len)).astype(np.int32)
            with_cache = cached_tokens_per_s(cfg, params, tokens_BxP, args.new_tokens)
            without = uncached_tokens_per_s(cfg, params, tokens_BxP, args.new_tokens,
                                            args.uncached_steps)
            print(f"{name:6} {b:5d} {with_cache:13.1f} {without:15.1f} "
                  f"{with_cache / without:7.1f}x", flush=True)


if __name__ == "__main__":
    main()
