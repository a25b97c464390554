"""HellaSwag from its official files, scored the two ways the field reports it.

The official `hellaswag_{train,val}.jsonl` (rowanz/hellaswag, data/) hold one JSON object per
line: `ind`, `activity_label`, `ctx_a`, `ctx_b`, `ctx`, `endings` (4 strings), `label` (the
correct ending, 0-3), `split`, `split_type`, `source_id`. Two conventions are quoted, and
their numbers differ (GPT-2 124M: 29.55% by llm.c, 31.14% acc_norm by the harness), so both
are computed from one evaluation and each metric is named for its source:

- llm.c (karpathy/llm.c, dev/data/hellaswag.py, `render_example` and `evaluate`): the
  context is `ctx` verbatim; each ending is tokenized on its own as " " + ending and
  appended to the context's tokens. `llmc_acc` picks the lowest summed loss over the
  ending's tokens, `llmc_acc_norm` the lowest mean per-token loss (llm.c's headline number).
- lm-evaluation-harness (EleutherAI/lm-evaluation-harness: lm_eval/tasks/hellaswag/utils.py
  `preprocess` and `process_docs`, hellaswag.yaml, lm_eval/api/task.py
  `ConfigurableTask.construct_requests`/`process_results`, lm_eval/api/model.py
  `_encode_pair`): query = preprocess(activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize()), choices = [preprocess(e) for e in endings], each scored as the
  continuation " " + choice (the default target_delimiter), whose tokens are those of
  encode(query + " " + choice) after the first len(encode(query)). `lmeval_acc` picks the
  highest summed log-likelihood, `lmeval_acc_norm` the highest log-likelihood divided by
  len(choice), the choice's length in characters without the delimiter.

Ties go to the first choice in every metric, as torch.argmin and numpy.argmax do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from etils import epath

from gpt_jax.config import ConfigError
from gpt_jax.tokenizer import Tokenizer

NUM_ENDINGS = 4
# the fields the two conventions read, and their JSON types
FIELDS: dict[str, type] = {"ind": int, "activity_label": str, "ctx_a": str, "ctx_b": str,
                           "ctx": str, "endings": list, "label": int}
CONVENTIONS = ("llmc", "lmeval")
METRICS = ("llmc_acc", "llmc_acc_norm", "lmeval_acc", "lmeval_acc_norm")
PRIMARY = "llmc_acc_norm"
SOURCES = {"llmc": "karpathy/llm.c dev/data/hellaswag.py",
           "lmeval": "EleutherAI/lm-evaluation-harness lm_eval/tasks/hellaswag"}
DELIMITER = " "  # lm-evaluation-harness's target_delimiter; llm.c prepends the same space


class Scored(Protocol):
    """One scored continuation (`gpt_jax.evaluate.Score`)."""

    logprob: float  # summed log P(continuation tokens | preceding tokens), nats
    num_tokens: int


def check_record(record: Any) -> str:
    """'' if `record` is an official HellaSwag record the two conventions can score, else
    what is wrong with it (naming the field)."""
    if not isinstance(record, dict):
        return f"a record is a JSON object with the fields {list(FIELDS)}"
    for name, kind in FIELDS.items():
        if name not in record:
            hint = " (the official test split is unlabelled: use hellaswag_val.jsonl)" \
                if name == "label" else ""
            return f"missing field '{name}'{hint}"
        value = record[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"'{name}'={value!r} must be a JSON {kind.__name__}"
    endings = record["endings"]
    if len(endings) != NUM_ENDINGS or not all(isinstance(e, str) for e in endings):
        return f"'endings' must be a list of {NUM_ENDINGS} strings, not {endings!r}"
    if not 0 <= record["label"] < NUM_ENDINGS:
        return f"'label'={record['label']} must be an index into 'endings' (0 to 3)"
    return ""


def read_records(path: str, max_examples: int = 0) -> list[dict]:
    """Every record of an official HellaSwag JSONL file, validated (ConfigError naming
    file:line and the field); the first `max_examples` if > 0."""
    try:
        text = epath.Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such HellaSwag JSONL file") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        problem = check_record(record)
        if problem:
            raise ConfigError(f"{path}:{n}: {problem} (official HellaSwag format)")
        records.append(record)
    if not records:
        raise ConfigError(f"{path}: no HellaSwag records")
    return records[:max_examples] if max_examples else records


def preprocess(text: str) -> str:
    """lm-evaluation-harness's `preprocess`: strip, ' [title]' -> '. ', [bracketed] WikiHow
    markup removed, one pass of double spaces -> single."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def lmeval_query(record: Mapping[str, Any]) -> str:
    """lm-evaluation-harness's prompt (`process_docs`'s query)."""
    ctx = record["ctx_a"] + " " + record["ctx_b"].capitalize()
    return preprocess(record["activity_label"] + ": " + ctx)


def prompts(record: Mapping[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """Per convention, (context, the continuations scored after it, delimiter included)."""
    return {"llmc": (record["ctx"], [DELIMITER + e for e in record["endings"]]),
            "lmeval": (lmeval_query(record),
                       [DELIMITER + preprocess(e) for e in record["endings"]])}


def encode(tok: Tokenizer, record: Mapping[str, Any]
           ) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Per convention, one (context ids, continuation ids) pair per ending, tokenized as that
    convention does: llm.c encodes context and " " + ending apart; the harness encodes
    context + continuation whole and takes the tokens after the context's own encoding."""
    texts = prompts(record)
    ctx, conts = texts["llmc"]
    ctx_ids = tok.encode(ctx)
    out = {"llmc": [(ctx_ids, tok.encode(c)) for c in conts]}
    query, conts = texts["lmeval"]
    query_ids = tok.encode(query)
    out["lmeval"] = [(query_ids, tok.encode(query + c)[len(query_ids):]) for c in conts]
    return out


def picks(record: Mapping[str, Any], scores: Mapping[str, Sequence[Scored]]) -> dict[str, int]:
    """The ending each metric chooses, from each convention's scores (one per ending)."""
    ll = {c: np.array([s.logprob for s in scores[c]], np.float64) for c in CONVENTIONS}
    ntok = np.array([s.num_tokens for s in scores["llmc"]], np.float64)
    nchar = np.array([len(preprocess(e)) for e in record["endings"]], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # an ending that preprocesses to ''
        lmeval_norm = ll["lmeval"] / nchar
    return {"llmc_acc": int(np.argmax(ll["llmc"])),
            "llmc_acc_norm": int(np.argmax(ll["llmc"] / ntok)),
            "lmeval_acc": int(np.argmax(ll["lmeval"])),
            "lmeval_acc_norm": int(np.argmax(lmeval_norm))}


def metrics(records: Sequence[Mapping[str, Any]], chosen: Sequence[Mapping[str, int]]
            ) -> dict[str, float]:
    """Each metric's accuracy: the fraction of records whose label it picked."""
    return {m: float(np.mean([p[m] == r["label"] for r, p in zip(records, chosen)]))
            for m in METRICS}


def sample(index: int, record: Mapping[str, Any], scores: Mapping[str, Sequence[Scored]],
           chosen: Mapping[str, int]) -> dict:
    """One `--log_samples` line: per convention the context and, per ending, the scored
    continuation with its summed log-likelihood and token, character and byte counts; each
    metric's pick and whether it is the label."""
    out: dict[str, Any] = {"doc_id": index, "ind": record["ind"], "label": record["label"]}
    for conv, (context, conts) in prompts(record).items():
        out[conv] = {"context": context, "choices": [
            {"continuation": c, "logprob": s.logprob, "num_tokens": s.num_tokens,
             "num_chars": len(c), "num_bytes": len(c.encode("utf-8"))}
            for c, s in zip(conts, scores[conv])]}
    out["picks"] = dict(chosen)
    out["correct"] = {m: i == record["label"] for m, i in chosen.items()}
    return out
