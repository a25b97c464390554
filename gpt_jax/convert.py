"""Hugging Face GPT-1 / GPT-2 checkpoints <-> gpt_jax workdirs.

    python -m gpt_jax.convert --from_hf=/path/to/gpt2 --workdir=runs/gpt2   # import
    python -m gpt_jax.convert --workdir=runs/gpt2 --to_hf=/out/gpt2         # export

Import reads an HF directory (`config.json` plus `model.safetensors` or
`pytorch_model.bin`, sharded variants with an `.index.json` too; any size or shape) of
`model_type` 'gpt2' (GPT2LMHeadModel) or 'openai-gpt' (OpenAIGPTLMHeadModel, GPT-1) and
writes a workdir like the trainer's: `config.json` (experiments/gpt2.py or gpt1.py defaults
with the HF shape, LN eps and dropout), an orbax checkpoint at step 0 (params and a freshly
initialised optimizer state, so `gpt_jax.train` fine-tunes from it), and the tokenizer
(`vocab.json`, `merges.txt`) with `data.tokenizer='gpt2'` / `'gpt1'` pointing at the workdir.

Fine-tuning: `python -m gpt_jax.train --config=experiments/gpt2.py:small --workdir=runs/gpt2
--config.data.tokenizer=gpt2 --config.data.tokenizer_path=runs/gpt2 ...` (with the model
shape of a custom import overridden to match) resumes the step-0 checkpoint; its optimizer
state was built from the imported config, so keep `optim.grad_clip` > 0 (or = 0) as there.
GPT-1's discriminative fine-tuning: `gpt_jax.finetune --init_from=<the workdir>`.

The two layouts differ only in names, norm placement and config fields (`ARCHS`); the
tensors are the same (`LAYER_TENSORS`). HF's Conv1D weights are [in, out], so they map onto
our kernels by reshapes alone: c_attn [D, 3D] -> qkv [D, 3, H, K]; attn c_proj [D, D] ->
proj [H, K, D]; c_fc [D, F]; mlp c_proj [F, D]; the LM head is tied to the token embedding.
GPT-2 is pre-norm with a final `ln_f`; GPT-1 (Radford et al. 2018) is post-norm
(x = LN(x + sublayer(x))) with no final LayerNorm and F = 4D. Export is the inverse, for
dense models (GPT-3's banded layers have neither equivalent): pre-norm ones as GPT-2,
post-norm ones as GPT-1.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import model as model_lib
from gpt_jax import optim, sharding
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.workdir import Workdir, WorkdirError, atomic_write_bytes, open_run

HF_PREFIX = "transformer."
TOKENIZER_FILES = (tokenizer_lib.GPT2_VOCAB_FILE, tokenizer_lib.GPT2_MERGES_FILE)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")
SHAPE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


class ConversionError(ValueError):
    """The checkpoint or config cannot be mapped between HF and gpt_jax; says why."""


@dataclasses.dataclass(frozen=True)
class HFArch:
    """What one HF model type calls things; everything else is shared."""

    model_type: str  # config.json's model_type
    architecture: str  # the LM-head class transformers loads an export as
    norm: str  # gpt_jax model.norm
    wte: str  # token embedding tensor (without 'transformer.')
    wpe: str  # position embedding tensor
    ln_f: str | None  # final LayerNorm (None: GPT-1 has none)
    act_key: str  # config.json's activation field
    act_values: tuple[str, ...]  # its values that mean the tanh GELU (first: what export writes)
    d_ff_key: str | None  # config.json's MLP width field (None: fixed at 4 * n_embd)
    fixed: tuple[tuple[str, Any], ...]  # config.json fields that must hold these values
    tokenizer: str  # data.tokenizer of the BPE in vocab.json + merges.txt
    experiment: str  # experiments/ file whose defaults an import starts from


ARCHS = {
    "gpt2": HFArch(
        "gpt2", "GPT2LMHeadModel", "pre", "wte", "wpe", "ln_f", "activation_function",
        TANH_GELUS, "n_inner",
        (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
         ("add_cross_attention", False), ("tie_word_embeddings", True)),
        "gpt2", "gpt2.py"),
    # HF's ACT_FNS["gelu"] for openai-gpt is gelu_new, the tanh GELU of the original code.
    "openai-gpt": HFArch(
        "openai-gpt", "OpenAIGPTLMHeadModel", "post", "tokens_embed", "positions_embed", None,
        "afn", ("gelu",), None, (("tie_word_embeddings", True),), "gpt1", "gpt1.py"),
}


# ---------------------------------------------------------------- configs

def read_hf_config(hf_dir: str) -> dict:
    """config.json of an HF GPT-1/GPT-2 directory, checked against what gpt_jax can express
    (one ConversionError line naming the file and every offending field)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {hf_dir!r} a Hugging Face model dir?")
    with open(path) as f:
        hf = json.load(f)
    model_type = hf.setdefault("model_type", "gpt2")
    if model_type not in ARCHS:
        raise ConversionError(f"{path}: cannot import model_type={model_type!r} (only "
                              f"{sorted(ARCHS)})")
    arch = ARCHS[model_type]
    problems = [f"{key} missing" for key in SHAPE_FIELDS if key not in hf]
    problems += [f"{key}={hf[key]!r} (needs a positive integer)" for key in SHAPE_FIELDS
                 if key in hf and not (isinstance(hf[key], int) and hf[key] > 0)]
    if not problems and hf["n_embd"] % hf["n_head"]:
        problems.append(f"n_embd={hf['n_embd']} is not divisible by n_head={hf['n_head']}")
    act = hf.get(arch.act_key, arch.act_values[0])
    if act not in arch.act_values:
        problems.append(f"{arch.act_key}={act!r} (gpt_jax uses the tanh GELU: "
                        f"{list(arch.act_values)})")
    for key, ok in arch.fixed:
        if hf.get(key, ok) != ok:
            problems.append(f"{key}={hf[key]!r} (needs {ok})")
    if problems:
        raise ConversionError(f"{path}: cannot import: " + "; ".join(problems))
    return hf


def _experiment_defaults(arch: HFArch, hf: dict) -> ml_collections.ConfigDict:
    """The arch's experiment config (for GPT-2 the size with HF's shape, else small's)."""
    path = os.path.join(EXPERIMENTS, arch.experiment)
    if not os.path.isfile(path):  # installed without the repo's experiments/
        return config_lib.base_config()
    spec = importlib.util.spec_from_file_location(f"{arch.tokenizer}_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sizes = getattr(module, "SIZES", None)
    if sizes is None:
        return module.get_config()
    shape = (hf["n_layer"], hf["n_embd"], hf["n_head"])
    return module.get_config(next((name for name, s in sizes.items() if s[:3] == shape),
                                  "small"))


def config_from_hf(hf: dict, workdir: str, scan_layers: bool = False,
                   has_tokenizer: bool = True) -> ml_collections.ConfigDict:
    """A full gpt_jax config: the arch's experiment defaults with the HF model's shape."""
    arch = ARCHS[hf.get("model_type", "gpt2")]
    cfg = _experiment_defaults(arch, hf)
    m = cfg.model
    released = (m.vocab_size, m.context, m.n_layer, m.d_model, m.n_head)
    m.vocab_size, m.context = int(hf["vocab_size"]), int(hf["n_positions"])
    m.n_layer, m.n_head, m.d_model = int(hf["n_layer"]), int(hf["n_head"]), int(hf["n_embd"])
    m.d_ff = int((arch.d_ff_key and hf.get(arch.d_ff_key)) or 4 * m.d_model)
    m.ln_eps = float(hf.get("layer_norm_epsilon", 1e-5))
    m.init_std = float(hf.get("initializer_range", 0.02))
    m.embd_pdrop = float(hf.get("embd_pdrop", 0.1))
    m.resid_pdrop = float(hf.get("resid_pdrop", 0.1))
    m.attn_pdrop = float(hf.get("attn_pdrop", 0.1))
    m.norm, m.attention_pattern, m.scan_layers = arch.norm, "dense", scan_layers
    m.dtype = "float32"  # an import computes as the original did (fine-tune: override it)
    if released != (m.vocab_size, m.context, m.n_layer, m.d_model, m.n_head):
        cfg.name = f"{arch.tokenizer}-hf-{m.n_layer}x{m.d_model}"
    if has_tokenizer:
        cfg.data.tokenizer, cfg.data.tokenizer_path = arch.tokenizer, str(Workdir(workdir))
    return config_lib.validate(cfg)


def arch_of(model_cfg: ml_collections.ConfigDict) -> HFArch:
    """The HF layout of a gpt_jax model (pre-norm: GPT-2, post-norm: GPT-1), or
    ConversionError naming the field that has none."""
    if model_cfg.attention_pattern != "dense":
        raise ConversionError(
            f"model.attention_pattern={model_cfg.attention_pattern!r}: only dense attention "
            "maps to GPT-1/GPT-2 (GPT-3's locally banded layers have no HF equivalent here)")
    arch = next(a for a in ARCHS.values() if a.norm == model_cfg.norm)
    if arch.d_ff_key is None and model_cfg.d_ff != 4 * model_cfg.d_model:
        raise ConversionError(
            f"model.d_ff={model_cfg.d_ff}: a post-norm model exports as GPT-1 "
            f"({arch.architecture}), whose MLP width is 4 * d_model = {4 * model_cfg.d_model}")
    return arch


def hf_config(cfg: ml_collections.ConfigDict, eot_id: int | None) -> dict:
    """The HF config.json dict (GPT2Config or OpenAIGPTConfig) of a gpt_jax config."""
    m = cfg.model
    arch = arch_of(m)
    out = {
        "architectures": [arch.architecture], "model_type": arch.model_type,
        "vocab_size": m.vocab_size, "n_positions": m.context, "n_embd": m.d_model,
        "n_layer": m.n_layer, "n_head": m.n_head, arch.act_key: arch.act_values[0],
        "layer_norm_epsilon": m.ln_eps, "initializer_range": m.init_std,
        "resid_pdrop": m.resid_pdrop, "embd_pdrop": m.embd_pdrop, "attn_pdrop": m.attn_pdrop,
        "torch_dtype": "float32", **dict(arch.fixed)}
    if arch.d_ff_key:
        out[arch.d_ff_key] = m.d_ff
    if arch.model_type == "gpt2":  # GPT-1 has no end-of-text token to name
        eos = eot_id if eot_id is not None and eot_id < m.vocab_size else None
        out.update({"n_ctx": m.context, "reorder_and_upcast_attn": False, "use_cache": True,
                    "bos_token_id": eos, "eos_token_id": eos})
    return out


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
        if name == "position_ids":
            continue  # GPT-1's position index buffer (saved by old transformers)
        out[name] = np.asarray(value, np.float32)
    head = out.pop("lm_head.weight", None)
    embed = next((a.wte + ".weight" for a in ARCHS.values() if a.wte + ".weight" in out), None)
    if head is not None and (embed is None or not np.array_equal(head, out[embed])):
        raise ConversionError(f"{', '.join(files)}: lm_head.weight differs from the token "
                              f"embedding {embed}: gpt_jax ties them")
    return out


# One transformer layer: HF name under h.N, gpt_jax path under h_N, HF shape, gpt_jax shape
# (dimension symbols are resolved by `_dims`).
LAYER_TENSORS = (
    ("ln_1.weight", ("ln_1", "scale"), "D", "D"),
    ("ln_1.bias", ("ln_1", "bias"), "D", "D"),
    ("ln_2.weight", ("ln_2", "scale"), "D", "D"),
    ("ln_2.bias", ("ln_2", "bias"), "D", "D"),
    ("attn.c_attn.weight", ("attn", "qkv", "kernel"), "D 3D", "D 3 H K"),
    ("attn.c_attn.bias", ("attn", "qkv", "bias"), "3D", "3 H K"),
    ("attn.c_proj.weight", ("attn", "proj", "kernel"), "D D", "H K D"),
    ("attn.c_proj.bias", ("attn", "proj", "bias"), "D", "D"),
    ("mlp.c_fc.weight", ("mlp", "fc", "kernel"), "D F", "D F"),
    ("mlp.c_fc.bias", ("mlp", "fc", "bias"), "F", "F"),
    ("mlp.c_proj.weight", ("mlp", "proj", "kernel"), "F D", "F D"),
    ("mlp.c_proj.bias", ("mlp", "proj", "bias"), "D", "D"),
)


def _dims(arch: HFArch, m: ml_collections.ConfigDict) -> dict[str, tuple[str, int]]:
    """Dimension symbol -> (the config.json field it comes from, size)."""
    d = m.d_model
    return {"V": ("vocab_size", m.vocab_size), "T": ("n_positions", m.context),
            "D": ("n_embd", d), "3D": ("3 * n_embd", 3 * d), "H": ("n_head", m.n_head),
            "K": ("n_embd / n_head", d // m.n_head), "3": ("3", 3),
            "F": (arch.d_ff_key or "4 * n_embd", m.d_ff)}


def tensor_table(model_cfg: ml_collections.ConfigDict
                 ) -> dict[str, tuple[tuple[str, ...], tuple[tuple[str, int], ...],
                                      tuple[int, ...]]]:
    """HF tensor name (without 'transformer.') -> (gpt_jax param path, HF dims as
    (config.json field, size), gpt_jax shape) for the model's arch (`arch_of`)."""
    arch = arch_of(model_cfg)
    dims = _dims(arch, model_cfg)

    def entry(path: tuple[str, ...], hf: str, ours: str) -> tuple:
        return (path, tuple(dims[s] for s in hf.split()),
                tuple(dims[s][1] for s in ours.split()))

    table = {f"{arch.wte}.weight": entry(("wte", "embedding"), "V D", "V D"),
             f"{arch.wpe}.weight": entry(("wpe", "embedding"), "T D", "T D")}
    if arch.ln_f:
        table[f"{arch.ln_f}.weight"] = entry(("ln_f", "scale"), "D", "D")
        table[f"{arch.ln_f}.bias"] = entry(("ln_f", "bias"), "D", "D")
    for i in range(model_cfg.n_layer):
        for name, path, hf, ours in LAYER_TENSORS:
            table[f"h.{i}.{name}"] = entry((f"h_{i}", *path), hf, ours)
    return table


def params_from_hf(w: dict[str, np.ndarray], model_cfg: ml_collections.ConfigDict,
                   source: str = "the checkpoint") -> dict:
    """The gpt_jax param tree (numpy float32) of HF GPT-1/GPT-2 weights (`load_hf_weights`),
    checked against config.json's sizes; stacked when `model_cfg.scan_layers`. `source`
    (the weight files) names where a missing, extra or misshapen tensor came from."""
    table = tensor_table(model_cfg)
    layers = f"config.json has n_layer={model_cfg.n_layer}"
    missing = [name for name in table if name not in w]
    if missing:
        raise ConversionError(f"{source}: no tensor {missing[0]} ({len(missing)} missing; "
                              f"{layers}, {arch_of(model_cfg).architecture} layout)")
    unused = sorted(set(w) - set(table))
    if unused:
        raise ConversionError(f"{source}: unexpected tensors {unused[:4]} ({layers}; not part "
                              f"of a {arch_of(model_cfg).architecture})")
    params: dict = {}
    for name, (path, hf_dims, shape) in table.items():
        want = tuple(size for _, size in hf_dims)
        if w[name].shape != want:
            field, size = next((f, s) for (f, s), got in zip(hf_dims, w[name].shape)
                               if got != s) if w[name].ndim == len(want) else hf_dims[0]
            raise ConversionError(
                f"{source}: {name} has shape {tuple(w[name].shape)}, but config.json's "
                f"{field}={size} needs {want}")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = w[name].reshape(shape)
    if model_cfg.scan_layers:
        params = jax.tree.map(np.asarray, model_lib.stack_layers(params, model_cfg))
    expected = model_lib.unbox(model_lib.abstract_params(model_cfg))
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(
        lambda x: tuple(x.shape), expected), "tensor_table disagrees with model.GPT"
    return params


def hf_from_params(params: Any, model_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Inverse of `params_from_hf`: HF LM-head-model tensor names -> float32 arrays."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    if model_cfg.scan_layers:
        p = jax.tree.map(np.asarray, model_lib.unstack_layers(p, model_cfg))
    out = {}
    for name, (path, hf_dims, _) in tensor_table(model_cfg).items():
        value = p
        for key in path:
            value = value[key]
        out[HF_PREFIX + name] = np.ascontiguousarray(
            value.reshape(tuple(size for _, size in hf_dims)))
    return out


# ---------------------------------------------------------------- import / export

def check_tokenizer(hf_dir: str, cfg: ml_collections.ConfigDict) -> None:
    """Reads the directory's vocab.json + merges.txt (malformed files fail here, naming the
    file) and checks they are the model type's kind of BPE and fit the embedding table."""
    tok = tokenizer_lib.load_tokenizer(os.path.join(hf_dir, tokenizer_lib.GPT2_VOCAB_FILE))
    if tok.kind != cfg.data.tokenizer:
        raise ConversionError(
            f"{os.path.join(hf_dir, tokenizer_lib.GPT2_VOCAB_FILE)}: a {tok.kind} vocabulary, "
            f"but config.json's model_type needs {cfg.data.tokenizer}'s")
    tokenizer_lib.check_vocab(tok, cfg)


def import_hf(hf_dir: str, workdir: str, scan_layers: bool = False) -> ml_collections.ConfigDict:
    """Writes an HF GPT-1/GPT-2 directory as a gpt_jax workdir (config, step-0 checkpoint,
    tokenizer); returns the config."""
    hf = read_hf_config(hf_dir)
    has_tok = all(os.path.isfile(os.path.join(hf_dir, n)) for n in TOKENIZER_FILES)
    cfg = config_from_hf(hf, workdir, scan_layers, has_tok)
    if has_tok:
        check_tokenizer(hf_dir, cfg)
    wd = Workdir(workdir)
    ckpt = ckpt_lib.Checkpointer(wd, async_save=False)
    try:
        if ckpt.latest_step() is not None:
            raise FileExistsError(f"{ckpt.directory} already holds checkpoints; import into "
                                  "an empty workdir")
        params_np = params_from_hf(load_hf_weights(hf_dir), cfg.model,
                                   ", ".join(_weight_files(hf_dir)[1]))
        mesh = sharding.make_mesh(cfg)
        tx = optim.make_optimizer(cfg)
        boxed = model_lib.abstract_params(cfg.model)
        param_sh = sharding.tree_shardings(boxed, mesh, cfg)
        opt_sh = sharding.tree_shardings(jax.eval_shape(tx.init, boxed), mesh, cfg)
        params = jax.device_put(params_np, param_sh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        wd.write_config(cfg)
        if has_tok and jax.process_index() == 0:
            for name in TOKENIZER_FILES:
                wd.write_bytes(name, (epath.Path(hf_dir) / name).read_bytes())
        meta = {"step": 0, "data_step": 0, "seed": cfg.seed, "data_seed": cfg.data.seed,
                "imported_from": os.path.abspath(hf_dir)}
        ckpt.save(0, params, opt_state, meta, force=True)
    finally:
        ckpt.close()
    return cfg


def export_hf(workdir: str, out_dir: str, step: int | None = None) -> dict:
    """Writes a workdir's checkpoint as an HF GPT-2 (pre-norm) or GPT-1 (post-norm)
    directory (config.json, model.safetensors, and vocab.json/merges.txt if the workdir has
    that model's BPE); returns the HF config."""
    from safetensors.numpy import save

    wd = Workdir(workdir)
    arch = arch_of(wd.read_config().model)  # refuse what HF cannot express before restoring
    run = open_run(wd, step=step)
    cfg = run.cfg
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), run.params)
    try:
        tok = run.tokenizer
    except WorkdirError:
        tok = None
    hf = hf_config(cfg, None if tok is None else tok.eot_id)
    if jax.process_index() != 0:
        return hf
    out = epath.Path(out_dir)  # local or gs://, like the workdir
    atomic_write_bytes(out / "model.safetensors",
                       save(hf_from_params(params, cfg.model), metadata={"format": "pt"}))
    atomic_write_bytes(out / "config.json", json.dumps(hf, indent=2, sort_keys=True).encode())
    if tok is not None and tok.kind == arch.tokenizer:
        tok.save(out_dir)
    return hf


# ---------------------------------------------------------------- CLI

def define_flags() -> None:
    """CLI flags, defined only when run as a program so importing this module is free."""
    from absl import flags
    flags.DEFINE_string("workdir", None, "gpt_jax workdir (written by import, read by export).")
    flags.DEFINE_string("from_hf", None, "Import: a Hugging Face GPT-2 or openai-gpt "
                        "(GPT-1) directory.")
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
        if cfg.data.tokenizer not in ("gpt1", "gpt2"):
            print(f"warning: no {' / '.join(TOKENIZER_FILES)} in {f.from_hf}; copy them into "
                  f"{f.workdir} before sampling or evaluating")
    else:
        export_hf(f.workdir, f.to_hf, f.step)
        print(f"exported {f.workdir} -> {f.to_hf}")


if __name__ == "__main__":
    from gpt_jax import cli
    define_flags()
    cli.run(main, errors=(ConversionError,))
