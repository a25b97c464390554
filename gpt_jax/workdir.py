"""The run directory: its layout, and the one way to open a run.

A workdir is a local folder or a Cloud Storage prefix (`gs://bucket/runs/name`); every
file of a run is read and written through `etils.epath`, so the two behave the same:

    config.json          the resolved config, (re)written only once restore and the
                         compatibility check have passed
    metrics.jsonl        one JSON object per line (`metrics.MetricsWriter`)
    goodput.json         where each attempt's wall time went, across restarts (`goodput`)
    tb/                  TensorBoard events (tensorboardX, which writes gs:// itself)
    tokenizer.model | tokenizer.json | vocab.json + merges.txt
    checkpoints/<step>/  orbax checkpoints (`checkpoint.Checkpointer`; arrays via tensorstore),
                         each sealed with checksums.json within its commit
    samples/             `sample --out` texts
    reports/             `evaluate` JSON reports
    reward_offset.json   a reward-model run's demonstration offset
    policy/              PPO's exported policy, itself a workdir
    hf/                  `convert --to_hf` exports (by default)

Cloud Storage clients. Three libraries touch a gs:// run: epath (config, metrics,
tokenizer, reports, orbax's metadata), tensorstore (orbax's array data) and
google-cloud-storage (tensorboardX's event files). `configure_storage` makes epath use
gcsfs rather than `tf.io.gfile` (one client, the one that honours a storage emulator) and
turns off gcsfs's listing cache (orbax and tensorboardX write behind its back). With
`STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` set, it also points tensorstore
(`TENSORSTORE_GCS_HTTP_URL`) at that server and uses anonymous credentials, so the whole
run talks to a local GCS server (see README, "Cloud Storage").
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from etils import epath

from gpt_jax import config as config_lib
from gpt_jax import storage
from gpt_jax.config import ConfigError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
REPORTS_DIR = "reports"
REWARD_OFFSET_FILE = "reward_offset.json"
POLICY_DIR = "policy"
HF_DIR = "hf"
_PROBE = ".gpt_jax_write_probe"


class WorkdirError(ValueError):
    """A run directory cannot be used; the message names the path and the cause."""


@functools.cache
def configure_storage() -> None:
    """Client settings for gs:// paths (see the module docstring); idempotent, and an
    explicit setting in the environment wins."""
    os.environ.setdefault("EPATH_USE_TF", "0")
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator:
        if "://" not in emulator:
            emulator = f"http://{emulator}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # no control plane
        os.environ.setdefault("NO_GCE_CHECK", "true")  # no metadata-server probe
        # tensorstore's anonymous token for a local server (its own test bench's setting):
        # without it, every run logs an error-level "Could not find the credentials file"
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "anonymous")
    # gcsfs logs each exhausted retry with a traceback; the error reaches the caller anyway
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    try:
        import fsspec.config
    except ImportError:
        return
    gs = fsspec.config.conf.setdefault("gs", {})
    gs.setdefault("use_listings_cache", False)
    if emulator:
        gs.setdefault("token", "anon")
    storage.configure_clients()  # a deadline per request; an empty prefix lists as empty


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` (local or gs://) so readers never see half a file: locally via a
    temp file + rename; a Cloud Storage object upload is atomic by itself."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "://" in os.fspath(path):
        path.write_bytes(data)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (local or gs://), read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def move_tree(src: str | os.PathLike, dst: str | os.PathLike,
              delete_first: tuple[str, ...] = ()) -> None:
    """Moves directory `src` to `dst`: locally one rename; on gs://, which has no
    directories to rename, a server-side copy of every object, then the originals are
    deleted, the files named in `delete_first` (e.g. a commit marker) before the rest."""
    src, dst = epath.Path(src), epath.Path(dst)
    if not is_remote(src):
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        return
    import fsspec  # optional: the gs:// client (gcsfs) that epath uses, see configure_storage

    fs = fsspec.filesystem(os.fspath(src).split("://", 1)[0])
    fs.copy(os.fspath(src), os.fspath(dst), recursive=True)
    for name in delete_first:
        if (src / name).exists():
            fs.rm(os.fspath(src / name))
    fs.rm(os.fspath(src), recursive=True)


def probe_writable(directory: str | os.PathLike) -> None:
    """Creates `directory` and writes and deletes a small file in it (process 0 only);
    raises what the storage client raised."""
    if jax.process_index() != 0:
        return
    path = epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / _PROBE
    probe.write_text("ok")
    probe.unlink()


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def describe_error(path: str | os.PathLike, error: BaseException) -> str:
    """One line: which path failed and why, for storage errors of any client."""
    text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    if is_remote(path):
        bucket = os.fspath(path).split("://", 1)[1].split("/", 1)[0]
        low = text.lower()
        if isinstance(error, FileNotFoundError) and "/o" in text and "/b/" in text \
                and "/o/" not in text:
            return f"{path}: bucket gs://{bucket} does not exist ({text})"
        if "connect" in low or "resolve" in low or "name or service" in low:
            return (f"{path}: cannot reach the Cloud Storage endpoint "
                    f"({os.environ.get('STORAGE_EMULATOR_HOST') or 'storage.googleapis.com'}): "
                    f"{text}")
        if any(s in low for s in ("401", "403", "credential", "permission", "unauthorized")):
            return (f"{path}: no permission to write gs://{bucket} (credentials: "
                    f"`gcloud auth application-default login` or the VM's service account): "
                    f"{text}")
    return f"{path}: {text}"


class Workdir:
    """One run directory (local or gs://); names of its files and their I/O."""

    def __init__(self, path: str | os.PathLike) -> None:
        configure_storage()
        path = os.fspath(path)
        if not path:
            raise WorkdirError("--workdir is empty: give a local path or gs://bucket/prefix")
        if not is_remote(path):
            path = os.path.abspath(path)  # orbax wants absolute paths
        self.path = epath.Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return os.fspath(self.path)

    def __truediv__(self, name: str) -> epath.Path:
        return self.path / name

    @property
    def remote(self) -> bool:
        return is_remote(self.path)

    @property
    def checkpoints(self) -> str:
        return os.fspath(self.path / CHECKPOINTS_DIR)

    @property
    def tensorboard(self) -> str:
        return os.fspath(self.path / TB_DIR)

    # ---------------------------------------------------------------- files

    def exists(self, name: str = "") -> bool:
        return (self.path / name if name else self.path).exists()

    def read_text(self, name: str) -> str:
        path = self.path / name
        try:
            return path.read_text()
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - any client's failure becomes one line
            raise WorkdirError(describe_error(path, e)) from e

    def write_text(self, name: str, text: str) -> epath.Path:
        """Writes one file atomically (process 0's job; callers decide who writes)."""
        return self.write_bytes(name, text.encode())

    def write_bytes(self, name: str, data: bytes) -> epath.Path:
        path = self.path / name
        try:
            atomic_write_bytes(path, data)
        except Exception as e:  # noqa: BLE001
            raise WorkdirError(describe_error(path, e)) from e
        return path

    def check_writable(self) -> None:
        """Fails fast, before any compile, when the run directory cannot be written: a
        missing bucket, an unreachable endpoint, missing credentials, a read-only folder."""
        try:
            probe_writable(self.path)
        except Exception as e:  # noqa: BLE001
            raise WorkdirError(describe_error(self.path, e)) from e

    # ---------------------------------------------------------------- config

    def read_config(self) -> ml_collections.ConfigDict:
        path = self.path / CONFIG_FILE
        try:
            text = self.read_text(CONFIG_FILE)
        except FileNotFoundError:
            raise WorkdirError(f"{path} not found: is {self} a gpt_jax workdir?") from None
        try:
            return config_lib.from_json(text)
        except ValueError as e:
            raise WorkdirError(f"{path} is not a readable config ({e}); restore it or use "
                               "another --workdir") from None

    def write_config(self, cfg: ml_collections.ConfigDict) -> None:
        """Writes the resolved config atomically (process 0 only)."""
        if jax.process_index() == 0:
            self.write_text(CONFIG_FILE, config_lib.to_json(cfg))

    # ---------------------------------------------------------------- tokenizer

    def tokenizer(self) -> Any:
        from gpt_jax.tokenizer import load_tokenizer
        try:
            return load_tokenizer(self.path)
        except FileNotFoundError:
            raise WorkdirError(f"{self} has no tokenizer (tokenizer.model, tokenizer.json or "
                               "vocab.json + merges.txt): sampling and evaluation need one; "
                               "copy it in or import the model with its tokenizer") from None
        except (ValueError, KeyError, RuntimeError, UnicodeDecodeError) as e:  # damaged file
            names = [n for n in ("tokenizer.model", "tokenizer.json", "vocab.json")
                     if (self.path / n).exists()]
            raise WorkdirError(f"{self / (names[0] if names else '')}: not a readable "
                               f"tokenizer ({type(e).__name__}: {str(e)[:120]}); restore it "
                               "from the run's data_dir/tokenizers") from None

    def save_tokenizer(self, tok: Any) -> None:
        if jax.process_index() == 0:
            try:
                tok.save(self.path)
            except Exception as e:  # noqa: BLE001
                raise WorkdirError(describe_error(self.path, e)) from e


def check_compatible(workdir: Workdir, abstract_params: Any, saved: Any,
                     cfg: ml_collections.ConfigDict) -> None:
    """Raises a one-line ConfigError when the checkpoint's arrays (`saved`, a tree of
    anything with `.shape`) do not fit the params this config builds, naming the first
    differing array and the model fields config.json holds otherwise."""
    want = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
    have = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(saved)}
    if want == have:
        return
    diffs = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
    first = diffs[0]
    what = (f"param {first} is {have.get(first, 'absent')} in the checkpoint and "
            f"{want.get(first, 'absent')} here")
    fields = ""
    try:
        old = workdir.read_config().model
        changed = [f"model.{k}={old[k]!r} (now {cfg.model[k]!r})" for k in cfg.model
                   if k in old and old[k] != cfg.model[k]]
        fields = f"; config.json has {', '.join(changed[:4])}" if changed else ""
    except (WorkdirError, FileNotFoundError):
        pass
    raise ConfigError(f"--workdir={workdir} holds a run of another model shape: {what}"
                      f"{fields}. Use a new --workdir, or this run's model section.")


@dataclasses.dataclass
class Run:
    """An existing run, opened: its config, params on a mesh, checkpoint meta."""

    workdir: Workdir
    cfg: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    params: Any
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @functools.cached_property
    def tokenizer(self) -> Any:
        return self.workdir.tokenizer()


def run_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's own mesh, or all devices data-parallel when this machine's devices do
    not fit it (sampling a pod run on one host)."""
    import sys

    from gpt_jax import sharding
    try:
        return sharding.make_mesh(cfg)
    except ConfigError as e:
        print(f"note: {e}; using mesh.data=-1, mesh.model=1", file=sys.stderr)
        cfg = cfg.copy_and_resolve_references()
        cfg.mesh.data, cfg.mesh.model, cfg.mesh.dcn_data = -1, 1, 1
        return sharding.make_mesh(cfg)


def open_run(path: str | os.PathLike | Workdir, mesh: jax.sharding.Mesh | None = None, *,
             rules: ml_collections.ConfigDict | None = None,
             boxed: Callable[[ml_collections.ConfigDict], Any] | None = None,
             step: int | None = None) -> Run:
    """Opens the run in `path` read-only and restores its latest (or `step`) checkpoint's
    params.

    Every tool that reads a finished or running run comes through here: sampling,
    evaluation, export, and fine-tuning/SFT/RM/PPO initialising from a pretrained run
    (PPO's reward and reference runs too). Opening never writes, renames or deletes anything
    in the run (`checkpoint.Checkpointer(read_only=True)`), so it is safe on the workdir of
    a trainer that is saving; only the trainers open checkpoints writable.
    `mesh`: where the params land (default: the run's own mesh, see `run_mesh`), laid out
    by the logical-axis rules of `rules` (default: the run's config; a later stage passes
    its own, e.g. with `mesh.fsdp`). `boxed(model_cfg)`: the abstract, logically annotated
    params the checkpoint holds (default: the GPT of the run's `model` section).
    """
    from gpt_jax import checkpoint as ckpt_lib
    from gpt_jax import model as model_lib
    from gpt_jax import sharding

    workdir = path if isinstance(path, Workdir) else Workdir(path)
    cfg = workdir.read_config()
    mesh = run_mesh(cfg) if mesh is None else mesh
    tree = (boxed or model_lib.abstract_params)(cfg.model)
    abstract = ckpt_lib.abstract_with_shardings(
        model_lib.unbox(tree), sharding.tree_shardings(tree, mesh, rules or cfg))
    params, meta = ckpt_lib.restore_params(workdir, abstract, step)
    return Run(workdir, cfg, mesh, params, meta)
