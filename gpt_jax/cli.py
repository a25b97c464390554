"""Flags and start-up shared by the `python -m gpt_jax.<tool>` programs.

Flags are defined by calling these from a tool's `if __name__ == "__main__":`
block, so importing any module never defines flags.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags


def define_run_flags(config_help: str = "Experiment config file.", init_from: bool = False) -> None:
    """--config, --workdir (required), --init_from (if asked) and the multi-process flags."""
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
    flags.mark_flags_as_required(required)


def start() -> None:
    """Quiets INFO logs (orbax logs every file) unless --verbosity was given, splits a
    CPU-only host into `mesh.cpu_devices` devices, and joins the other processes of a
    multi-process run."""
    from gpt_jax import loop, sharding

    loop.catch_sigterm()  # a preemption notice during start-up exits 0 at the first safe point
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().addFilter(_no_orbax_tracebacks)
    if "config" in f and f.config is not None:
        sharding.set_cpu_devices(f.config)
    if "coordinator_address" in f:
        sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    if "workdir" in f and f.workdir:  # a missing bucket or credentials: now, not after compiling
        from gpt_jax.workdir import Workdir
        Workdir(f.workdir).check_writable()


def _no_orbax_tracebacks(record: Any) -> bool:
    """Orbax logs a failed background save with its traceback; keep its one line, as the
    loop raises the error itself, named, and that line should be the last thing printed."""
    if "/orbax/" in record.pathname:
        record.exc_info, record.exc_text = None, None
    return True


USAGE, RUNTIME = 2, 1  # exit statuses: the command was wrong / the run failed


def fail(message: str, status: int) -> None:
    """Prints one `error: ...` line and exits; skips orbax's atexit hooks, whose
    "cannot schedule new futures after interpreter shutdown" tracebacks would bury it."""
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
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
        missing = str(e).strip("\"'")
        bad = next((a for a in argv[1:] if a.startswith("--config.")
                    and a.split("=")[0].split(".")[-1] == missing), f"--config...{missing}")
        fail(f"{bad.split('=')[0]}: no such config field", USAGE)
    except (TypeError, ValueError, OSError) as e:
        if _show_tracebacks():
            raise
        config = " ".join(a for a in argv[1:] if a.startswith("--config="))
        fail(f"{config or 'flags'}: {_last_line(str(e))}", USAGE)


def run(main: Callable[[list[str]], None], errors: tuple[type[Exception], ...] = ()) -> None:
    """`absl.app.run(main)` for every gpt_jax command: bad flags, the project's own errors
    (a config field, a workdir, and `errors`) exit 2, and files that are missing,
    unreadable or malformed exit 1, each as one `error: ...` line rather than a
    traceback (`--verbosity=1` or GPT_JAX_TRACEBACK=1 shows it)."""
    import json

    from gpt_jax.checkpoint import CheckpointError
    from gpt_jax.config import ConfigError
    from gpt_jax.loop import NonFiniteLossError
    from gpt_jax.workdir import WorkdirError

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except (ConfigError, WorkdirError, *errors) as e:
            if _show_tracebacks():
                raise
            fail(_last_line(str(e)), USAGE)
        except (CheckpointError, NonFiniteLossError) as e:
            if _show_tracebacks():
                raise
            fail(_last_line(str(e)), RUNTIME)
        except (FileNotFoundError, PermissionError, IsADirectoryError,
                json.JSONDecodeError, UnicodeDecodeError) as e:
            if _show_tracebacks():
                raise
            what = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename \
                else f"{type(e).__name__}: {e}"
            fail(_last_line(what), RUNTIME)

    app.run(guarded, flags_parser=parse_flags)
