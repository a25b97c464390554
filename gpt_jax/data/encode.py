"""Documents -> token arrays: each non-empty document's ids followed by end-of-text.

The in-process path (`data.corpus`) encodes chunks of documents in a `multiprocessing` pool;
the Beam pipeline (`data.pipeline`) calls `encode_documents` per document on its workers.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterable, Iterator

import numpy as np

from gpt_jax.tokenizer import Tokenizer

CHUNK_CHARS = 1 << 20  # documents are sent to tokenizer workers in chunks of about 1M chars


def encode_documents(tok: Tokenizer, docs: Iterable[str]) -> tuple[np.ndarray, int, int]:
    """(tokens, UTF-8 bytes, documents): each non-empty document's ids followed by eot."""
    parts, n_bytes, n_docs = [], 0, 0
    for doc in docs:
        if doc:
            parts.append(tok.encode_array(doc))
            parts.append(np.array([tok.eot_id], dtype=np.int64))
            n_bytes += len(doc.encode("utf-8"))
            n_docs += 1
    tokens = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
    return tokens, n_bytes, n_docs


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tok: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _encode_in_worker(docs: list[str]) -> tuple[np.ndarray, int, int]:
    assert _WORKER_TOKENIZER is not None
    return encode_documents(_WORKER_TOKENIZER, docs)


def chunk_documents(docs: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
    """Groups documents into lists of about `chunk_chars` characters, in order."""
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def pool_start_method() -> str:
    """'fork' unless JAX or TensorFlow (multithreaded) is loaded, then 'spawn'.

    fork starts fast and never re-runs the caller's script; after JAX/TF have started threads
    it is unsafe, and spawn needs the usual `if __name__ == "__main__":` guard in scripts (the
    `python -m gpt_jax.*` CLIs have it).
    """
    threaded = any(m in sys.modules for m in ("jax", "tensorflow"))
    return "spawn" if threaded else "fork"


def encode_chunks(tok: Tokenizer, docs: Iterable[str],
                  num_workers: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """`encode_documents` over chunks of `docs`, in order, in `num_workers` processes."""
    chunks = chunk_documents(docs)
    if num_workers <= 1:
        for chunk in chunks:
            yield encode_documents(tok, chunk)
        return
    ctx = multiprocessing.get_context(pool_start_method())
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(tok,)) as pool:
        yield from pool.imap(_encode_in_worker, chunks)
