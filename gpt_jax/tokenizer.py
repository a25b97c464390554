"""Tokenizers behind one small interface: encode, decode, eot_id, vocab_size, fingerprint.

Five kinds, chosen by `data.tokenizer`:
- 'sentencepiece': a BPE vocabulary of `model.vocab_size` pieces trained on a seeded sample of
  the training split, with byte fallback so every UTF-8 string round-trips exactly.
- 'char': the sorted characters of the training split, for tiny experiments.
- 'file': an existing sentencepiece `.model` (`data.tokenizer_path`).
- 'gpt2': GPT-2's byte-level BPE from a directory holding `vocab.json` and `merges.txt`
  (`data.tokenizer_path`; what `gpt_jax.convert` copies into a workdir).
- 'gpt1': GPT-1's lowercased BPE with '</w>' word ends from the same two files (HF
  `openai-gpt`); `load_tokenizer` tells the two apart by the vocabulary.

End of text: every tokenizer has an `eot_id` that `encode` never produces from text (so a
literal "<|endoftext|>" inside a document stays ordinary text); data.py inserts it between
documents and `decode` renders it as the string "<|endoftext|>".

Trained vocabularies are stored once under `<data.data_dir>/tokenizers/` and reused; a copy
saved into a workdir with `Tokenizer.save` is rebuilt with `load_tokenizer`.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.util
import io
import json
import os
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence

import ml_collections
import numpy as np
import sentencepiece as spm
from etils import epath

from gpt_jax.config import ConfigError
from gpt_jax.workdir import atomic_write_bytes

EOT = "<|endoftext|>"
MODEL_FILE = "tokenizer.model"  # the file names `Tokenizer.save` writes in a directory
CHAR_FILE = "tokenizer.json"
GPT2_VOCAB_FILE = "vocab.json"  # GPT-2 BPE: these two files, as Hugging Face stores them
GPT2_MERGES_FILE = "merges.txt"
SPM_THREADS = 4  # fixed so training is reproducible whatever the machine
SPM_MAX_SENTENCE_BYTES = 8192
SENTENCE_CHARS = 2000  # training sentences are chunks of whole lines of about this size


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tokenizer(abc.ABC):
    """The interface every tokenizer implements.

    Attributes: `kind` ('sentencepiece', 'char', 'gpt2' or 'gpt1'), `eot_id`, `vocab_size`
    (ids lie in [0, vocab_size)), `fingerprint` (sha256 of the serialized vocabulary;
    identifies it).
    """

    kind: str
    eot_id: int
    vocab_size: int
    fingerprint: str

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (never contains `eot_id`)."""

    @abc.abstractmethod
    def _decode_text(self, ids: list[int]) -> str:
        """Text of ids that contain no `eot_id`."""

    @abc.abstractmethod
    def serialize(self) -> bytes:
        """The bytes `load_tokenizer` rebuilds this tokenizer from."""

    @property
    @abc.abstractmethod
    def file_name(self) -> str:
        """Name under which `save` stores `serialize()` in a directory."""

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int64 array (fast path for data preparation)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; each `eot_id` is rendered as the literal string '<|endoftext|>'."""
        pieces: list[str] = []
        run: list[int] = []
        for i in (int(i) for i in ids):
            if i == self.eot_id:
                pieces.append(self._decode_text(run))
                pieces.append(EOT)
                run = []
            else:
                run.append(i)
        pieces.append(self._decode_text(run))
        return "".join(pieces)

    def save(self, directory: str | os.PathLike) -> str:
        """Stores the tokenizer in `directory` (local or gs://); returns the file path."""
        path = epath.Path(directory) / self.file_name
        atomic_write_bytes(path, self.serialize())
        return os.fspath(path)

    def __reduce__(self):  # picklable for multiprocessing workers
        return (load_tokenizer_bytes, (self.serialize(), self.file_name))


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (trained here or loaded from a `.model` file)."""

    kind = "sentencepiece"
    file_name = MODEL_FILE

    def __init__(self, model_bytes: bytes):
        self._bytes = bytes(model_bytes)
        self._sp = spm.SentencePieceProcessor(model_proto=self._bytes)
        self.vocab_size = int(self._sp.get_piece_size())
        self.fingerprint = _sha256(self._bytes)
        eot = self._sp.piece_to_id(EOT)
        if self._sp.id_to_piece(eot) != EOT:  # piece_to_id returns unk for unknown pieces
            # A foreign model without our symbol: use its eos, else one id past the vocabulary.
            eos = self._sp.eos_id()
            eot = eos if eos >= 0 else self.vocab_size
            self.vocab_size = max(self.vocab_size, eot + 1)
        self.eot_id = int(eot)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _decode_text(self, ids: list[int]) -> str:
        return self._sp.decode(ids) if ids else ""

    def serialize(self) -> bytes:
        return self._bytes


class CharTokenizer(Tokenizer):
    """One id per character: ids 0..n-1 are `chars` in sorted order, then eot, then unk.

    Characters missing from the vocabulary (e.g. ones that only occur in the validation split)
    encode to `unk_id`, which decodes to U+FFFD; text made of known characters round-trips.
    """

    kind = "char"
    file_name = CHAR_FILE

    def __init__(self, chars: Sequence[str]):
        chars = sorted(set(chars))
        if any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer vocabulary entries must be single characters")
        self.chars = "".join(chars)
        self.eot_id = len(chars)
        self.unk_id = len(chars) + 1
        self.vocab_size = len(chars) + 2
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.int64)
        self._table = np.array(list(chars) + [EOT, "\ufffd"], dtype=object)
        self.fingerprint = _sha256(self.serialize())

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        if not len(self._codepoints):
            return np.full(codes.shape, self.unk_id, dtype=np.int64)
        pos = np.searchsorted(self._codepoints, codes)
        pos_clipped = np.minimum(pos, len(self._codepoints) - 1)
        known = (pos < len(self._codepoints)) & (self._codepoints[pos_clipped] == codes)
        return np.where(known, pos, self.unk_id).astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def _decode_text(self, ids: list[int]) -> str:
        return "".join(self._table[np.asarray(ids, dtype=np.int64)]) if ids else ""

    def serialize(self) -> bytes:
        return json.dumps({"kind": "char", "chars": self.chars}, ensure_ascii=True).encode()


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE (Radford et al. 2019), read from `vocab.json` + `merges.txt`.

    Text is split by GPT-2's pre-tokenization regex, each piece's UTF-8 bytes are mapped to
    printable characters (`bytes_to_unicode`) and merged by rank; decoding inverts the byte
    map, so every UTF-8 string round-trips exactly. `eot_id` is the id of '<|endoftext|>'
    (one past the vocabulary if it has none); `encode` treats that string in text as text.
    """

    kind = "gpt2"
    file_name = GPT2_VOCAB_FILE
    CACHE_SIZE = 1 << 16
    PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
               r"""|\s+(?!\S)|\s+""")
    EOT_PIECE = EOT  # the vocabulary entry that is `eot_id`

    def __init__(self, vocab_json: bytes, merges_txt: bytes):
        import regex  # third-party: the pattern needs \p{L} / \p{N}

        self._vocab_bytes, self._merges_bytes = bytes(vocab_json), bytes(merges_txt)
        self.encoder = read_vocab(self._vocab_bytes)
        self.decoder = {i: piece for piece, i in self.encoder.items()}
        self.ranks = read_merges(self._merges_bytes)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._pattern = regex.compile(self.PATTERN)
        self._cache: dict[str, list[int]] = {}
        self.vocab_size = max(self.encoder.values(), default=-1) + 1
        if self.EOT_PIECE in self.encoder:
            self.eot_id = self.encoder[self.EOT_PIECE]
        else:
            self.eot_id, self.vocab_size = self.vocab_size, self.vocab_size + 1
        self.fingerprint = _sha256(self.serialize())

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> GPT2Tokenizer:
        paths = [epath.Path(directory) / n for n in (GPT2_VOCAB_FILE, GPT2_MERGES_FILE)]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"GPT-2 tokenizer file {p} does not exist")
        return cls(paths[0].read_bytes(), paths[1].read_bytes())

    def _bpe(self, piece: str) -> list[int]:
        """Ids of one pre-tokenized piece (its bytes already mapped to characters)."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = bpe_merge(list(piece), self.ranks)
        try:
            ids = [self.encoder[w] for w in word]
        except KeyError as e:
            raise ValueError(f"GPT-2 vocabulary has no entry for {e.args[0]!r} (a vocabulary "
                             "without all 256 byte symbols?)") from None
        if len(self._cache) >= self.CACHE_SIZE:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._pattern.findall(text):
            ids.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return ids

    def _decode_text(self, ids: list[int]) -> str:
        chars = "".join(self.decoder.get(i, "") for i in ids)
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")

    def serialize(self) -> bytes:
        return json.dumps({"kind": self.kind, "vocab": self._vocab_bytes.decode("utf-8"),
                           "merges": self._merges_bytes.decode("utf-8")}).encode()

    def save(self, directory: str | os.PathLike) -> str:
        """Writes `vocab.json` and `merges.txt` (as read) into `directory`; returns the first."""
        atomic_write_bytes(epath.Path(directory) / GPT2_MERGES_FILE, self._merges_bytes)
        path = epath.Path(directory) / GPT2_VOCAB_FILE
        atomic_write_bytes(path, self._vocab_bytes)
        return os.fspath(path)


def read_vocab(vocab_json: bytes, source: str = GPT2_VOCAB_FILE) -> dict[str, int]:
    """A BPE `vocab.json`: a JSON object of piece -> id; ValueError naming `source` if not."""
    try:
        vocab = json.loads(vocab_json.decode("utf-8"))
    except ValueError as e:
        raise ValueError(f"{source}: not a JSON object of piece -> id ({e})") from None
    if not isinstance(vocab, dict) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()):
        raise ValueError(f"{source}: not a JSON object of piece -> non-negative integer id")
    return vocab


def read_merges(merges_txt: bytes, source: str = GPT2_MERGES_FILE) -> dict[tuple[str, str], int]:
    """Merge ranks of a BPE `merges.txt` ('#version' line, then one 'a b' pair per line, in
    the order they were learned); ValueError naming `source` and the line if malformed."""
    ranks: dict[tuple[str, str], int] = {}
    for n, line in enumerate(merges_txt.decode("utf-8").split("\n"), 1):
        if not line.strip() or line.startswith("#version"):
            continue
        pair = tuple(line.split())
        if len(pair) != 2:
            raise ValueError(f"{source} line {n}: {line!r} is not two space-separated symbols")
        ranks.setdefault(pair, len(ranks))
    return ranks


def bpe_merge(word: list, ranks: dict[tuple[str, str], int]) -> list:
    """Byte-pair encoding of one word's symbols (Sennrich et al. 2016): repeatedly merges
    every occurrence of the lowest-ranked adjacent pair. Symbols without ranks (e.g. None
    for unknown characters) are never merged."""
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word, word[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


GPT1_EOW = "</w>"  # GPT-1's end-of-word marker on the last symbol of every word
GPT1_UNK = "<unk>"
# BERT's basic tokenizer, as transformers.OpenAIGPTTokenizer applies it (tokenizers'
# BertNormalizer + BertPreTokenizer): punctuation is ASCII non-alphanumeric symbols and
# Unicode P*; CJK ideographs become words of their own.
_BERT_PUNCT = r"!-/:-@\[-`{-~\p{P}"
_BERT_CONTROL = r"[\x00\ufffd]|[^\P{C}\t\n\r]"
_CJK = ("[\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002b73f"
        "\U0002b740-\U0002b81f\U0002b820-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f]")


def is_gpt1_vocab(vocab: dict[str, int]) -> bool:
    """Whether a `vocab.json` is GPT-1's rather than GPT-2's: it marks word ends with '</w>'
    and, lowercased and not byte-level, lacks GPT-2's space symbol 'Ġ' (which every
    byte-level vocabulary has)."""
    return "\u0120" not in vocab and any(p.endswith(GPT1_EOW) for p in vocab)


class GPT1Tokenizer(GPT2Tokenizer):
    """GPT-1's BPE (Radford et al. 2018; HF `openai-gpt`) from `vocab.json` + `merges.txt`.

    Shares GPT-2's files, merge ranks, storage and `save`; differs in everything else. As
    `transformers.OpenAIGPTTokenizer` does (and the original code when ftfy and spaCy are
    absent), text gets BERT's basic normalisation (control characters dropped, CJK
    ideographs spaced out, accents stripped, lowercased), is split on whitespace and around
    every punctuation character, and each word's characters are merged by rank with '</w>'
    on the last one; a character the vocabulary lacks becomes '<unk>' (is dropped if the
    vocabulary has no '<unk>'). Decoding joins the pieces, each '</w>' a space, so text
    comes back lowercased and spaced out: "Don't, café!" -> "don ' t , cafe !".

    The original (finetune-transformer-lm) instead ran `ftfy.fix_text` (mojibake, curly
    quotes and the like to plain Unicode) and spaCy's English tokenizer, which keeps
    contractions together ("do" "n't") and turns newlines into '\\n</w>' tokens. `use_ftfy`
    (default: if ftfy is installed) applies `fix_text` first here too; spaCy is not used.

    GPT-1 has no end-of-text token. `eot_id` is the newline piece '\\n</w>', the paragraph
    break the released model saw in BooksCorpus and which this `encode` never produces from
    text (whitespace only separates words); one past the vocabulary if it lacks that piece.
    Fine-tuning's start, delimiter and extract tokens are appended after the model's
    vocabulary (`finetune.Specials`: 40478, 40479, 40480 for the released model, the ids
    the original code gave them).
    """

    kind = "gpt1"
    PATTERN = rf"[{_BERT_PUNCT}]|[^\s{_BERT_PUNCT}]+"
    EOT_PIECE = "\n" + GPT1_EOW

    def __init__(self, vocab_json: bytes, merges_txt: bytes, use_ftfy: bool | None = None):
        if use_ftfy is None:
            use_ftfy = importlib.util.find_spec("ftfy") is not None
        self.use_ftfy = bool(use_ftfy)
        super().__init__(vocab_json, merges_txt)
        self.unk_id = self.encoder.get(GPT1_UNK)

    @classmethod
    def from_gpt2(cls, tok: GPT2Tokenizer) -> GPT1Tokenizer:
        """The GPT-1 reading of the same files."""
        return cls(tok._vocab_bytes, tok._merges_bytes)

    def normalize(self, text: str) -> str:
        """BERT's basic normalisation (after ftfy's `fix_text` if `use_ftfy`)."""
        import regex

        if self.use_ftfy:
            import ftfy
            text = ftfy.fix_text(text)
        text = regex.sub(_BERT_CONTROL, "", text)
        text = regex.sub(_CJK, r" \g<0> ", text)
        text = regex.sub(r"\p{Mn}", "", unicodedata.normalize("NFD", text))
        return text.replace("\u03a3", "\u03c3").lower()  # per character: no final sigma

    def _bpe(self, word: str) -> list[int]:
        """Ids of one word: its characters, '</w>' on the last, merged by rank."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = [*word[:-1], word[-1] + GPT1_EOW]
        known = [s if s in self.encoder else None for s in symbols]
        ids = []
        for piece in bpe_merge(known, self.ranks):
            if piece is None:
                if self.unk_id is not None:
                    ids.append(self.unk_id)
            elif piece in self.encoder:
                ids.append(self.encoder[piece])
            else:
                raise ValueError(f"GPT-1 vocabulary has no entry for the merge {piece!r} "
                                 f"({GPT2_VOCAB_FILE} and {GPT2_MERGES_FILE} disagree)")
        if len(self._cache) >= self.CACHE_SIZE:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self._pattern.findall(self.normalize(text)):
            ids.extend(self._bpe(word))
        return ids

    def _decode_text(self, ids: list[int]) -> str:
        pieces = [self.decoder[i] for i in ids if i in self.decoder]
        last = pieces.pop().replace(GPT1_EOW, "") if pieces else ""
        return "".join(p.replace(GPT1_EOW, " ") for p in pieces) + last

    def serialize(self) -> bytes:
        spec = json.loads(super().serialize())
        spec["ftfy"] = self.use_ftfy
        return json.dumps(spec).encode()


def bpe_from_directory(directory: str | os.PathLike) -> GPT2Tokenizer:
    """The BPE in a directory's `vocab.json` + `merges.txt`: GPT-1's or GPT-2's, by the
    vocabulary (`is_gpt1_vocab`)."""
    tok = GPT2Tokenizer.from_directory(directory)
    return GPT1Tokenizer.from_gpt2(tok) if is_gpt1_vocab(tok.encoder) else tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def load_tokenizer_bytes(data: bytes, file_name: str) -> Tokenizer:
    """Rebuilds a tokenizer from `serialize()` bytes; `file_name` says which kind they are."""
    if file_name.endswith(".json"):
        spec = json.loads(data)
        if spec.get("kind") == "gpt2":
            return GPT2Tokenizer(spec["vocab"].encode(), spec["merges"].encode())
        if spec.get("kind") == "gpt1":
            return GPT1Tokenizer(spec["vocab"].encode(), spec["merges"].encode(),
                                 use_ftfy=spec.get("ftfy"))
        if spec.get("kind") != "char":
            raise ValueError(f"{file_name}: not a char tokenizer (kind={spec.get('kind')!r})")
        return CharTokenizer(spec["chars"])
    return SentencePieceTokenizer(data)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer (local or gs://) from a `.model`/`.json` file or a directory holding
    one (a workdir); GPT-2 BPE from a directory (or its `vocab.json`) with `vocab.json` and
    `merges.txt`."""
    path = epath.Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, CHAR_FILE, GPT2_VOCAB_FILE):
            if (path / name).exists():
                return load_tokenizer(path / name)
        raise FileNotFoundError(f"no {MODEL_FILE}, {CHAR_FILE} or {GPT2_VOCAB_FILE} + "
                                f"{GPT2_MERGES_FILE} in directory {path}")
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    if path.name == GPT2_VOCAB_FILE:
        return bpe_from_directory(path.parent)
    return load_tokenizer_bytes(path.read_bytes(), path.name)


def take_chars(docs: Iterable[str], max_chars: int) -> list[str]:
    """The first documents of `docs` up to `max_chars` characters in all (last one cut)."""
    out: list[str] = []
    left = max_chars
    for doc in docs:
        if left <= 0:
            break
        out.append(doc[:left])
        left -= len(out[-1])
    return out


def training_sentences(docs: Iterable[str]) -> Iterator[str]:
    """Chunks documents into sentencepiece training sentences of whole lines.

    Newlines stay inside the sentences so pieces such as '):\\n' or '\\n\\n' can be learned;
    chunks stay under sentencepiece's sentence length limit (longer lines are cut).
    """
    for doc in docs:
        buf: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            for start in range(0, len(line), SENTENCE_CHARS):
                part = line[start:start + SENTENCE_CHARS]
                if size + len(part) > SENTENCE_CHARS and buf:
                    yield "".join(buf)
                    buf, size = [], 0
                buf.append(part)
                size += len(part)
        if buf:
            yield "".join(buf)


def train_sentencepiece(docs: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
    """Trains a byte-fallback BPE of exactly `vocab_size` pieces on `docs`, deterministically.

    Normalization is off and whitespace is kept as is, so encode/decode is the identity on any
    UTF-8 text; digits are split; id 0 is <unk> (never produced), id 1 the eot control symbol.
    """
    sentences = [s for s in training_sentences(docs)
                 if len(s.encode("utf-8")) <= SPM_MAX_SENTENCE_BYTES]
    if not sentences:
        raise ValueError("cannot train a sentencepiece vocabulary on an empty corpus")
    model = io.BytesIO()
    with open(os.devnull, "w") as devnull:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, logstream=devnull,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
            character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_by_whitespace=False, split_digits=True,
            control_symbols=[EOT], unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            num_threads=SPM_THREADS, input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=SPM_MAX_SENTENCE_BYTES, train_extremely_large_corpus=False)
    return SentencePieceTokenizer(model.getvalue())


def build_char_tokenizer(docs: Iterable[str]) -> CharTokenizer:
    """A char tokenizer over the sorted set of characters in `docs`."""
    chars: set[str] = set()
    for doc in docs:
        chars.update(doc)
    return CharTokenizer(sorted(chars))


def check_vocab(tokenizer: Tokenizer, cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError if the tokenizer has more ids than the model's embedding table."""
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the {tokenizer.kind} "
            f"tokenizer's vocabulary of {tokenizer.vocab_size} ids; raise model.vocab_size to "
            f"at least {tokenizer.vocab_size}")


def tokenizer_file(cfg: ml_collections.ConfigDict, corpus_key: str) -> str:
    """Where the vocabulary trained for `corpus_key` under this config lives in the data dir."""
    d = cfg.data
    directory = os.path.join(d.data_dir, "tokenizers")
    if d.tokenizer == "char":
        return os.path.join(directory, f"{corpus_key}-char.json")
    return os.path.join(
        directory, f"{corpus_key}-sp{cfg.model.vocab_size}-seed{d.seed}"
                   f"-chars{d.tokenizer_train_chars}.model")


def from_config(cfg: ml_collections.ConfigDict, corpus_key: str,
                train_docs: Callable[[int], Iterable[str]]) -> Tokenizer:
    """The tokenizer `cfg.data.tokenizer` asks for: loaded if stored, else trained and stored.

    `train_docs(max_chars)` yields a seeded sample of the training documents of at least
    `max_chars` characters (0: all of them); it is only called when a vocabulary is built.
    Checks the size against `model.vocab_size`.
    """
    d = cfg.data
    if d.tokenizer == "file":
        if not d.tokenizer_path or not epath.Path(d.tokenizer_path).is_file():
            raise ConfigError(
                f"data.tokenizer_path={d.tokenizer_path!r} is not an existing sentencepiece "
                ".model file (data.tokenizer='file')")
        tok = load_tokenizer(d.tokenizer_path)
    elif d.tokenizer in ("gpt2", "gpt1"):
        path = d.tokenizer_path
        if path and epath.Path(path).name == GPT2_VOCAB_FILE and epath.Path(path).is_file():
            path = os.fspath(epath.Path(path).parent)
        if not path or not all((epath.Path(path) / n).is_file()
                               for n in (GPT2_VOCAB_FILE, GPT2_MERGES_FILE)):
            raise ConfigError(
                f"data.tokenizer_path={d.tokenizer_path!r} is not a directory holding "
                f"{GPT2_VOCAB_FILE} and {GPT2_MERGES_FILE} (data.tokenizer={d.tokenizer!r})")
        tok = (GPT1Tokenizer if d.tokenizer == "gpt1" else GPT2Tokenizer).from_directory(path)
    elif d.tokenizer in ("sentencepiece", "char"):
        path = tokenizer_file(cfg, corpus_key)
        if epath.Path(path).exists():  # data.data_dir may be gs://
            tok = load_tokenizer(path)
        elif d.tokenizer == "char":
            tok = build_char_tokenizer(train_docs(0))
            check_vocab(tok, cfg)
            atomic_write_bytes(path, tok.serialize())
        else:
            tok = train_sentencepiece(
                take_chars(train_docs(d.tokenizer_train_chars), d.tokenizer_train_chars),
                cfg.model.vocab_size)
            atomic_write_bytes(path, tok.serialize())
    else:
        raise ConfigError(f"data.tokenizer={d.tokenizer!r} is not one of "
                          "['sentencepiece', 'char', 'file', 'gpt2', 'gpt1']")
    check_vocab(tok, cfg)
    return tok
