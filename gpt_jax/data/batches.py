"""Batches as a pure function of (seed, step, host), from one source or a weighted mixture.

Windows of `context + 1` tokens start at multiples of `context`; an epoch is a permutation of
all windows seeded by (seed, epoch), and step s takes positions [s*B, (s+1)*B) of the epochs
laid end to end, so batches depend on (seed, step) only and a resumed run sees exactly the
batches of an uninterrupted one. Process p reads only rows [p*B/P, (p+1)*B/P) of each
global batch. `tokens` is a numpy array or a store split (`store.ShardedTokens`): the same
windows either way.

A mixture (GPT-3 Table 2.2) gives source i floor(w_i * B * s) of the first s*B rows (the
heaviest source the rest), so every batch holds each source in proportion (to within one row)
and source i's k-th row is position k of its own window stream; a seeded permutation mixes the
sources' rows within the step before the hosts take their slices.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from gpt_jax.config import ConfigError
from gpt_jax.data.store import ShardedTokens

Tokens = np.ndarray | ShardedTokens


def num_windows(num_tokens: int, context: int) -> int:
    """Non-overlapping windows of context + 1 tokens starting at multiples of `context`."""
    return max(num_tokens - 1, 0) // context


@functools.lru_cache(maxsize=16)
def epoch_permutation(n_windows: int, seed: int, epoch: int, stream: int = -1) -> np.ndarray:
    """The order of the windows in `epoch` (read-only, cached: computed once per epoch).

    `stream` >= 0 gives each source of a mixture its own order; -1 is the single source.
    """
    key = [seed, epoch] if stream < 0 else [seed, stream, epoch]
    perm = np.random.default_rng(key).permutation(n_windows)
    perm.flags.writeable = False
    return perm


def window_ids(n_windows: int, seed: int, start: int, count: int,
               stream: int = -1) -> np.ndarray:
    """Windows at positions [start, start + count) of the epoch permutations end to end."""
    pos = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(pos, n_windows)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = epoch_permutation(n_windows, seed, int(epoch), stream)[offsets[mask]]
    return out


def gather_windows(tokens: Tokens, ids: np.ndarray, context: int,
                   stride: int | None = None) -> np.ndarray:
    """int32 array [len(ids), context + 1]: window i is tokens[i*s : i*s + context + 1], s the
    `stride` (default `context`: windows that share only their boundary token)."""
    starts = ids * (stride or context)
    if isinstance(tokens, np.ndarray):
        index = starts[:, None] + np.arange(context + 1, dtype=np.int64)[None, :]
        return np.asarray(tokens[index], dtype=np.int32)
    return tokens.windows(starts, context + 1).astype(np.int32)


def _local_rows(global_batch: int, process_index: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by the "
                         f"{process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    return global_batch // process_count


def _windows_or_raise(tokens: Tokens, context: int) -> int:
    n = num_windows(len(tokens), context)
    if n < 1:
        raise ValueError(f"context={context} needs at least {context + 1} tokens, the split "
                         f"has {len(tokens)}")
    return n


def train_batch(tokens: Tokens, *, seed: int, step: int, global_batch: int, context: int,
                process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """This process's rows of the global batch for `step`: int32 [B / pc, context + 1].

    A pure function of (tokens, seed, step, ...): within an epoch no window repeats, and a
    resumed run sees exactly the batches of an uninterrupted one. Process p gets rows
    [p*B/pc, (p+1)*B/pc) of the global batch. Inputs are [:, :-1], targets [:, 1:].
    """
    local = _local_rows(global_batch, process_index, process_count)
    n = _windows_or_raise(tokens, context)
    ids = window_ids(n, seed, step * global_batch + process_index * local, local)
    return gather_windows(tokens, ids, context)


def epoch_at(step: int, global_batch: int, n_windows: int) -> float:
    """How many epochs the first `step` steps consumed (for logging)."""
    return step * global_batch / n_windows


def eval_window_ids(n_windows: int, total: int) -> np.ndarray:
    """`total` fixed windows: evenly spread over the split, or all of them cyclically."""
    if total <= n_windows:
        return np.arange(total, dtype=np.int64) * n_windows // total
    return np.arange(total, dtype=np.int64) % n_windows


def eval_batches(tokens: Tokens, *, global_batch: int, context: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[np.ndarray]:
    """`num_batches` deterministic batches of validation windows, this process's rows of each.

    Same shapes and host slicing as `train_batch`; the same windows on every call, spread
    evenly over the split so a few batches still see all of its documents.
    """
    local = _local_rows(global_batch, process_index, process_count)
    ids = eval_window_ids(_windows_or_raise(tokens, context), num_batches * global_batch)
    for b in range(num_batches):
        start = b * global_batch + process_index * local
        yield gather_windows(tokens, ids[start:start + local], context)


# ---------------------------------------------------------------------------- mixtures


def mixture_offsets(weights: Sequence[float], rows: int) -> np.ndarray:
    """How many of the first `rows` rows each source gets: floor(w_i * rows) for all but the
    heaviest source, which takes the rest (so the counts sum to `rows` exactly)."""
    w = np.asarray(weights, dtype=np.float64)
    heavy = int(np.argmax(w))
    counts = np.floor(w * rows + 1e-9).astype(np.int64)
    counts[heavy] = rows - (counts.sum() - counts[heavy])
    return counts


def check_mixture(weights: dict[str, float], global_batch: int) -> None:
    """ConfigError unless every step of `global_batch` rows can hold each source's share."""
    w = list(weights.values())
    heavy = int(np.argmax(w))
    light = sum(math.ceil(x * global_batch - 1e-9) for i, x in enumerate(w) if i != heavy)
    if light > global_batch:
        raise ConfigError(
            f"data.mixture={dict(weights)}: a batch of {global_batch} rows cannot hold every "
            "source's share each step; raise train.batch_size (per microbatch) or merge the "
            "smallest sources")


def mixture_batch(sources: Sequence[Tokens], weights: Sequence[float], *, seed: int, step: int,
                  global_batch: int, context: int, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
    """This process's rows of a mixture's global batch for `step`: int32 [B / P, context + 1].

    Pure in (seed, step): source i's rows are positions [C_i(s), C_i(s+1)) of its own epoch
    stream, with C = `mixture_offsets` of s*B rows.
    """
    local = _local_rows(global_batch, process_index, process_count)
    before = mixture_offsets(weights, step * global_batch)
    counts = mixture_offsets(weights, (step + 1) * global_batch) - before
    owner = np.repeat(np.arange(len(sources)), counts)
    rank = np.concatenate([np.arange(c) for c in counts])
    order = np.random.default_rng([seed, step, len(sources)]).permutation(global_batch)
    lo = process_index * local
    owner, rank = owner[order][lo:lo + local], rank[order][lo:lo + local]
    out = np.empty((local, context + 1), np.int32)
    for i, tokens in enumerate(sources):
        mine = owner == i
        if mine.any():
            ids = window_ids(_windows_or_raise(tokens, context), seed, int(before[i]),
                             int(counts[i]), stream=i)
            out[mine] = gather_windows(tokens, ids[rank[mine]], context)
    return out


class Prefetch:
    """batch(step) for step in [start, stop), in order, with `depth` steps computed ahead on
    background threads so the train step never waits on reads (numpy and the store's I/O
    release the GIL). `close()` cancels what has not started and waits for what has, so no
    read outlives the loop that asked for it."""

    def __init__(self, batch: Callable[[int], Any], start: int, stop: int, depth: int):
        self._batch, self._next, self._stop = batch, start, stop
        self._pool = ThreadPoolExecutor(max_workers=min(depth, 4),
                                        thread_name_prefix="gpt_jax-prefetch")
        self._pending: collections.deque[Future] = collections.deque()
        for _ in range(depth):
            self._submit()

    def _submit(self) -> None:
        if self._next < self._stop:
            self._pending.append(self._pool.submit(self._batch, self._next))
            self._next += 1

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        if not self._pending:
            self.close()
            raise StopIteration
        future = self._pending.popleft()
        self._submit()
        return future.result()

    def close(self) -> None:
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def prefetch(batch: Callable[[int], Any], start: int, stop: int, depth: int) -> Iterator[Any]:
    """batch(step) for step in [start, stop): computed ahead (`Prefetch`) when depth > 0."""
    if depth <= 0:
        return (batch(step) for step in range(start, stop))
    return Prefetch(batch, start, stop, depth)
