"""Flags and start-up shared by the `python -m gpt_jax.<tool>` programs.

Flags are defined by calling these from a tool's `if __name__ == "__main__":`
block, so importing any module never defines flags.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

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
    from gpt_jax import sharding

    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if "config" in f and f.config is not None:
        sharding.set_cpu_devices(f.config)
    if "coordinator_address" in f:
        sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    if "workdir" in f and f.workdir:  # a missing bucket or credentials: now, not after compiling
        from gpt_jax.workdir import Workdir
        Workdir(f.workdir).check_writable()


def run(main: Callable[[list[str]], None], errors: tuple[type[Exception], ...] = ()) -> None:
    """`absl.app.run(main)`, printing the project's own errors (a config field, a workdir,
    and `errors`) as one `error: ...` line with exit status 2 instead of a traceback
    (`--verbosity=1` or GPT_JAX_TRACEBACK=1 shows it)."""
    from gpt_jax.config import ConfigError
    from gpt_jax.workdir import WorkdirError

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except (ConfigError, WorkdirError, *errors) as e:
            if os.environ.get("GPT_JAX_TRACEBACK") or flags.FLAGS["verbosity"].present:
                raise
            sys.stdout.flush()
            print(f"error: {e}", file=sys.stderr, flush=True)
            os._exit(2)  # skip orbax's atexit hooks, whose tracebacks would bury the line

    app.run(guarded)
