"""Losses and the train/eval step factories every trainer uses.

A trainer supplies `loss_fn(params, microbatch, rng) -> (loss, aux)`; the step
accumulates gradients over the leading microbatch axis of the batch, applies
the optax update and returns metrics. Pretraining, fine-tuning, SFT, the
reward model and PPO differ only in their loss_fn and data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from gpt_jax import model as model_lib
from gpt_jax import sharding

Array = jax.Array
LossFn = Callable[[Any, Any, Array], tuple[Array, dict[str, Array]]]


def cross_entropy(logits_BxTxV: Array, targets_BxT: Array,
                  mask_BxT: Array | None = None) -> tuple[Array, Array]:
    """(summed next-token cross-entropy in float32, number of counted tokens)."""
    losses_BxT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV.astype(jnp.float32), targets_BxT)
    if mask_BxT is None:
        return losses_BxT.sum(), jnp.asarray(losses_BxT.size, jnp.float32)
    mask_BxT = mask_BxT.astype(jnp.float32)
    return (losses_BxT * mask_BxT).sum(), mask_BxT.sum()


def lm_loss_fn(model_cfg: ml_collections.ConfigDict) -> LossFn:
    """Mean next-token loss on windows of context + 1 tokens (pretraining)."""
    net = model_lib.GPT(model_cfg)

    def loss_fn(params: Any, windows_BxT1: Array, rng: Array) -> tuple[Array, dict]:
        inputs, targets = windows_BxT1[:, :-1], windows_BxT1[:, 1:]
        deterministic = rng is None
        logits = net.apply({"params": params}, inputs, deterministic=deterministic,
                           rngs=None if deterministic else {"dropout": rng})
        total, count = cross_entropy(logits, targets)
        return total / count, {}

    return loss_fn


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    grad_shardings: Any = None) -> Callable:
    """train_step(state, batch_Mx..., rng, num_micro) -> (state, metrics).

    `batch` has a leading axis of M microbatches; the first `num_micro` are
    used (a traced count, so GPT-3's batch ramp never recompiles) and their
    gradients averaged. `state` is {'step', 'params', 'opt_state'}. With
    `grad_shardings` (the params'), each microbatch's gradients are pinned to them,
    so the accumulator is sharded like the params (reduce-scattered under FSDP)
    rather than left for XLA to replicate.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: dict, batch: Any, rng: Array, num_micro: Array) -> tuple[dict, dict]:
        params = state["params"]
        step_rng = jax.random.fold_in(rng, state["step"])

        def micro(i: Array, carry: tuple) -> tuple:
            grads_acc, loss_acc = carry
            mb = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), batch)
            (loss, _), grads = grad_fn(params, mb, jax.random.fold_in(step_rng, i))
            if grad_shardings is not None:
                grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
            return jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.zeros((), jnp.float32))
        if jax.tree.leaves(batch)[0].shape[0] == 1:  # no accumulation: no loop for XLA
            grads, loss = micro(jnp.asarray(0), init)
        else:
            grads, loss = jax.lax.fori_loop(0, num_micro, micro, init)
        scale = 1.0 / num_micro.astype(jnp.float32)
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        return new_state, {"loss": loss * scale, "grad_norm": global_norm(grads)}

    return train_step


def global_norm(tree: Any) -> Array:
    """sqrt of the sum of squares of every leaf (the norm that clipping uses)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_eval_step(model_cfg: ml_collections.ConfigDict) -> Callable:
    """eval_step(params, windows_BxT1[, weights]) -> (summed loss, token count), dropout off.
    `weights` (0 or 1) is `rows_B`, one per window, leaving padding windows out of both sums
    so a whole split can be scored in batches of one shape, or `mask_BxT`, one per target,
    so overlapping windows score each token once (`train.full_split_loss`)."""
    net = model_lib.GPT(model_cfg)

    def eval_step(params: Any, windows_BxT1: Array,
                  weights: Array | None = None) -> tuple[Array, Array]:
        logits = net.apply({"params": params}, windows_BxT1[:, :-1])
        targets_BxT = windows_BxT1[:, 1:]
        mask_BxT = (None if weights is None else weights if weights.ndim == 2 else
                    jnp.broadcast_to(weights[:, None], targets_BxT.shape))
        return cross_entropy(logits, targets_BxT, mask_BxT)

    return eval_step


def jit_eval_step(model_cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  param_shardings: Any = None) -> Callable:
    """`make_eval_step` jitted on the training mesh: traced under the same
    activation-sharding context as the train step, so attention takes the same kernel
    (a splash `shard_map` over the mesh on multi-chip TPUs, where an unbound mesh falls
    back to XLA) and activations are laid out as in training; the sums come back
    replicated. With `param_shardings` the params must arrive sharded like the trainer's."""
    eval_step = make_eval_step(model_cfg)

    def bound(params: Any, windows_BxT1: Array,
              weights: Array | None = None) -> tuple[Array, Array]:
        with sharding.activation_sharding(mesh):
            return eval_step(params, windows_BxT1, weights)

    repl = sharding.replicated(mesh)
    pinned = ({} if param_shardings is None else
              {"in_shardings": (param_shardings, sharding.batch_sharding(mesh, 2))})
    return jax.jit(bound, out_shardings=(repl, repl), **pinned)
