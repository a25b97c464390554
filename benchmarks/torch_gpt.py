"""A nanoGPT-style PyTorch GPT of exactly gpt_jax's architecture, for side-by-side timing.

Pre-norm blocks, learned positions, tied embeddings, biases everywhere, tanh GELU,
fused QKV (its output columns ordered (3, heads, head_dim) like ours), the same init
(normal 0.02, residual projections 0.02 / sqrt(2 n_layer), zero biases, unit LN
gains) and the same AdamW as `gpt_jax.optim` (decay only on matrices, global-norm
clipping). `load_jax_params` copies a gpt_jax (unscanned) param tree in, so both
frameworks start from identical weights.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, h: int, f: int, eps: float) -> None:
        super().__init__()
        self.n_head = h
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.fc = nn.Linear(d, f)
        self.mlp_proj = nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.n_head, d // self.n_head).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    """The same decoder as `gpt_jax.model.GPT` with norm='pre' and dropout 0."""

    def __init__(self, vocab: int, context: int, n_layer: int, n_head: int, d_model: int,
                 d_ff: int, eps: float = 1e-5, init_std: float = 0.02) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(context, d_model)
        self.h = nn.ModuleList(Block(d_model, n_head, d_ff, eps) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, eps=eps)
        resid_std = init_std / math.sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln" in name:
                nn.init.ones_(p)
            else:
                std = resid_std if name.endswith(("attn_proj.weight", "mlp_proj.weight")) \
                    else init_std
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def from_config(m: Any) -> TorchGPT:
    """A TorchGPT for a gpt_jax `model` config section."""
    return TorchGPT(m.vocab_size, m.context, m.n_layer, m.n_head, m.d_model, m.d_ff, m.ln_eps,
                    m.init_std)


def make_optimizer(model: TorchGPT, o: Any, lr: float) -> torch.optim.AdamW:
    """AdamW with gpt_jax's betas/eps/decay, decay only on >=2-D weights; the fused CUDA
    kernel on GPUs (as nanoGPT), torch's default (foreach) elsewhere."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    fused = True if next(model.parameters()).is_cuda else None
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(o.b1, o.b2), eps=o.eps, fused=fused)


def train_step(model: TorchGPT, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               clip: float) -> torch.Tensor:
    """One nanoGPT-style step: forward, backward, clip, AdamW."""
    loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss


def load_jax_params(model: TorchGPT, params: Any) -> None:
    """Copies an unscanned gpt_jax param tree (h_0..h_{L-1}) into `model`."""
    def t(x: Any) -> torch.Tensor:
        return torch.from_numpy(np.array(x, np.float32))

    with torch.no_grad():
        model.wte.weight.copy_(t(params["wte"]["embedding"]))
        model.wpe.weight.copy_(t(params["wpe"]["embedding"]))
        model.ln_f.weight.copy_(t(params["ln_f"]["scale"]))
        model.ln_f.bias.copy_(t(params["ln_f"]["bias"]))
        for i, blk in enumerate(model.h):
            p = params[f"h_{i}"]
            d = blk.qkv.in_features
            blk.ln_1.weight.copy_(t(p["ln_1"]["scale"]))
            blk.ln_1.bias.copy_(t(p["ln_1"]["bias"]))
            blk.ln_2.weight.copy_(t(p["ln_2"]["scale"]))
            blk.ln_2.bias.copy_(t(p["ln_2"]["bias"]))
            blk.qkv.weight.copy_(t(p["attn"]["qkv"]["kernel"]).reshape(d, 3 * d).T)
            blk.qkv.bias.copy_(t(p["attn"]["qkv"]["bias"]).reshape(3 * d))
            blk.attn_proj.weight.copy_(t(p["attn"]["proj"]["kernel"]).reshape(d, d).T)
            blk.attn_proj.bias.copy_(t(p["attn"]["proj"]["bias"]))
            blk.fc.weight.copy_(t(p["mlp"]["fc"]["kernel"]).T)
            blk.fc.bias.copy_(t(p["mlp"]["fc"]["bias"]))
            blk.mlp_proj.weight.copy_(t(p["mlp"]["proj"]["kernel"]).T)
            blk.mlp_proj.bias.copy_(t(p["mlp"]["proj"]["bias"]))
