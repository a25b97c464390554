"""Sampling from a trained model."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from gpt_jax import model as model_lib


def greedy_text(model_cfg: ml_collections.ConfigDict, params: Any, tokenizer: Any,
                prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (full recompute in a fixed-size buffer)."""
    net = model_lib.GPT(model_cfg)
    ids = tokenizer.encode(prompt)[-(model_cfg.context - 1):] or [tokenizer.eot_id]
    n = min(max_new_tokens, model_cfg.context - len(ids))
    buf = jnp.zeros((1, model_cfg.context), jnp.int32).at[0, :len(ids)].set(jnp.asarray(ids))

    @jax.jit
    def generate(params: Any, buf: jax.Array) -> jax.Array:
        def body(i: jax.Array, buf: jax.Array) -> jax.Array:
            pos = len(ids) + i
            logits = net.apply({"params": params}, buf)
            nxt = jnp.argmax(logits[0, pos - 1]).astype(jnp.int32)
            return buf.at[0, pos].set(nxt)
        return jax.lax.fori_loop(0, n, body, buf)

    out = [int(t) for t in jax.device_get(generate(params, buf))[0, :len(ids) + n]]
    return tokenizer.decode(out)
