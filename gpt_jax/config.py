"""Shared config defaults and the one place configs are validated.

Every experiment file under `experiments/` starts from `base_config()` and
overrides what its paper says. `validate(cfg)` runs before any compute and
raises `ConfigError` naming the offending field and what would be valid.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "muon")
DATA_SOURCES = ("stdlib", "text", "tfds", "hf")
VAL_SPLIT_RULES = ("hash", "first", "permutation")  # data.val_split_rule
TOKENIZERS = ("sentencepiece", "char", "file", "gpt2", "gpt1")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment (a GPT-2-style pre-norm decoder)."""
    cfg = ml_collections.ConfigDict()
    cfg.name = "base"
    cfg.seed = 0

    cfg.model = m = ml_collections.ConfigDict()
    m.vocab_size = 50257
    m.context = 1024  # maximum sequence length (learned position table size)
    m.n_layer = 12
    m.n_head = 12
    m.d_model = 768
    m.d_ff = 3072
    m.norm = "pre"  # 'pre' (GPT-2/3) or 'post' (GPT-1)
    m.ln_eps = 1e-5
    m.init_std = 0.02
    m.scale_residual_init = True  # GPT-2: residual projections get std / sqrt(2 n_layer)
    m.embd_pdrop = 0.1
    m.resid_pdrop = 0.1
    m.attn_pdrop = 0.1
    m.attention_pattern = "dense"  # 'dense' or 'alternating' (GPT-3)
    m.window = 256  # banded layers attend to the previous `window` positions
    m.dtype = "float32"  # compute dtype; params are always float32
    m.scan_layers = False
    m.remat = "none"
    # 'auto': Pallas splash attention on TPU, cuDNN flash attention on GPU (bf16/f16),
    # XLA elsewhere; or force 'xla', 'splash' or 'cudnn' (gpt_jax/attention.py).
    m.attention_impl = "auto"
    m.splash_block_q = 512  # splash kernel block sizes (multiples of 128; capped at T)
    m.splash_block_kv = 512

    cfg.optim = o = ml_collections.ConfigDict()
    # 'cosine': linear warmup from 0, cosine to final_lr_frac * peak at the end of
    # decay, then flat (GPT-1 with frac 0, GPT-3 with 0.1, SFT with no warmup).
    # 'linear': warmup, then linear decay to final_lr_frac * peak (GPT-1 fine-tuning).
    # 'constant': warmup, then flat.
    o.schedule = "cosine"
    o.peak_lr = 6e-4
    o.warmup_steps = 0
    # Token fields (GPT-3) count tokens actually consumed, the batch ramp included: with
    # either set, the lr follows tokens seen rather than steps (optim.py).
    o.warmup_tokens = 0  # if > 0, overrides warmup_steps
    o.decay_steps = 0  # 0 means train.steps
    o.decay_tokens = 0  # if > 0, overrides decay_steps
    # Extending a run (README "Extending a run"): from this step on the lr decays, in the
    # shape of `schedule`, from its value there to final_lr_frac * peak at train.steps.
    o.extend_from_step = 0  # 0: off
    o.final_lr_frac = 0.1
    o.warmup_frac = 0.0  # fine-tuning: warmup as a fraction of all steps
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.grad_clip = 1.0
    # 'adamw' (the papers'), or 'muon': orthogonalised momentum for the hidden matrices
    # at peak muon_lr (AdamW-RMS-matched), AdamW for the rest (optim.make_optimizer).
    o.optimizer = "adamw"
    o.muon_lr = 3e-3
    o.muon_momentum = 0.95
    # GPT-3 batch-size ramp: microbatches grow linearly from ceil(start/full)
    # of the full batch to all of it over the first `batch_ramp_tokens` tokens.
    o.batch_ramp_tokens = 0
    o.batch_ramp_start_tokens = 32768

    cfg.train = t = ml_collections.ConfigDict()
    t.batch_size = 8  # global sequences per optimizer step
    t.microbatches = 1  # gradient accumulation steps per optimizer step
    t.steps = 1000
    t.tokens = 0  # if > 0, `validate` sets train.steps to the steps that consume this many
    t.log_every = 10
    t.eval_every = 100
    t.eval_batches = 4
    t.eval_at_start = True  # evaluate before the first step too (nanoGPT): curves start at init
    # Task files (docs/evaluate.md; comma-separated) scored zero-shot at every evaluation, on
    # their first eval_task_limit examples (0: all), logged as '<task>/<metric>' rows.
    t.eval_tasks = ""
    t.eval_task_limit = 100
    t.ckpt_every = 200
    t.keep = 2
    # A trainer's lease on its workdir (gpt_jax/lease.py) whose heartbeat is older than
    # this is taken over by the next trainer; the heartbeat is refreshed every timeout / 5.
    t.lease_timeout_s = 300.0
    # Storage outages (gpt_jax/storage.py): how long a storage call the run needs (a token
    # read, the metrics fold) is retried before the run stops, and how many checkpoint
    # saves in a row may fail (each keeps the last good one and training going) before it
    # stops with exit 1.
    t.storage_retry_budget_s = 600.0
    t.max_failed_saves = 3
    t.sample_tokens = 64
    t.sample_prompt = "def "
    t.sample_temperature = 0.8  # 0 = greedy
    t.sample_top_p = 0.95
    t.sample_repetition_penalty = 1.0  # 1.0: off; CTRL's penalty (sample.SamplingConfig)
    # After the last step: score every token of the validation split and set the model's
    # bits per byte beside gzip -9 and xz -9 on the same files (train.py).
    t.final_full_eval = False
    # The fraction of model.context each of its windows re-reads from the one before (0: none;
    # 0.5: windows every context/2 tokens), so every scored token has at least
    # overlap * context tokens before it. A fraction, so it survives a context override.
    t.full_eval_overlap = 0.0

    cfg.data = d = ml_collections.ConfigDict()
    d.source = "stdlib"
    d.sequence = ""  # babygpt: a literal 0/1 token string
    d.text_glob = ""
    d.val_glob = ""  # 'text': the validation files ('' = a hash split of text_glob's files)
    d.tfds_name = ""
    d.tfds_split = "train"
    d.tfds_val_split = "validation"
    d.tfds_text_feature = "text"
    d.tfds_data_dir = ""
    d.tfds_max_docs = 0  # 0 = all documents
    d.hf_path = ""  # 'hf': a builder ('json', 'parquet') or a hub name ('HuggingFaceFW/fineweb')
    d.hf_name = ""  # 'hf': the dataset's config name, if it has several
    d.hf_split = "train"
    d.hf_data_files = ""  # 'hf': comma-separated local globs for 'json'/'parquet'/'text'
    d.hf_text_field = "text"
    d.hf_max_docs = 0  # 0 = all documents
    d.data_dir = "data"  # token stores and tokenizer models live here (local or gs://)
    d.token_dir = ""  # explicit store of the in-process path; default <data_dir>/tokens/<key>
    # A token store written by `python -m gpt_jax.prepare` (local or gs://): training reads
    # it by random access instead of tokenizing in-process (README "Data at scale").
    d.store = ""
    d.shard_tokens = 1 << 26  # tokens per store shard (128 MiB of uint16)
    d.prefetch = 2  # batches computed ahead of the step on background threads (0 = off)
    # Several named sources (name -> `data` fields that differ, e.g. source/text_glob/hf_*),
    # prepared into one store; {} = the one source `data.source`.
    d.sources = ml_collections.ConfigDict()
    # Name -> weight: each training batch draws rows from the store's sources in these
    # proportions (GPT-3 Table 2.2); {} = the store's only source.
    d.mixture = ml_collections.ConfigDict()
    # GPT-3 Appendix A's filters (`python -m gpt_jax.prepare` only; data.dedup, data.quality).
    d.dedup = dd = ml_collections.ConfigDict()
    dd.exact = False  # drop documents whose normalized text repeats (sha1)
    dd.fuzzy = False  # MinHash LSH over word shingles (Spark MinHashLSH, 10 hashes)
    dd.ngram, dd.num_perm, dd.bands, dd.rows = 5, 10, 10, 1
    # Jaccard similarity of 5-gram shingle sets at or above which docs are duplicates: a copy
    # with 3-5% of its words changed scores 0.59-0.72 (tests/test_dedup.py); GPT-3 gives none.
    dd.threshold = 0.5
    dd.max_bucket = 1000  # LSH buckets larger than this are skipped (boilerplate)
    d.quality = q = ml_collections.ConfigDict()
    q.enabled = False
    q.sources = ""  # comma-separated sources to filter ('' = every source)
    q.reference_sources = ""  # label 1: high-quality text (WebText, Wikipedia, books)
    q.raw_sources = ""  # label 0: unfiltered text (Common Crawl)
    q.max_train_docs = 20_000  # per class, a seeded sample of the training split
    q.num_features_log2 = 18  # hashed word features (Spark HashingTF)
    q.alpha = 9.0  # keep a doc iff np.random.pareto(alpha) > 1 - score
    d.val_fraction = 0.05
    # How record sources split: 'hash' (of each record's index, against val_fraction), or, for
    # parquet files, a peer's rule (data/sources.py `route`): 'first' makes the first
    # `val_docs` records validation (llm.c's FineWeb), 'permutation' the first
    # ceil(val_fraction * n) of numpy's default_rng(val_split_seed).permutation(n) (nanoGPT's
    # OpenWebText through `datasets`' train_test_split).
    d.val_split_rule = "hash"
    d.val_docs = 0
    d.val_split_seed = 0
    d.tokenizer = "sentencepiece"
    d.tokenizer_path = ""  # 'file': a sentencepiece .model; 'gpt2': dir with vocab.json, merges.txt
    d.tokenizer_train_chars = 20_000_000  # characters sampled to train a new vocabulary
    d.seed = 0
    d.num_workers = 2

    cfg.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1  # -1: all devices not used by the other axes
    mesh.model = 1
    mesh.fsdp = False  # shard params and optimizer state over 'data' too
    mesh.dcn_data = 1  # data parallelism across TPU slices (multi-slice)
    # CPU-only hosts: split the cores into this many XLA devices, so the data axis runs
    # across cores (XLA runs most small ops of one CPU device on one thread). Applied
    # by the CLI before JAX starts; no effect on TPU/GPU devices.
    mesh.cpu_devices = 1
    return cfg


def finetune_base(task_type: str, num_outputs: int) -> ml_collections.ConfigDict:
    """GPT-1 fine-tuning defaults (Radford et al. 2018, section 4.1); the model section
    is replaced by the pretrained run's at launch (`gpt_jax.finetune`)."""
    cfg = base_config()
    cfg.model.embd_pdrop = cfg.model.resid_pdrop = cfg.model.attn_pdrop = 0.1
    o = cfg.optim
    o.schedule, o.peak_lr, o.warmup_frac, o.final_lr_frac = "linear", 6.25e-5, 0.002, 0.0
    o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip = 0.9, 0.999, 1e-8, 0.01, 1.0
    t = cfg.train
    t.batch_size, t.log_every, t.eval_every, t.ckpt_every, t.sample_tokens = 32, 10, 100, 100, 0
    cfg.finetune = ft = ml_collections.ConfigDict()
    ft.task_type = task_type  # classification | entailment | similarity | multiple_choice
    ft.num_outputs = num_outputs  # classes (1 = regression for similarity; unused for MC)
    ft.epochs = 3  # sets train.steps from the training set size
    ft.lm_coef = 0.5  # lambda in L3 = L_task + lambda * L_LM
    ft.clf_pdrop = 0.1
    ft.max_len = 128  # tokens per sequence, special tokens included
    ft.tfds_name = ""  # e.g. 'glue/sst2' (see finetune.TFDS_TASKS), or JSONL files:
    ft.tfds_train_split, ft.tfds_val_split, ft.tfds_data_dir = "train", "validation", ""
    ft.train_jsonl = ""
    ft.val_jsonl = ""
    return cfg


def inherit_model(cfg: ml_collections.ConfigDict,
                  pretrained: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `cfg` whose model is the pretrained run's, with `cfg`'s dropout rates
    (fine-tuning, SFT and RLHF set their own)."""
    cfg = cfg.copy_and_resolve_references()
    dropout = {k: cfg.model[k] for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop")}
    cfg.model = pretrained.model.copy_and_resolve_references()
    cfg.model.update(dropout)
    return cfg


def _fail(field: str, value: Any, why: str) -> None:
    raise ConfigError(f"{field}={value!r} {why}")


def _check_choice(cfg: ml_collections.ConfigDict, field: str, choices: tuple[str, ...]) -> None:
    value = _get(cfg, field)
    if value not in choices:
        _fail(field, value, f"is not one of {list(choices)}")


def _get(cfg: ml_collections.ConfigDict, field: str) -> Any:
    node: Any = cfg
    for part in field.split("."):
        node = node[part]
    return node


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a config before any compute; returns it (with train.steps set from
    train.tokens when that is > 0) or raises ConfigError."""
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    for field in ("model.vocab_size", "model.context", "model.n_layer", "model.n_head",
                  "model.d_model", "model.d_ff", "train.batch_size", "train.microbatches",
                  "train.steps", "train.log_every", "train.eval_every", "train.ckpt_every",
                  "train.keep", "train.eval_batches"):
        value = _get(cfg, field)
        if not isinstance(value, int) or value < 1:
            _fail(field, value, "must be a positive integer")
    limit = t.get("eval_task_limit", 0)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        _fail("train.eval_task_limit", limit, "must be an integer >= 0 (0: every example)")
    overlap = t.get("full_eval_overlap", 0.0)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or \
            not 0 <= overlap < 1:
        _fail("train.full_eval_overlap", overlap, "must be in [0, 1) (0: windows do not overlap)")
    saves = t.get("max_failed_saves", 3)
    if not isinstance(saves, int) or isinstance(saves, bool) or saves < 1:
        _fail("train.max_failed_saves", saves, "must be a positive integer")
    budget = t.get("storage_retry_budget_s", 600.0)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        _fail("train.storage_retry_budget_s", budget, "must be > 0 (seconds)")
    if m.d_model % m.n_head:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}")
    _check_choice(cfg, "model.norm", ("pre", "post"))
    _check_choice(cfg, "model.attention_pattern", ("dense", "alternating"))
    _check_choice(cfg, "model.dtype", DTYPES)
    _check_choice(cfg, "model.remat", REMAT_POLICIES)
    _check_choice(cfg, "model.attention_impl", ("auto", "xla", "splash", "cudnn"))
    for field in ("model.splash_block_q", "model.splash_block_kv"):
        value = m.get(field.split(".")[1], 512)
        if not isinstance(value, int) or value < 128 or value % 128:
            _fail(field, value, "must be a positive multiple of 128 (the TPU's lanes)")
    if m.attention_pattern == "alternating" and not 1 <= m.window:
        _fail("model.window", m.window, "must be >= 1 for alternating attention")
    for field in ("model.embd_pdrop", "model.resid_pdrop", "model.attn_pdrop"):
        value = _get(cfg, field)
        if not 0.0 <= value < 1.0:
            _fail(field, value, "must be in [0, 1)")
    if m.scan_layers and m.attention_pattern == "alternating" and m.n_layer % 2:
        _fail("model.n_layer", m.n_layer,
              "must be even when model.scan_layers=True with alternating attention "
              "(layers are scanned in dense/banded pairs)")

    _check_choice(cfg, "optim.schedule", SCHEDULES)
    _check_choice(cfg, "optim.optimizer", OPTIMIZERS)
    if o.muon_lr <= 0:
        _fail("optim.muon_lr", o.muon_lr, "must be > 0")
    if not 0.0 <= o.muon_momentum < 1.0:
        _fail("optim.muon_momentum", o.muon_momentum, "must be in [0, 1)")
    if o.peak_lr <= 0:
        _fail("optim.peak_lr", o.peak_lr, "must be > 0")
    if not 0.0 <= o.final_lr_frac <= 1.0:
        _fail("optim.final_lr_frac", o.final_lr_frac, "must be in [0, 1]")
    if not 0.0 <= o.warmup_frac < 1.0:
        _fail("optim.warmup_frac", o.warmup_frac, "must be in [0, 1)")
    for field in ("optim.b1", "optim.b2"):
        if not 0.0 <= _get(cfg, field) < 1.0:
            _fail(field, _get(cfg, field), "must be in [0, 1)")
    if o.grad_clip < 0:
        _fail("optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    for field, zero in (("optim.warmup_steps", "no warmup"), ("optim.decay_steps", "train.steps")):
        value = _get(cfg, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            _fail(field, value, f"must be an integer >= 0 (0: {zero})")
    if o.eps <= 0:
        _fail("optim.eps", o.eps, "must be > 0")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", o.weight_decay, "must be >= 0 (0: off)")

    if t.batch_size % t.microbatches:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by "
            f"train.microbatches={t.microbatches}")
    if o.batch_ramp_tokens:
        if o.batch_ramp_start_tokens <= 0:
            _fail("optim.batch_ramp_start_tokens", o.batch_ramp_start_tokens, "must be > 0")
    for field in ("optim.warmup_tokens", "optim.decay_tokens", "optim.batch_ramp_tokens",
                  "train.tokens"):
        value = _get(cfg, field) if field != "train.tokens" else t.get("tokens", 0)
        if not (isinstance(value, (int, float)) and value >= 0):
            _fail(field, value, "must be a number of tokens >= 0 (0: off)")
    if t.get("tokens", 0):
        from gpt_jax import optim  # jax; only for token-counted runs
        t.steps = max(1, optim.steps_for_tokens(cfg, t.tokens))

    _check_choice(cfg, "data.source", DATA_SOURCES)
    _check_choice(cfg, "data.tokenizer", TOKENIZERS)
    if d.source == "text" and not d.text_glob:
        _fail("data.text_glob", d.text_glob, "must name files when data.source='text'")
    if d.get("val_glob", "") and d.source != "text":
        _fail("data.val_glob", d.val_glob, "applies only to data.source='text'")
    if d.source == "tfds" and not d.tfds_name:
        _fail("data.tfds_name", d.tfds_name, "must name a TFDS dataset when data.source='tfds'")
    if d.tokenizer in ("file", "gpt2", "gpt1") and not d.tokenizer_path:
        _fail("data.tokenizer_path", d.tokenizer_path,
              f"must point to a tokenizer when data.tokenizer={d.tokenizer!r}")
    if not 0.0 < d.val_fraction < 1.0:
        _fail("data.val_fraction", d.val_fraction, "must be in (0, 1)")
    if d.source == "hf" and not d.hf_path:
        _fail("data.hf_path", d.hf_path, "must name a builder ('parquet', 'json') or a hub "
              "dataset when data.source='hf'")
    for field in ("val_docs", "val_split_seed"):
        value = d.get(field, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            _fail(f"data.{field}", value, "must be an integer >= 0")
    rule = d.get("val_split_rule", "hash")
    if rule not in VAL_SPLIT_RULES:
        _fail("data.val_split_rule", rule, f"is not one of {list(VAL_SPLIT_RULES)}")
    if rule == "first" and d.val_docs < 1:
        _fail("data.val_docs", d.val_docs, "must be >= 1 with data.val_split_rule='first' "
              "(the first val_docs records are the validation split)")
    if rule != "hash" and not d.get("sources") and not (
            d.source == "hf" and d.hf_path == "parquet" and d.hf_data_files):
        _fail("data.val_split_rule", rule, "applies only to parquet files (data.source='hf', "
              "data.hf_path='parquet', data.hf_data_files); 'hash' splits any source")

    if "finetune" in cfg:
        ft = cfg.finetune
        _check_choice(cfg, "finetune.task_type",
                      ("classification", "entailment", "similarity", "multiple_choice"))
        if not 3 <= ft.max_len <= m.context:
            _fail("finetune.max_len", ft.max_len, f"must be in [3, model.context={m.context}]")
        if ft.num_outputs < 1:
            _fail("finetune.num_outputs", ft.num_outputs, "must be >= 1")
        if ft.lm_coef < 0:
            _fail("finetune.lm_coef", ft.lm_coef, "must be >= 0")

    if cfg.mesh.model < 1:
        _fail("mesh.model", cfg.mesh.model, "must be >= 1")
    if cfg.mesh.data == 0 or cfg.mesh.data < -1:
        _fail("mesh.data", cfg.mesh.data, "must be -1 (all remaining devices) or >= 1")
    if cfg.mesh.get("cpu_devices", 1) < 1:
        _fail("mesh.cpu_devices", cfg.mesh.cpu_devices, "must be >= 1 (1: XLA's single CPU device)")
    if m.n_head % cfg.mesh.model:
        raise ConfigError(
            f"model.n_head={m.n_head} is not divisible by mesh.model={cfg.mesh.model}")
    if m.d_ff % cfg.mesh.model:
        raise ConfigError(
            f"model.d_ff={m.d_ff} is not divisible by mesh.model={cfg.mesh.model}")
    _check_ranges(cfg)
    return cfg


# Fields with a lower bound above 0 or an upper bound (validate's other checks cover the rest);
# a field missing from a config (an older config.json) is skipped.
RANGES = {
    "model.init_std": (0, None, "must be > 0"), "model.ln_eps": (0, None, "must be > 0"),
    "data.shard_tokens": (1, None, "must be >= 1"), "data.num_workers": (1, None, "must be >= 1"),
    "data.tokenizer_train_chars": (1, None, "must be >= 1"),
    "data.dedup.ngram": (1, None, "must be >= 1"), "data.dedup.num_perm": (1, None, "must be >= 1"),
    "data.dedup.bands": (1, None, "must be >= 1"), "data.dedup.rows": (1, None, "must be >= 1"),
    "data.dedup.max_bucket": (1, None, "must be >= 1"),
    "data.dedup.threshold": (0, 1, "must be in (0, 1]"),
    "data.quality.num_features_log2": (1, 30, "must be in [1, 30]"),
    "data.quality.alpha": (0, None, "must be > 0"),
    "mesh.dcn_data": (1, None, "must be >= 1"),
    "optim.batch_ramp_start_tokens": (1, None, "must be >= 1"),
    "train.sample_top_p": (0, 1, "must be in (0, 1]"),
    "train.sample_repetition_penalty": (0, None, "must be > 0 (1.0: off)"),
}
MAY_BE_NEGATIVE = ("seed", "data.seed", "mesh.data")  # mesh.data: -1 = all other devices


def _leaves(node: Any, prefix: str = "") -> Any:
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _check_ranges(cfg: ml_collections.ConfigDict) -> None:
    """`RANGES`, and no negative number anywhere but in `MAY_BE_NEGATIVE` (a count, a
    length, a rate or a timeout below 0 is always a mistake)."""
    for field, (low, high, why) in RANGES.items():
        try:
            value = _get(cfg, field)
        except (KeyError, AttributeError):
            continue
        strict = isinstance(low, int) and low == 0  # 0 itself is out of range
        if value < low or (strict and value == low) or (high is not None and value > high):
            _fail(field, value, why)
    for field, value in _leaves(cfg):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0 \
                and field not in MAY_BE_NEGATIVE:
            _fail(field, value, "must be >= 0")


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (written next to checkpoints)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `to_json`: a config saved in a workdir."""
    return ml_collections.ConfigDict(json.loads(text))
