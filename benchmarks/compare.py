"""gpt_jax vs a nanoGPT-style PyTorch GPT: training tokens/s side by side, same process.

    python benchmarks/compare.py [--shapes=nanogpt,gpt2] [--repeats=5] [--steps=5]
        [--compile] [--json_out=compare.json]
    # on a GPU: GPT-2 small at context 1024 in bfloat16, cuDNN / flash attention
    python benchmarks/compare.py --shapes=gpt2-1024 --dtype=bfloat16 --compile

Both frameworks train the same model (`benchmarks/torch_gpt.py` mirrors
`gpt_jax.model`) on the same random batch with the same AdamW; torch starts from
gpt_jax's initial weights, and the step-0 losses are compared (|diff| <= 1e-4 in float32).
Repeats alternate between the frameworks so load changes hit both alike; the
figures are medians. Both use the machine's 2 cores: torch as 2 intra-op threads
(`--torch_threads`); gpt_jax as XLA's intra-op pool, and for the nanoGPT shape as 2
XLA CPU devices on a data-parallel mesh (`CPU_DEVICES`; what `mesh.cpu_devices` does
for training), each running half of the batch on its own core. Each shape runs in its
own process, since the device count is fixed once JAX starts.

With a GPU, torch runs on CUDA (bfloat16 via autocast, flash attention through
`scaled_dot_product_attention`) and gpt_jax on its default backend
(`model.attention_impl=cudnn` with bfloat16); MFU is against the data-sheet peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import ml_collections  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch_gpt  # noqa: E402

from gpt_jax import bench, flops, sharding  # noqa: E402
from gpt_jax import model as model_lib  # noqa: E402
from gpt_jax.config import base_config, validate  # noqa: E402

SHAPES = {  # name: (n_layer, n_head, d_model, context, batch, vocab)
    "nanogpt": (4, 4, 128, 64, 12, 65),  # nanoGPT's shakespeare_char CPU settings
    "gpt2": (12, 12, 768, 256, 4, 50257),  # GPT-2 small at context 256
    "gpt2-1024": (12, 12, 768, 1024, 16, 50257),  # GPT-2 small as trained (accelerators)
}
# gpt_jax's `mesh.cpu_devices` per shape on a CPU host (the faster setting measured on 2
# cores; benchmarks/README.md): the small-op-bound nanoGPT shape runs data-parallel over
# the cores, while GPT-2's large matmuls already use both cores on one device, where a
# second one only adds a 500 MB gradient all-reduce and a duplicate optimizer update.
CPU_DEVICES = {"nanogpt": 2, "gpt2": 1, "gpt2-1024": 1}


def shape_config(name: str, batch: int | None = None, dtype: str = "float32"
                 ) -> ml_collections.ConfigDict:
    n_layer, n_head, d, t, b, v = SHAPES[name]
    cfg = base_config()
    cfg.name = f"compare-{name}"
    m = cfg.model
    m.n_layer, m.n_head, m.d_model, m.d_ff = n_layer, n_head, d, 4 * d
    m.context, m.vocab_size = t, v
    m.embd_pdrop = m.resid_pdrop = m.attn_pdrop = 0.0
    cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.peak_lr = "constant", 0, 1e-3
    cfg.train.batch_size = batch or b
    m.dtype = dtype
    if dtype == "bfloat16" and jax.default_backend() == "gpu":
        m.attention_impl = "cudnn"  # fused flash attention, as torch's SDPA uses
    return validate(cfg)


def compare(name: str, repeats: int, steps: int, use_compile: bool,
            batch: int | None = None, dtype: str = "float32") -> dict:
    cfg = shape_config(name, batch, dtype)
    jb = bench.TrainBench(cfg)
    params0 = jax.device_get(jb.state["params"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tm = torch_gpt.from_config(cfg.model)
    torch_gpt.load_jax_params(tm, params0)
    tm = tm.to(device)
    x = torch.from_numpy(jb.local[0, :, :-1].astype("int64")).to(device)
    y = torch.from_numpy(jb.local[0, :, 1:].astype("int64")).to(device)
    autocast = torch.autocast(device, torch.bfloat16, enabled=dtype == "bfloat16")
    with torch.no_grad(), autocast:
        torch_loss0 = float(tm(x, y))
    jax_loss0 = jb.loss()  # step 0: the loss before the first update
    opt = torch_gpt.make_optimizer(tm, cfg.optim, cfg.optim.peak_lr)
    runners = {"jax": jb.steps}

    def torch_runner(fn: object) -> object:
        def run(n: int) -> float:
            tic = time.perf_counter()
            for _ in range(n):
                with autocast:
                    fn(tm, opt, x, y, cfg.optim.grad_clip)
            if device == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - tic) / n
        return run

    runners["torch_eager"] = torch_runner(torch_gpt.train_step)
    compile_note = None
    if use_compile:
        try:
            compiled = torch.compile(torch_gpt.train_step)
            tic = time.perf_counter()
            compiled(tm, opt, x, y, cfg.optim.grad_clip)
            compiled(tm, opt, x, y, cfg.optim.grad_clip)
            compile_note = f"compiled in {time.perf_counter() - tic:.1f} s"
            runners["torch_compile"] = torch_runner(compiled)
        except Exception as e:  # report why rather than fail the comparison
            compile_note = f"torch.compile failed: {type(e).__name__}: {str(e)[:300]}"
    for run in runners.values():
        run(1)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for k, run in runners.items():
            times[k].append(run(steps))
    tokens = cfg.train.batch_size * cfg.model.context
    n_params = model_lib.count_params(jb.trainer.abstract_params)
    peak = flops.device_peak_flops()  # None on CPUs
    out = {"shape": name, "batch": cfg.train.batch_size, "context": cfg.model.context,
           "dtype": dtype, "jax_device": jax.devices()[0].device_kind, "torch_device": device,
           "params": n_params,
           "loss0_jax": jax_loss0, "loss0_torch": torch_loss0,
           "loss0_abs_diff": abs(jax_loss0 - torch_loss0), "torch_compile_note": compile_note,
           "load_average": list(os.getloadavg())}
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = {"step_s": med, "tokens_per_s": tokens / med, "all_s": ts,
                  "mfu": peak and tokens / med * flops.flops_per_token(cfg.model, n_params)
                  / (peak * jax.device_count())}
    for k in runners:
        if k != "jax":
            out[f"ratio_jax_over_{k}"] = out["jax"]["tokens_per_s"] / out[k]["tokens_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="nanogpt,gpt2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="override the shape's batch")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype (params stay float32 in both)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--torch_threads", type=int, default=2,
                    help="torch intra-op threads (2 = both cores; 1 is faster on a loaded box)")
    ap.add_argument("--jax_cpu_devices", type=int, default=None,
                    help="XLA CPU devices (the mesh's data axis); default: CPU_DEVICES[shape]")
    ap.add_argument("--json_out", default=None)
    args = ap.parse_args()
    names = args.shapes.split(",")
    if len(names) > 1:  # the device count is fixed once JAX starts: a process per shape
        run_each_shape(names, args)
        return
    torch.set_num_threads(args.torch_threads)
    cpu = base_config()
    cpu.mesh.cpu_devices = args.jax_cpu_devices or CPU_DEVICES[names[0]]
    sharding.set_cpu_devices(cpu)  # before JAX starts its backend
    print(f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].device_kind} "
          f"device(s); torch {torch.__version__} "
          f"threads {torch.get_num_threads()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    results = []
    for name in names:
        steps = args.steps if name == "nanogpt" else max(1, args.steps // 2)
        r = compare(name, args.repeats, steps * (8 if name == "nanogpt" else 1), args.compile,
                    args.batch, args.dtype)
        results.append(r)
        print(f"\n{name}: batch {r['batch']} x context {r['context']}, {r['params']:,} params, "
              f"{r['dtype']}, jax on {r['jax_device']}, torch on {r['torch_device']}, "
              f"load {[round(x, 2) for x in r['load_average']]}")
        print(f"  step-0 loss jax {r['loss0_jax']:.6f} torch {r['loss0_torch']:.6f} "
              f"|diff| {r['loss0_abs_diff']:.2e}")
        if r["torch_compile_note"]:
            print(f"  torch.compile: {r['torch_compile_note']}")
        for k in ("jax", "torch_eager", "torch_compile"):
            if k in r:
                mfu = f"  MFU {r[k]['mfu']:.1%}" if r[k]["mfu"] else ""
                print(f"  {k:14} {r[k]['step_s'] * 1e3:9.2f} ms/step "
                      f"{r[k]['tokens_per_s']:12,.0f} tok/s{mfu}")
        for k, v in r.items():
            if k.startswith("ratio"):
                print(f"  {k}: {v:.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(results, fh, indent=2)


def run_each_shape(names: list[str], args: argparse.Namespace) -> None:
    """Runs this script once per shape (its output streams through) and merges the JSON."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = os.path.join(tmp, f"{name}.json")
            argv = [f"--shapes={name}", f"--json_out={out}", f"--repeats={args.repeats}",
                    f"--steps={args.steps}", f"--dtype={args.dtype}",
                    f"--torch_threads={args.torch_threads}"]
            argv += [f"--{k}={v}" for k in ("batch", "jax_cpu_devices")
                     if (v := getattr(args, k)) is not None]
            argv += ["--compile"] if args.compile else []
            subprocess.run([sys.executable, os.path.abspath(__file__), *argv], check=True)
            with open(out) as fh:
                results += json.load(fh)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
