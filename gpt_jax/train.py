"""`python -m gpt_jax.train --config=experiments/tiny.py --workdir=runs/tiny`: pretraining.

Thin wiring of the modules: config -> mesh -> tokens -> sharded state (fresh or
restored) -> jitted step loop -> metrics and checkpoints -> a final sample.
Rerunning the same command resumes from the workdir's latest checkpoint; on
SIGTERM (TPU VM preemption) the run checkpoints at the next step boundary and
exits 0.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import data as data_lib
from gpt_jax import model as model_lib
from gpt_jax import optim, sample, sharding, steps
from gpt_jax.flops import device_peak_flops, flops_per_token
from gpt_jax.metrics import MetricsWriter


def define_flags() -> None:
    """CLI flags, defined only when run as a program so importing this module is free."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
    flags.DEFINE_string(
        "coordinator_address", None,
        "host:port of process 0 for multi-process runs; auto-detected on Cloud TPU VMs and SLURM.")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index.")
    flags.mark_flags_as_required(["config", "workdir"])
    flags.FLAGS.set_default("verbosity", logging.WARNING)  # orbax logs every file at INFO


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN/inf; the last good checkpoint stays."""


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
    eval_step: Callable


def build_trainer(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  loss_fn: steps.LossFn | None = None) -> Trainer:
    """Shardings from the logical-axis rules, and jitted init / train / eval steps."""
    tx = optim.make_optimizer(cfg)
    boxed_params = model_lib.abstract_params(cfg.model)
    boxed_opt = jax.eval_shape(tx.init, boxed_params)
    param_sh = sharding.tree_shardings(boxed_params, mesh, cfg)
    opt_sh = sharding.tree_shardings(boxed_opt, mesh, cfg)
    repl = sharding.replicated(mesh)
    state_sh = {"step": repl, "params": param_sh, "opt_state": opt_sh}

    def init_state(rng: jax.Array) -> dict:
        params = model_lib.unbox(model_lib.init_params(cfg.model, rng))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    batch_sh = sharding.batch_sharding(mesh, 3, batch_axis=1)  # M x B x (T+1)
    loss_fn = loss_fn or steps.lm_loss_fn(cfg.model)
    train_step = jax.jit(steps.make_train_step(loss_fn, tx),
                         in_shardings=(state_sh, batch_sh, repl, repl),
                         out_shardings=(state_sh, repl), donate_argnums=(0,))
    eval_step = jax.jit(steps.make_eval_step(cfg.model),
                        in_shardings=(param_sh, sharding.batch_sharding(mesh, 2)),
                        out_shardings=(repl, repl))
    return Trainer(cfg, mesh, param_sh, opt_sh, model_lib.unbox(boxed_params),
                   model_lib.unbox(boxed_opt),
                   jax.jit(init_state, out_shardings=state_sh), train_step, eval_step)


def restore_or_init(trainer: Trainer, ckpt: ckpt_lib.Checkpointer) -> tuple[dict, dict]:
    """(state, meta) from the latest checkpoint onto this mesh, or freshly initialised."""
    step = ckpt.latest_step()
    if step is None:
        return trainer.init_state(jax.random.key(trainer.cfg.seed)), {}
    restored = ckpt.restore(
        step, ckpt_lib.abstract_with_shardings(trainer.abstract_params, trainer.param_shardings),
        ckpt_lib.abstract_with_shardings(trainer.abstract_opt_state, trainer.opt_shardings))
    meta = restored["meta"]
    state = {"step": jax.device_put(jnp.asarray(meta["step"], jnp.int32),
                                    sharding.replicated(trainer.mesh)),
             "params": restored["params"], "opt_state": restored["opt_state"]}
    if jax.process_index() == 0:
        print(f"resuming from step {meta['step']} in {ckpt.directory}")
    return state, meta


def step_batch(cfg: ml_collections.ConfigDict, tokens: np.ndarray, step: int,
               mesh: jax.sharding.Mesh) -> jax.Array:
    """The global M x b x (T+1) batch of `step`, built from this host's slice only.

    Microbatch m of step s is the data pipeline's batch number s * M + m, so the
    sequence of windows does not depend on M or on the number of hosts.
    """
    m = cfg.train.microbatches
    micro = cfg.train.batch_size // m
    local = np.stack([
        data_lib.train_batch(tokens, seed=cfg.data.seed, step=step * m + i, global_batch=micro,
                             context=cfg.model.context, process_index=jax.process_index(),
                             process_count=jax.process_count())
        for i in range(m)])
    return sharding.host_local_to_global(local, mesh, batch_axis=1)


def evaluate(trainer: Trainer, params: Any, tokens: np.ndarray) -> float:
    """Mean next-token loss over `train.eval_batches` fixed validation batches."""
    cfg = trainer.cfg
    total, count = 0.0, 0.0
    batch = cfg.train.batch_size // cfg.train.microbatches
    for local in data_lib.eval_batches(
            tokens, global_batch=batch, context=cfg.model.context,
            num_batches=cfg.train.eval_batches, process_index=jax.process_index(),
            process_count=jax.process_count()):
        s, c = trainer.eval_step(params, sharding.host_local_to_global(local, trainer.mesh))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


class Preemption:
    """SIGTERM sets a flag; all hosts agree on it at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.requested = True

    def reached(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        flags_all = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags_all))


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains until `train.steps`, resuming from `workdir`; returns final metrics."""
    cfg = config_lib.validate(cfg)
    mesh = sharding.make_mesh(cfg)
    sharding.check_batch(cfg, mesh)
    corpus = data_lib.prepare(cfg)  # validates context and vocabulary against the data
    ckpt_lib.write_config(workdir, cfg)
    corpus.tokenizer.save(workdir)
    if jax.process_index() == 0:
        print(f"{cfg.name}: {model_lib.count_params(model_lib.abstract_params(cfg.model)):,} "
              f"params; {len(corpus.train):,} training tokens; unigram entropy "
              f"{data_lib.unigram_entropy(corpus.val, corpus.tokenizer.vocab_size):.3f} nats "
              f"(validation loss of a model that ignores context)")
    trainer = build_trainer(cfg, mesh)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep)
    state, _ = restore_or_init(trainer, ckpt)
    start = int(state["step"])
    writer = MetricsWriter(workdir)
    preemption = Preemption()
    rng = jax.random.key(cfg.seed + 1)
    t = cfg.train
    tokens_per_step = t.batch_size * cfg.model.context
    flops_tok = flops_per_token(cfg.model)
    peak = device_peak_flops()
    bpt = corpus.bytes_per_token("val")
    progress = _progress_bar(start, t.steps)
    pending: list[tuple[int, jax.Array]] = []
    last_eval, last_eval_step = float("nan"), -1
    final: dict = {}
    tic, tic_step = time.perf_counter(), start

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

    for step in range(start, t.steps):
        batch = step_batch(cfg, corpus.train, step, mesh)
        state, metrics = trainer.train_step(state, batch, rng,
                                            optim.microbatches_at(cfg, step))
        pending.append((step + 1, metrics["loss"]))
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            losses = check_losses()
            step_time = (time.perf_counter() - tic) / (done - tic_step)
            tic, tic_step = time.perf_counter(), done
            tok_s = tokens_per_step / step_time
            final = {"loss": losses[-1], "lr": float(optim.learning_rate_schedule(cfg)(step)),
                     "grad_norm": float(metrics["grad_norm"]), "tokens": done * tokens_per_step,
                     "tokens_per_s": tok_s, "step_time_s": step_time,
                     "mfu": None if peak is None else
                     tok_s * flops_tok / (peak * jax.device_count())}
            writer.write(done, final)
            progress.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tok_s:,.0f}")
        if done % t.eval_every == 0 or done == t.steps:
            last_eval, last_eval_step = evaluate(trainer, state["params"], corpus.val), done
            writer.write(done, {"eval_loss": last_eval,
                                "eval_ppl": math.exp(min(last_eval, 50.0)),
                                "eval_bpb": last_eval / math.log(2) / bpt,
                                "tokens": done * tokens_per_step})
            final["eval_loss"] = last_eval
            tic, tic_step = time.perf_counter(), done
        progress.update(1)
        stop = preemption.reached()
        if done % t.ckpt_every == 0 or done == t.steps or stop:
            check_losses()
            meta = {"step": done, "data_step": done, "seed": cfg.seed,
                    "data_seed": cfg.data.seed}
            ckpt.save(done, state["params"], state["opt_state"], meta,
                      eval_loss=last_eval if last_eval_step == done else None, force=stop)
        if stop:
            logging.warning("SIGTERM: checkpointed step %d, exiting", done)
            break
    ckpt.close()
    writer.close()
    progress.close()
    if not preemption.requested and t.sample_tokens:  # every host computes, process 0 prints
        text = sample.greedy_text(cfg.model, state["params"], corpus.tokenizer,
                                  t.sample_prompt, t.sample_tokens)
        if jax.process_index() == 0:
            print(f"\n--- sample (greedy) ---\n{text}\n-----------------------")
        final["sample"] = text
    return final


def _progress_bar(start: int, total: int) -> Any:
    from tqdm import tqdm
    return tqdm(initial=start, total=total, disable=jax.process_index() != 0,
                dynamic_ncols=True, desc="train")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    train(f.config, f.workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
