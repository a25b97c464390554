"""Flags and start-up shared by the `python -m gpt_jax.<tool>` programs.

Flags are defined by calling these from a tool's `if __name__ == "__main__":`
block, so importing any module never defines flags.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags


def define_run_flags(config_help: str = "Experiment config file.", init_from: bool = False) -> None:
    """--config, --workdir (required), --init_from (if asked), --restart and the
    multi-process flags."""
    config_flags.DEFINE_config_file("config", None, config_help)
    flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
    required = ["config", "workdir"]
    if init_from:
        flags.DEFINE_string("init_from", None, "Workdir to initialise from (ours or converted).")
        required.append("init_from")
    flags.DEFINE_string(
        "coordinator_address", None,
        "host:port of process 0 for multi-process runs; auto-detected on Cloud TPU VMs and SLURM.")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index.")
    flags.DEFINE_boolean(
        "restart", False,
        "Start over from step 0 on a workdir whose metrics show progress but that holds no "
        "restorable checkpoint (its metrics rows are set aside); without it such a run stops.")
    flags.DEFINE_list(
        "accept_changes", [],
        "Resume although these changed since the checkpoint (comma-separated: config, "
        "schedule, tokenizer, store, code); each is printed and recorded in metrics.jsonl. "
        "Without it such a resume stops, naming the change (README, \"Resume\").")
    flags.mark_flags_as_required(required)


def restart_requested() -> bool:
    """Whether this run command was given --restart (False in a program without the flag)."""
    f = flags.FLAGS
    return "restart" in f and f.is_parsed() and bool(f.restart)


def accepted_changes() -> list[str]:
    """This run command's --accept_changes ([] in a program without the flag)."""
    f = flags.FLAGS
    return list(f.accept_changes) if "accept_changes" in f and f.is_parsed() else []


def run_options() -> dict[str, Any]:
    """`loop.run`'s keyword arguments from this command's --restart and --accept_changes
    (their defaults when called as a library, without parsed flags)."""
    return {"restart": restart_requested(), "accept_changes": accepted_changes()}


def start() -> None:
    """Quiets INFO logs (orbax logs every file) unless --verbosity was given, splits a
    CPU-only host into `mesh.cpu_devices` devices, and joins the other processes of a
    multi-process run."""
    from gpt_jax import loop, sharding, storage

    loop.catch_sigterm()  # a preemption notice during start-up exits 0 at the first safe point
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if "config" in f and f.config is not None:
        sharding.set_cpu_devices(f.config)
        if "train" in f.config:  # token reads before the loop (data.prepare) retry as long
            storage.set_budget(f.config.train.get("storage_retry_budget_s",
                                                  storage.DEFAULT_BUDGET_S))
    if "coordinator_address" in f:
        sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
        watch_peers()
    if "workdir" in f and f.workdir:  # a missing bucket or credentials: now, not after compiling
        from gpt_jax.workdir import Workdir
        _CREATED.append(_first_missing(f.workdir))
        Workdir(f.workdir).check_writable()


PEER_TIMEOUT_S = 30.0  # a process silent this long is lost (JAX's own heartbeat: 100 s)
_WATCHING: list[int] = []  # this process's index once `watch_peers` runs


def watch_peers(timeout_s: float = PEER_TIMEOUT_S) -> None:
    """In a multi-process run, a background thread publishes this process's heartbeat
    through JAX's coordination service every `timeout_s / 6` and reads the others'. When
    one stops (killed, its host gone) or the service itself (process 0) stops answering,
    this process prints one line naming it and exits 1 within `timeout_s` plus one
    interval, instead of hanging in the next collective until JAX's heartbeat aborts it
    with a C++ log (status -6). The last checkpoint is kept."""
    import jax
    from jax._src import distributed  # the coordination client has no public handle

    client, me, n = distributed.global_state.client, jax.process_index(), jax.process_count()
    if client is None or n < 2:
        return

    def beat() -> None:
        count, seen = 0, {p: (None, time.monotonic()) for p in range(n) if p != me}
        service_ok = time.monotonic()
        while True:
            count += 1
            now = time.monotonic()
            try:
                client.key_value_set(f"gpt_jax/heartbeat/{me}", str(count), allow_overwrite=True)
                for p, (value, _) in seen.items():
                    try:
                        new = client.key_value_try_get(f"gpt_jax/heartbeat/{p}")
                    except Exception:  # noqa: BLE001 - not published yet
                        new = value
                    if new != value:
                        seen[p] = (new, now)
                service_ok = now
            except Exception as e:  # noqa: BLE001 - the service is unreachable
                if now - service_ok > timeout_s:
                    fail(f"lost process 0 (the coordinator, {flags.FLAGS.coordinator_address}):"
                         f" no answer for {timeout_s:.0f} s ({type(e).__name__}); stopping "
                         "this process too, the last checkpoint is kept", RUNTIME)
            for p, (value, at) in seen.items():
                if value != "exited" and now - at > timeout_s:
                    fail(f"lost process {p} of {n}: no heartbeat for {timeout_s:.0f} s (killed, "
                         "or its host is gone); stopping this process too, the last "
                         "checkpoint is kept", RUNTIME)
            time.sleep(timeout_s / 6)

    def exited() -> None:  # a peer that ends normally is not lost
        try:
            client.key_value_set(f"gpt_jax/heartbeat/{me}", "exited", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the service may be gone already
            pass

    atexit.register(exited)  # before JAX's own shutdown hook, registered earlier
    _WATCHING.append(me)
    threading.Thread(target=beat, name="gpt_jax-peers", daemon=True).start()


_CREATED: list[str | None] = []  # local folders this run made, removed again if it is refused


def _first_missing(path: str) -> str | None:
    """The outermost folder of the local `path` that does not exist yet (None: all exist,
    or a gs:// path, where an empty prefix is no object)."""
    if "://" in path:
        return None
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def _remove_created() -> None:
    """A refused or failed run leaves nothing behind: removes the folders `start` made
    when they hold no file (a run that wrote anything keeps it)."""
    for top in filter(None, _CREATED):
        if os.path.isdir(top) and not any(files for _, _, files in os.walk(top)):
            shutil.rmtree(top, ignore_errors=True)


def _quiet_orbax(record: Any) -> bool:
    """Orbax logs a failed background save with its traceback; keep its one line, as the
    loop raises the error itself, named, and that line should be the last thing printed.
    Its warning that a reader's checkpoint directory is read only is dropped: readers
    (`sample`, `evaluate`, ...) open runs read-only on purpose (`workdir.open_run`)."""
    if "/orbax/" in record.pathname:
        if "Given directory is read only" in record.getMessage():
            return False
        if not _show_tracebacks():
            record.exc_info, record.exc_text = None, None
    return True


USAGE, RUNTIME, INTERRUPTED = 2, 1, 130  # the command was wrong / the run failed / Ctrl-C


class UsageError(ValueError):
    """A command-line value that cannot work, found before anything is loaded; the message
    names the flag (exit status 2)."""


def check_input_file(flag: str, path: str, text: bool = True) -> None:
    """Raises UsageError naming `flag` and `path` unless the local `path` is a readable,
    non-empty file (and UTF-8 text when `text`): found before anything is loaded."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"{flag}={path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{flag}={path}: is a directory, not a file") from None
    except OSError as e:
        raise UsageError(f"{flag}={path}: cannot be read ({e.strerror})") from None
    if not data.strip():
        raise UsageError(f"{flag}={path}: the file is empty")
    if text:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{flag}={path}: not UTF-8 text (byte {e.start})") from None


def check_input_dir(flag: str, path: str) -> None:
    """Raises UsageError naming `flag` and `path` unless the local `path` is a directory
    (a gs:// path is checked when it is read)."""
    if "://" in path or os.path.isdir(path):
        return
    what = "is a file, not a run directory" if os.path.exists(path) else "no such directory"
    raise UsageError(f"{flag}={path}: {what}")


def _existing_ancestor(path: str) -> str:
    """The nearest part of the local `path` (itself included) that exists."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_output_file(flag: str, path: str) -> None:
    """Raises UsageError naming `flag` and `path` unless a file can be written at the local
    `path`: not a directory, and its folder exists (a gs:// path is checked when written)."""
    if "://" in path:
        return
    if os.path.isdir(path):
        raise UsageError(f"{flag}={path}: is a directory, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is a file" if os.path.exists(folder) else "does not exist"
        raise UsageError(f"{flag}={path}: its folder {folder} {what}")


def check_output_dir(flag: str, path: str) -> None:
    """Raises UsageError naming `flag` and `path` when the local `path`, or the nearest of
    its parents that exists, is not a directory (gs:// paths are checked when written)."""
    if "://" in path:
        return
    found = _existing_ancestor(path)
    if not os.path.isdir(found):
        where = "" if found == os.path.abspath(path) else f" ({found})"
        raise UsageError(f"{flag}={path}: is a file{where}, not a directory")


def fail(message: str, status: int) -> None:
    """Prints one `error: ...` line and exits; skips orbax's atexit hooks, whose
    "cannot schedule new futures after interpreter shutdown" tracebacks would bury it."""
    sys.stdout.flush()
    bars = getattr(sys.modules.get("tqdm"), "tqdm", None)  # an open progress bar: a line of its own
    print(f"{chr(10) if bars is not None and getattr(bars, '_instances', None) else ''}"
          f"error: {message}", file=sys.stderr, flush=True)
    _remove_created()
    os._exit(status)


def _show_tracebacks() -> bool:
    return bool(os.environ.get("GPT_JAX_TRACEBACK")) or (
        "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present)


def _last_line(text: str) -> str:
    """The message of an error whose text embeds a traceback (config_flags does that)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every bad flag (an unknown config field, a config file
    that does not exist or fails to load, a value of the wrong type) as one line, status 2."""
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS["config"].present:
            flags.FLAGS.config.get("name")  # config files load lazily: fail here, not later
        _check_numbers(flags.FLAGS)
        return rest
    except flags.UnrecognizedFlagError as e:
        if _show_tracebacks():
            raise
        name = e.flagname
        if name.startswith("config."):
            section = name.split(".")[1:-1]
            fields = ""
            try:
                node = flags.FLAGS["config"].value
                for key in section:
                    node = node[key]
                fields = f"; {'.'.join(['config', *section])} has: {', '.join(sorted(node))}"
            except Exception:  # noqa: BLE001 - the list of fields is a courtesy
                pass
            fail(f"--{name}: no such config field{fields}", USAGE)
        fail(f"--{name}: unknown flag (--helpfull lists them)", USAGE)
    except flags.Error as e:
        if _show_tracebacks():
            raise
        fail(_last_line(str(e)), USAGE)
    except (AttributeError, KeyError) as e:  # an override names a field the config lacks
        if _show_tracebacks():
            raise
        if "get_config" in str(e):  # an empty file, or one without the function
            given = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
            fail(f"{given}: the file defines no get_config() (see experiments/)", USAGE)
        missing = str(e).strip("\"'")
        bad = next((a for a in argv[1:] if a.startswith("--config.")
                    and missing in a.split("=")[0].split(".")[1:]), f"--config...{missing}")
        fail(f"{bad.split('=')[0]}: no such config field", USAGE)
    except (TypeError, ValueError, OSError) as e:
        if _show_tracebacks():
            raise
        config = " ".join(a for a in argv[1:] if a.startswith("--config="))
        fail(f"{config or 'flags'}: {_last_line(str(e))}", USAGE)
    except Exception as e:  # noqa: BLE001 - the config file itself raised (or did not parse)
        if _show_tracebacks():
            raise
        fail(_config_file_error(e, argv), USAGE)


# Errors about a file or directory itself: missing, of the wrong kind, unreadable, malformed.
BAD_INPUT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
             UnicodeDecodeError, json.JSONDecodeError)
NEGATIVE_OK = ("seed", "length_penalty")  # the numeric flags that may be below 0


def _check_numbers(f: flags.FlagValues) -> None:
    """No gpt_jax flag that counts, sizes or indexes something may be negative; nor may
    the multi-process flags be inconsistent (jax would wait for processes that never come)."""
    for name in f:
        value = f[name].value
        if (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0
                and name not in NEGATIVE_OK and "gpt_jax" in f.find_module_defining_flag(name)):
            fail(f"--{name}={value} must be >= 0", USAGE)
    if "num_processes" in f and f.num_processes is not None:
        if f.num_processes < 1:
            fail(f"--num_processes={f.num_processes} must be >= 1", USAGE)
        if f.process_id is not None and f.process_id >= f.num_processes:
            fail(f"--process_id={f.process_id} must be below --num_processes="
                 f"{f.num_processes}", USAGE)


def _config_file_error(error: Exception, argv: list[str]) -> str:
    """`file:line: what` for an error raised while loading the --config file: the line
    of a syntax error, else the deepest line of the file on the traceback."""
    given = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
    path = given.split(":")[0]
    if isinstance(error, SyntaxError):
        return f"{error.filename or path}:{error.lineno}: {error.msg} (--config={given})"
    frames = [fr for fr in traceback.extract_tb(error.__traceback__)
              if path and os.path.abspath(fr.filename) == os.path.abspath(path)]
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else f"--config={given}"
    return f"{where}: {type(error).__name__}: {_last_line(str(error))}"


def run(main: Callable[[list[str]], None], errors: tuple[type[Exception], ...] = ()) -> None:
    """`absl.app.run(main)` for every gpt_jax command, every outcome one line: bad flags,
    the project's usage errors (a config field, a workdir, a flag value, and `errors`)
    exit 2, and so does a file the command named that is missing, unreadable or malformed
    when found before compute; runtime failures (a checkpoint, a non-finite loss, storage,
    a lost peer, any error once the loop computes) exit 1; Ctrl-C exits 130 (after the
    training loop saved, see `loop.catch_sigterm`). `--verbosity=1` or GPT_JAX_TRACEBACK=1 shows
    the traceback instead."""
    from gpt_jax import loop
    from gpt_jax.checkpoint import CheckpointError
    from gpt_jax.config import ConfigError
    from gpt_jax.storage import StorageStalled
    from gpt_jax.workdir import WorkdirError

    def outcome(e: BaseException) -> tuple[str, int]:
        if isinstance(e, (ConfigError, WorkdirError, UsageError, *errors)):
            return _last_line(str(e)), RUNTIME if loop.computing() else USAGE
        if isinstance(e, KeyboardInterrupt):
            return "interrupted (Ctrl-C)", INTERRUPTED
        if isinstance(e, (CheckpointError, loop.NonFiniteLossError, StorageStalled)):
            return _last_line(str(e)), RUNTIME
        text = _last_line(str(e)) or "no message"
        what = f"{e.filename}: {e.strerror or text}" if isinstance(e, OSError) and e.filename \
            else f"{type(e).__name__}: {text}"
        if isinstance(e, BAD_INPUT):  # a file the command named: usage, unless it went bad later
            return what, RUNTIME if loop.computing() else USAGE
        if isinstance(e, OSError):  # storage or the network
            return what, RUNTIME
        return f"{what} (GPT_JAX_TRACEBACK=1 shows where)", RUNTIME

    def guarded(argv: list[str]) -> None:
        logging.get_absl_handler().addFilter(_quiet_orbax)  # every command, readers too
        try:
            main(argv)
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure one line
            if _show_tracebacks():
                raise
            message, status = outcome(e)
            if _WATCHING and type(e).__module__.startswith("jax"):  # a collective failed: if
                time.sleep(PEER_TIMEOUT_S * 7 / 6 + 1)  # a peer died, the watcher names it first
            fail(message, status)
        if loop.interrupted():  # Ctrl-C: the loop saved and said so; the status says it too
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(INTERRUPTED)

    app.run(guarded, flags_parser=parse_flags)
