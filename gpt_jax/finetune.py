"""GPT-1 discriminative fine-tuning: input transformations, task heads, the L3 objective.

`python -m gpt_jax.finetune --config=experiments/finetune/sst2.py --init_from=runs/pre
--workdir=runs/sst2`. One pretrained decoder serves every task: each example becomes
one or more token sequences with three new special tokens (Radford et al. 2018, Fig. 1),

  classification   <s> text <e>
  entailment       <s> premise $ hypothesis <e>
  similarity       <s> a $ b <e>  and  <s> b $ a <e>   (final states added)
  multiple choice  <s> context $ answer_k <e>  for each k (softmax over k)

and a linear head reads the final hidden state at <e>. The loss is
L3 = L_task + lm_coef * L_LM, the LM term over the task text.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags

from gpt_jax import cli, evaluate, loop, sharding, steps
from gpt_jax import config as config_lib
from gpt_jax import data as data_lib
from gpt_jax import model as model_lib
from gpt_jax.config import ConfigError
from gpt_jax.workdir import Workdir, open_run

Array = jax.Array
TASK_TYPES = ("classification", "entailment", "similarity", "multiple_choice")
NUM_SPECIAL = 3


@dataclasses.dataclass(frozen=True)
class Specials:
    """Ids of the added tokens: appended after the pretrained vocabulary."""

    start: int
    delim: int
    extract: int

    @classmethod
    def after(cls, vocab_size: int) -> Specials:
        return cls(vocab_size, vocab_size + 1, vocab_size + 2)


# ---------------------------------------------------------------------------- transformations


def _fit(parts: list[list[int]], budget: int) -> list[list[int]]:
    """Truncates the longest text part (keeping its start) until the total fits `budget`."""
    parts = [list(p) for p in parts]
    while sum(map(len, parts)) > budget:
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        parts[longest] = parts[longest][:-1]
    return parts


def _join(sp: Specials, first: list[int], second: list[int] | None, max_len: int) -> list[int]:
    if second is None:
        (first,) = _fit([first], max_len - 2)
        return [sp.start, *first, sp.extract]
    first, second = _fit([first, second], max_len - 3)
    return [sp.start, *first, sp.delim, *second, sp.extract]


def transform(task_type: str, texts: dict[str, Any], encode: Callable[[str], list[int]],
              sp: Specials, max_len: int) -> list[list[int]]:
    """The token sequences of one example (one per choice / order), each <= max_len.

    `texts` holds `text` (classification), `premise`/`hypothesis` (entailment),
    `a`/`b` (similarity) or `context`/`choices` (multiple choice).
    """
    if task_type == "classification":
        return [_join(sp, encode(texts["text"]), None, max_len)]
    if task_type == "entailment":
        return [_join(sp, encode(texts["premise"]), encode(texts["hypothesis"]), max_len)]
    if task_type == "similarity":
        a, b = encode(texts["a"]), encode(texts["b"])
        return [_join(sp, a, b, max_len), _join(sp, b, a, max_len)]
    if task_type == "multiple_choice":
        ctx = encode(texts["context"])
        return [_join(sp, ctx, encode(c), max_len) for c in texts["choices"]]
    raise ConfigError(f"finetune.task_type={task_type!r} is not one of {list(TASK_TYPES)}")


def pack(examples: Sequence[list[list[int]]], labels: Sequence[float], max_len: int,
         pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-pads sequences into arrays: tokens NxCxT, extract NxC, mask NxCxT, label N."""
    n, c = len(examples), len(examples[0])
    tokens = np.full((n, c, max_len), pad_id, np.int32)
    mask = np.zeros((n, c, max_len), np.float32)
    extract = np.zeros((n, c), np.int32)
    for i, seqs in enumerate(examples):
        if len(seqs) != c:
            raise ValueError(f"example {i} has {len(seqs)} sequences, expected {c}")
        for j, seq in enumerate(seqs):
            tokens[i, j, :len(seq)] = seq
            mask[i, j, :len(seq)] = 1.0
            extract[i, j] = len(seq) - 1
    return {"tokens": tokens, "extract": extract, "mask": mask,
            "label": np.asarray(labels, np.float32)}


# ---------------------------------------------------------------------------- model


class TaskModel(nn.Module):
    """The pretrained GPT (params under `gpt`) plus a linear head (`head`) at <e>.

    Returns (task outputs, LM logits): N x n_out for classification-like tasks
    (n_out = 1 for regression), N x C choice scores for multiple choice.
    """

    model_cfg: ml_collections.ConfigDict
    task_type: str
    num_outputs: int
    clf_pdrop: float

    @nn.compact
    def __call__(self, tokens_NxCxT: Array, extract_NxC: Array,
                 deterministic: bool = True) -> tuple[Array, Array]:
        n, c, t = tokens_NxCxT.shape
        gpt = model_lib.GPT(self.model_cfg, name="gpt")
        h_MxTxD = gpt(tokens_NxCxT.reshape(n * c, t), deterministic, return_hidden=True)
        wte_VxD = model_lib.unbox(gpt.variables["params"]["wte"]["embedding"])
        logits_MxTxV = model_lib.unembed(h_MxTxD, wte_VxD, self.model_cfg)
        h_MxD = h_MxTxD[jnp.arange(n * c), extract_NxC.reshape(n * c)]
        h_NxCxD = h_MxD.reshape(n, c, -1).astype(jnp.float32)
        if self.task_type == "similarity":
            h_NxCxD = h_NxCxD.sum(axis=1, keepdims=True)  # both orders, added element-wise
        h_NxCxD = nn.Dropout(self.clf_pdrop, deterministic=deterministic)(h_NxCxD)
        head = nn.Dense(1 if self.task_type == "multiple_choice" else self.num_outputs,
                        name="head", kernel_init=nn.initializers.normal(0.02))
        out = head(h_NxCxD)
        out = out[..., 0] if self.task_type == "multiple_choice" else out[:, 0]
        return out, logits_MxTxV.reshape(n, c, t, -1)


def extend_vocab(gpt_params: dict, rng: Array, init_std: float = 0.02) -> dict:
    """Appends the 3 special-token rows to the tied embedding, drawn N(0, init_std)."""
    wte = gpt_params["wte"]["embedding"]
    new = init_std * jax.random.normal(rng, (NUM_SPECIAL, wte.shape[1]), wte.dtype)
    return {**gpt_params, "wte": {"embedding": jnp.concatenate([wte, new], axis=0)}}


# ---------------------------------------------------------------------------- objective


def loss_fn(net: TaskModel, lm_coef: float, regression: bool) -> steps.LossFn:
    """L3 = L_task + lm_coef * L_LM for one microbatch (see the module docstring)."""

    def loss(params: Any, batch: dict, rng: Array | None) -> tuple[Array, dict]:
        deterministic = rng is None
        out, logits = net.apply({"params": params}, batch["tokens"], batch["extract"],
                                deterministic, rngs=None if deterministic else {"dropout": rng})
        task = task_loss(out, batch["label"], regression)
        # LM term over the task text: predict every token after <s>, pads masked out.
        lm_sum, lm_count = steps.cross_entropy(logits[:, :, :-1], batch["tokens"][:, :, 1:],
                                               batch["mask"][:, :, 1:])
        lm = lm_sum / jnp.maximum(lm_count, 1.0)
        return task + lm_coef * lm, {"task_loss": task, "lm_loss": lm}

    return loss


def task_loss(out: Array, label: Array, regression: bool) -> Array:
    """Cross-entropy over classes / choices, or squared error for regression."""
    if regression:
        return jnp.mean((out[:, 0] - label) ** 2)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, label.astype(jnp.int32)))


def predictions(out: Array, regression: bool) -> Array:
    return out[:, 0] if regression else jnp.argmax(out, axis=-1)


def scores(pred: np.ndarray, label: np.ndarray, regression: bool) -> dict[str, float]:
    """Accuracy, or Pearson and Spearman correlations for similarity regression."""
    if not regression:
        return {"accuracy": float(np.mean(pred == label))}

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        return r

    return {"pearson": float(np.corrcoef(pred, label)[0, 1]),
            "spearman": float(np.corrcoef(ranks(pred), ranks(label))[0, 1])}


# ---------------------------------------------------------------------------- data

# TFDS adapters: example dict (bytes values) -> (texts for `transform`, label).
TFDS_TASKS: dict[str, tuple[str, Callable[[dict], tuple[dict, float]]]] = {
    "glue/sst2": ("classification", lambda e: ({"text": e["sentence"]}, e["label"])),
    "glue/cola": ("classification", lambda e: ({"text": e["sentence"]}, e["label"])),
    "glue/rte": ("entailment", lambda e: (
        {"premise": e["sentence1"], "hypothesis": e["sentence2"]}, e["label"])),
    "glue/mnli": ("entailment", lambda e: (
        {"premise": e["premise"], "hypothesis": e["hypothesis"]}, e["label"])),
    "glue/qnli": ("entailment", lambda e: (
        {"premise": e["question"], "hypothesis": e["sentence"]}, e["label"])),
    "glue/stsb": ("similarity", lambda e: ({"a": e["sentence1"], "b": e["sentence2"]},
                                           e["label"])),
    "glue/mrpc": ("similarity", lambda e: ({"a": e["sentence1"], "b": e["sentence2"]},
                                           e["label"])),
    "glue/qqp": ("similarity", lambda e: ({"a": e["question1"], "b": e["question2"]},
                                          e["label"])),
    "hellaswag": ("multiple_choice", lambda e: (
        {"context": e["context"], "choices": list(e["endings"])}, e["label"])),
    "piqa": ("multiple_choice", lambda e: (
        {"context": e["goal"], "choices": [e["sol1"], e["sol2"]]}, e["label"])),
}


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) and isinstance(
            value[0], bytes):
        return [v.decode("utf-8") for v in value]
    return value


def tfds_examples(name: str, split: str, data_dir: str = "") -> Iterator[tuple[dict, Any]]:
    """(texts, label) pairs of a TFDS task in its fixed order."""
    import tensorflow_datasets as tfds

    if name not in TFDS_TASKS:
        raise ConfigError(f"finetune.tfds_name={name!r} has no adapter; known: "
                          f"{sorted(TFDS_TASKS)} (or use finetune.train_jsonl)")
    adapt = TFDS_TASKS[name][1]
    ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)
    for example in tfds.as_numpy(ds):
        texts, label = adapt({k: _text(v) for k, v in example.items()})
        yield texts, label


def jsonl_examples(path: str) -> Iterator[tuple[dict, Any]]:
    """(texts, label) pairs from JSONL: one object per line with the task's text fields
    (see `transform`) and `label` (class index, choice index or similarity score)."""
    for row in data_lib.read_jsonl(path, ("label",)):
        yield {k: v for k, v in row.items() if k != "label"}, row["label"]


TEXT_FIELDS = {"classification": ("text",), "entailment": ("premise", "hypothesis"),
               "similarity": ("a", "b"), "multiple_choice": ("context",)}


def check_example(texts: dict, label: Any, ft: ml_collections.ConfigDict) -> float:
    """The label as a float once the example fits the task: its text fields are strings
    and its label is one of the task's classes (an index into `choices` for multiple
    choice; any finite number for similarity regression). Raises ValueError saying what
    is wrong, as a bad label would otherwise train to nan, be truncated or crash."""
    for name in TEXT_FIELDS[ft.task_type]:
        if not isinstance(texts.get(name), str):
            raise ValueError(f"{name!r} must be a string for finetune.task_type="
                             f"{ft.task_type!r}")
    regression = ft.task_type == "similarity" and ft.num_outputs == 1
    if ft.task_type == "multiple_choice":
        choices = texts.get("choices")
        if not (isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) for c in choices)):
            raise ValueError("'choices' must be a list of 2+ strings")
        classes, what = len(choices), "an index into 'choices'"
    else:
        classes, what = ft.num_outputs, f"a class of finetune.num_outputs={ft.num_outputs}"
    number = isinstance(label, (int, float, np.integer, np.floating)) \
        and not isinstance(label, bool) and np.isfinite(label)
    if regression:
        if not number:
            raise ValueError(f"'label'={label!r} must be a finite number (a similarity score)")
        return float(label)
    if not (number and float(label).is_integer() and 0 <= label < classes):
        raise ValueError(f"'label'={label!r} must be {what}: an integer in [0, {classes - 1}]")
    return float(label)


def load_split(ft: ml_collections.ConfigDict, split: str) -> list[tuple[dict, float]]:
    """All (texts, label) examples of 'train' or 'validation' per the finetune config,
    each checked against the task (`check_example`) before anything is computed: a bad
    one raises ConfigError naming `file:line` (a TFDS split: the example's index)."""
    if ft.tfds_name:
        tfds_split = ft.tfds_train_split if split == "train" else ft.tfds_val_split
        rows, path = tfds_examples(ft.tfds_name, tfds_split, ft.tfds_data_dir), ""
    else:
        field = "train_jsonl" if split == "train" else "val_jsonl"
        path = ft[field]
        if not path:
            raise ConfigError(f"finetune.{field} is empty and finetune.tfds_name is not set: "
                              "give one data source")
        rows = jsonl_examples(path)
    examples = []
    for i, (texts, label) in enumerate(rows):
        try:
            examples.append((texts, check_example(texts, label, ft)))
        except ValueError as e:
            where = f"{path}:{evaluate.jsonl_line(path, i)}" if path else \
                f"{ft.tfds_name} {tfds_split} example {i}"
            raise ConfigError(f"{where}: {e}") from None
    return examples


def encode_split(examples: Iterable[tuple[dict, float]], task_type: str,
                 encode: Callable[[str], list[int]], sp: Specials,
                 max_len: int) -> dict[str, np.ndarray]:
    """Transforms and packs a whole split (small: GLUE-sized) into arrays."""
    seqs, labels = [], []
    for texts, label in examples:
        seqs.append(transform(task_type, texts, encode, sp, max_len))
        labels.append(label)
    return pack(seqs, labels, max_len)


# ---------------------------------------------------------------------------- the run


def finetune_config(cfg: ml_collections.ConfigDict, init_from: str,
                    num_train: int) -> ml_collections.ConfigDict:
    """The task config with the pretrained model's shape (+3 tokens) and steps from epochs."""
    cfg = config_lib.inherit_model(cfg, Workdir(init_from).read_config())
    cfg.model.vocab_size += NUM_SPECIAL
    if cfg.finetune.epochs:
        cfg.train.steps = max(1, cfg.finetune.epochs * (num_train // cfg.train.batch_size))
    return config_lib.validate(cfg)


def make_task(cfg: ml_collections.ConfigDict, init_from: str, mesh: jax.sharding.Mesh,
              train_arrays: dict[str, np.ndarray],
              val_arrays: dict[str, np.ndarray]) -> loop.Task:
    """The fine-tuning Task for the shared loop: L3 loss, epoch batches, accuracy."""
    ft = cfg.finetune
    regression = ft.task_type == "similarity" and ft.num_outputs == 1
    net = TaskModel(cfg.model, ft.task_type, ft.num_outputs, ft.clf_pdrop)
    example = {k: v[:1] for k, v in train_arrays.items()}
    boxed = jax.eval_shape(lambda r: net.init(r, example["tokens"], example["extract"]),
                           jax.random.key(0))["params"]
    micro = cfg.train.batch_size // cfg.train.microbatches

    def init_params(rng: jax.Array, shardings: Any) -> Any:
        gpt = open_run(init_from, mesh, rules=cfg).params

        def build(gpt: Any, rng: jax.Array) -> Any:
            fresh = model_lib.unbox(net.init(rng, example["tokens"], example["extract"]))
            return {**fresh["params"], "gpt": extend_vocab(gpt, rng, cfg.model.init_std)}

        return jax.jit(build, out_shardings=shardings)(gpt, rng)

    def batch(step: int) -> dict[str, np.ndarray]:
        full = data_lib.epoch_batch(train_arrays, seed=cfg.data.seed, step=step,
                                    batch_size=cfg.train.batch_size)
        return loop.microbatched(full, cfg.train.microbatches)

    forward = jax.jit(lambda p, b: net.apply({"params": p}, b["tokens"], b["extract"])[0])

    def evaluate(params: Any) -> dict[str, float]:
        out = np.concatenate([np.asarray(jax.device_get(forward(params, b)))[:real]
                              for b, real in loop.eval_batches(val_arrays, micro, mesh)])
        label = val_arrays["label"]
        metrics = scores(np.asarray(predictions(jnp.asarray(out), regression)), label,
                         regression)
        metrics["eval_loss"] = float(task_loss(jnp.asarray(out), jnp.asarray(label), regression))
        return metrics

    return loop.Task(loss_fn=loss_fn(net, ft.lm_coef, regression), batch=batch,
                     evaluate=evaluate, boxed_params=boxed, init_params=init_params,
                     tokens_per_step=cfg.train.batch_size * train_arrays["tokens"].shape[1]
                     * ft.max_len, extra_meta={"init_from": init_from})


def finetune(cfg: ml_collections.ConfigDict, init_from: str, workdir: str) -> dict:
    """Fine-tunes the pretrained workdir `init_from` on the config's task; final metrics."""
    tok = Workdir(init_from).tokenizer()
    train_examples = load_split(cfg.finetune, "train")
    cfg = finetune_config(cfg, init_from, len(train_examples))
    sp = Specials.after(cfg.model.vocab_size - NUM_SPECIAL)
    encode = functools.partial(encode_split, task_type=cfg.finetune.task_type,
                               encode=tok.encode, sp=sp, max_len=cfg.finetune.max_len)
    train_arrays = encode(train_examples)
    val_arrays = encode(load_split(cfg.finetune, "validation"))
    mesh = sharding.make_mesh(cfg)
    sharding.check_batch(cfg, mesh)
    Workdir(workdir).save_tokenizer(tok)
    task = make_task(cfg, init_from, mesh, train_arrays, val_arrays)
    final, _, _ = loop.run(cfg, workdir, mesh, task, **cli.run_options())
    if jax.process_index() == 0:
        shown = {k: round(v, 4) for k, v in final.items() if isinstance(v, float)}
        print(f"{cfg.name}: {shown}")
    return final


def main(argv: list[str]) -> None:
    del argv
    cli.check_input_dir("--init_from", flags.FLAGS.init_from)
    cli.start()
    finetune(flags.FLAGS.config, flags.FLAGS.init_from, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_run_flags("Fine-tuning config (experiments/finetune/).", init_from=True)
    cli.run(main)
