"""Pieces SFT, the reward model and PPO share: JSONL, prompt + response encoding, batches,
and the stage config built on the init workdir.

An example's token sequence is `prompt ids + response ids + [eot]`: the prompt is encoded
as is (put any separator such as "\\nA:" in the prompt text), an empty prompt becomes
`[eot]` (as the sampler does), and the eot after the response is the stop signal the
policy learns and where the reward model reads its score. Sequences are right-padded
(with eot) one example per row, so causal attention never mixes examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from gpt_jax import config as config_lib
from gpt_jax import data as data_lib
from gpt_jax.workdir import Workdir


def train_val(rows: list[dict], val_path: str, required: Sequence[str]
              ) -> tuple[list[dict], list[dict]]:
    """(train, validation): the validation file, or every 10th training row held out."""
    if val_path:
        return rows, data_lib.read_jsonl(val_path, required)
    held = set(range(9, len(rows), 10)) or {len(rows) - 1}
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def encode_example(encode: Any, eot_id: int, prompt: str, response: str,
                   max_len: int) -> tuple[list[int], int]:
    """(ids, index of the first response token): prompt + response + eot in `max_len`
    tokens; the response keeps its start (at most max_len - 1 tokens), the prompt its end."""
    p = encode(prompt) or [eot_id]
    r = (encode(response) + [eot_id])[:max_len - 1]
    p = p[-(max_len - len(r)):]
    return p + r, len(p)


def pad_examples(examples: Sequence[tuple[list[int], int]], max_len: int,
                 pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded rows: tokens NxT, mask NxT (1 on response tokens, eot included),
    last N (index of the last real token, where a reward head reads)."""
    n = len(examples)
    tokens = np.full((n, max_len), pad_id, np.int32)
    mask = np.zeros((n, max_len), np.float32)
    last = np.zeros(n, np.int32)
    for i, (ids, start) in enumerate(examples):
        tokens[i, :len(ids)] = ids
        mask[i, start:len(ids)] = 1.0
        last[i] = len(ids) - 1
    return {"tokens": tokens, "mask": mask, "last": last}


def stage_config(cfg: ml_collections.ConfigDict, init_from: str) -> ml_collections.ConfigDict:
    """The stage config with the init workdir's model (this config's dropout kept) and data
    section (the pretraining corpus, recorded for PPO-ptx)."""
    pre = Workdir(init_from).read_config()
    cfg = config_lib.inherit_model(cfg, pre)
    if "ppo" not in cfg or cfg.ppo.ptx_data == "init":
        cfg.data = pre.data
    return cfg
