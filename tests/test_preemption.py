"""Preemption on several hosts: JAX's coordination service, no per-step collective."""

from __future__ import annotations

import os
import signal
import time

from conftest import run_python
from test_sharding import finish, free_port, start_processes


def train_args(workdir, data_dir, steps):
    from test_train import train_args as base
    return base(workdir, data_dir, steps)


def test_no_per_step_collective_in_two_processes(tmp_path):
    """Preemption goes through JAX's coordination service: the number of host collectives
    (process_allgather) does not grow with the number of steps; and a SIGTERM to one of two
    processes makes both save the same step and exit 0."""
    data = tmp_path / "data"
    first = run_python(train_args(tmp_path / "warm", data, steps=1))  # tokenize once
    assert first.returncode == 0, first.stderr[-3000:]

    count = """
import sys
from jax.experimental import multihost_utils
from gpt_jax import cli, train
calls = [0]
gather = multihost_utils.process_allgather
def counted(*a, **k):
    calls[0] += 1
    return gather(*a, **k)
multihost_utils.process_allgather = counted
cli.define_run_flags()
import atexit
atexit.register(lambda: print(f"ALLGATHER_CALLS={calls[0]}", flush=True))
cli.run(train.main)
"""

    def two(workdir, steps, script=None, term_after_rows=None):
        args = train_args(workdir, data, steps)
        args += ["--config.mesh.cpu_devices=1", "--config.train.ckpt_every=1000",
                 "--config.train.eval_every=1000", "--config.train.sample_tokens=0"]
        procs = start_processes(["-c", script] + args[2:] if script else args, free_port(),
                                devices=1)
        if term_after_rows:
            deadline = time.time() + 300
            path = workdir / "metrics.jsonl"
            while not (path.exists() and len(path.read_text().splitlines()) >= term_after_rows):
                if time.time() > deadline or procs[0].poll() is not None:
                    finish(procs, timeout=10)
                    raise AssertionError("the run ended before it logged enough rows")
                time.sleep(0.2)
            procs[1].send_signal(signal.SIGTERM)  # one host's preemption notice
        return finish(procs)

    calls = []
    for steps in (4, 12):
        outs = two(tmp_path / f"count{steps}", steps, script=count)
        calls.append([int(o.split("ALLGATHER_CALLS=")[1].split()[0]) for o, _ in outs])
    assert calls[0] == calls[1], calls  # no collective per step

    workdir = tmp_path / "term"
    two(workdir, 100000, term_after_rows=5)
    steps = [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    assert len(steps) == 1 and int(steps[0]) >= 5, steps
