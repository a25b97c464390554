"""What general-purpose compressors achieve on a split: the bar a language model must clear.

A model's validation loss in bits per byte (`eval_bpb`) is a code length, so it can be
set beside a compressor's output on the same text. Each document is compressed on its
own, as `gzip -9 FILE` and `xz -9 FILE` do per file (zlib level 9 in gzip's container;
LZMA2 preset 9 in xz's, CRC64 check): neither compressor sees another file's text.
"""

from __future__ import annotations

import gzip
import lzma
from collections.abc import Iterable

COMPRESSORS = ("gzip -9", "xz -9")


def compressed_sizes(text: str) -> tuple[int, dict[str, int]]:
    """(UTF-8 bytes, {compressor: compressed bytes}) of one document."""
    raw = text.encode("utf-8")
    return len(raw), {"gzip -9": len(gzip.compress(raw, compresslevel=9, mtime=0)),
                      "xz -9": len(lzma.compress(raw, format=lzma.FORMAT_XZ, preset=9))}


def compression_bpb(docs: Iterable[str]) -> tuple[int, int, dict[str, float]]:
    """(documents, UTF-8 bytes, {compressor: bits per byte}) over the non-empty `docs`,
    each compressed on its own."""
    n_docs, n_bytes, packed = 0, 0, dict.fromkeys(COMPRESSORS, 0)
    for text in docs:
        if not text:  # an empty file holds nothing to predict (the token store skips it too)
            continue
        size, sizes = compressed_sizes(text)
        n_docs, n_bytes = n_docs + 1, n_bytes + size
        for name, packed_size in sizes.items():
            packed[name] += packed_size
    return n_docs, n_bytes, {k: 8.0 * v / max(n_bytes, 1) for k, v in packed.items()}
