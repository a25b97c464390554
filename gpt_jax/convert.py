"""Hugging Face GPT-2 checkpoints <-> gpt_jax workdirs.

    python -m gpt_jax.convert --from_hf=/path/to/gpt2 --workdir=runs/gpt2   # import
    python -m gpt_jax.convert --workdir=runs/gpt2 --to_hf=/out/gpt2         # export

Import reads an HF GPT-2 directory (`config.json` plus `model.safetensors` or
`pytorch_model.bin`, sharded variants with an `.index.json` too; any size or shape) and
writes a workdir like the trainer's: `config.json` (experiments/gpt2.py defaults with the
HF shape, LN eps and dropout), an orbax checkpoint at step 0 (params and a freshly
initialised optimizer state, so `gpt_jax.train` fine-tunes from it), and the tokenizer
(`vocab.json`, `merges.txt`) with `data.tokenizer='gpt2'` pointing at the workdir.

Fine-tuning: `python -m gpt_jax.train --config=experiments/gpt2.py:small --workdir=runs/gpt2
--config.data.tokenizer=gpt2 --config.data.tokenizer_path=runs/gpt2 ...` (with the model
shape of a custom import overridden to match) resumes the step-0 checkpoint; its optimizer
state was built from the imported config, so keep `optim.grad_clip` > 0 (or = 0) as there.

HF's Conv1D weights are [in, out], so they map onto our kernels by reshapes alone:
c_attn [D, 3D] -> qkv [D, 3, H, K]; attn c_proj [D, D] -> proj [H, K, D]; c_fc [D, F];
mlp c_proj [F, D]; the LM head is tied to wte. Export is the inverse, for pre-norm dense
models only (GPT-1's post-norm and GPT-3's banded layers have no GPT-2 equivalent).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import model as model_lib
from gpt_jax import optim, sharding
from gpt_jax import tokenizer as tokenizer_lib

HF_PREFIX = "transformer."
TOKENIZER_FILES = (tokenizer_lib.GPT2_VOCAB_FILE, tokenizer_lib.GPT2_MERGES_FILE)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
GPT2_EXPERIMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "experiments", "gpt2.py")


class ConversionError(ValueError):
    """The checkpoint or config cannot be mapped between GPT-2 and gpt_jax; says why."""


# ---------------------------------------------------------------- configs

def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {hf_dir!r} a Hugging Face model dir?")
    with open(path) as f:
        hf = json.load(f)
    problems = []
    if hf.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type={hf['model_type']!r} (only 'gpt2')")
    if hf.get("activation_function", "gelu_new") not in TANH_GELUS:
        problems.append(f"activation_function={hf['activation_function']!r} "
                        f"(gpt_jax uses the tanh GELU: {list(TANH_GELUS)})")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if hf.get(key, ok) != ok:
            problems.append(f"{key}={hf[key]!r} (needs {ok})")
    if problems:
        raise ConversionError(f"{path}: cannot import: " + "; ".join(problems))
    return hf


def _gpt2_defaults(hf: dict) -> ml_collections.ConfigDict:
    """experiments/gpt2.py's config for the size with HF's shape (small's if none matches)."""
    if not os.path.isfile(GPT2_EXPERIMENT):  # installed without the repo's experiments/
        return config_lib.base_config()
    spec = importlib.util.spec_from_file_location("gpt2_experiment", GPT2_EXPERIMENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shape = (hf["n_layer"], hf["n_embd"], hf["n_head"])
    size = next((name for name, s in module.SIZES.items() if s[:3] == shape), "small")
    return module.get_config(size)


def config_from_hf(hf: dict, workdir: str, scan_layers: bool = False,
                   has_tokenizer: bool = True) -> ml_collections.ConfigDict:
    """A full gpt_jax config: GPT-2 experiment defaults with the HF model's shape."""
    cfg = _gpt2_defaults(hf)
    m = cfg.model
    m.vocab_size, m.context = int(hf["vocab_size"]), int(hf["n_positions"])
    m.n_layer, m.n_head, m.d_model = int(hf["n_layer"]), int(hf["n_head"]), int(hf["n_embd"])
    m.d_ff = int(hf.get("n_inner") or 4 * m.d_model)
    m.ln_eps = float(hf.get("layer_norm_epsilon", 1e-5))
    m.init_std = float(hf.get("initializer_range", 0.02))
    m.embd_pdrop = float(hf.get("embd_pdrop", 0.1))
    m.resid_pdrop = float(hf.get("resid_pdrop", 0.1))
    m.attn_pdrop = float(hf.get("attn_pdrop", 0.1))
    m.norm, m.attention_pattern, m.scan_layers = "pre", "dense", scan_layers
    standard = m.vocab_size == 50257 and m.context == 1024
    if not (standard and cfg.name.startswith("gpt2-")):
        cfg.name = f"gpt2-hf-{m.n_layer}x{m.d_model}"
    if has_tokenizer:
        cfg.data.tokenizer, cfg.data.tokenizer_path = "gpt2", os.path.abspath(workdir)
    return config_lib.validate(cfg)


def check_gpt2_compatible(model_cfg: ml_collections.ConfigDict) -> None:
    """Raises ConversionError unless the model is a GPT-2 (pre-norm, dense attention)."""
    if model_cfg.norm != "pre":
        raise ConversionError(
            f"model.norm={model_cfg.norm!r}: only pre-norm models map to GPT-2 (GPT-1's "
            "post-norm blocks and missing final LayerNorm are not GPT-2)")
    if model_cfg.attention_pattern != "dense":
        raise ConversionError(
            f"model.attention_pattern={model_cfg.attention_pattern!r}: only dense attention "
            "maps to GPT-2 (GPT-3's locally banded layers are not GPT-2)")


def hf_config(cfg: ml_collections.ConfigDict, eot_id: int | None) -> dict:
    """The HF GPT2Config dict of a gpt_jax config."""
    m = cfg.model
    eos = eot_id if eot_id is not None and eot_id < m.vocab_size else None
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": m.vocab_size, "n_positions": m.context, "n_ctx": m.context,
        "n_embd": m.d_model, "n_layer": m.n_layer, "n_head": m.n_head, "n_inner": m.d_ff,
        "activation_function": "gelu_new", "layer_norm_epsilon": m.ln_eps,
        "initializer_range": m.init_std, "resid_pdrop": m.resid_pdrop,
        "embd_pdrop": m.embd_pdrop, "attn_pdrop": m.attn_pdrop,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": "float32",
    }


# ---------------------------------------------------------------- weights

def _weight_files(hf_dir: str) -> tuple[str, list[str]]:
    """('safetensors' | 'torch', files), preferring safetensors, following shard indexes."""
    for kind, single, index in (
            ("safetensors", "model.safetensors", "model.safetensors.index.json"),
            ("torch", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(hf_dir, single)):
            return kind, [os.path.join(hf_dir, single)]
        if os.path.isfile(os.path.join(hf_dir, index)):
            with open(os.path.join(hf_dir, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return kind, [os.path.join(hf_dir, s) for s in shards]
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {hf_dir}")


def load_hf_weights(hf_dir: str) -> dict[str, np.ndarray]:
    """HF tensor name (without 'transformer.') -> float32 array; attention mask buffers and
    the tied lm_head are dropped."""
    kind, files = _weight_files(hf_dir)
    raw: dict[str, np.ndarray] = {}
    for path in files:
        if kind == "safetensors":
            from safetensors.numpy import load_file
            raw.update(load_file(path))
        else:
            try:
                import torch
            except ImportError as e:
                raise ImportError(f"reading {path} needs torch (pip install "
                                  "torch==2.13.0), or convert it to model.safetensors") from e
            state = torch.load(path, map_location="cpu", weights_only=True)
            raw.update({k: v.float().numpy() for k, v in state.items()})
    out = {}
    for name, value in raw.items():
        name = name.removeprefix(HF_PREFIX)
        if name.endswith((".attn.bias", ".attn.masked_bias")) and value.ndim != 1:
            continue  # causal-mask buffers of old checkpoints
        out[name] = np.asarray(value, np.float32)
    head = out.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, out["wte.weight"]):
        raise ConversionError("lm_head.weight differs from wte.weight: gpt_jax ties them")
    return out


def params_from_hf(w: dict[str, np.ndarray], model_cfg: ml_collections.ConfigDict) -> dict:
    """The gpt_jax param tree (numpy float32) of HF GPT-2 weights, checked against the
    model's shapes; stacked when `model_cfg.scan_layers`."""
    d, h = model_cfg.d_model, model_cfg.n_head
    k = d // h

    def ln(prefix: str) -> dict:
        return {"scale": w[f"{prefix}.weight"], "bias": w[f"{prefix}.bias"]}

    params = {"wte": {"embedding": w["wte.weight"]}, "wpe": {"embedding": w["wpe.weight"]},
              "ln_f": ln("ln_f")}
    for i in range(model_cfg.n_layer):
        p = f"h.{i}"
        params[f"h_{i}"] = {
            "ln_1": ln(f"{p}.ln_1"), "ln_2": ln(f"{p}.ln_2"),
            "attn": {
                "qkv": {"kernel": w[f"{p}.attn.c_attn.weight"].reshape(d, 3, h, k),
                        "bias": w[f"{p}.attn.c_attn.bias"].reshape(3, h, k)},
                "proj": {"kernel": w[f"{p}.attn.c_proj.weight"].reshape(h, k, d),
                         "bias": w[f"{p}.attn.c_proj.bias"]}},
            "mlp": {"fc": {"kernel": w[f"{p}.mlp.c_fc.weight"], "bias": w[f"{p}.mlp.c_fc.bias"]},
                    "proj": {"kernel": w[f"{p}.mlp.c_proj.weight"],
                             "bias": w[f"{p}.mlp.c_proj.bias"]}}}
    unused = set(w) - {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} - {
        n for n in w if n.split(".")[0] == "h" and int(n.split(".")[1]) < model_cfg.n_layer}
    if unused:
        raise ConversionError(f"unexpected tensors in the checkpoint: {sorted(unused)[:8]}")
    if model_cfg.scan_layers:
        params = jax.tree.map(np.asarray, model_lib.stack_layers(params, model_cfg))
    expected = model_lib.unbox(model_lib.abstract_params(model_cfg))
    got_shapes = jax.tree.map(lambda x: x.shape, params)
    want_shapes = jax.tree.map(lambda x: tuple(x.shape), expected)
    if got_shapes != want_shapes:
        raise ConversionError(f"checkpoint shapes {got_shapes} do not match the model's "
                              f"{want_shapes}")
    return params


def hf_from_params(params: Any, model_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Inverse of `params_from_hf`: HF GPT2LMHeadModel tensor names -> float32 arrays."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    if model_cfg.scan_layers:
        p = jax.tree.map(np.asarray, model_lib.unstack_layers(p, model_cfg))
    d = model_cfg.d_model
    out = {"wte.weight": p["wte"]["embedding"], "wpe.weight": p["wpe"]["embedding"],
           "ln_f.weight": p["ln_f"]["scale"], "ln_f.bias": p["ln_f"]["bias"]}
    for i in range(model_cfg.n_layer):
        b, n = p[f"h_{i}"], f"h.{i}"
        out.update({
            f"{n}.ln_1.weight": b["ln_1"]["scale"], f"{n}.ln_1.bias": b["ln_1"]["bias"],
            f"{n}.ln_2.weight": b["ln_2"]["scale"], f"{n}.ln_2.bias": b["ln_2"]["bias"],
            f"{n}.attn.c_attn.weight": b["attn"]["qkv"]["kernel"].reshape(d, 3 * d),
            f"{n}.attn.c_attn.bias": b["attn"]["qkv"]["bias"].reshape(3 * d),
            f"{n}.attn.c_proj.weight": b["attn"]["proj"]["kernel"].reshape(d, d),
            f"{n}.attn.c_proj.bias": b["attn"]["proj"]["bias"],
            f"{n}.mlp.c_fc.weight": b["mlp"]["fc"]["kernel"],
            f"{n}.mlp.c_fc.bias": b["mlp"]["fc"]["bias"],
            f"{n}.mlp.c_proj.weight": b["mlp"]["proj"]["kernel"],
            f"{n}.mlp.c_proj.bias": b["mlp"]["proj"]["bias"]})
    return {HF_PREFIX + k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------- import / export

def import_hf(hf_dir: str, workdir: str, scan_layers: bool = False) -> ml_collections.ConfigDict:
    """Writes an HF GPT-2 directory as a gpt_jax workdir (config, step-0 checkpoint,
    tokenizer); returns the config."""
    hf = read_hf_config(hf_dir)
    has_tok = all(os.path.isfile(os.path.join(hf_dir, n)) for n in TOKENIZER_FILES)
    cfg = config_from_hf(hf, workdir, scan_layers, has_tok)
    ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
    try:
        if ckpt.latest_step() is not None:
            raise FileExistsError(f"{ckpt.directory} already holds checkpoints; import into "
                                  "an empty workdir")
        params_np = params_from_hf(load_hf_weights(hf_dir), cfg.model)
        mesh = sharding.make_mesh(cfg)
        tx = optim.make_optimizer(cfg)
        boxed = model_lib.abstract_params(cfg.model)
        param_sh = sharding.tree_shardings(boxed, mesh, cfg)
        opt_sh = sharding.tree_shardings(jax.eval_shape(tx.init, boxed), mesh, cfg)
        params = jax.device_put(params_np, param_sh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        ckpt_lib.write_config(workdir, cfg)
        if has_tok and jax.process_index() == 0:
            for name in TOKENIZER_FILES:
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(workdir, name))
        meta = {"step": 0, "data_step": 0, "seed": cfg.seed, "data_seed": cfg.data.seed,
                "imported_from": os.path.abspath(hf_dir)}
        ckpt.save(0, params, opt_state, meta, force=True)
    finally:
        ckpt.close()
    return cfg


def export_hf(workdir: str, out_dir: str, step: int | None = None) -> dict:
    """Writes a workdir's checkpoint as an HF GPT-2 directory (config.json,
    model.safetensors, and vocab.json/merges.txt if the workdir has a GPT-2 tokenizer);
    returns the HF config."""
    from safetensors.numpy import save_file

    cfg = ckpt_lib.read_config(workdir)
    check_gpt2_compatible(cfg.model)
    mesh = sharding.make_mesh(cfg)
    boxed = model_lib.abstract_params(cfg.model)
    abstract = ckpt_lib.abstract_with_shardings(model_lib.unbox(boxed),
                                                sharding.tree_shardings(boxed, mesh, cfg))
    params, _ = ckpt_lib.restore_params(workdir, abstract, step)
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    try:
        tok = tokenizer_lib.load_tokenizer(workdir)
    except FileNotFoundError:
        tok = None
    hf = hf_config(cfg, None if tok is None else tok.eot_id)
    if jax.process_index() != 0:
        return hf
    os.makedirs(out_dir, exist_ok=True)
    save_file(hf_from_params(params, cfg.model), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    if isinstance(tok, tokenizer_lib.GPT2Tokenizer):
        tok.save(out_dir)
    return hf


# ---------------------------------------------------------------- CLI

def define_flags() -> None:
    """CLI flags, defined only when run as a program so importing this module is free."""
    from absl import flags
    flags.DEFINE_string("workdir", None, "gpt_jax workdir (written by import, read by export).")
    flags.DEFINE_string("from_hf", None, "Import: a Hugging Face GPT-2 directory.")
    flags.DEFINE_string("to_hf", None, "Export: the Hugging Face directory to write.")
    flags.DEFINE_integer("step", None, "Export: checkpoint step (default: the latest).")
    flags.DEFINE_bool("scan_layers", False, "Import: store layers stacked (model.scan_layers).")
    flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    from absl import flags, logging
    del argv
    f = flags.FLAGS
    if not f["verbosity"].present:  # orbax logs every file at INFO
        logging.set_verbosity(logging.WARNING)
    if bool(f.from_hf) == bool(f.to_hf):
        raise SystemExit("give exactly one of --from_hf (import) or --to_hf (export)")
    if f.from_hf:
        cfg = import_hf(f.from_hf, f.workdir, f.scan_layers)
        n = model_lib.count_params(model_lib.abstract_params(cfg.model))
        print(f"imported {f.from_hf} -> {f.workdir}: {cfg.name}, {n:,} params")
        if cfg.data.tokenizer != "gpt2":
            print(f"warning: no {' / '.join(TOKENIZER_FILES)} in {f.from_hf}; copy them into "
                  f"{f.workdir} before sampling or evaluating")
    else:
        export_hf(f.workdir, f.to_hf, f.step)
        print(f"exported {f.workdir} -> {f.to_hf}")


if __name__ == "__main__":
    from absl import app
    define_flags()
    app.run(main)
