"""Reference curves: every paper config, scaled down, trained briefly, its losses pinned.

    python -m gpt_jax.reference --check            # rerun all, compare with the pinned files
    python -m gpt_jax.reference --write            # regenerate experiments/reference_curves/
    python -m gpt_jax.reference --write --names=gpt1,gpt2:small

Each reference is the paper config passed through `scale_down`: the same family (norm
placement, attention pattern with the window at the same fraction of the context, dropout,
dtype, layer scan and remat, optimizer, schedule shape, GPT-3's token clock and batch
ramp), at width 32, 2 layers, context 32 (48 for the RLHF toy), a character vocabulary
and about `STEPS` steps. Schedules keep their shape in the small run's units: a part f
of the paper run (a warmup, a decay, a ramp) becomes sqrt(f) of the small one, so the
order and relative sizes stay and a sliver such as GPT-3's 375M-token warmup still spans
steps. Learning rates are the paper's times `LR_SCALE` (at width 32 the paper's rates
barely move the loss in 16 steps); their ratios across sizes are kept.

Pretraining runs on the standard library's `json` package (character tokenizer, tokenized
once into a shared data dir); GPT-1 fine-tuning starts from the `gpt1` reference run on a
small synthetic JSONL task per layout; the InstructGPT stages start from the
`rlhf/pretrain_tiny` reference on experiments/rlhf/data. Each pinned file holds the
per-step training losses, the evaluations, the config fields changed from the paper
config, and the versions, platform and CPU (model, instruction sets) that produced it;
`check` requires agreement to `RTOL`/`ATOL`, which allows another CPU's rounding but not
a real change, and names the config and the first step that moved. A file written with
another jax/flax/optax/python version is compared anyway, after a one-line warning.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import platform
import random
import sys
import sysconfig
import tempfile
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURVES_DIR = os.path.join(REPO, "experiments", "reference_curves")
RLHF_DATA = os.path.join(REPO, "experiments", "rlhf", "data")
STEPS = 16  # full-batch steps of every small pretraining run
CONTEXT, D_MODEL, N_HEAD, N_LAYER = 32, 32, 2, 2
VOCAB = 256  # character tokenizer
LR_SCALE = 10.0
SMOKE_SP_CHARS = 200_000  # `own_data`: characters a shrunk sentencepiece vocabulary learns from
# Losses differ across x86-64 CPUs in their last digits (XLA:CPU's kernels follow the
# instruction set; no XLA flag made two CPUs agree bit for bit, README "Reference curves"):
# up to 5.3e-5 relative over 16-20 steps as measured. The smallest change the check must
# catch, a peak learning rate 0.1% higher, moves gpt2:small by 3.5e-4. RTOL sits between
# the two, about 2.6x from each (tests/test_reference_curves.py checks both sides).
RTOL, ATOL = 1.4e-4, 1e-6
VERSIONED = ("jax", "jaxlib", "flax", "optax")


class ReferenceError(ValueError):
    """A reference curve cannot be run or read; the message names it."""


class CurveMismatch(AssertionError):
    """A rerun moved a pinned curve; the message names the config and the first step."""


@dataclass(frozen=True)
class Reference:
    """One pinned curve: `experiment` is the config file spec ('gpt3.py:small'), `stage`
    the trainer, `init` the reference whose workdir it starts from."""

    name: str
    experiment: str
    stage: str = "pretrain"  # pretrain | babygpt | finetune | sft | reward (| ppo: no curve)
    init: str = ""

    @property
    def file(self) -> str:
        return os.path.join(CURVES_DIR, self.name.replace("/", "-").replace(":", "-") + ".json")


def _references() -> dict[str, Reference]:
    refs = [Reference("gpt1", "gpt1.py")]
    refs += [Reference(f"gpt2:{s}", f"gpt2.py:{s}") for s in ("small", "medium", "large", "xl")]
    refs += [Reference(f"gpt3:{s}", f"gpt3.py:{s}")
             for s in ("small", "medium", "large", "xl", "2.7b", "6.7b", "13b", "175b")]
    refs += [Reference("tiny", "tiny.py:bpe"), Reference("tiny:char", "tiny.py:char"),
             Reference("babygpt", "babygpt.py", "babygpt")]
    refs += [Reference(f"finetune/{t}", f"finetune/{t}.py", "finetune", "gpt1")
             for t in ("sst2", "rte", "stsb", "hellaswag")]
    refs += [Reference("rlhf/pretrain_tiny", "rlhf/pretrain_tiny.py"),
             Reference("rlhf/sft", "rlhf/sft.py", "sft", "rlhf/pretrain_tiny"),
             Reference("rlhf/reward", "rlhf/reward.py", "reward", "rlhf/sft")]
    return {r.name: r for r in refs}


REFERENCES = _references()


def experiment_module(path: str) -> types.ModuleType:
    """experiments/<path> loaded as a module (its get_config, VARIANTS, ...)."""
    module_spec = importlib.util.spec_from_file_location(
        "experiment_" + path.replace("/", "_").removesuffix(".py"),
        os.path.join(REPO, "experiments", path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def experiment_config(spec: str) -> ml_collections.ConfigDict:
    """`get_config(*args)` of experiments/<file>[:arg] (the --config syntax)."""
    path, _, arg = spec.partition(":")
    return experiment_module(path).get_config(*([arg] if arg else []))


# ---------------------------------------------------------------------------- scaling down


def squeeze(fraction: float) -> float:
    """The part of the small run that stands for `fraction` of the paper run."""
    return math.sqrt(max(0.0, min(1.0, fraction)))


def _small_model(m: ml_collections.ConfigDict, context: int = CONTEXT) -> None:
    window = max(1, round(m.window * context / m.context))
    m.update(dict(vocab_size=VOCAB, context=context, n_layer=N_LAYER, n_head=N_HEAD,
                  d_model=D_MODEL, d_ff=4 * D_MODEL, window=window, attention_impl="xla"))


def _small_train(t: ml_collections.ConfigDict, steps: int, batch_size: int) -> None:
    """Every loss logged, evaluations every STEPS // 2 steps, one checkpoint (the last)."""
    t.update(dict(steps=steps, batch_size=batch_size, microbatches=1, log_every=1,
                  eval_every=STEPS // 2, eval_batches=2, ckpt_every=10 * STEPS, keep=1,
                  sample_tokens=0, eval_at_start=True))


def _small_data(cfg: ml_collections.ConfigDict, data_dir: str, text_glob: str) -> None:
    cfg.data.update(dict(source="text", text_glob=text_glob, val_glob="", tokenizer="char",
                         tokenizer_path="", data_dir=data_dir, token_dir="", num_workers=1,
                         seed=0, store=""))
    # One embedded source: the papers' mixtures and filters need `python -m gpt_jax.prepare`.
    cfg.data.sources, cfg.data.mixture = ml_collections.ConfigDict(), ml_collections.ConfigDict()
    cfg.data.dedup.update(exact=False, fuzzy=False)
    cfg.data.quality.enabled = False
    cfg.mesh.update(dict(data=-1, model=1, fsdp=False, dcn_data=1, cpu_devices=1))


def _own_data(cfg: ml_collections.ConfigDict, paper: ml_collections.ConfigDict, data_dir: str,
              text_glob: str | None) -> None:
    """The paper config's own data source, mixture, filters and tokenizer kind, made in
    `data_dir`; a sentencepiece vocabulary shrinks to 512 pieces trained on SMOKE_SP_CHARS
    characters, a character vocabulary keeps the config's size (it must hold the corpus)."""
    d = cfg.data
    d.update(dict(data_dir=data_dir, token_dir="", store="", num_workers=1))
    if text_glob:
        d.text_glob = text_glob
    cfg.model.vocab_size = paper.model.vocab_size
    if d.tokenizer == "sentencepiece":
        cfg.model.vocab_size = 512
        d.tokenizer_train_chars = min(d.tokenizer_train_chars, SMOKE_SP_CHARS)
    cfg.mesh.update(dict(data=-1, model=1, fsdp=False, dcn_data=1, cpu_devices=1))


def corpus_glob() -> str:
    """The embedded corpus of the pretraining references: the stdlib's json package."""
    return os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")


def mixture_rows(mixture: dict[str, float]) -> int:
    """The fewest rows a (micro)batch needs to hold every source's share of `mixture`."""
    from gpt_jax.config import ConfigError
    from gpt_jax.data import batches
    rows = 1
    while True:
        try:
            batches.check_mixture(dict(mixture), rows)
            return rows
        except ConfigError:
            rows += 1


def scale_down(cfg: ml_collections.ConfigDict, data_dir: str, text_glob: str | None = None,
               steps: int = STEPS, batch_size: int = 8,
               own_data: bool = False) -> ml_collections.ConfigDict:
    """A paper pretraining config at reference size, keeping its family (module docstring),
    trained `steps` full batches (of `batch_size` rows where the paper has no token clock).
    `own_data` keeps the config's data (`_own_data`; tests/test_experiments.py) instead of
    the references' json package, and then gives microbatches the rows a mixture needs."""
    paper = cfg
    cfg = cfg.copy_and_resolve_references()
    _small_model(cfg.model, CONTEXT if paper.model.context > 3 else paper.model.context)
    o, t = cfg.optim, cfg.train
    o.peak_lr = paper.optim.peak_lr * LR_SCALE
    paper_steps = paper.train.steps
    if paper.optim.warmup_steps:
        o.warmup_steps = max(2, round(steps * squeeze(paper.optim.warmup_steps / paper_steps)))
    if paper.optim.decay_steps:
        o.decay_steps = max(1, round(steps * squeeze(paper.optim.decay_steps / paper_steps)))
    _small_train(t, steps, batch_size)
    if paper.train.get("tokens", 0):  # GPT-3: token clock, batch ramp, microbatches
        micro_rows = max(1, paper.train.batch_size // paper.train.microbatches // 64)
        t.microbatches = max(1, paper.train.batch_size // 64) // micro_rows
        if own_data and paper.data.mixture:
            micro_rows = max(micro_rows, mixture_rows(paper.data.mixture))
        t.batch_size = t.microbatches * micro_rows
        full = t.batch_size * CONTEXT
        total = steps * full
        t.tokens = total
        paper_total = paper.train.tokens
        if paper.optim.warmup_tokens:
            o.warmup_tokens = round(total * squeeze(paper.optim.warmup_tokens / paper_total))
        if paper.optim.decay_tokens:
            o.decay_tokens = round(total * squeeze(paper.optim.decay_tokens / paper_total))
        if paper.optim.batch_ramp_tokens:
            o.batch_ramp_tokens = round(total * squeeze(paper.optim.batch_ramp_tokens
                                                        / paper_total))
            o.batch_ramp_start_tokens = micro_rows * CONTEXT  # one microbatch, as the paper's
    if own_data:
        _own_data(cfg, paper, data_dir, text_glob)
        return cfg
    _small_data(cfg, data_dir, text_glob or paper.data.text_glob or corpus_glob())
    if paper.data.tokenizer == "sentencepiece" and paper.name == "tiny-bpe":
        cfg.data.tokenizer = "sentencepiece"  # tiny's own BPE; 512 pieces cover json's chars
        cfg.model.vocab_size = 512
    return cfg


def rlhf_pretrain(cfg: ml_collections.ConfigDict, data_dir: str,
                  **scale: Any) -> ml_collections.ConfigDict:
    """experiments/rlhf/pretrain_tiny.py scaled down: its own corpus, context 48 (`scale`:
    `scale_down`'s steps, batch_size, own_data)."""
    glob = os.path.join(RLHF_DATA, "corpus", "*.txt")
    small = scale_down(cfg, data_dir, glob, **scale)
    _small_model(small.model, 48)
    small.model.vocab_size = cfg.model.vocab_size
    return small


# ---------------------------------------------------------------------------- stage data

WORDS = "the a json value key list object string number array parse dump load".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 5)))


def task_rows(task_type: str, n: int, seed: int, num_outputs: int = 1) -> list[dict]:
    """A learnable toy task per GPT-1 input layout: the label is whether (or which) text
    ends in 'yes' (similarity: a 0/5 score, or with `num_outputs` > 1 a class 0/1); a pure
    function of the seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        end = " yes" if label else " no"
        if task_type == "classification":
            rows.append({"text": _sentence(rng) + end, "label": label})
        elif task_type == "entailment":
            rows.append({"premise": _sentence(rng), "hypothesis": _sentence(rng) + end,
                         "label": label})
        elif task_type == "similarity":
            rows.append({"a": _sentence(rng), "b": _sentence(rng) + end,
                         "label": float(5 * label) if num_outputs == 1 else label})
        else:
            right = rng.randrange(4)
            rows.append({"context": _sentence(rng), "label": right,
                         "choices": [_sentence(rng) + (" yes" if i == right else " no")
                                     for i in range(4)]})
    return rows


def _write_jsonl(path: str, rows: Sequence[dict]) -> str:
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"  # processes writing the same file do not mix
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, path)
    return path


def _first_rows(src: str, n: int, dst: str) -> str:
    with open(src) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(n))]
    return _write_jsonl(dst, rows)


def _rows_holding(batches: int, batch_size: int) -> int:
    """Rows of a JSONL file of which every 10th is held out (rlhf/common.train_val) that
    leave `batches` full training batches."""
    n = batches * batch_size
    while n - max(1, len(range(9, n, 10))) < batches * batch_size:
        n += 1
    return n


def stage_config(ref: Reference, data_dir: str, steps: int = 0) -> ml_collections.ConfigDict:
    """The reference-size config of a fine-tuning or RLHF stage (its model comes from the
    init run at launch); data files are written under `data_dir`. `steps` > 0: one epoch
    of `steps` batches of 4 (tests/test_experiments.py) rather than the references' 1-3
    epochs of fixed files. PPO (no reference of its own) runs `steps` or STEPS iterations;
    its `ppo.reward_workdir` is the caller's to set."""
    cfg = experiment_config(ref.experiment)
    o = cfg.optim
    o.peak_lr *= LR_SCALE
    cfg.mesh.update(dict(data=-1, model=1, fsdp=False, dcn_data=1, cpu_devices=1))
    t = cfg.train
    batch = 4 if steps or ref.stage == "reward" else 8
    tag = f"-{steps}x{batch}" if steps else ""  # one file per size of data set
    if ref.stage == "finetune":
        ft = cfg.finetune
        kind = f"{ft.num_outputs}class" if ft.task_type == "similarity" and \
            ft.num_outputs > 1 else ""
        stem = os.path.join(data_dir, f"ft_{ft.task_type}{kind}{tag}")
        rows = task_rows(ft.task_type, steps * batch if steps else 48, 0, ft.num_outputs)
        ft.update(dict(tfds_name="", train_jsonl=_write_jsonl(stem + ".train.jsonl", rows),
                       val_jsonl=_write_jsonl(stem + ".val.jsonl", task_rows(
                           ft.task_type, 16, 1, ft.num_outputs)),
                       max_len=CONTEXT, epochs=1 if steps else 3))
        _small_train(t, STEPS, batch)  # train.steps follows from the epochs
    elif ref.stage in ("sft", "reward"):
        sft_rows = _rows_holding(steps, batch) if steps else 80
        demos = _first_rows(os.path.join(RLHF_DATA, "sft.jsonl"), sft_rows,
                            os.path.join(data_dir, f"sft{tag}.jsonl"))
        if ref.stage == "sft":
            cfg.sft.update(dict(train_jsonl=demos, val_jsonl="", max_len=48,
                                epochs=1 if steps else 2))
        else:
            cfg.reward.update(dict(
                train_jsonl=_first_rows(os.path.join(RLHF_DATA, "rankings.jsonl"),
                                        _rows_holding(steps, batch) if steps else 72,
                                        os.path.join(data_dir, f"rankings{tag}.jsonl")),
                val_jsonl="", demo_jsonl=demos, max_len=48, max_k=9, epochs=1))
        _small_train(t, STEPS, batch)
    elif ref.stage == "ppo":
        p = cfg.ppo
        # minibatches of 2 episodes; 24 prompt slots hold the toy's headers, 8 new tokens
        # and the pretraining windows fit the 48-token model of `rlhf_pretrain`
        p.update(dict(prompts_jsonl=_first_rows(os.path.join(RLHF_DATA, "prompts.jsonl"), 64,
                                                os.path.join(data_dir, "prompts.jsonl")),
                      iterations=steps or STEPS, rollout_batch=2 * p.minibatches,
                      max_prompt_len=24, response_len=8, ptx_context=min(p.ptx_context, 48)))
        for field, name in (("eval_prompts_jsonl", "valid_prompts.jsonl"),
                            ("test_prompts_jsonl", "test_prompts.jsonl")):
            if p[field]:
                p[field] = _first_rows(os.path.join(RLHF_DATA, name), 2,
                                       os.path.join(data_dir, name))
        _small_train(t, steps or STEPS, batch)
    else:
        raise ReferenceError(f"{ref.name}: unknown stage {ref.stage!r}")
    return cfg


def reference_config(ref: Reference, data_dir: str, steps: int = 0) -> ml_collections.ConfigDict:
    """The config a reference trains with (stages: before the init run's model is merged).
    `steps` > 0: the smoke test's instead (tests/test_experiments.py): `steps` batches of 4
    rows on the config's own data (`scale_down(own_data=True)`, `stage_config(steps=)`)."""
    if ref.stage == "babygpt":  # already tiny (vocabulary 2, context 3): as the paper's
        cfg = experiment_config(ref.experiment)
        cfg.train.steps = steps or cfg.train.steps
        return cfg
    if ref.stage != "pretrain":
        return stage_config(ref, data_dir, steps)
    paper = experiment_config(ref.experiment)
    scale: dict[str, Any] = dict(steps=steps, batch_size=4, own_data=True) if steps else {}
    if ref.experiment == "rlhf/pretrain_tiny.py":
        return rlhf_pretrain(paper, data_dir, **scale)
    return scale_down(paper, data_dir, **scale)


# ---------------------------------------------------------------------------- running


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def portable(value: Any, root: str) -> Any:
    """A config value with this machine's paths spelled <root>, <stdlib> or repo-relative."""
    if not isinstance(value, str):
        return value
    for prefix, name in ((root, "<root>"), (sysconfig.get_paths()["stdlib"], "<stdlib>"),
                         (REPO + os.sep, "")):
        if value.startswith(prefix):
            value = name + value[len(prefix):]
    return value


def overrides(paper: ml_collections.ConfigDict, small: ml_collections.ConfigDict,
              root: str = "") -> dict[str, Any]:
    """Config fields whose value differs from the paper config's (dotted names)."""
    a, b = _flat(paper.to_dict()), _flat(small.to_dict())
    return {k: portable(b[k], root) if root else b[k] for k in sorted(b)
            if a.get(k, object()) != b[k]}


def versions() -> dict[str, str]:
    """The library versions and platform a curve depends on."""
    import jax
    out = {}
    for name in VERSIONED:
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "absent"
    out["python"] = ".".join(map(str, sys.version_info[:3]))
    out["platform"] = jax.default_backend()
    out["devices"] = str(jax.device_count())
    out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return out


ISA_FLAGS = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512_bf16", "amx_tile")


def machine() -> dict[str, Any]:
    """The CPU a curve was trained on: its model name, the instruction-set extensions XLA's
    CPU kernels choose between (of `ISA_FLAGS`) and the core count. Losses differ across
    CPUs in the last digits (see RTOL), so a pinned file says where its bits came from."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:  # Linux; elsewhere the platform's name is all
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    have = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "isa": [f for f in ISA_FLAGS if f in have], "cores": os.cpu_count()}


def corpus_digest(text_glob: str) -> str:
    """sha256 of the files of a text glob (the json package varies across Python patches)."""
    import glob
    h = hashlib.sha256()
    for path in sorted(glob.glob(text_glob)):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def run_reference(ref: Reference, root: str, workdirs: dict[str, str]) -> dict:
    """Trains `ref` under `root` (its init run's workdir from `workdirs`); the curve."""
    from gpt_jax import finetune, metrics, train
    from gpt_jax.rlhf import reward, sft
    from gpt_jax.workdir import Workdir

    data_dir = os.path.join(root, "data")
    os.makedirs(data_dir, exist_ok=True)
    workdir = os.path.join(root, ref.name.replace("/", "-").replace(":", "-"))
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        raise ReferenceError(f"{ref.name}: {workdir} already holds a run; use a fresh root")
    cfg = reference_config(ref, data_dir)
    init = ""
    if ref.init:
        if ref.init not in workdirs:
            raise ReferenceError(f"{ref.name} starts from {ref.init}, which has not run")
        init = workdirs[ref.init]
    trainers: dict[str, Callable[[], Any]] = {
        "pretrain": lambda: train.train(cfg, workdir),
        "finetune": lambda: finetune.finetune(cfg, init, workdir),
        "sft": lambda: sft.sft(cfg, init, workdir),
        "reward": lambda: reward.train_reward(cfg, init, workdir),
    }
    paper = experiment_config(ref.experiment)
    if ref.stage == "babygpt":  # its own full-batch loop (gpt_jax.babygpt), no workdir
        from gpt_jax import babygpt
        losses = babygpt.train(cfg)[2]
        tokens = cfg.train.batch_size * cfg.model.context
        rows = [{"step": i + 1, "loss": float(v), "tokens": (i + 1) * tokens, "lr": None}
                for i, v in enumerate(losses)]
        ran = cfg
    else:
        trainers[ref.stage]()
        workdirs[ref.name] = workdir
        rows = metrics.read_metrics(workdir)
        ran = Workdir(workdir).read_config()
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    glob = ran.data.text_glob if ran.data.source == "text" else ""
    return {
        "name": ref.name, "config": f"experiments/{ref.experiment}", "stage": ref.stage,
        "init": ref.init, "versions": versions(), "machine": machine(),
        "corpus": {"glob": portable(glob, root), "sha256": corpus_digest(glob)} if glob else {},
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "overrides": overrides(paper, ran, root),
        "steps": [r["step"] for r in train_rows],
        "tokens": [r["tokens"] for r in train_rows],
        "loss": [r["loss"] for r in train_rows],
        "lr": [r["lr"] for r in train_rows],
        "eval_steps": [r["step"] for r in eval_rows],
        "eval_tokens": [r["tokens"] for r in eval_rows],
        "eval_loss": [r["eval_loss"] for r in eval_rows],
    }


def order(names: Sequence[str]) -> list[Reference]:
    """The references of `names` and those they start from, each after its init."""
    out: list[Reference] = []

    def add(name: str) -> None:
        if name not in REFERENCES:
            raise ReferenceError(f"no reference curve {name!r}; known: {', '.join(REFERENCES)}")
        ref = REFERENCES[name]
        if ref.init:
            add(ref.init)
        if ref not in out:
            out.append(ref)

    for name in names:
        add(name)
    return out


# ---------------------------------------------------------------------------- pinned files


def for_config(config_name: str) -> str | None:
    """The reference of a run's `cfg.name` (e.g. 'gpt2-small' -> 'gpt2:small'), if any."""
    for ref in REFERENCES.values():
        if experiment_config(ref.experiment).name == config_name:
            return ref.name
    return None


def for_run(cfg: ml_collections.ConfigDict) -> str | None:
    """The reference a run reproduces: its config's, if the run has the reference's model
    fields (a full-size run is not overlaid on a 16-step toy)."""
    name = for_config(cfg.get("name", ""))
    if name is None or not os.path.exists(REFERENCES[name].file):
        return None
    flat = _flat(cfg.to_dict())
    model = {k: v for k, v in read(name)["overrides"].items() if k.startswith("model.")}
    return name if all(flat.get(k) == v for k, v in model.items()) else None


def read(name: str, directory: str = CURVES_DIR) -> dict:
    """The pinned curve of reference `name`."""
    path = os.path.join(directory, os.path.basename(REFERENCES[name].file)) \
        if name in REFERENCES else name
    if not os.path.exists(path):
        raise ReferenceError(f"{name}: no pinned curve at {path}; write it with "
                             "`python -m gpt_jax.reference --write`")
    with open(path) as f:
        return json.load(f)


def write(curve: dict, directory: str = CURVES_DIR) -> str:
    """Pins a curve; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, os.path.basename(REFERENCES[curve["name"]].file))
    with open(path, "w") as f:
        json.dump(curve, f, indent=1)
        f.write("\n")
    return path


def version_warning(pinned: dict, now: dict[str, str]) -> str | None:
    """One line when the pinned file came from other library versions, else None."""
    then = pinned.get("versions", {})
    diff = [f"{k} {then.get(k, '?')} -> {now[k]}" for k in (*VERSIONED, "python", "platform",
                                                            "devices", "xla_flags")
            if k in now and then.get(k) != now[k]]
    if not diff:
        return None
    return (f"reference curve {pinned['name']} was pinned with other versions "
            f"({', '.join(diff)}); comparing anyway")


def compare(pinned: dict, fresh: dict, rtol: float = RTOL, atol: float = ATOL) -> str | None:
    """None if `fresh` matches `pinned`, else one line naming the config and first step
    that moved. Warns (one line) when the pinned file came from other versions."""
    message = version_warning(pinned, fresh["versions"] if "versions" in fresh else versions())
    if message:
        warnings.warn(message, stacklevel=2)
    name = pinned["name"]
    if pinned.get("corpus", {}).get("sha256") != fresh.get("corpus", {}).get("sha256"):
        warnings.warn(f"reference curve {name}: the corpus {pinned['corpus'].get('glob')} "
                      f"differs from the pinned one (another Python patch release?)",
                      stacklevel=2)
    for kind, steps_key in (("loss", "steps"), ("eval_loss", "eval_steps")):
        a = dict(zip(pinned[steps_key], pinned[kind]))
        b = dict(zip(fresh[steps_key], fresh[kind]))
        if sorted(a) != sorted(b):
            return (f"{name}: {kind} logged at steps {sorted(b)}, pinned at {sorted(a)} "
                    f"({REFERENCES[name].file if name in REFERENCES else ''})")
        for step in sorted(a):
            want, got = float(a[step]), float(b[step])
            if not abs(got - want) <= atol + rtol * abs(want):
                return (f"{name}: {kind} at step {step} is {got:.7g}, pinned {want:.7g} "
                        f"(rtol {rtol:g}, atol {atol:g}); if the change is intended, "
                        f"`python -m gpt_jax.reference --write --names={name}`")
    return None


def run_all(names: Sequence[str], root: str | None = None,
            each: Callable[[Reference, dict], None] | None = None) -> dict[str, dict]:
    """Trains the references of `names` (and their inits) under `root`; curves by name."""
    root = root or tempfile.mkdtemp(prefix="gpt_jax_reference-")
    workdirs: dict[str, str] = {}
    curves = {}
    for ref in order(names):
        curves[ref.name] = run_reference(ref, root, workdirs)
        if each is not None:
            each(ref, curves[ref.name])
    return curves


XLA_FLAGS = "--xla_backend_optimization_level=0"  # a third of the compile time; pinned with it


def configure_jax(cache_dir: str) -> None:
    """Before JAX starts: cheap compiles, and a compilation cache so that programs shared
    by several references (evaluation and init at equal shapes) compile once."""
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip()
    import jax
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def partition(refs: Sequence[Reference], jobs: int) -> list[list[Reference]]:
    """Families (gpt2:*, a reference with those starting from it, ...) spread over `jobs`
    workers, so equal shapes share compiles; GPT-3's (layer scan, batch ramp: slower
    compiles) counted heavier; each list in run order."""
    chains: dict[str, list[Reference]] = {}
    for ref in refs:
        root = ref
        while root.init:
            root = REFERENCES[root.init]
        chains.setdefault(root.name.split(":")[0].split("/")[0], []).append(ref)
    weight = lambda chain: sum(1.5 if r.name.startswith("gpt3") else 1.0  # noqa: E731
                               for r in chain)
    groups: list[list[Reference]] = [[] for _ in range(max(1, jobs))]
    loads = [0.0] * len(groups)
    for chain in sorted(chains.values(), key=weight, reverse=True):
        i = loads.index(min(loads))
        groups[i] += chain
        loads[i] += weight(chain)
    return [g for g in groups if g]


def _worker(names: Sequence[str], root: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)

    def save(ref: Reference, curve: dict) -> None:
        path = os.path.join(out, os.path.basename(ref.file))
        with open(path + ".tmp", "w") as f:
            json.dump(curve, f)
        os.replace(path + ".tmp", path)
        print(f"{ref.name}: trained, final loss {curve['loss'][-1]:.4f}", flush=True)

    run_all(names, root, save)
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"worker: {len(order(names))} references in {usage.ru_utime + usage.ru_stime:.0f} s "
          "of CPU", flush=True)


def fresh_curves(names: Sequence[str], root: str, jobs: int) -> dict[str, dict]:
    """Trains the references of `names` in `jobs` worker processes; curves by name."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = os.path.join(root, "fresh")
    procs = []
    for i, group in enumerate(partition(order(names), jobs)):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gpt_jax.reference", f"--_worker_out={out}",
             f"--root={os.path.join(root, f'w{i}')}",
             f"--names={','.join(r.name for r in group)}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        text, _ = p.communicate()
        print(text.rstrip())
        if p.returncode:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            raise ReferenceError(f"a reference worker failed: {lines[-1] if lines else p.args}")
    curves = {}
    for ref in order(names):
        with open(os.path.join(out, os.path.basename(ref.file))) as f:
            curves[ref.name] = json.load(f)
    return curves


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    from gpt_jax import cli
    f = flags.FLAGS
    root = f.root or tempfile.mkdtemp(prefix="gpt_jax_reference-")
    names = f.names or list(REFERENCES)
    if f._worker_out:
        configure_jax(os.path.join(root, "xla_cache"))
        cli.start()
        _worker(names, root, f._worker_out)
        return
    if f.write == f.check:
        raise ReferenceError("give exactly one of --write and --check")
    curves = fresh_curves(names, root, f.jobs)
    problems = []
    here = machine()
    pinned_on = {json.dumps(read(n).get("machine")) for n in names if f.check}
    if pinned_on - {json.dumps(here)}:  # one line: another CPU's rounding is within RTOL
        print(f"note: checking on {here['cpu']} ({' '.join(here['isa'])}); some curves were "
              f"pinned on another CPU, compared to rtol {RTOL:g}")
    for name in names:
        curve = curves[name]
        if f.write:
            path = os.path.relpath(write(curve), REPO)
            print(f"wrote {path}: final loss {curve['loss'][-1]:.4f}")
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            problem = compare(read(name), curve)
        for w in caught:
            print(f"warning: {w.message}")
        print(problem or f"{name}: matches its pinned curve ({len(curve['steps'])} steps)")
        if problem:
            problems.append(problem)
    if problems:
        raise CurveMismatch(f"{len(problems)} reference curve(s) moved; first: {problems[0]}")


def define_flags() -> None:
    from absl import flags
    flags.DEFINE_bool("write", False, "Regenerate the pinned files.")
    flags.DEFINE_bool("check", False, "Rerun and compare with the pinned files.")
    flags.DEFINE_list("names", None, f"References to run (default all: {', '.join(REFERENCES)}).")
    flags.DEFINE_string("root", None, "Where runs and data go (default: a new temp dir).")
    flags.DEFINE_integer("jobs", 2, "Worker processes (compiles are single-threaded).")
    flags.DEFINE_string("_worker_out", None, "Internal: a worker's output directory.")


if __name__ == "__main__":
    from gpt_jax import cli as _cli
    define_flags()
    _cli.run(main, errors=(ReferenceError, CurveMismatch))
