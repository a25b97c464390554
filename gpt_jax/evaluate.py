"""Evaluation: LM loss / perplexity / bits per byte, and GPT-2/3-style in-context tasks.

    python -m gpt_jax.evaluate --workdir=runs/gpt2 --tasks=experiments/eval/arc_easy.json \\
        --shots=0,1,5 --out=report.json
    python -m gpt_jax.evaluate --workdir=runs/gpt2 --lm_text_glob='corpus/*.txt' --stride=512

Everything reduces to scoring requests (context ids, continuation ids): the summed
log-probability of the continuation given the context and whether every continuation token
is the argmax (the greedy continuation). Requests are left-truncated to context + 1 tokens,
right-padded to a power-of-two bucket (so at most log2(context) shapes compile), batched,
sharded over the training mesh's `data` axis and scored by one jitted forward pass.

LM eval: each document is scored as [eot] + tokens with a sliding window: the first window
scores up to `context` tokens, each later one the next `stride` tokens with the preceding
context - stride tokens as left context, so every token is scored once. Bits per byte divide
the summed loss by ln 2 and the documents' UTF-8 bytes (eot is never scored).

Tasks (schema in docs/evaluate.md): K demonstrations drawn reproducibly per example from the
task's train split, joined by the task's separator before the example's context; demos are
dropped from the front until prompt + continuation fit the context, then the prompt is
left-truncated. Multiple choice reports accuracy by summed, per-token and per-byte
normalised log-likelihood and, with `answer_context`, by log P(choice | prompt) -
log P(choice | answer_context). Completion (LAMBADA) reports exact match (the greedy
continuation of len(target) tokens equals the target: the teacher-forced argmax test) and
the target's perplexity. Generation (free-form answers, GPT-3's protocol) decodes the prompt
with beam search (4 beams, length penalty 0.6 by default), cuts the answer at the first
stop string and reports SQuAD's exact match and token F1 against the best of the answers.
A task file with "adapter": "hellaswag" reads the official HellaSwag JSONL and reports
llm.c's and lm-evaluation-harness's accuracies side by side (`gpt_jax.evaluation.hellaswag`).
`--log_samples` writes every example's per-choice scores and picks next to --out.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import math
import os
import re
import string
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from gpt_jax import cli, sharding
from gpt_jax import data as data_lib
from gpt_jax import model as model_lib
from gpt_jax import sample as sample_lib
from gpt_jax.config import ConfigError
from gpt_jax.evaluation import hellaswag as hellaswag_lib
from gpt_jax.tokenizer import Tokenizer
from gpt_jax.workdir import REPORTS_DIR, Workdir, atomic_write_bytes, open_run

MIN_BUCKET = 16
TASK_TYPES = ("multiple_choice", "completion", "generation")
# task files with a top-level "adapter": an official format, read by gpt_jax.evaluation
FILE_ADAPTERS = ("hellaswag",)


# ---------------------------------------------------------------- scoring

@dataclasses.dataclass(frozen=True)
class Request:
    """Score `continuation` given `context` (an empty context means [eot])."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Score:
    logprob: float  # summed log P(continuation tokens | preceding tokens), nats
    num_tokens: int  # continuation tokens scored (fewer only if it exceeds the context)
    greedy: bool  # every scored token is the argmax of its distribution


def bucket_length(n: int, context: int) -> int:
    """The padded input length for n tokens: a power of two >= MIN_BUCKET, at most context."""
    return min(context, max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


def pack(request: Request, context: int, eot_id: int) -> tuple[list[int], int]:
    """(the last context + 1 tokens of context + continuation, tokens scored)."""
    if not request.continuation:
        raise ValueError("a request needs at least one continuation token")
    seq = list(request.context or (eot_id,)) + list(request.continuation)
    seq = seq[-(context + 1):]
    return seq, min(len(request.continuation), len(seq) - 1)


class Scorer:
    """Scores requests in fixed-shape batches with one jitted forward per bucket length."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, params: Any,
                 mesh: jax.sharding.Mesh, eot_id: int, batch_size: int = 8,
                 vocab: int | None = None, progress: bool = True) -> None:
        self.model_cfg, self.params, self.mesh, self.eot_id = model_cfg, params, mesh, eot_id
        self.vocab = vocab
        data = mesh.shape["data"]
        self.batch_size = -(-batch_size // data) * data  # rows split evenly over 'data'
        self.progress = progress and jax.process_index() == 0
        self._batch_sh = sharding.batch_sharding(mesh, 2)
        net, limit = model_lib.GPT(model_cfg), vocab or model_cfg.vocab_size

        def score(params: Any, inputs_BxT: jax.Array, targets_BxT: jax.Array,
                  mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
            logits_BxTxV = net.apply({"params": params}, inputs_BxT)
            logp_BxT = -optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
            allowed_V = jnp.arange(logits_BxTxV.shape[-1]) < limit
            best_BxT = jnp.argmax(jnp.where(allowed_V, logits_BxTxV, -jnp.inf), axis=-1)
            hit_BxT = (best_BxT == targets_BxT) | (mask_BxT == 0)
            return (logp_BxT * mask_BxT).sum(-1), hit_BxT.all(-1)

        self._score = jax.jit(score, out_shardings=sharding.replicated(mesh))

    def _put(self, x_BxT: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(x_BxT.shape, self._batch_sh, lambda i: x_BxT[i])

    def __call__(self, requests: Sequence[Request], desc: str = "score") -> list[Score]:
        context = self.model_cfg.context
        packed = [pack(r, context, self.eot_id) for r in requests]
        order = sorted(range(len(packed)), key=lambda i: len(packed[i][0]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        out: list[Score | None] = [None] * len(requests)
        for rows in _progress(batches, desc, self.progress):
            t = bucket_length(max(len(packed[i][0]) - 1 for i in rows), context)
            inputs, targets, mask = (np.zeros((self.batch_size, t), np.int32) for _ in range(3))
            for r, i in enumerate(rows):
                seq, n = packed[i]
                inputs[r, :len(seq) - 1], targets[r, :len(seq) - 1] = seq[:-1], seq[1:]
                mask[r, len(seq) - 1 - n:len(seq) - 1] = 1
            logp_B, greedy_B = jax.device_get(self._score(
                self.params, self._put(inputs), self._put(targets),
                self._put(mask.astype(np.float32))))
            for r, i in enumerate(rows):
                out[i] = Score(float(logp_B[r]), packed[i][1], bool(greedy_B[r]))
        return out  # type: ignore[return-value]


def _progress(items: list, desc: str, enabled: bool) -> Iterable:
    if not enabled or len(items) < 2:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, dynamic_ncols=True, leave=False)


# ---------------------------------------------------------------- language modelling

def window_requests(ids: Sequence[int], context: int, stride: int,
                    eot_id: int) -> list[Request]:
    """Sliding-window requests scoring every token of [eot] + ids once: the first window
    scores up to `context` tokens, later ones `stride` tokens after context - stride of
    left context."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride={stride} must be in [1, context={context}]")
    seq, out = [eot_id, *ids], []
    a, b = 1, min(1 + context, len(seq))
    while a < len(seq):
        lo = max(0, b - 1 - context)
        out.append(Request(tuple(seq[lo:a]), tuple(seq[a:b])))
        a, b = b, min(b + stride, len(seq))
    return out


def evaluate_lm(scorer: Scorer, tok: Tokenizer, docs: Iterable[str], stride: int) -> dict:
    """loss (nats/token), perplexity and bits per byte over `docs`."""
    requests, n_bytes, n_docs = [], 0, 0
    for doc in docs:
        if doc:
            requests += window_requests(tok.encode(doc), scorer.model_cfg.context, stride,
                                        tok.eot_id)
            n_bytes += len(doc.encode("utf-8"))
            n_docs += 1
    if not requests:
        raise ValueError("no non-empty documents to evaluate")
    scores = scorer(requests, desc="lm")
    nll = -sum(s.logprob for s in scores)
    n_tok = sum(s.num_tokens for s in scores)
    return {"loss": nll / n_tok, "perplexity": math.exp(min(nll / n_tok, 700.0)),
            "bits_per_byte": nll / math.log(2) / n_bytes, "num_tokens": n_tok,
            "num_bytes": n_bytes, "num_docs": n_docs, "stride": stride,
            "context": scorer.model_cfg.context}


def text_documents(pattern: str) -> list[str]:
    """Each file matched by `pattern` (recursive glob) is one document."""
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise cli.UsageError(f"--lm_text_glob={pattern!r} matches no files")
    docs = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.append(f.read())
    return docs


# ---------------------------------------------------------------- tasks

@dataclasses.dataclass
class TaskSpec:
    """A task file (JSON, see docs/evaluate.md); paths are relative to the file."""

    name: str
    type: str
    eval: str = ""  # JSONL of examples to score
    train: str = ""  # JSONL of demonstrations ('' = draw from the eval split, never itself)
    separator: str = "\n\n"
    description: str = ""  # prepended to every prompt
    answer_context: str | None = None  # multiple choice: unconditional normalisation
    max_examples: int = 0  # 0 = all
    tfds: dict | None = None  # {"name", "split", "train_split", "adapter", "data_dir"}
    adapter: str = ""  # `eval` is in this official format (FILE_ADAPTERS), not the schema
    # generation: beam search (GPT-3: 4 beams, length penalty 0.6) for up to max_new_tokens,
    # the answer cut at the first of `stop`
    max_new_tokens: int = 32
    num_beams: int = 4
    length_penalty: float = 0.6
    stop: list[str] = dataclasses.field(default_factory=lambda: ["\n"])

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: type={self.type!r} is not one of "
                             f"{list(TASK_TYPES)}")
        if not 1 <= self.num_beams <= sample_lib.MAX_BEAMS:
            raise ValueError(f"task {self.name!r}: num_beams={self.num_beams} must be in "
                             f"[1, {sample_lib.MAX_BEAMS}]")
        if self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens={self.max_new_tokens} "
                             "must be >= 1")
        if not (isinstance(self.stop, list) and all(isinstance(x, str) and x for x in self.stop)):
            raise ValueError(f"task {self.name!r}: stop={self.stop!r} must be a list of "
                             "non-empty strings")
        if not self.eval and not self.tfds:
            raise ValueError(f"task {self.name!r}: needs 'eval' (a JSONL file) or 'tfds'")
        if self.adapter:
            self._check_adapter()

    def _check_adapter(self) -> None:
        where = f"task {self.name!r}: adapter={self.adapter!r}"
        if self.adapter not in FILE_ADAPTERS:
            raise ValueError(f"{where} is not one of {list(FILE_ADAPTERS)} (TFDS adapters go "
                             "under 'tfds')")
        if self.type != "multiple_choice" or not self.eval or self.tfds:
            raise ValueError(f"{where} needs type 'multiple_choice' and an 'eval' file, "
                             "no 'tfds'")
        if self.train or self.description or self.answer_context is not None:
            raise ValueError(f"{where} scores zero-shot with llm.c's and the harness's own "
                             "prompts: 'train', 'description' and 'answer_context' do not apply")


def check_example(example: dict, task_type: str, where: str) -> dict:
    """Validates one example against the schema; returns it."""
    if not isinstance(example.get("context"), str):
        raise ConfigError(f"{where}: 'context' must be a string")
    if task_type == "multiple_choice":
        choices, label = example.get("choices"), example.get("label")
        if not (isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) and c for c in choices)):
            raise ConfigError(f"{where}: 'choices' must be a list of 2+ non-empty strings")
        if not (isinstance(label, int) and not isinstance(label, bool)
                and 0 <= label < len(choices)):
            raise ConfigError(f"{where}: 'label'={label!r} must be an index into 'choices' "
                             f"(0 to {len(choices) - 1})")
    elif task_type == "generation":
        answers = example.get("answers")
        if not (isinstance(answers, list) and answers
                and all(isinstance(a, str) and a.strip() for a in answers)):
            raise ConfigError(f"{where}: 'answers' must be a list of 1+ non-empty strings")
    elif not (isinstance(example.get("target"), str) and example["target"]):
        raise ConfigError(f"{where}: 'target' must be a non-empty string")
    return example


def load_task(path: str, limit: int = 0) -> tuple[TaskSpec, list[dict], list[dict] | None]:
    """(spec, eval examples, train examples or None) of a task file; at most `limit` (if
    > 0) or the spec's `max_examples` eval examples, whichever is fewer."""
    try:
        raw = json.loads(epath.Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a task file is one JSON object (docs/evaluate.md)")
    raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(TaskSpec)})
    if unknown:
        raise ConfigError(f"{path}: unknown task fields {unknown} (docs/evaluate.md)")
    try:
        spec = TaskSpec(**raw)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    if limit:
        spec.max_examples = min(spec.max_examples or limit, limit)
    base = os.path.dirname(os.path.abspath(path))
    if spec.adapter:  # hellaswag: the official records, validated line by line
        return spec, hellaswag_lib.read_records(os.path.join(base, spec.eval),
                                                spec.max_examples), None
    if spec.tfds:
        t = spec.tfds
        evals = tfds_examples(t["name"], t.get("split", "validation"), t["adapter"],
                              t.get("data_dir", ""), spec.max_examples)
        train_split = t.get("train_split", "")
        train = tfds_examples(t["name"], train_split, t["adapter"], t.get("data_dir", "")) \
            if train_split else None
        for name, split in (("eval", evals), ("train", train or [])):
            for i, ex in enumerate(split):
                check_example(ex, spec.type, f"{spec.name} {name} example {i}")
        return spec, evals, train
    files = {"eval": os.path.join(base, spec.eval),
             "train": os.path.join(base, spec.train) if spec.train else ""}
    splits = {name: data_lib.read_jsonl(file, ()) for name, file in files.items() if file}
    for name, split in splits.items():  # every example, before anything is computed
        for i, ex in enumerate(split):
            try:
                check_example(ex, spec.type, "")
            except ConfigError as e:  # its message starts ': ...'
                where = f"{files[name]}:{jsonl_line(files[name], i)}"
                raise ConfigError(f"{where}{e} (task {path})") from None
    evals = splits["eval"][:spec.max_examples] if spec.max_examples else splits["eval"]
    return spec, evals, splits.get("train")


def jsonl_line(path: str, index: int) -> int:
    """The line number of the `index`-th object of a JSONL file (blank lines are
    skipped, as `data.read_jsonl` does), for `file:line` in error messages."""
    lines = [n for n, line in enumerate(epath.Path(path).read_text().splitlines(), 1)
             if line.strip()]
    return lines[index]


def gold(example: dict) -> str:
    """The correct continuation: the labelled choice, the first answer or the target."""
    if "choices" in example:
        return example["choices"][example["label"]]
    return example["answers"][0] if "answers" in example else example["target"]


def draw_demos(num_examples: int, index: int, train: list[dict] | None, evals: list[dict],
               k: int, seed: int) -> list[dict]:
    """K demonstrations for eval example `index`, seeded by (seed, index); the K-shot set
    is a prefix of the (K+1)-shot set. Without a train split, other eval examples."""
    if k == 0:
        return []
    pool = train if train is not None else [e for j, e in enumerate(evals) if j != index]
    order = np.random.default_rng([seed, index]).permutation(len(pool))
    return [pool[j] for j in order[:k]]


def make_prompt(tok: Tokenizer, spec: TaskSpec, example: dict, demos: list[dict],
                budget: int) -> tuple[list[int], int]:
    """(prompt ids, demos used): demos dropped from the front until the prompt has at most
    `budget` tokens, then left-truncated."""
    shots = [d["context"] + gold(d) for d in demos]
    for used in range(len(shots), -1, -1):
        text = spec.description + spec.separator.join(shots[len(shots) - used:]
                                                      + [example["context"]])
        ids = tok.encode(text)
        if len(ids) <= budget or used == 0:
            return ids[max(len(ids) - budget, 0):], used
    raise AssertionError("unreachable")


def choice_requests(tok: Tokenizer, spec: TaskSpec, evals: list[dict],
                    train: list[dict] | None, k: int, seed: int, context: int
                    ) -> tuple[list[list[Request]], list[int]]:
    """Per example, one request per choice (or the target); and the demos each used."""
    per_example, used = [], []
    for i, ex in enumerate(evals):
        conts = [tuple(tok.encode(c)) for c in ex.get("choices", [ex.get("target", "")])]
        budget = context + 1 - max(len(c) for c in conts)
        ids, n = make_prompt(tok, spec, ex, draw_demos(len(evals), i, train, evals, k, seed),
                             max(budget, 0))
        per_example.append([Request(tuple(ids), c) for c in conts])
        used.append(n)
    return per_example, used


def _flat_scores(scorer: Scorer, nested: list[list[Request]], desc: str) -> list[list[Score]]:
    flat = scorer([r for rs in nested for r in rs], desc=desc)
    out, i = [], 0
    for rs in nested:
        out.append(flat[i:i + len(rs)])
        i += len(rs)
    return out


def multiple_choice_picks(example: dict, scores: Sequence[Score],
                          uncond: Sequence[Score] | None) -> dict[str, int]:
    """The choice each metric picks: highest summed, per-token and per-byte log-likelihood
    (and log-likelihood minus the unconditional one when `uncond` is given)."""
    ll = np.array([s.logprob for s in scores])
    ntok = np.array([s.num_tokens for s in scores])
    nbytes = np.array([len(c.encode("utf-8")) for c in example["choices"]])
    out = {"acc": int(np.argmax(ll)), "acc_per_token": int(np.argmax(ll / ntok)),
           "acc_per_byte": int(np.argmax(ll / nbytes))}
    if uncond is not None:
        out["acc_uncond"] = int(np.argmax(ll - np.array([s.logprob for s in uncond])))
    return out


def multiple_choice_metrics(evals: list[dict], scores: list[list[Score]],
                            uncond: list[list[Score]] | None) -> dict:
    """Accuracy by summed, per-token and per-byte normalised log-likelihood (and
    unconditionally normalised when `uncond` is given)."""
    picks = [multiple_choice_picks(ex, ss, None if uncond is None else uncond[i])
             for i, (ex, ss) in enumerate(zip(evals, scores))]
    return {name: float(np.mean([p[name] == ex["label"] for p, ex in zip(picks, evals)]))
            for name in picks[0]}


def _choice_sample(text: str, score: Score) -> dict:
    return {"continuation": text, "logprob": score.logprob, "num_tokens": score.num_tokens,
            "num_chars": len(text), "num_bytes": len(text.encode("utf-8")),
            "greedy": score.greedy}


def task_samples(spec: TaskSpec, evals: list[dict], scores: list[list[Score]] | None,
                 uncond: list[list[Score]] | None, used: list[int],
                 predictions: list[str] | None = None) -> list[dict]:
    """`--log_samples` lines, one per example: the scored continuations with their summed
    log-likelihood and token/character/byte counts, each metric's pick and the label (a
    completion's target score; a generation's prediction and answers)."""
    out = []
    for i, ex in enumerate(evals):
        line: dict[str, Any] = {"doc_id": i, "context": ex["context"], "shots_used": used[i]}
        if spec.type == "multiple_choice":
            line["choices"] = [_choice_sample(c, s) for c, s in zip(ex["choices"], scores[i])]
            if uncond is not None:
                for c, s in zip(line["choices"], uncond[i]):
                    c["uncond_logprob"] = s.logprob
            picks = multiple_choice_picks(ex, scores[i], None if uncond is None else uncond[i])
            line.update(label=ex["label"], picks=picks,
                        correct={m: j == ex["label"] for m, j in picks.items()})
        elif spec.type == "completion":
            line["target"] = _choice_sample(ex["target"], scores[i][0])
        else:
            line.update(prediction=predictions[i], answers=ex["answers"],
                        **generation_metrics([predictions[i]], [ex]))
        out.append(line)
    return out


def completion_metrics(scores: list[list[Score]]) -> dict:
    """Exact match of the greedy continuation, the target's perplexity and mean log-prob."""
    flat = [s[0] for s in scores]
    nll, ntok = -sum(s.logprob for s in flat), sum(s.num_tokens for s in flat)
    return {"acc": float(np.mean([s.greedy for s in flat])),
            "perplexity": math.exp(min(nll / ntok, 700.0)),
            "logprob": -nll / len(flat)}


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1_score(prediction: str, answer: str) -> float:
    """SQuAD's token F1 between normalised strings (bag of words)."""
    pred, gold_ = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold_:
        return float(pred == gold_)
    common = sum((collections.Counter(pred) & collections.Counter(gold_)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold_)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(predictions: list[str], evals: list[dict]) -> dict:
    """Exact match and F1 of each prediction against its best-matching answer, averaged."""
    em = [max(float(normalize_answer(p) == normalize_answer(a)) for a in ex["answers"])
          for p, ex in zip(predictions, evals)]
    f1 = [max(f1_score(p, a) for a in ex["answers"]) for p, ex in zip(predictions, evals)]
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1))}


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    ends = [i for i in (text.find(x) for x in stop) if i >= 0]
    return text[:min(ends)] if ends else text


def generate_answers(scorer: Scorer, tok: Tokenizer, spec: TaskSpec,
                     prompts: list[list[int]]) -> list[str]:
    """Beam-search continuations of `prompts` (batches of similar length, the last one
    filled up so one shape compiles per length bucket), decoded and cut at a stop."""
    beam = sample_lib.BeamConfig(spec.num_beams, spec.length_penalty)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    size = scorer.batch_size
    for lo in _progress(list(range(0, len(order), size)), f"{spec.name} generate",
                        scorer.progress):
        rows = order[lo:lo + size]
        batch = [prompts[i] for i in rows] + [prompts[rows[-1]]] * (size - len(rows))
        new = sample_lib.beam_generate(scorer.model_cfg, scorer.params, batch, beam,
                                       spec.max_new_tokens, tok.eot_id, scorer.vocab)
        for i, ids in zip(rows, new):
            out[i] = cut_at_stop(tok.decode(ids), spec.stop)
    return out


def check_shots(spec: TaskSpec, shots: Sequence[int]) -> None:
    """ConfigError unless the task can be evaluated with every K in `shots`."""
    if spec.adapter and any(shots):
        raise ConfigError(f"--shots={','.join(map(str, shots))}: task {spec.name!r} "
                          f"(adapter {spec.adapter!r}) is zero-shot, as llm.c and the harness "
                          "report it; use --shots=0")


def evaluate_hellaswag(scorer: Scorer, tok: Tokenizer, spec: TaskSpec, records: list[dict],
                       seed: int = 0, samples: bool = False) -> dict:
    """The zero-shot report of official HellaSwag records in both conventions
    (`gpt_jax.evaluation.hellaswag`), from one scoring pass."""
    encoded = [hellaswag_lib.encode(tok, r) for r in records]
    nested = [[Request(tuple(c), tuple(x)) for conv in hellaswag_lib.CONVENTIONS
               for c, x in e[conv]] for e in encoded]
    flat = _flat_scores(scorer, nested, f"{spec.name} 0-shot")
    n = hellaswag_lib.NUM_ENDINGS
    scores = [{conv: ss[j * n:(j + 1) * n] for j, conv in enumerate(hellaswag_lib.CONVENTIONS)}
              for ss in flat]
    chosen = [hellaswag_lib.picks(r, s) for r, s in zip(records, scores)]
    report = {
        "task": spec.name, "type": spec.type, "shots": 0, "shots_used_mean": 0.0,
        "num_examples": len(records), "primary": hellaswag_lib.PRIMARY,
        "metrics": hellaswag_lib.metrics(records, chosen),
        "config": {"adapter": spec.adapter, "conventions": hellaswag_lib.SOURCES,
                   "seed": seed, "context": scorer.model_cfg.context}}
    if samples:
        report["samples"] = [hellaswag_lib.sample(i, r, s, p) for i, (r, s, p)
                             in enumerate(zip(records, scores, chosen))]
    return report


def evaluate_task(scorer: Scorer, tok: Tokenizer, spec: TaskSpec, evals: list[dict],
                  train: list[dict] | None, shots: Sequence[int], seed: int = 0,
                  samples: bool = False) -> list[dict]:
    """One report per K in `shots`; with `samples`, each has the `--log_samples` lines of
    its examples under "samples"."""
    check_shots(spec, shots)
    if spec.adapter:
        return [evaluate_hellaswag(scorer, tok, spec, evals, seed, samples)]
    context = scorer.model_cfg.context
    uncond = None
    if spec.type == "multiple_choice" and spec.answer_context is not None:
        base = tuple(tok.encode(spec.answer_context))
        uncond = _flat_scores(scorer, [[Request(base, tuple(tok.encode(c)))
                                        for c in ex["choices"]] for ex in evals],
                              f"{spec.name} uncond")
    reports = []
    for k in shots:
        extra: dict = {}
        if spec.type == "generation":  # the answer must fit after the prompt
            budget = max(context - spec.max_new_tokens, 1)
            fitted = [make_prompt(tok, spec, ex, draw_demos(len(evals), i, train, evals, k,
                                                            seed), budget)
                      for i, ex in enumerate(evals)]
            used = [n for _, n in fitted]
            predictions = generate_answers(scorer, tok, spec, [ids for ids, _ in fitted])
            metrics, primary = generation_metrics(predictions, evals), "f1"
            extra = {"predictions": predictions}
            scores = None
        else:
            nested, used = choice_requests(tok, spec, evals, train, k, seed, context)
            scores = _flat_scores(scorer, nested, f"{spec.name} {k}-shot")
            predictions = None
        if spec.type == "multiple_choice":
            metrics, primary = multiple_choice_metrics(evals, scores, uncond), "acc_per_token"
            if uncond is not None:
                primary = "acc_uncond"
        elif spec.type == "completion":
            metrics, primary = completion_metrics(scores), "acc"
        reports.append({
            "task": spec.name, "type": spec.type, "shots": k,
            "shots_used_mean": float(np.mean(used)) if used else 0.0,
            "num_examples": len(evals), "primary": primary, "metrics": metrics,
            "config": {"separator": spec.separator, "answer_context": spec.answer_context,
                       "description": spec.description, "seed": seed, "context": context,
                       "train_split": bool(train is not None or spec.tfds),
                       **({"num_beams": spec.num_beams, "length_penalty": spec.length_penalty,
                           "max_new_tokens": spec.max_new_tokens, "stop": spec.stop}
                          if spec.type == "generation" else {})},
            **extra})
        if samples:
            reports[-1]["samples"] = task_samples(spec, evals, scores, uncond, used,
                                                  predictions)
    return reports


# ---------------------------------------------------------------- TFDS adapters
# Each maps one TFDS example (numpy values) to the task schema, or None to skip it
# (e.g. HellaSwag's unlabelled test split).

def _s(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(ex: dict) -> dict | None:
    endings = [" " + _hellaswag_clean(_s(e)) for e in ex["endings"]]
    label = int(ex["label"])
    if not 0 <= label < len(endings) or not all(e.strip() for e in endings):
        return None
    context = _hellaswag_clean(f"{_s(ex['activity_label'])}: {_s(ex['context'])}")
    return {"context": context, "choices": endings, "label": label}


def piqa(ex: dict) -> dict | None:
    return {"context": f"Question: {_s(ex['goal'])}\nAnswer:",
            "choices": [" " + _s(ex["sol1"]), " " + _s(ex["sol2"])], "label": int(ex["label"])}


def ai2_arc(ex: dict) -> dict | None:
    labels = [int(x) for x in ex["choices"]["label"]]
    if int(ex["answerKey"]) not in labels:
        return None
    return {"context": f"Question: {_s(ex['question'])}\nAnswer:",
            "choices": [" " + _s(t) for t in ex["choices"]["text"]],
            "label": labels.index(int(ex["answerKey"]))}


def lambada(ex: dict) -> dict | None:
    passage = _s(ex["passage"]).strip()
    if " " not in passage:
        return None
    context, word = passage.rsplit(" ", 1)
    return {"context": context, "target": " " + word}


ADAPTERS: dict[str, Callable[[dict], dict | None]] = {
    "hellaswag": hellaswag, "piqa": piqa, "ai2_arc": ai2_arc, "lambada": lambada}


def tfds_examples(name: str, split: str, adapter: str, data_dir: str = "",
                  max_examples: int = 0) -> list[dict]:
    """A TFDS split in the task schema (via `ADAPTERS[adapter]`), in the dataset's order."""
    import tensorflow_datasets as tfds  # heavy; only for TFDS tasks

    if adapter not in ADAPTERS:
        raise ValueError(f"TFDS adapter {adapter!r} is not one of {sorted(ADAPTERS)}")
    ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)
    out = []
    for ex in tfds.as_numpy(ds):
        item = ADAPTERS[adapter](ex)
        if item is not None:
            out.append(item)
            if max_examples and len(out) >= max_examples:
                break
    return out


# ---------------------------------------------------------------- loading, report, CLI

def summary_table(reports: list[dict]) -> str:
    """The terminal table: task, shots, metric, value, examples."""
    rows = [("task", "shots", "metric", "value", "n")]
    for r in reports:
        for name, value in r["metrics"].items():
            if isinstance(value, float):
                rows.append((r["task"], str(r.get("shots", "-")), name, f"{value:.4f}",
                             str(r.get("num_examples", r.get("num_docs", "")))))
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
                     for row in rows)


def define_flags() -> None:
    """CLI flags, defined only when run as a program so importing this module is free."""
    from absl import flags
    flags.DEFINE_string("workdir", None, "Run directory (config, tokenizer, checkpoints).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_list("tasks", [], "Task files (JSON, see docs/evaluate.md).")
    flags.DEFINE_list("shots", ["0"], "Numbers of in-context examples K.")
    flags.DEFINE_integer("seed", 0, "Seed for drawing demonstrations.")
    flags.DEFINE_integer("limit", 0, "At most this many eval examples per task (0 = all).")
    flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass (rounded up to the "
                         "data axis of the mesh).")
    flags.DEFINE_string("lm_text_glob", None, "LM eval on these text files (one per doc).")
    flags.DEFINE_string("lm_tfds", None, "LM eval on a TFDS split, 'name:split'.")
    flags.DEFINE_string("lm_tfds_feature", "text", "Text feature of --lm_tfds.")
    flags.DEFINE_bool("lm_val", False, "LM eval on the validation split of the workdir's "
                      "config.data source.")
    flags.DEFINE_integer("lm_max_docs", 0, "At most this many documents (0 = all).")
    flags.DEFINE_integer("stride", 0, "Sliding-window stride (0 = context // 2).")
    flags.DEFINE_string("out", None, "Write the JSON report here.")
    flags.DEFINE_bool("log_samples", False, "Also write every example's scores (each "
                      "choice's log-likelihood, token/character/byte counts, each metric's "
                      "pick) as JSONL next to --out: <out>.samples.<task>.<K>shot.jsonl.")
    flags.mark_flags_as_required(["workdir"])


def run(workdir: str, tasks: Sequence[str] = (), shots: Sequence[int] = (0,), seed: int = 0,
        limit: int = 0, batch_size: int = 8, lm_docs: Iterable[str] | None = None,
        lm_name: str = "lm", stride: int = 0, step: int | None = None,
        out: str | None = None, log_samples: bool = False) -> dict:
    """Evaluates a workdir on LM documents and/or task files; returns (and writes) the report.
    With `log_samples`, each task entry's per-example lines go to `samples_path(out, ...)`
    (named in its "samples_file")."""
    if log_samples and not out:
        raise cli.UsageError("--log_samples needs --out: the samples are written next to it")
    loaded = [load_task(path, limit) for path in tasks]  # every file checked before loading
    for spec, _, _ in loaded:
        check_shots(spec, shots)
    opened = open_run(workdir, step=step)
    cfg, mesh, params, tok, step = (opened.cfg, opened.mesh, opened.params, opened.tokenizer,
                                    opened.step)
    scorer = Scorer(cfg.model, params, mesh, tok.eot_id, batch_size, vocab=tok.vocab_size)
    reports = []
    if lm_docs is not None:
        lm = evaluate_lm(scorer, tok, lm_docs, stride or max(cfg.model.context // 2, 1))
        reports.append({"task": lm_name, "type": "lm", "metrics": lm, "num_docs": lm["num_docs"]})
    for spec, evals, train in loaded:
        reports += evaluate_task(scorer, tok, spec, evals, train, shots, seed, log_samples)
    report = {"workdir": str(opened.workdir), "step": step, "model": cfg.name,
              "tokenizer": tok.kind, "results": reports}
    for r in reports:  # the samples go to their own files, not into the report
        if "samples" in r:
            lines = r.pop("samples")
            r["samples_file"] = samples_path(out, r["task"], r["shots"])
            if jax.process_index() == 0:
                atomic_write_bytes(r["samples_file"], "".join(
                    json.dumps(line) + "\n" for line in lines).encode())
    if jax.process_index() == 0:  # into the run (reports/), and to --out if given
        text = json.dumps(report, indent=2)
        names = "-".join(r["task"].replace(":", "_").replace("/", "_") for r in reports)
        opened.workdir.write_text(f"{REPORTS_DIR}/step{step}-{names or 'none'}.json", text)
        if out:
            atomic_write_bytes(out, text.encode())
    return report


def samples_path(out: str, task: str, shots: int) -> str:
    """Where `--log_samples` writes a task's lines: next to `out`, named for task and K."""
    root = out[:-len(".json")] if out.endswith(".json") else out
    return f"{root}.samples.{task.replace(':', '_').replace('/', '_')}.{shots}shot.jsonl"


def check_flags(f: Any) -> list[int]:
    """The --shots as integers, after checking every flag and --tasks file before anything
    is loaded (`cli.UsageError` naming the flag)."""
    try:
        shots = [int(k) for k in f.shots]
    except ValueError:
        raise cli.UsageError(f"--shots={','.join(f.shots)} must be integers >= 0") from None
    for name, value, low in (("shots", min(shots, default=0), 0), ("limit", f.limit, 0),
                             ("batch_size", f.batch_size, 1), ("stride", f.stride, 0),
                             ("lm_max_docs", f.lm_max_docs, 0), ("step", f.step, 0)):
        if value is not None and value < low:
            raise cli.UsageError(f"--{name}={value} must be >= {low}")
    for path in f.tasks:
        if "://" not in path:
            cli.check_input_file("--tasks", path)
    if f.log_samples and not f.tasks:
        raise cli.UsageError("--log_samples logs --tasks examples: give --tasks")
    if f.log_samples and not f.out:
        raise cli.UsageError("--log_samples needs --out: the samples are written next to it")
    if not (f.tasks or f.lm_text_glob or f.lm_tfds or f.lm_val):
        raise cli.UsageError("nothing to evaluate: give --tasks and/or --lm_text_glob, "
                             "--lm_tfds or --lm_val")
    return shots


def main(argv: list[str]) -> None:
    from absl import flags, logging
    del argv
    f = flags.FLAGS
    shots = check_flags(f)
    if not f["verbosity"].present:  # orbax logs every file at INFO
        logging.set_verbosity(logging.WARNING)
    lm_docs, lm_name = None, "lm"
    if f.lm_text_glob:
        lm_docs, lm_name = text_documents(f.lm_text_glob), f"lm:{f.lm_text_glob}"
    elif f.lm_tfds:
        from gpt_jax import data as data_lib
        name, _, split = f.lm_tfds.partition(":")
        lm_docs = data_lib.tfds_documents(name, split or "validation", f.lm_tfds_feature, "",
                                          f.lm_max_docs)
        lm_name = f"lm:{f.lm_tfds}"
    elif f.lm_val:
        from gpt_jax import data as data_lib
        lm_docs, lm_name = data_lib.make_source(Workdir(f.workdir).read_config()).docs("val"), \
            "lm:val"
    if lm_docs is not None and f.lm_max_docs:
        lm_docs = list(lm_docs)[:f.lm_max_docs]
    report = run(f.workdir, f.tasks, shots, f.seed, f.limit, f.batch_size,
                 lm_docs, lm_name, f.stride, f.step, f.out, f.log_samples)
    if jax.process_index() == 0:
        print(summary_table(report["results"]))
        if f.out:
            print(f"report: {f.out}", file=sys.stderr)
        for r in report["results"]:
            if "samples_file" in r:
                print(f"samples: {r['samples_file']}", file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
