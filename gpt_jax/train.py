"""`python -m gpt_jax.train --config=experiments/tiny.py --workdir=runs/tiny`: pretraining.

Thin wiring of the modules: config -> mesh -> token files -> the shared loop
(`loop.run`: sharded init or restore, jitted steps, metrics, checkpoints) ->
a final sample. Rerunning the same command resumes from the workdir's latest
checkpoint; on SIGTERM (TPU VM preemption) the run checkpoints at the next
step boundary and exits 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from gpt_jax import cli, loop, sample, sharding, steps
from gpt_jax import config as config_lib
from gpt_jax import data as data_lib
from gpt_jax import evaluate as evaluate_lib
from gpt_jax import model as model_lib
from gpt_jax.data import compress
from gpt_jax.flops import flops_per_token


def step_windows(cfg: ml_collections.ConfigDict, corpus: data_lib.Corpus,
                 step: int) -> np.ndarray:
    """This host's M x b_local x (T+1) windows of `step`.

    Microbatch m of step s is the data pipeline's batch number s * M + m, so the
    sequence of windows depends neither on M nor on the number of hosts.
    """
    m = cfg.train.microbatches
    return np.stack([
        corpus.batch(seed=cfg.data.seed, step=step * m + i,
                     global_batch=cfg.train.batch_size // m, context=cfg.model.context,
                     process_index=jax.process_index(), process_count=jax.process_count())
        for i in range(m)])


def make_evaluate(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  corpus: data_lib.Corpus) -> Any:
    """params -> {eval_loss, eval_ppl, eval_bpb} over fixed validation windows; a mixture
    also reports each source's `eval_loss/<name>` and the weighted mean as eval_loss."""
    eval_step = steps.jit_eval_step(cfg.model, mesh)  # the training mesh: its attention kernel

    def source_loss(params: Any, name: str) -> float:
        total, count = 0.0, 0.0
        for local in data_lib.eval_batches(
                corpus.tokens("val", name),
                global_batch=cfg.train.batch_size // cfg.train.microbatches,
                context=cfg.model.context, num_batches=cfg.train.eval_batches,
                process_index=jax.process_index(), process_count=jax.process_count()):
            s, c = eval_step(params, sharding.host_local_to_global(local, mesh))
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)

    def evaluate(params: Any) -> dict[str, float]:
        losses = {name: source_loss(params, name) for name in corpus.names}
        loss = sum(corpus.weights[n] * v for n, v in losses.items())
        bpb = sum(corpus.weights[n] * v / math.log(2) / corpus.bytes_per_token("val", n)
                  for n, v in losses.items())
        out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_bpb": bpb}
        if len(losses) > 1:
            out.update({f"eval_loss/{n}": v for n, v in losses.items()})
        return out

    return evaluate


def make_task_evaluate(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       tokenizer: Any) -> Callable[[Any], dict[str, float]] | None:
    """params -> {'<task>/<metric>': value} of `train.eval_tasks`, zero-shot on their first
    `train.eval_task_limit` examples, scored on the training mesh; None without tasks.
    The task files are read and checked here, before any step."""
    files = [f.strip() for f in cfg.train.get("eval_tasks", "").split(",") if f.strip()]
    if not files:
        return None
    tasks = []
    for path in files:
        try:
            tasks.append(evaluate_lib.load_task(path, cfg.train.get("eval_task_limit", 0)))
        except (config_lib.ConfigError, OSError) as e:
            raise config_lib.ConfigError(f"train.eval_tasks: {e}") from None
    scorer = evaluate_lib.Scorer(cfg.model, None, mesh, tokenizer.eot_id,
                                 cfg.train.batch_size // cfg.train.microbatches,
                                 vocab=tokenizer.vocab_size, progress=False)

    def evaluate(params: Any) -> dict[str, float]:
        scorer.params, out = params, {}
        for spec, evals, demos in tasks:
            for report in evaluate_lib.evaluate_task(scorer, tokenizer, spec, evals, demos,
                                                     shots=[0], seed=cfg.seed):
                out.update({f"{spec.name}/{k}": v for k, v in report["metrics"].items()
                            if isinstance(v, float)})
        return out

    return evaluate


def full_split_loss(eval_step: Any, params: Any, tokens: Any, *, batch: int, context: int,
                    mesh: jax.sharding.Mesh, stride: int = 0) -> tuple[float, float]:
    """(summed loss in nats, tokens scored) over a whole split, every target once but the
    last few (< stride) that no whole window reaches.

    Windows of context + 1 tokens start every `stride` tokens (0: `context`, windows that
    share only their boundary). With a shorter stride they overlap: the first window scores
    all its targets, each later one only its last `stride`, so every scored token sees at
    least context - stride tokens before it (the sliding-window perplexity of Press et al.
    2021, "Shortformer", and HF's perplexity guide) instead of 0 to context - 1. The last
    batch is padded with window 0, masked out."""
    stride = stride or context
    n = (len(tokens) - 1 - context) // stride + 1 if len(tokens) > context else 0
    lo, hi = loop.host_rows(batch)
    late_T = (np.arange(context) >= context - stride).astype(np.float32)
    total, count = 0.0, 0.0
    for start in range(0, n, batch):
        ids = np.arange(start, start + batch, dtype=np.int64)
        mask_BxT = np.where((ids == 0)[:, None], 1.0, late_T[None, :]).astype(np.float32)
        mask_BxT *= (ids < n)[:, None]
        local = data_lib.gather_windows(tokens, np.where(ids < n, ids, 0)[lo:hi], context,
                                        stride)
        s, c = eval_step(params, sharding.host_local_to_global(local, mesh),
                         sharding.host_local_to_global(mask_BxT[lo:hi], mesh))
        total, count = total + float(s), count + float(c)
    return total, count


def full_eval_stride(cfg: ml_collections.ConfigDict) -> int:
    """Tokens between the starts of the final full evaluation's windows."""
    context = cfg.model.context
    return max(1, context - round(cfg.train.get("full_eval_overlap", 0.0) * context))


def validation_against_compressors(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                                   corpus: data_lib.Corpus, params: Any) -> dict[str, Any]:
    """The model's bits per byte over the whole validation split beside what gzip -9 and
    xz -9 make of the same files (each compressed on its own; `data.compress`)."""
    tokens = corpus.val
    total, count = full_split_loss(
        steps.jit_eval_step(cfg.model, mesh), params, tokens,
        batch=cfg.train.batch_size // cfg.train.microbatches, context=cfg.model.context,
        mesh=mesh, stride=full_eval_stride(cfg))
    out: dict[str, Any] = {"val_bpb": total / math.log(2) / (count *
                                                             corpus.bytes_per_token("val"))}
    source = data_lib.make_source(cfg)
    if source.files is not None:  # local files: compress the very documents of the split
        out["val_docs"], out["val_bytes"], bpb = compress.compression_bpb(source.docs("val"))
        out.update({f"{name.replace(' -', '')}_bpb": v for name, v in bpb.items()})
    return out


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrains until `train.steps`, resuming from `workdir`; returns final metrics."""
    cfg = config_lib.validate(cfg)
    mesh = sharding.make_mesh(cfg)
    sharding.check_batch(cfg, mesh)
    corpus = data_lib.prepare(cfg)  # validates context and vocabulary against the data
    if jax.process_index() == 0:
        print(f"{cfg.name}: {model_lib.count_params(model_lib.abstract_params(cfg.model)):,} "
              f"params; mesh {' x '.join(f'{k}={v}' for k, v in mesh.shape.items())} of "
              f"{mesh.size} {mesh.devices.flat[0].platform} devices; "
              f"{sum(len(corpus.tokens('train', n)) for n in corpus.names):,} training "
              f"tokens; unigram entropy "
              f"{data_lib.unigram_entropy(corpus.val, corpus.tokenizer.vocab_size):.3f} nats "
              f"(validation loss of a model that ignores context)")
    lm_evaluate = make_evaluate(cfg, mesh, corpus)
    task_evaluate = make_task_evaluate(cfg, mesh, corpus.tokenizer)

    def evaluate(params: Any) -> dict[str, float]:
        return {**lm_evaluate(params), **(task_evaluate(params) if task_evaluate else {})}

    task = loop.Task(
        loss_fn=steps.lm_loss_fn(cfg.model),
        batch=lambda step: step_windows(cfg, corpus, step),
        evaluate=evaluate,
        tokens_per_step=cfg.train.batch_size * cfg.model.context,
        flops_per_token=flops_per_token(cfg.model),
        tokenizer=corpus.tokenizer, token_store=corpus.store)  # saved in the workdir by run
    final, params, preempted = loop.run(cfg, workdir, mesh, task, **cli.run_options())
    t = cfg.train
    if not preempted and t.get("final_full_eval", False) and len(corpus.names) == 1:
        final.update(validation_against_compressors(cfg, mesh, corpus, params))
        if jax.process_index() == 0:
            against = (f"; gzip -9 {final['gzip9_bpb']:.3f}, xz -9 {final['xz9_bpb']:.3f} "
                       f"on the same {final['val_docs']} files ({final['val_bytes']:,} bytes, "
                       "each compressed on its own)" if "xz9_bpb" in final else "")
            stride = full_eval_stride(cfg)
            print(f"validation, every token (windows every {stride} tokens): eval_bpb "
                  f"{final['val_bpb']:.3f} bits per byte{against}")
    if not preempted and t.sample_tokens:  # every host computes, process 0 prints
        how = sample.SamplingConfig(temperature=t.sample_temperature, top_p=t.sample_top_p,
                                    repetition_penalty=t.get("sample_repetition_penalty", 1.0))
        text = sample.sample_text(cfg.model, params, corpus.tokenizer, t.sample_prompt,
                                  t.sample_tokens, how, seed=cfg.seed)
        if jax.process_index() == 0:
            penalty = (f", repetition penalty {how.repetition_penalty}"
                       if how.repetition_penalty != 1.0 else "")
            print(f"\n--- sample (temperature {how.temperature}, top-p {how.top_p}{penalty}, "
                  f"seed {cfg.seed}) ---\n{text}\n-----------------------")
        final["sample"] = text
    return final


def main(argv: list[str]) -> None:
    del argv
    cli.start()
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_run_flags()
    cli.run(main)
