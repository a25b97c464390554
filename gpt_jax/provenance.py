"""Provenance: what a run was trained with, recorded with every checkpoint, checked on resume.

Every checkpoint's meta holds `provenance` (`compute`): the resolved config and its sha256,
the tokenizer's sha256 (`Tokenizer.fingerprint`: the sha256 of its serialized vocabulary,
the file's own for a sentencepiece model), the token store's fingerprint (the sha256 of its
manifest, which lists every shard's sha256), gpt_jax's version, and the git commit of its
source when it runs from a checkout. The first row a run writes to metrics.jsonl holds the
same (the config by its hash) and the changes its resume took.

On resume `verify_resume` compares the restored checkpoint's record with this run's inputs
(and with the workdir's config.json and tokenizer, which `train` would overwrite) and stops
in one line naming the first change (exit 2, before any compute), unless
`--accept_changes=<category>` accepts that category; an accepted change is printed as a
warning and recorded in metrics.jsonl. Categories:

- config: a config field other than those below.
- schedule: a field the learning-rate schedule depends on (SCHEDULE_FIELDS) whose change
  moves the rate at the resumed step or at any step already trained (`schedule_jump`); a
  change that keeps the rate of every step trained continuous is taken without a flag:
  that is how a run is extended (README, "Extending a run").
- tokenizer, store: another tokenizer or token store than the checkpoint's, whatever path.
- code: another gpt_jax version, or another git commit when neither tree had uncommitted
  changes in gpt_jax/ (with them the commit does not identify the code: it is recorded,
  with `git_dirty`, but not compared).

Taken without a flag (printed as a note, recorded): OPERATIONAL fields, which change
neither a step's arithmetic nor what a logged number means (logging, evaluation and
checkpoint intervals, checkpoints kept, the final sample, data loading workers, the mesh,
which the restore reshards onto, the attention kernel and remat policy, the lease
timeout), and the data's locations (data.data_dir, data.token_dir, data.store): what they
hold is checked by the tokenizer and store fingerprints instead, so a copied store is fine.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import ml_collections
import numpy as np

from gpt_jax import config as config_lib
from gpt_jax import optim
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.config import ConfigError
from gpt_jax.workdir import CONFIG_FILE, Workdir, WorkdirError

CATEGORIES = ("config", "schedule", "tokenizer", "store", "code")
OPERATIONAL = frozenset({
    "name", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep",
    "train.eval_at_start", "train.sample_tokens", "train.sample_prompt",
    "train.sample_temperature", "train.sample_top_p", "train.sample_repetition_penalty",
    "train.lease_timeout_s",
    "train.storage_retry_budget_s", "train.max_failed_saves",
    "train.final_full_eval", "train.full_eval_overlap",
    "data.prefetch", "data.num_workers", "data.data_dir", "data.token_dir", "data.store",
    "model.attention_impl", "model.remat", "model.splash_block_q", "model.splash_block_kv"})
OPERATIONAL_PREFIXES = ("mesh.",)
SCHEDULE_FIELDS = frozenset({
    "train.steps", "train.tokens", "train.microbatches", "optim.schedule", "optim.peak_lr",
    "optim.warmup_steps", "optim.warmup_tokens", "optim.warmup_frac", "optim.decay_steps",
    "optim.decay_tokens", "optim.final_lr_frac", "optim.batch_ramp_tokens",
    "optim.batch_ramp_start_tokens", "optim.extend_from_step"})
MAX_SCHEDULE_POINTS = 100_000  # steps at which two schedules are compared (all, up to this)
_ABSENT = "<absent>"


class ProvenanceError(ConfigError):
    """A resume whose inputs changed since its checkpoint; the message names what changed."""


@dataclasses.dataclass(frozen=True)
class Change:
    """One difference between a checkpoint's provenance and this run's inputs."""

    category: str  # one of CATEGORIES, or "" for a change a resume takes without a flag
    subject: str  # the field or file, for a list of several
    text: str  # one clause: what changed
    hint: str = ""  # what to do about it, when refused


# ---------------------------------------------------------------------------- recording


def plain_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON values (what config.json and the checkpoint meta hold)."""
    return json.loads(config_lib.to_json(cfg))


def config_sha256(plain: dict[str, Any]) -> str:
    """sha256 of the config's canonical JSON (`config.to_json`'s text)."""
    return hashlib.sha256(json.dumps(plain, indent=2, sort_keys=True).encode()).hexdigest()


def store_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 of a token store's manifest (canonical JSON): its shards' sha256s, counts,
    tokenizer and recipe; the same for a copy of the store anywhere."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _git(cwd: str, *args: str) -> str:
    return subprocess.run(["git", "-C", cwd, *args], capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()


@functools.cache
def code_identity() -> dict[str, Any]:
    """gpt_jax's version and, when it runs from a git checkout of itself, the commit and
    whether gpt_jax/ has uncommitted changes (None when unknown)."""
    try:
        version = importlib.metadata.version("gpt_jax")
    except importlib.metadata.PackageNotFoundError:
        version = None
    package = os.path.dirname(os.path.abspath(__file__))
    commit = dirty = None
    try:
        top = _git(package, "rev-parse", "--show-toplevel")
        if os.path.samefile(os.path.join(top, "gpt_jax"), package):  # not some other repo
            commit = _git(package, "rev-parse", "HEAD")
            dirty = bool(_git(package, "status", "--porcelain", "--", package))
    except (OSError, subprocess.SubprocessError):
        pass
    return {"gpt_jax_version": version, "git_commit": commit, "git_dirty": dirty}


def compute(cfg: ml_collections.ConfigDict, tokenizer: Any = None, token_store: Any = None,
            code: dict[str, Any] | None = None) -> dict[str, Any]:
    """This run's provenance: config (and its sha256), tokenizer sha256, token store
    fingerprint and path (None when the trainer has none), and `code_identity()`."""
    plain = plain_config(cfg)
    return {
        "config_sha256": config_sha256(plain), "config": plain,
        "tokenizer_sha256": None if tokenizer is None else tokenizer.fingerprint,
        "tokenizer_kind": None if tokenizer is None else tokenizer.kind,
        "store_fingerprint": None if token_store is None else store_fingerprint(
            token_store.manifest),
        "store_path": None if token_store is None else os.fspath(token_store.path),
        **(code_identity() if code is None else code)}


def metrics_entry(record: dict[str, Any], changes: Iterable[Change] = ()) -> dict[str, Any]:
    """What metrics.jsonl's first row of a run holds: the record without the config itself
    (config.json has it), and each change the resume took, with its category."""
    entry = {k: v for k, v in record.items() if k != "config"}
    entry["changes"] = [f"{c.category or 'allowed'}: {c.text}" for c in changes]
    return entry


# ---------------------------------------------------------------------------- comparing


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim.peak_lr': 6e-4, ...}; an empty section stays one value ({})."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def field_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) of every field that differs, sorted; a field that the
    old config lacks (added to gpt_jax since) counts as its default."""
    a, b = flatten(old), flatten(new)
    defaults = flatten(plain_config(config_lib.base_config()))
    out = []
    for name in sorted(set(a) | set(b)):
        before = a.get(name, defaults.get(name, _ABSENT))
        after = b.get(name, _ABSENT)
        if before != after:
            out.append((name, before, after))
    return out


def category(name: str) -> str:
    """'' (taken without a flag), 'schedule' (checked by its effect on the lr) or 'config'."""
    if name in OPERATIONAL or name.startswith(OPERATIONAL_PREFIXES):
        return ""
    return "schedule" if name in SCHEDULE_FIELDS else "config"


def _show(value: Any) -> str:
    return value if value == _ABSENT else repr(value)


def _fill(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with the fields only `new` has (those gpt_jax added since), recursively."""
    out = dict(old)
    for key, value in new.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _fill(out[key], value)
    return out


def schedule_jump(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict,
                  step: int) -> tuple[int, float, float] | None:
    """Where the learning rate under `new` differs from `old` over the steps trained and the
    resumed one (0..step): (step, old lr, new lr) at the resumed step if it differs there,
    else at the first trained step that differs; None when they agree everywhere."""
    steps = np.arange(step + 1)
    if len(steps) > MAX_SCHEDULE_POINTS:
        steps = np.unique(np.linspace(0, step, MAX_SCHEDULE_POINTS).round().astype(np.int64))
    a = np.asarray(optim.learning_rate_schedule(old)(steps), np.float64)
    b = np.asarray(optim.learning_rate_schedule(new)(steps), np.float64)
    differ = ~np.isclose(a, b, rtol=1e-6, atol=0.0)
    if not differ.any():
        return None
    i = len(steps) - 1 if differ[-1] else int(np.flatnonzero(differ)[0])
    return int(steps[i]), float(a[i]), float(b[i])


def _extension_hint(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict,
                    step: int) -> str:
    """How to extend this run with a continuous learning rate."""
    pins = []
    if not (new.optim.decay_steps or new.optim.decay_tokens):
        pins.append(f"--config.optim.decay_steps={optim.decay_steps(old)}")
    if new.optim.warmup_frac:
        pins.append(f"--config.optim.warmup_steps={optim.warmup_steps(old)} "
                    "--config.optim.warmup_frac=0")
    keep = f"keep its schedule ({' '.join(pins)}), " if pins else ""
    return (f"to extend a run, {keep}optionally with --config.optim.extend_from_step={step} "
            "for a new decay from the current rate to train.steps (README \"Extending a "
            "run\"); --accept_changes=schedule takes the jump")


def config_changes(recorded: dict[str, Any], cfg: ml_collections.ConfigDict,
                   step: int) -> list[Change]:
    """The config's changes since checkpoint `step`: each field by category, and the
    schedule's as one change naming the fields and the learning-rate jump."""
    changes, scheduled = [], []
    for name, before, after in field_changes(recorded, plain_config(cfg)):
        what = f"{name} changed from {_show(before)} to {_show(after)} since checkpoint {step}"
        kind = category(name)
        if kind == "schedule":
            scheduled.append((name, what))
        elif kind == "config":
            changes.append(Change("config", name, what, "add --accept_changes=config to "
                                  "train on with it (it is recorded), or use another "
                                  "--workdir"))
        else:
            changes.append(Change("", name, f"{what} (taken on resume)"))
    if not changes and not scheduled:
        return []
    old = ml_collections.ConfigDict(_fill(recorded, plain_config(cfg)))
    jump = schedule_jump(old, cfg, step)
    if jump is None:
        return changes + [Change("", n, f"{w} (the learning rate of every step trained is "
                                 "unchanged)") for n, w in scheduled]
    at, before, after = jump
    names = [n for n, _ in scheduled] or [c.subject for c in changes if c.category]
    what = " and ".join(w for _, w in scheduled) or f"{', '.join(names)} changed"
    how = (f"the learning rate at step {at} would jump from {before:.3e} to {after:.3e}"
           if at == step else f"the learning rate of trained step {at} would be {after:.3e}, "
           f"not {before:.3e}")
    return [Change("schedule", ", ".join(names), f"{what}, so {how}",
                   _extension_hint(old, cfg, step)), *changes]


def config_json_edits(config_json: dict[str, Any], recorded: dict[str, Any],
                      cfg: ml_collections.ConfigDict, step: int) -> list[Change]:
    """Fields of the workdir's config.json that differ from both the checkpoint's config and
    this command's: edited by hand (train never reads it, and would overwrite it)."""
    have, was, now = flatten(config_json), flatten(recorded), flatten(plain_config(cfg))
    out = []
    for name in sorted(set(have) | set(was)):
        value = have.get(name, _ABSENT)
        if value in (was.get(name, _ABSENT), now.get(name, _ABSENT)):
            continue
        what = (f"{CONFIG_FILE}: {name} was edited to {_show(value)} after checkpoint {step}, "
                f"which was trained with {_show(was.get(name, _ABSENT))}")
        if category(name) == "":
            out.append(Change("", name, f"{what} (overwritten with this command's config)"))
        else:
            out.append(Change("config", CONFIG_FILE, what, f"train does not read "
                              f"{CONFIG_FILE} (it writes it): restore it, or pass the change "
                              f"as --config.{name}=... with --accept_changes=config"))
    return out


def input_changes(recorded: dict[str, Any], current: dict[str, Any], step: int,
                  workdir_tokenizer: tuple[str, str] | None = None) -> list[Change]:
    """Changes of tokenizer, token store and code since checkpoint `step`.
    `workdir_tokenizer`: (file, sha256) of the tokenizer the workdir holds."""
    out = []
    want, have = recorded.get("tokenizer_sha256"), current.get("tokenizer_sha256")
    if want and have and want != have:
        out.append(Change("tokenizer", "tokenizer", (
            f"the run's {current.get('tokenizer_kind')} tokenizer has sha256 {have[:12]}, "
            f"not {want[:12]}, the one checkpoint {step} was trained with"),
            "use that tokenizer, or add --accept_changes=tokenizer"))
    if want and workdir_tokenizer and workdir_tokenizer[1] != want:
        name, digest = workdir_tokenizer
        out.append(Change("tokenizer", name, (
            f"{name} sha256 {digest[:12]} differs from the one checkpoint {step} was "
            f"trained with ({want[:12]})"), "sample and evaluate read it: restore it, or "
            "add --accept_changes=tokenizer to overwrite it with the run's"))
    want, have = recorded.get("store_fingerprint"), current.get("store_fingerprint")
    if want and have and want != have:
        out.append(Change("store", "token store", (
            f"the token store {current.get('store_path')} (fingerprint {have[:12]}) is not "
            f"the one checkpoint {step} was trained with ({want[:12]}, at "
            f"{recorded.get('store_path')})"),
            "point data.store back at it, or add --accept_changes=store"))
    was, now = recorded.get("gpt_jax_version"), current.get("gpt_jax_version")
    if was and now and was != now:
        out.append(Change("code", "gpt_jax version", (
            f"checkpoint {step} was trained by gpt_jax {was}, this is {now}"),
            "add --accept_changes=code to resume with it"))
    was, now = recorded.get("git_commit"), current.get("git_commit")
    if (was and now and was != now and recorded.get("git_dirty") is False
            and current.get("git_dirty") is False):
        out.append(Change("code", "git commit", (
            f"gpt_jax's code changed since checkpoint {step} (commit {was[:10]} then, "
            f"{now[:10]} now)"), "add --accept_changes=code to resume with it"))
    return out


def resume_changes(recorded: dict[str, Any], current: dict[str, Any],
                   cfg: ml_collections.ConfigDict, step: int,
                   config_json: dict[str, Any] | None = None,
                   workdir_tokenizer: tuple[str, str] | None = None) -> list[Change]:
    """Every change since checkpoint `step`: config (schedule first), config.json edits,
    tokenizer, token store, code."""
    return (config_changes(recorded["config"], cfg, step)
            + (config_json_edits(config_json, recorded["config"], cfg, step)
               if config_json is not None else [])
            + input_changes(recorded, current, step, workdir_tokenizer))


def parse_accept(values: Iterable[str]) -> frozenset[str]:
    """--accept_changes's categories; ConfigError naming an unknown one."""
    names = {v.strip() for v in values if v.strip()}
    unknown = sorted(names - set(CATEGORIES))
    if unknown:
        raise ConfigError(f"--accept_changes: {unknown[0]!r} is not one of {list(CATEGORIES)}")
    return frozenset(names)


def refuse_or_accept(changes: list[Change], accept: frozenset[str]) -> list[Change]:
    """Raises ProvenanceError with the first change `accept` does not cover (and the
    subjects of the others); returns the changes otherwise."""
    refused = [c for c in changes if c.category and c.category not in accept]
    if refused:
        more = (f" (also changed: {', '.join(c.subject for c in refused[1:])})"
                if len(refused) > 1 else "")
        first = refused[0]
        raise ProvenanceError(f"{first.text}; {first.hint}{more}")
    return changes


# ---------------------------------------------------------------------------- the resume


def _workdir_tokenizer(workdir: Workdir) -> tuple[str, str] | None:
    """(file, sha256) of the tokenizer in the workdir, ('...', 'unreadable') for a damaged
    one, None without one."""
    names = [n for n in (tokenizer_lib.MODEL_FILE, tokenizer_lib.CHAR_FILE,
                         tokenizer_lib.GPT2_VOCAB_FILE) if workdir.exists(n)]
    if not names:
        return None
    try:
        return os.fspath(workdir / names[0]), workdir.tokenizer().fingerprint
    except WorkdirError:
        return os.fspath(workdir / names[0]), "unreadable"


def verify_resume(meta: dict[str, Any], current: dict[str, Any], cfg: ml_collections.ConfigDict,
                  workdir: Workdir, accept: frozenset[str], show: bool = True) -> list[Change]:
    """Checks a resume from the checkpoint whose `meta` was restored against this run's
    provenance `current` (`compute`), the workdir's config.json and tokenizer; raises
    ProvenanceError naming the first change not accepted, else prints each change taken
    (a note, or a warning for an accepted one; when `show`) and returns them."""
    step, recorded = int(meta["step"]), meta.get("provenance")
    if recorded is None:
        _say(show, f"note: checkpoint {step} records no provenance (an imported model, or "
                   "an older gpt_jax's run): its config, tokenizer and token store are not "
                   "checked")
        return []
    try:
        config_json = json.loads(workdir.read_text(CONFIG_FILE))
    except FileNotFoundError:
        config_json = None
    except ValueError:  # unreadable JSON: rewritten with this command's config
        config_json = None
    tokenizer = _workdir_tokenizer(workdir) if current.get("tokenizer_sha256") else None
    changes = refuse_or_accept(
        resume_changes(recorded, current, cfg, step, config_json, tokenizer), accept)
    for c in changes:
        _say(show, f"warning: accepted by --accept_changes={c.category}: {c.text}"
             if c.category else f"note: {c.text}")
    return changes


def _say(show: bool, line: str) -> None:
    if show:
        print(line, file=sys.stderr, flush=True)
