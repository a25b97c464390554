"""The GPT decoder (GPT-1 post-norm, GPT-2/3 pre-norm) as a Flax linen module.

`GPT(cfg).apply({'params': params}, tokens_BxT)` returns float32 logits BxTxV.
Params are float32; matmuls run in `cfg.dtype`. Every parameter carries logical
axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `position`, `layers`) which
`sharding.py` maps to mesh axes; nothing here knows about devices.

KV-cache decoding: `GPT(cfg).apply({'params': p, 'cache': c}, tokens_BxT,
decode_step=attention.DecodeStep(index, pad_B), mutable=['cache'])` runs the
tokens as cache slots `index ..` and returns (logits, {'cache': updated}); make
`c` with `init_cache`. The training path (no `decode_step`) is unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gpt_jax import attention, precision, sharding

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _init(std: float, names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def layer_period(cfg: ml_collections.ConfigDict) -> int:
    """Layers per repeating unit: 1 for dense, 2 for GPT-3's dense/banded alternation."""
    return 2 if cfg.attention_pattern == "alternating" else 1


def is_banded(cfg: ml_collections.ConfigDict, layer: int) -> bool:
    """GPT-3: even layers dense, odd layers locally banded."""
    return cfg.attention_pattern == "alternating" and layer % 2 == 1


def layer_norm(cfg: ml_collections.ConfigDict, name: str) -> nn.LayerNorm:
    """LayerNorm (eps from config) with logically named params; flax keeps stats in float32."""
    return nn.LayerNorm(epsilon=cfg.ln_eps, dtype=DTYPES[cfg.dtype], name=name,
                        scale_init=_ones(("embed",)), bias_init=_zeros(("embed",)))


class SelfAttention(nn.Module):
    """Multi-head causal self-attention, dense or locally banded."""

    cfg: ml_collections.ConfigDict
    banded: bool
    deterministic: bool
    decode: bool = False  # keys/values go through the mutable 'cache' collection

    @nn.compact
    def __call__(self, x_BxTxD: Array, step: attention.DecodeStep | None = None) -> Array:
        cfg = self.cfg
        dtype, head_dim = DTYPES[cfg.dtype], cfg.d_model // cfg.n_head
        # One fused QKV projection, column-parallel over heads.
        qkv_BxTx3xHxK = nn.DenseGeneral(
            (3, cfg.n_head, head_dim), dtype=dtype, name="qkv",
            kernel_init=_init(cfg.init_std, ("embed", None, "heads", "kv")),
            bias_init=_zeros((None, "heads", "kv")))(x_BxTxD)
        q, k, v = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
        dropout = 0.0 if self.deterministic else cfg.attn_pdrop
        kw = dict(dropout_rate=dropout, kernel=attention.Kernel.from_config(cfg),
                  dropout_rng=self.make_rng("dropout") if dropout > 0 else None)
        if self.decode:
            y_BxTxHxK = self._cached_attention(q, k, v, step)
        elif self.banded:
            y_BxTxHxK = attention.banded_causal(q, k, v, window=cfg.window, **kw)
        else:
            y_BxTxHxK = attention.dense_causal(q, k, v, **kw)
        # Row-parallel output projection (GPT-2: std scaled by 1/sqrt(2 n_layer)).
        return nn.DenseGeneral(
            cfg.d_model, axis=(-2, -1), dtype=dtype, name="proj",
            kernel_init=_init(residual_std(cfg), ("heads", "kv", "embed")),
            bias_init=_zeros(("embed",)))(y_BxTxHxK)

    def _cached_attention(self, q_BxTxHxK: Array, k_BxTxHxK: Array, v_BxTxHxK: Array,
                          step: attention.DecodeStep) -> Array:
        """Cache sized on first use (by `init_cache`, T = cache length): a ring of
        min(window, T) slots in banded layers, all T slots in dense ones."""
        b, t, h, d = k_BxTxHxK.shape
        size = min(self.cfg.window, t) if self.banded else t
        zeros = functools.partial(jnp.zeros, (b, size, h, d), k_BxTxHxK.dtype)
        k_cache = self.variable("cache", "cached_key", zeros)
        v_cache = self.variable("cache", "cached_value", zeros)
        if self.banded:
            fn = functools.partial(attention.banded_decode, window=self.cfg.window)
        else:
            fn = attention.dense_decode
        y_BxTxHxK, k_cache.value, v_cache.value = fn(
            q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, k_cache.value, v_cache.value, step)
        return y_BxTxHxK


def residual_std(cfg: ml_collections.ConfigDict) -> float:
    """Init std of the residual output projections."""
    if cfg.get("scale_residual_init", True):
        return cfg.init_std / math.sqrt(2 * cfg.n_layer)
    return cfg.init_std


class MLP(nn.Module):
    """Position-wise feed-forward: d_model -> d_ff (tanh GELU) -> d_model."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
        h_BxTxF = nn.Dense(cfg.d_ff, dtype=dtype, name="fc",
                           kernel_init=_init(cfg.init_std, ("embed", "mlp")),
                           bias_init=_zeros(("mlp",)))(x_BxTxD)
        h_BxTxF = nn.gelu(h_BxTxF, approximate=True)
        return nn.Dense(cfg.d_model, dtype=dtype, name="proj",
                        kernel_init=_init(residual_std(cfg), ("mlp", "embed")),
                        bias_init=_zeros(("embed",)))(h_BxTxF)


class Block(nn.Module):
    """One transformer layer.

    pre-norm (GPT-2/3):  x = x + attn(LN(x));  x = x + mlp(LN(x))
    post-norm (GPT-1):   x = LN(x + attn(x));  x = LN(x + mlp(x))
    """

    cfg: ml_collections.ConfigDict
    banded: bool
    deterministic: bool
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxTxD: Array, step: attention.DecodeStep | None = None) -> Array:
        cfg = self.cfg
        attn = SelfAttention(cfg, self.banded, self.deterministic, self.decode, name="attn")
        mlp = MLP(cfg, name="mlp")
        drop = nn.Dropout(cfg.resid_pdrop, deterministic=self.deterministic)
        ln_1, ln_2 = layer_norm(cfg, "ln_1"), layer_norm(cfg, "ln_2")
        x_BxTxD = sharding.constrain(x_BxTxD, ("batch", None, "act_embed"))
        if cfg.norm == "pre":
            x_BxTxD = x_BxTxD + drop(attn(ln_1(x_BxTxD), step))
            return x_BxTxD + drop(mlp(ln_2(x_BxTxD)))
        x_BxTxD = ln_1(x_BxTxD + drop(attn(x_BxTxD, step)))
        return ln_2(x_BxTxD + drop(mlp(x_BxTxD)))


class LayerGroup(nn.Module):
    """`layer_period` consecutive blocks: the unit that `nn.scan` repeats."""

    cfg: ml_collections.ConfigDict
    deterministic: bool
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxTxD: Array, step: attention.DecodeStep | None = None
                 ) -> tuple[Array, None]:
        # Not rematerialised per block: `GPT` remats the whole group it scans.
        for j in range(layer_period(self.cfg)):
            x_BxTxD = Block(self.cfg, is_banded(self.cfg, j), self.deterministic, self.decode,
                            name=f"layer_{j}")(x_BxTxD, step)
        return x_BxTxD, None


def _maybe_remat(module: type[nn.Module], cfg: ml_collections.ConfigDict) -> Any:
    if cfg.remat == "none":
        return module
    return nn.remat(module, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class GPT(nn.Module):
    """Token + learned position embeddings, n_layer blocks, tied unembedding."""

    cfg: ml_collections.ConfigDict  # the `model` section of an experiment config

    @nn.compact
    def __call__(self, tokens_BxT: Array, deterministic: bool = True,
                 positions_BxT: Array | None = None, return_hidden: bool = False,
                 decode_step: attention.DecodeStep | None = None) -> Array:
        """float32 logits BxTxV, or with `return_hidden` the final hidden states BxTxD
        (after ln_f for pre-norm) in the compute dtype, for task and reward heads.

        With `decode_step` the tokens are cache slots `index ..` (KV-cache mode, see the
        module docstring); positions default to each row's slot minus its padding."""
        cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
        decode = decode_step is not None
        if decode and positions_BxT is None:
            slot_T = decode_step.index + jnp.arange(tokens_BxT.shape[1])
            positions_BxT = jnp.maximum(slot_T[None, :] - decode_step.pad_B[:, None], 0)
        wte = nn.Embed(cfg.vocab_size, cfg.d_model, name="wte",
                       embedding_init=_init(cfg.init_std, ("vocab", "embed")))
        wpe = nn.Embed(cfg.context, cfg.d_model, name="wpe",
                       embedding_init=_init(cfg.init_std, ("position", "embed")))
        if positions_BxT is None:
            positions_BxT = jnp.arange(tokens_BxT.shape[1])[None, :]
        x_BxTxD = wte(tokens_BxT) + wpe(positions_BxT)
        x_BxTxD = nn.Dropout(cfg.embd_pdrop, deterministic=deterministic)(x_BxTxD).astype(dtype)
        # Decoding needs no remat (it only matters for gradients); scanned, the cache
        # gets a leading layers axis like the params.
        if cfg.scan_layers:
            x_BxTxD, _ = nn.scan(
                LayerGroup if decode else _maybe_remat(LayerGroup, cfg),
                variable_axes={"params": 0, "cache": 0} if decode else {"params": 0},
                split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                length=cfg.n_layer // layer_period(cfg),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic, decode, name="h")(x_BxTxD, decode_step)
        else:
            block = Block if decode else _maybe_remat(Block, cfg)
            for i in range(cfg.n_layer):
                x_BxTxD = block(cfg, is_banded(cfg, i), deterministic, decode,
                                name=f"h_{i}")(x_BxTxD, decode_step)
        if cfg.norm == "pre":
            x_BxTxD = layer_norm(cfg, "ln_f")(x_BxTxD)
        if return_hidden:
            return x_BxTxD
        return unembed(x_BxTxD, wte.embedding, cfg)


def unembed(x_BxTxD: Array, embedding_VxD: Array, cfg: ml_collections.ConfigDict) -> Array:
    """Tied unembedding in the compute dtype, accumulated and returned in float32
    (its gradients in the compute dtype: `precision.einsum_f32`)."""
    dtype = DTYPES[cfg.dtype]
    return precision.einsum_f32("btd,vd->btv", x_BxTxD.astype(dtype),
                                embedding_VxD.astype(dtype))


def init_params(cfg: ml_collections.ConfigDict, rng: Array) -> Any:
    """Boxed (logically partitioned) params for the `model` section `cfg`."""
    tokens = jnp.zeros((1, min(cfg.context, 8)), jnp.int32)
    return GPT(cfg).init({"params": rng}, tokens)["params"]


def init_cache(cfg: ml_collections.ConfigDict, batch: int, length: int) -> Any:
    """A zeroed KV cache (the 'cache' collection) for `batch` rows of `length` slots:
    per layer `cached_key`/`cached_value` B x S x H x K, S = length in dense layers and
    min(window, length) in banded ones (a ring buffer); stacked over layers with scan."""
    def collection(params: Any) -> Any:
        step = attention.DecodeStep(jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32))
        _, out = GPT(cfg).apply({"params": params}, jnp.zeros((batch, length), jnp.int32),
                                decode_step=step, mutable=["cache"])
        return out["cache"]
    shapes = jax.eval_shape(collection, unbox(abstract_params(cfg)))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def abstract_params(cfg: ml_collections.ConfigDict) -> Any:
    """Shapes, dtypes and logical axis names of the params, allocating nothing."""
    return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def unbox(params: Any) -> Any:
    """Strips logical-partitioning metadata: a plain pytree of arrays."""
    return nn.meta.unbox(params)


def logical_axes(params: Any) -> Any:
    """The logical PartitionSpec of every param (from boxed params)."""
    return nn.get_partition_spec(params)


def count_params(params: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(unbox(params)))


def stack_layers(params: dict, cfg: ml_collections.ConfigDict) -> dict:
    """Unscanned params (`h_0`..`h_{L-1}`) -> the scanned layout (`h/layer_j` stacked)."""
    period = layer_period(cfg)
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    out["h"] = {
        f"layer_{j}": jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[params[f"h_{i}"] for i in range(j, cfg.n_layer, period)])
        for j in range(period)}
    return out


def unstack_layers(params: dict, cfg: ml_collections.ConfigDict) -> dict:
    """Inverse of `stack_layers`."""
    period = layer_period(cfg)
    out = {k: v for k, v in params.items() if k != "h"}
    for i in range(cfg.n_layer):
        group = params["h"][f"layer_{i % period}"]
        out[f"h_{i}"] = jax.tree.map(lambda x, g=i // period: x[g], group)
    return out
