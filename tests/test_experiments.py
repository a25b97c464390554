"""Every config and variant in experiments/ builds, trains 2 steps and evaluates once, so no
shipped config fails on its defaults again (issue 25: tiny.py:char's vocabulary of 256 could
not hold the 447 characters of its own default corpus).

The cases are discovered, not listed: every experiments/**/*.py but make_data.py, once per
name in its `VARIANTS` (a file whose get_config takes an argument must have them and must
refuse any other name). Each case validates the full-size config unchanged, then trains the
smoke-size copy `reference.reference_config(..., steps=2)` makes: width 32, 2 layers,
context 32 (48 for the RLHF toy), batches of 4 rows, keeping the config's structure (norm
placement, attention pattern with the window at the same fraction of the context, dtype,
layer scan, remat, GPT-3's token clock, batch ramp and microbatches, schedule shape,
dropout; `test_smoke_copy_keeps_the_structure` lists what may change) and its own data
source and tokenizer kind. The standard library (`stdlib`, tiny/GPT-1/GPT-2's default) is
tokenized once per tokenizer into a data dir all cases share; character vocabularies keep
the config's size, sentencepiece ones shrink to 512 pieces learnt from 200k characters.

Stand-ins for data that needs a download:
  GPT-3's five Hugging Face sources: the same source names and mixture weights over local
      `text` sources (one stdlib package each, the heaviest source the largest package),
      made into a store by gpt_jax.prepare's Beam pipeline (DirectRunner) once, with the
      recipe's exact and fuzzy dedup. Its quality filter is checked (`check_recipe`) but
      off: trained to tell Python from Python it keeps 2 of the 33 common_crawl files and
      empties that source's validation split (tests/test_prepare.py tests the filter).
  GLUE and HellaSwag (TFDS): JSONL files of the same task layout (`reference.task_rows`).
  Web text in parquet (gpt2.py:124m_fineweb's FineWeb, :124m_owt's OpenWebText): a local
      parquet file with FineWeb's schema holding 48 stdlib modules (`web_text`), split by
      the recipe's own rule ('first' keeps 4 validation documents of the 48); GPT-2's BPE
      files: a byte-level vocabulary in their format (256 byte symbols and <|endoftext|>,
      no merges), so the real GPT2Tokenizer reads it and the model keeps 50,257 rows.
The RLHF configs read experiments/rlhf/data (in the repository; the first rows of each file).
Stages start from smoke runs, as in real use (--init_from): fine-tuning from gpt1.py's,
SFT from rlhf/pretrain_tiny.py's, the reward model and PPO from rlhf/sft.py:tiny's, PPO
scored by rlhf/reward.py:tiny's. Each run happens once per session and is shared by the
cases that need it, across pytest-xdist workers too (a file lock per run).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import inspect
import json
import math
import os
import shutil
import sysconfig
from collections.abc import Iterator

import jax
import pytest
from conftest import REPO

from gpt_jax import babygpt, finetune, metrics, rlhf, train
from gpt_jax import config as config_lib
from gpt_jax import data as data_lib
from gpt_jax import reference as ref_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.data import pipeline
from gpt_jax.rlhf import ppo, reward, sft
from gpt_jax.workdir import Workdir

EXPERIMENTS = os.path.join(REPO, "experiments")
STEPS = 2
STAGES = ("finetune", "sft", "reward", "ppo")  # config sections naming a stage's trainer
# What each stage starts from (--init_from), as the experiment files' docstrings say.
INIT = {"finetune": "gpt1.py", "sft": "rlhf/pretrain_tiny.py", "reward": "rlhf/sft.py:tiny",
        "ppo": "rlhf/sft.py:tiny"}
REWARD_MODEL = "rlhf/reward.py:tiny"  # ppo.reward_workdir
# Stand-ins for a mixture's sources, largest first (given to the heaviest source first).
STAND_INS = ("asyncio", "email", "multiprocessing", "unittest", "importlib", "xml/dom")


def experiment_files() -> list[str]:
    return sorted(os.path.relpath(p, EXPERIMENTS)
                  for p in glob.glob(os.path.join(EXPERIMENTS, "**", "*.py"), recursive=True)
                  if os.path.basename(p) != "make_data.py")


def experiment_specs() -> list[str]:
    """'file' or 'file:variant' for every file and each of its VARIANTS."""
    specs = []
    for rel in experiment_files():
        variants = getattr(ref_lib.experiment_module(rel), "VARIANTS", ())
        specs += [f"{rel}:{v}" for v in variants] or [rel]
    return specs


SPECS = experiment_specs()


def stage_of(cfg) -> str:
    for stage in STAGES:
        if stage in cfg:
            return stage
    return "babygpt" if cfg.data.sequence else "pretrain"


# ---------------------------------------------------------------------------- runs, once


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive lock on `path`.lock, across processes (xdist workers)."""
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Runs:
    """The smoke runs of a session under `root`, each made once (by whichever worker
    asks first) and reused; the data dir is shared, so a corpus is tokenized once."""

    def __init__(self, root: str):
        self.root = root
        self.data_dir = os.path.join(root, "data")
        os.makedirs(self.data_dir, exist_ok=True)

    def workdir(self, spec: str) -> str:
        name = spec.replace("/", "-").replace(":", "-").replace(".py", "")
        workdir = os.path.join(self.root, name)
        with locked(workdir):
            if not os.path.exists(workdir + ".done"):
                shutil.rmtree(workdir, ignore_errors=True)  # a failed attempt's leftovers
                self._train(spec, workdir)
                open(workdir + ".done", "w").close()
        return workdir

    def config(self, spec: str):
        paper = ref_lib.experiment_config(spec)
        ref = ref_lib.Reference(spec, spec, stage_of(paper))
        cfg = ref_lib.reference_config(ref, self.data_dir, steps=STEPS)
        cfg.train.update(dict(eval_at_start=False, eval_batches=1))
        d = cfg.data
        if d.source == "hf" and d.hf_path == "parquet":  # the module docstring's stand-ins
            d.hf_data_files = self.web_text()
            if d.val_split_rule == "first":
                d.val_docs = 4
        if d.tokenizer == "gpt2":
            d.tokenizer_path = self.byte_bpe()
        return cfg

    def web_text(self) -> str:
        """A parquet file in FineWeb's schema: 48 stdlib modules of 2-50 kB, 8,000
        characters of each; returns its path."""
        import pyarrow as pa  # optional, heavy: the [data] extra (parquet sources)
        import pyarrow.parquet as pq

        path = os.path.join(self.data_dir, "web_text", "000_00000.parquet")
        with locked(os.path.join(self.data_dir, "web_text")):
            if not os.path.exists(path):
                root = sysconfig.get_paths()["stdlib"]
                files = [p for p in sorted(glob.glob(os.path.join(root, "*.py")))
                         if 2_000 <= os.path.getsize(p) <= 50_000][:48]
                texts = [open(p, encoding="utf-8").read()[:8000] for p in files]
                n = len(texts)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                pq.write_table(pa.table({
                    "text": texts, "id": [f"<urn:uuid:{i}>" for i in range(n)],
                    "dump": ["CC-MAIN-2024-10"] * n,
                    "url": [f"https://example.org/{os.path.basename(p)}" for p in files],
                    "date": ["2024-02-21T00:00:00Z"] * n,
                    "file_path": ["s3://commoncrawl/crawl-data/0.warc.gz"] * n,
                    "language": ["en"] * n,
                    "language_score": pa.array([0.9] * n, pa.float64()),
                    "token_count": pa.array([len(t.encode()) for t in texts], pa.int64())}),
                    path + ".tmp", row_group_size=16)
                os.replace(path + ".tmp", path)
        return path

    def byte_bpe(self) -> str:
        """vocab.json + merges.txt in GPT-2's format: the 256 byte symbols and
        <|endoftext|>, no merges (every byte its own token); returns the directory."""
        out = os.path.join(self.data_dir, "gpt2_bytes")
        with locked(out):
            if not os.path.exists(os.path.join(out, tokenizer_lib.GPT2_VOCAB_FILE)):
                os.makedirs(out, exist_ok=True)
                symbols = sorted(tokenizer_lib.bytes_to_unicode().values())
                vocab = {c: i for i, c in enumerate(symbols)}
                vocab[tokenizer_lib.EOT] = len(vocab)
                with open(os.path.join(out, tokenizer_lib.GPT2_MERGES_FILE), "w") as f:
                    f.write("#version: 0.2\n")
                with open(os.path.join(out, tokenizer_lib.GPT2_VOCAB_FILE), "w") as f:
                    json.dump(vocab, f)
        return out

    def _train(self, spec: str, workdir: str) -> None:
        cfg = self.config(spec)
        stage = stage_of(cfg)
        if stage == "pretrain":
            if cfg.data.sources:
                cfg.data.store = self.mixture_store(cfg)
            with locked(os.path.join(self.data_dir, "tokens")):  # each corpus tokenized once
                data_lib.prepare(config_lib.validate(cfg.copy_and_resolve_references()))
            train.train(cfg, workdir)
            return
        init = self.workdir(INIT[stage])
        if stage == "finetune":
            finetune.finetune(cfg, init, workdir)
        elif stage == "sft":
            sft.sft(cfg, init, workdir)
        elif stage == "reward":
            reward.train_reward(cfg, init, workdir)
        else:
            cfg.ppo.reward_workdir = self.workdir(REWARD_MODEL)
            ppo.train_ppo(cfg, init, workdir)

    def mixture_store(self, cfg) -> str:
        """A store of the config's mixture with each source a local stdlib package."""
        d = cfg.data
        pipeline.check_recipe(cfg)  # the recipe as shipped: source names of the filters
        root = sysconfig.get_paths()["stdlib"]
        names = sorted(d.sources, key=lambda n: -d.mixture[n])
        assert len(names) <= len(STAND_INS), f"more sources than stand-ins: {names}"
        for name, package in zip(names, STAND_INS):
            d.sources[name] = {"source": "text", "text_glob": os.path.join(root, package, "*.py")}
        d.quality.enabled = False  # the module docstring says why
        key = hashlib.sha1(json.dumps(d.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        out = os.path.join(self.data_dir, f"mixture-{key}")
        with locked(out):
            if not os.path.exists(os.path.join(out, "manifest.json")):
                pipeline.run(cfg, out, [])
        return out


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's root, shared by its workers
    root = base / "experiment_runs"
    root.mkdir(exist_ok=True)
    return Runs(str(root))


CACHE_FLAGS = {"jax_compilation_cache_dir": None, "jax_persistent_cache_min_compile_time_secs": 0.0,
               "jax_persistent_cache_min_entry_size_bytes": 0}


@pytest.fixture(scope="module", autouse=True)
def compile_cache(runs) -> Iterator[None]:
    """A persistent compilation cache while this module runs: programs that runs share
    (inits and evaluations of equal shapes; GPT-1 fine-tuning from JSONL and from the GLUE
    stand-ins) compile once. The learning rate is a constant of each train step, so those
    differ. Restored afterwards for the worker's other tests."""
    from jax.experimental.compilation_cache import compilation_cache
    saved = {k: getattr(jax.config, k) for k in CACHE_FLAGS}
    for k, v in CACHE_FLAGS.items():
        jax.config.update(k, v if v is not None else os.path.join(runs.root, "jax_cache"))
    compilation_cache.reset_cache()  # the cache is set up once per process, at first use
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


# ---------------------------------------------------------------------------- the cases


def validate_full_size(spec: str):
    """The config as shipped, validated unchanged (stage sections too, with placeholders
    for the paths a stage's command line must give); its default data files exist."""
    cfg = ref_lib.experiment_config(spec)
    config_lib.validate(cfg)
    stage = stage_of(cfg)
    if stage in ("sft", "reward", "ppo"):
        check = cfg.copy_and_resolve_references()
        if stage == "ppo":
            check.ppo.prompts_jsonl = check.ppo.prompts_jsonl or "prompts.jsonl"
            check.ppo.reward_workdir = check.ppo.reward_workdir or "reward_workdir"
        rlhf.validate(check)
    for field, value in ref_lib._flat(cfg.to_dict()).items():
        if isinstance(value, str) and value.startswith("experiments/"):
            assert glob.glob(os.path.join(REPO, value)), f"{spec}: {field}={value!r} is missing"
    return cfg


def finite(row: dict, key: str) -> bool:
    return isinstance(row.get(key), float) and math.isfinite(row[key])


@pytest.mark.parametrize("spec", SPECS)
def test_trains_two_steps_and_evaluates_once(spec, runs):
    paper = validate_full_size(spec)
    if stage_of(paper) == "babygpt":  # its own full-batch loop; evaluated as its table
        cfg = runs.config(spec)
        before, after, losses = babygpt.train(cfg)
        assert len(losses) == STEPS and all(map(math.isfinite, losses)), losses
        assert len(babygpt.table(cfg, before, after).splitlines()) == 1 + 2 ** cfg.model.context
        return
    workdir = runs.workdir(spec)
    ran = Workdir(workdir).read_config()
    rows = metrics.read_metrics(workdir)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, ran.train.steps + 1)), steps
    assert ran.train.steps == STEPS or ran.train.get("tokens"), ran.train.steps  # GPT-3: ramp
    assert all(finite(r, "loss") for r in rows if "loss" in r)
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    if stage_of(ran) == "ppo" and not ran.ppo.eval_prompts_jsonl:
        assert not evals  # the paper's PPO has no held-out prompts
    else:
        assert [r["step"] for r in evals] == [ran.train.steps], evals
        assert finite(evals[0], "eval_loss"), evals[0]


# Fields a smoke copy may change (shape, length, logging, paths, where data lives); every
# other field of the shipped config must reach the run unchanged.
SHAPE = ("model.vocab_size", "model.context", "model.n_layer", "model.n_head",
         "model.d_model", "model.d_ff", "model.window", "model.attention_impl")
SCHEDULE = ("optim.peak_lr", "optim.warmup_steps", "optim.decay_steps", "optim.warmup_tokens",
            "optim.decay_tokens", "optim.batch_ramp_tokens", "optim.batch_ramp_start_tokens")
LOOP = tuple(f"train.{k}" for k in ("batch_size", "microbatches", "steps", "tokens",
                                    "log_every", "eval_every", "eval_batches", "eval_at_start",
                                    "ckpt_every", "keep", "sample_tokens"))
WHERE = ("data.data_dir", "data.token_dir", "data.store", "data.num_workers",
         "data.tokenizer_train_chars", "data.text_glob", "mesh.cpu_devices",
         "data.hf_data_files", "data.tokenizer_path", "data.val_docs")
STAGE_DATA = tuple(f"{s}.{k}" for s, keys in (
    ("finetune", ("tfds_name", "train_jsonl", "val_jsonl", "max_len", "epochs")),
    ("sft", ("train_jsonl", "max_len", "epochs")),
    ("reward", ("train_jsonl", "demo_jsonl", "max_len", "epochs")),
    ("ppo", ("prompts_jsonl", "eval_prompts_jsonl", "test_prompts_jsonl", "reward_workdir",
             "iterations", "rollout_batch", "max_prompt_len", "response_len", "ptx_context")))
    for k in keys)


@pytest.mark.parametrize("spec", [s for s in SPECS
                                  if stage_of(ref_lib.experiment_config(s)) != "babygpt"])
def test_smoke_copy_keeps_the_structure(spec, tmp_path):
    """The smoke config against the shipped one (no training): only the fields above
    change; a stage's model comes from its init run and so is not compared; GPT-3's
    mixture sources are replaced only when the store is made."""
    paper = ref_lib.experiment_config(spec)
    small = Runs(str(tmp_path)).config(spec)
    stage = stage_of(paper)
    changed = set(SHAPE + SCHEDULE + LOOP + WHERE + STAGE_DATA)
    if stage != "pretrain":
        changed |= {k for k in ref_lib._flat(paper.to_dict()) if k.startswith("model.")
                    and not k.endswith("_pdrop")}
    moved = {k: v for k, v in ref_lib.overrides(paper, small).items() if k not in changed}
    assert not moved, f"{spec}: the smoke copy changes {moved}"
    m, p = small.model, paper.model
    if stage == "pretrain" and p.context > 3:
        assert m.window / m.context == p.window / p.context
        assert (m.d_model, m.n_layer, m.context) == (32, 2, 32 if spec != "rlhf/pretrain_tiny.py"
                                                    else 48)
        # a character vocabulary keeps the config's size: it must hold the corpus; GPT-2's
        # BPE (its byte-level stand-in) keeps GPT-2's 50,257 rows
        assert m.vocab_size == (p.vocab_size if paper.data.tokenizer in ("char", "gpt2")
                                else 512)
    if paper.train.microbatches > 1:
        assert small.train.microbatches > 1 and bool(small.optim.batch_ramp_tokens) == bool(
            paper.optim.batch_ramp_tokens)


def test_every_experiment_and_variant_is_a_case():
    files = experiment_files()
    assert {s.split(":")[0] for s in SPECS} == set(files)
    for rel in files:
        module = ref_lib.experiment_module(rel)
        params = inspect.signature(module.get_config).parameters
        assert bool(params) == hasattr(module, "VARIANTS"), (
            f"{rel}: get_config takes a variant iff the file lists VARIANTS")
        if params:
            (param,) = params.values()
            assert param.default in module.VARIANTS and len(set(module.VARIANTS)) == len(
                module.VARIANTS), rel
            with pytest.raises(ValueError, match="is not one of"):
                module.get_config("no-such-variant")
    assert ref_lib.experiment_module("finetune/jsonl.py").VARIANTS == finetune.TASK_TYPES
    for name in ("gpt2.py", "gpt3.py"):
        module = ref_lib.experiment_module(name)
        assert module.VARIANTS == tuple(module.SIZES) + getattr(module, "RECIPES", ())
    for r in ref_lib.REFERENCES.values():  # a reference curve's spec names a case
        path, _, variant = r.experiment.partition(":")
        default = inspect.signature(ref_lib.experiment_module(path).get_config).parameters
        variant = variant or next((v.default for v in default.values()), "")
        assert (f"{path}:{variant}" if variant else path) in SPECS, r.experiment
