"""The training loop every trainer shares: pretraining, fine-tuning, SFT, reward model.

A trainer describes itself as a `Task` (params, loss, batches, evaluation);
`run` does the rest the same way for all of them: sharded init or restore from
the workdir's latest checkpoint, the jitted step, metrics.jsonl/TensorBoard,
evaluation, asynchronous checkpoints (last `train.keep` plus the best by eval
loss), SIGTERM -> checkpoint and exit 0, and a stop naming the step on a
non-finite loss; and the run's goodput ledger (`gpt_jax.goodput`: where its seconds went,
across restarts), logged and printed at every evaluation and at the end.

Storage outages (gpt_jax/storage.py): token reads retry for `train.storage_retry_budget_s`,
metrics are written in the background, a failed save is retried at the next interval
(`train.max_failed_saves`), and a SIGTERM is honoured within SIGTERM_GRACE_S whatever
storage is doing: a watchdog thread, woken by the signal itself (a wakeup fd, so even a
main thread blocked in a storage client's C++ code cannot delay it), exits with status 1
and one line naming the last good checkpoint when the save at the stop has not finished.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import data as data_lib
from gpt_jax import goodput, optim, provenance, sharding, steps, storage
from gpt_jax import lease as lease_lib
from gpt_jax import model as model_lib
from gpt_jax.flops import device_peak_flops
from gpt_jax.metrics import MetricsWriter, last_step
from gpt_jax.workdir import Workdir, WorkdirError, check_compatible


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN/inf; the last good checkpoint stays."""


@dataclass
class Task:
    """What a trainer plugs into `run`.

    `batch(step)` returns this host's slice of the step's batch as a pytree of
    numpy arrays with a leading microbatch axis (M x local_batch x ...); it must
    be a pure function of the step so a resumed run sees the same data.
    `evaluate(params)` returns metrics, including `eval_loss` when it has one.
    """

    evaluate: Callable[[Any], dict[str, float]]
    loss_fn: steps.LossFn | None = None  # default: the GPT's next-token loss
    batch: Callable[[int], Any] | None = None  # required unless `make_step` is given
    boxed_params: Any = None  # abstract params with logical axes; default: the GPT's
    # (rng, param shardings) -> params laid out on those shardings, called eagerly
    # (it may restore a pretrained checkpoint); default: a fresh GPT, initialised sharded.
    init_params: Callable[[jax.Array, Any], Any] | None = None
    tokens_per_step: int = 0
    flops_per_token: float | None = None
    extra_meta: dict = field(default_factory=dict)
    optimizer: Any = None  # an optax.GradientTransformation; default optim.make_optimizer(cfg)
    # (trainer) -> step(state, step) -> (state, metrics with 'loss'): replaces `batch` and
    # the jitted gradient step with one that may do more per step (PPO: rollouts, scoring,
    # several updates); it must be a pure function of (state, step) for an exact resume.
    # It runs under the activation-sharding context; other metrics it returns are logged.
    make_step: Callable[[Trainer], Callable[[dict, int], tuple[dict, dict]]] | None = None
    # The tokenizer and data.TokenStore the run trains on, when it has them: their sha256 /
    # fingerprint go into every checkpoint's provenance and are checked on resume; the
    # tokenizer is saved into the workdir once that check has passed.
    tokenizer: Any = None
    token_store: Any = None


@dataclass
class Trainer:
    """Compiled steps and shardings for one config on one mesh."""

    cfg: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    param_shardings: Any
    opt_shardings: Any
    abstract_params: Any
    abstract_opt_state: Any
    init_state: Callable
    train_step: Callable
    tx: Any = None  # the optimizer


def build_trainer(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  loss_fn: steps.LossFn | None = None, boxed_params: Any = None,
                  init_params: Callable[[jax.Array, Any], Any] | None = None,
                  tx: Any = None) -> Trainer:
    """Shardings from the logical-axis rules; jitted init and train step.

    The train step's batch may be any pytree of arrays with a leading
    microbatch axis; its batch dimension (axis 1) is sharded over `data`.
    """
    tx = optim.make_optimizer(cfg) if tx is None else tx
    boxed_params = model_lib.abstract_params(cfg.model) if boxed_params is None else boxed_params
    boxed_opt = jax.eval_shape(tx.init, boxed_params)
    param_sh = sharding.tree_shardings(boxed_params, mesh, cfg)
    opt_sh = sharding.tree_shardings(boxed_opt, mesh, cfg)
    repl = sharding.replicated(mesh)
    state_sh = {"step": repl, "params": param_sh, "opt_state": opt_sh}
    def fresh_state(rng: jax.Array) -> dict:
        params = model_lib.unbox(model_lib.init_params(cfg.model, rng))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    init_state = jax.jit(fresh_state, out_shardings=state_sh)
    if init_params is not None:
        init_opt = jax.jit(tx.init, out_shardings=opt_sh)

        def init_state(rng: jax.Array) -> dict:
            params = init_params(rng, param_sh)
            return {"step": jax.device_put(jnp.zeros((), jnp.int32), repl), "params": params,
                    "opt_state": init_opt(params)}

    # The batch keeps whatever (data-axis) sharding `host_local_to_global` gave it.
    step_fn = steps.make_train_step(loss_fn or steps.lm_loss_fn(cfg.model), tx, param_sh)

    def train_step(*args: Any) -> Any:  # activation constraints bind to the mesh
        with sharding.activation_sharding(mesh):
            return step_fn(*args)

    train_step = jax.jit(train_step, in_shardings=(state_sh, None, repl, repl),
                         out_shardings=(state_sh, repl), donate_argnums=(0,))
    return Trainer(cfg, mesh, param_sh, opt_sh, model_lib.unbox(boxed_params),
                   model_lib.unbox(boxed_opt), init_state, train_step, tx)


def restore_or_init(trainer: Trainer, ckpt: ckpt_lib.Checkpointer,
                    workdir: Workdir | None = None) -> tuple[dict, dict]:
    """(state, meta) from the latest checkpoint onto this mesh, or freshly initialised.
    With `workdir`, a checkpoint of another model shape is refused (one line) before any
    array is read."""
    def compatible(step: int) -> None:
        if workdir is not None:
            check_compatible(workdir, trainer.abstract_params, ckpt.saved_params(step),
                             trainer.cfg)

    found = ckpt.restore_latest(
        ckpt_lib.abstract_with_shardings(trainer.abstract_params, trainer.param_shardings),
        ckpt_lib.abstract_with_shardings(trainer.abstract_opt_state, trainer.opt_shardings),
        before_restore=compatible)
    if found is None:
        return trainer.init_state(jax.random.key(trainer.cfg.seed)), {}
    meta = found[1]["meta"]
    restored = found[1]
    state = {"step": jax.device_put(jnp.asarray(meta["step"], jnp.int32),
                                    sharding.replicated(trainer.mesh)),
             "params": restored["params"], "opt_state": restored["opt_state"]}
    if jax.process_index() == 0:
        print(f"resuming from step {meta['step']} in {ckpt.directory}")
    return state, meta


def global_batch(local: Any, mesh: jax.sharding.Mesh) -> Any:
    """Each host's M x b x ... slices -> global arrays sharded over `data` on axis 1."""
    return jax.tree.map(lambda x: sharding.host_local_to_global(x, mesh, batch_axis=1), local)


def host_rows(rows: int) -> tuple[int, int]:
    """This host's contiguous slice [lo, hi) of `rows` global rows."""
    per = rows // jax.process_count()
    return jax.process_index() * per, (jax.process_index() + 1) * per


def microbatched(full: dict[str, np.ndarray], microbatches: int) -> dict[str, np.ndarray]:
    """A global batch -> this host's M x b_local x ... slices (what `loop.Task.batch` returns)."""
    rows = len(next(iter(full.values())))
    micro = rows // microbatches
    lo, hi = host_rows(micro)
    return {k: v.reshape(microbatches, micro, *v.shape[1:])[:, lo:hi] for k, v in full.items()}


def eval_batches(arrays: dict[str, np.ndarray], rows: int, mesh: jax.sharding.Mesh) -> Any:
    """(global batch, number of real rows) over a whole split in order, the last batch
    wrapped around to a full `rows` (its extra rows are to be ignored)."""
    n = len(next(iter(arrays.values())))
    lo, hi = host_rows(rows)
    for start in range(0, n, rows):
        idx = np.arange(start, start + rows) % n
        yield ({k: sharding.host_local_to_global(v[idx][lo:hi], mesh)
                for k, v in arrays.items()},
               min(rows, n - start))


class Preemption:
    """Agrees on a step at which every host saves after a SIGTERM (a preemption notice).

    One process: a Python signal handler sets a flag. Several: JAX's coordination
    service does it. Its preemption notifier catches SIGTERM on any host and tells the
    others in the background; `reached(step)` is a local check until then, so no step
    pays for a host-to-host collective (multihost_utils.reached_preemption_sync_point).
    """

    def __init__(self) -> None:
        self._distributed = jax.process_count() > 1
        self._synced = False
        if not self._distributed:
            catch_sigterm()

    @property
    def requested(self) -> bool:
        return self._synced or _SIGTERM.is_set()

    def reached(self, step: int) -> bool:
        if self._distributed:
            self._synced = self._synced or multihost_utils.reached_preemption_sync_point(step)
            return self._synced
        return _SIGTERM.is_set()


_SIGTERM = threading.Event()
_SIGINT = threading.Event()


def catch_sigterm() -> None:
    """From here on SIGTERM only sets a flag that `Preemption` reads, so a notice that
    arrives during start-up (data, compile, restore) is honoured at the first safe point
    instead of killing the process with status 143. `cli.start` calls it first thing; on
    several hosts JAX's preemption notifier takes SIGTERM over at distributed init.
    Ctrl-C (SIGINT) is the same request, passed on as a SIGTERM to this process (so on
    several hosts the notifier tells the others) and remembered for the exit status
    (130, `cli.run`); a second Ctrl-C exits at once, without saving."""
    signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())
    signal.signal(signal.SIGINT, _on_sigint)
    _start_watchdog()


SIGTERM_GRACE_S = 25.0  # a preemption notice gives about 30 s
_LAST_GOOD: list[Callable[[], Any]] = []  # the running loop's Checkpointer.last_good


def _start_watchdog() -> None:
    """The thread that bounds how long a SIGTERM may take once training has begun (see the
    module docstring); once per process, from the main thread."""
    if _WATCHDOG:
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: a library caller; no watchdog
        return
    _WATCHDOG.append(read)

    def watch() -> None:
        while signal.SIGTERM not in os.read(read, 64):
            pass
        deadline = time.monotonic() + SIGTERM_GRACE_S
        while time.monotonic() < deadline or not computing():
            time.sleep(0.2)
        step = _LAST_GOOD[-1]() if _LAST_GOOD else None
        os.write(2, (f"\nerror: SIGTERM: the run could not save within {SIGTERM_GRACE_S:g} s "
                     f"(storage did not answer); exiting now. The last good checkpoint is "
                     f"step {step}\n").encode())
        os._exit(1)

    threading.Thread(target=watch, name="sigterm watchdog", daemon=True).start()


_WATCHDOG: list[int] = []


def _on_sigint(signum: int, frame: Any) -> None:
    if _SIGINT.is_set():
        os.write(2, b"\nerror: interrupted twice (Ctrl-C): exiting now, without saving\n")
        os._exit(130)
    _SIGINT.set()
    os.kill(os.getpid(), signal.SIGTERM)


def interrupted() -> bool:
    """Whether Ctrl-C asked this process to stop."""
    return _SIGINT.is_set()


_COMPUTING = threading.Event()


def computing() -> bool:
    """Whether `run` has trained a step (a failure after that is not a usage error)."""
    return _COMPUTING.is_set()


def run(cfg: ml_collections.ConfigDict, workdir: str | Workdir, mesh: jax.sharding.Mesh,
        task: Task, restart: bool = False,
        accept_changes: Sequence[str] = ()) -> tuple[dict, Any, bool]:
    """Trains `task` to `train.steps`, resuming from `workdir`, as its one writer: process 0
    holds the workdir's lease (`gpt_jax.lease`) until this returns. `restart` (a command's
    --restart) lets a workdir whose metrics show progress but that holds no restorable
    checkpoint start over (see `check_fresh_start`); `accept_changes` (--accept_changes)
    names the provenance categories a resume may change (`provenance.parse_accept`).

    Returns (last logged metrics, final params, whether the run was preempted).
    """
    workdir = Workdir(workdir)
    lease = take_lease(workdir, cfg)
    ledger = goodput.Ledger(workdir)  # counts from the process's start, the lease's wait too
    try:
        return _run(cfg, workdir, mesh, task, lease, ledger, restart, accept_changes)
    finally:
        ledger.stop()  # after an error the attempt stays open, like a killed one
        if lease is not None:
            lease.release()


def take_lease(workdir: Workdir, cfg: ml_collections.ConfigDict) -> lease_lib.Lease | None:
    """Process 0 takes the workdir's lease for the job (None elsewhere); when it cannot,
    every process stops with its one line, before anything is written or computed."""
    held, error = None, None
    if jax.process_index() == 0:
        try:
            held = lease_lib.acquire(workdir, cfg.train.get("lease_timeout_s",
                                                            lease_lib.DEFAULT_TIMEOUT_S))
        except WorkdirError as e:
            error = e
    if jax.process_count() > 1 and not int(
            multihost_utils.broadcast_one_to_all(np.int32(error is None))):
        error = error or lease_lib.LeaseError(f"process 0 could not take the lease on "
                                              f"{workdir} (its error says why)")
    if error is not None:
        raise error
    return held


def check_fresh_start(workdir: Workdir, restart: bool) -> None:
    """Refuses, in one line, to train from step 0 a workdir whose metrics show progress but
    that holds no restorable checkpoint (its first save was cut off, or its checkpoints
    were deleted), unless `restart`: starting over silently would repeat every step."""
    logged = last_step(workdir)
    if logged > 0 and not restart:
        raise WorkdirError(f"--workdir={workdir} logged steps up to {logged} but holds no "
                           f"restorable checkpoint in {workdir.checkpoints} (its first save "
                           "did not complete): rerun with --restart to train it from step 0 "
                           "(the rows logged are set aside), or use another --workdir")


def _run(cfg: ml_collections.ConfigDict, workdir: Workdir, mesh: jax.sharding.Mesh,
         task: Task, lease: lease_lib.Lease | None, ledger: goodput.Ledger, restart: bool,
         accept_changes: Sequence[str]) -> tuple[dict, Any, bool]:
    trainer = build_trainer(cfg, mesh, task.loss_fn, task.boxed_params, task.init_params,
                            task.optimizer)
    storage.set_budget(cfg.train.get("storage_retry_budget_s", storage.DEFAULT_BUDGET_S))
    ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep,
                                 max_failed_saves=cfg.train.get("max_failed_saves", 3))
    _LAST_GOOD.append(ckpt.last_good)
    ckpt.check_writable()
    latest = ckpt.latest_step()
    if latest is None:
        check_fresh_start(workdir, restart)
    accept = provenance.parse_accept(accept_changes)
    record = provenance.compute(cfg, task.tokenizer, task.token_store)
    with ledger.timer("startup" if latest is None else "restore"):
        state, meta = restore_or_init(trainer, ckpt, workdir)
    changes = (provenance.verify_resume(meta, record, cfg, workdir, accept,
                                        show=jax.process_index() == 0) if meta else [])
    workdir.write_config(cfg)  # only now: a run that cannot resume keeps its config.json
    if task.tokenizer is not None:  # and its tokenizer
        workdir.save_tokenizer(task.tokenizer)
    start, t = int(state["step"]), cfg.train
    ledger.resume(start, last_step(workdir))  # before the writer sets later rows aside
    writer = MetricsWriter(workdir, resume_step=start)  # sets aside rows it will rewrite
    writer.write(start, {"provenance": provenance.metrics_entry(record, changes)})
    preemption = Preemption()
    rng = jax.random.key(cfg.seed + 1)
    lr = optim.learning_rate_schedule(cfg)
    peak = device_peak_flops()
    progress = _progress_bar(start, t.steps)
    pending: list[tuple[int, jax.Array]] = []
    last_eval, last_eval_step = float("nan"), -1
    final: dict = {}
    tic, tic_step = time.perf_counter(), start

    def tokens(steps: int) -> int:  # actually consumed: GPT-3's batch ramp shrinks early steps
        return task.tokens_per_step * optim.microbatches_consumed(cfg, steps) // t.microbatches

    def report_goodput(step: int) -> None:  # a metrics row (and TensorBoard) and a line
        writer.write(step, {**ledger.fields(), "tokens": tokens(step)})
        if jax.process_index() == 0:
            progress.write(ledger.line())

    def check_losses() -> list[float]:
        values = [float(v) for _, v in pending]
        for (s, _), v in zip(pending, values):
            if not math.isfinite(v):
                ckpt.wait()
                raise NonFiniteLossError(
                    f"loss became {v} at step {s}; stopping. The last good checkpoint in "
                    f"{ckpt.directory} is step {ckpt.latest_step()}. Try a lower optim.peak_lr "
                    f"or a smaller optim.grad_clip.")
        pending.clear()
        return values

    def meta_at(step: int) -> dict:
        return {"step": step, "data_step": step, "seed": cfg.seed, "data_seed": cfg.data.seed,
                "provenance": record, **task.extra_meta}

    if start < t.steps and preemption.reached(start):  # SIGTERM during start-up
        if not meta:  # a fresh state is worth keeping; a restored one is on disk already
            ckpt.save(start, state["params"], state["opt_state"], meta_at(start), force=True)
        ckpt.close()
        ledger.close()
        report_goodput(start)
        writer.close()
        progress.close()
        logging.warning("SIGTERM during start-up: exiting before step %d", start)
        return final, state["params"], True

    if start == 0 and t.get("eval_at_start", True):  # curves start at the init loss (nanoGPT)
        with ledger.timer("eval"):
            evals = task.evaluate(state["params"])
        writer.write(0, {**evals, "tokens": 0})
        tic = time.perf_counter()

    custom_step = task.make_step(trainer) if task.make_step is not None else None
    # The next batches are read on background threads while this step runs.
    local_batches = (data_lib.prefetch(task.batch, start, t.steps, cfg.data.get("prefetch", 0))
                     if custom_step is None else None)
    ledger.switch("steps")
    for step in range(start, t.steps):
        if custom_step is None:
            with ledger.timer("data"):
                local = next(local_batches)
            batch = global_batch(local, mesh)
            state, metrics = trainer.train_step(state, batch, rng,
                                                optim.microbatches_at(cfg, step))
        else:
            with sharding.activation_sharding(mesh):
                state, metrics = custom_step(state, step)
        pending.append((step + 1, metrics["loss"]))
        _COMPUTING.set()  # a step ran: from here a failure is the run's, not the command's
        ckpt.check()  # a failed asynchronous save stops the run now, not at the next save
        if lease is not None:
            lease.check()  # taken over by another writer: stop before writing more
        done = step + 1
        ledger.trained(done)
        if done % t.log_every == 0 or done == t.steps:
            losses = check_losses()
            step_time = (time.perf_counter() - tic) / (done - tic_step)
            tok_s = (tokens(done) - tokens(tic_step)) / (step_time * (done - tic_step))
            tic, tic_step = time.perf_counter(), done
            final = {"loss": losses[-1], "lr": float(lr(step)),
                     "grad_norm": float(metrics["grad_norm"]),
                     "tokens": tokens(done), "tokens_per_s": tok_s,
                     "step_time_s": step_time,
                     "mfu": None if peak is None or not task.flops_per_token else
                     tok_s * task.flops_per_token / (peak * jax.device_count())}
            final.update({k: float(v) for k, v in metrics.items() if k != "loss"})
            writer.write(done, final)
            progress.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tok_s:,.0f}")
        if done % t.eval_every == 0 or done == t.steps:
            with ledger.timer("eval"):
                evals = task.evaluate(state["params"])
            last_eval, last_eval_step = evals.get("eval_loss", float("nan")), done
            writer.write(done, {**evals, "tokens": tokens(done)})
            final.update(evals)
            if done < t.steps:  # at the end, once the last save is in it
                report_goodput(done)
            tic, tic_step = time.perf_counter(), done
        progress.update(1)
        stop = preemption.reached(done)
        if done % t.ckpt_every == 0 or done == t.steps or stop:
            check_losses()
            with ledger.timer("save"):
                ckpt.save(done, state["params"], state["opt_state"], meta_at(done),
                          eval_loss=last_eval if last_eval_step == done else None, force=stop)
            ledger.persist()
            writer.flush(wait=False)  # queued: on gs:// an outage must not stop training
        if stop:
            progress.close()  # its last redraw would come after the line below
            logging.warning("%s: checkpointed step %d, exiting",
                            "interrupted (Ctrl-C)" if interrupted() else "SIGTERM", done)
            break
    if local_batches is not None:
        local_batches.close()  # stops reads of steps that will not run (after SIGTERM)
    with ledger.timer("save"):
        ckpt.close()  # waits for the last save
    ledger.close()
    report_goodput(int(state["step"]))
    writer.close()
    progress.close()
    return final, state["params"], preemption.requested


def _progress_bar(start: int, total: int) -> Any:
    from tqdm import tqdm
    return tqdm(initial=start, total=total, disable=jax.process_index() != 0,
                dynamic_ncols=True, desc="train")
