"""The data path: sources -> tokens -> token store -> batches.

A module per concern:
- `sources`: stdlib, text files, TFDS and Hugging Face datasets; train/validation splits.
- `encode`: documents -> token arrays (in-process pool).
- `store`: the sharded token store (flat shards + manifest, local or gs://) and its reader.
- `corpus`: the run's corpus: a prepared store (`data.store`) or the in-process one.
- `batches`: windows as a pure function of (seed, step, host); mixtures; prefetch.
- `examples`: JSONL examples and epoch batches for fine-tuning, SFT and reward models.
- `pipeline`, `dedup`, `quality`: the Apache Beam preparation (`python -m gpt_jax.prepare`)
  and GPT-3's filters (imported on use: they need the `[data]` extra).
"""

from gpt_jax.data.batches import (
    epoch_at,
    epoch_permutation,
    eval_batches,
    eval_window_ids,
    gather_windows,
    mixture_batch,
    num_windows,
    prefetch,
    train_batch,
    window_ids,
)
from gpt_jax.data.corpus import Corpus, check_context, default_token_dir, prepare, unigram_entropy
from gpt_jax.data.encode import encode_chunks, encode_documents
from gpt_jax.data.examples import epoch_batch, read_jsonl
from gpt_jax.data.sources import (
    SPLITS,
    Source,
    assign_splits,
    glob_root,
    hash_fraction,
    make_source,
    source_specs,
    stdlib_files,
    stdlib_source,
    text_source,
    tfds_documents,
)
from gpt_jax.data.store import ShardedTokens, TokenStore, token_dtype

__all__ = [
    "Corpus", "SPLITS", "ShardedTokens", "Source", "TokenStore", "assign_splits",
    "check_context", "default_token_dir", "encode_chunks", "encode_documents", "epoch_at",
    "epoch_batch", "epoch_permutation", "eval_batches", "eval_window_ids", "gather_windows",
    "glob_root", "hash_fraction", "make_source", "mixture_batch", "num_windows", "prefetch",
    "prepare", "read_jsonl", "source_specs", "stdlib_files", "stdlib_source", "text_source",
    "tfds_documents", "token_dtype", "train_batch", "unigram_entropy", "window_ids",
]
