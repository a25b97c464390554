"""GPT-2 (Radford et al. 2019): pre-norm, 1024 context, 50,257-token byte-level BPE.

`--config=experiments/gpt2.py:small|medium|large|xl`. The paper gives batch 512
but not the learning rates ("hand-tuned"); we use GPT-3's rate for the
nearest size and GPT-3's optimizer (betas 0.9/0.95, decay 0.1, clip 1.0) with
a 2,000-step warmup and cosine decay to 10%: a documented choice.

`:124m_fineweb` and `:124m_owt` are the two public GPT-2 124M reproductions, each with its
peer's published hyperparameters and validation split (sources cited line by line below;
the recipe, stage by stage: docs/recipes/gpt2_124m.md):
- `124m_fineweb`: llm.c (karpathy/llm.c scripts/run_gpt2_124M.sh, train_gpt2.cu at f1e2ace)
  on FineWeb sample-10BT; its README's discussion #481 is quoted for FineWeb val loss ~3.28
  (not read at the source here: docs/recipes/gpt2_124m.md says what was).
- `124m_owt`: nanoGPT (karpathy/nanoGPT config/train_gpt2.py over train.py's defaults, at
  3adf61e) on OpenWebText; its README reports val loss ~2.85 after the 600k iterations.
Both read GPT-2's own BPE files (vocab.json, merges.txt) from `data.tokenizer_path`
(default `data/gpt2`: copy them there, e.g. from `python -m gpt_jax.convert --from_hf`'s
workdir or the `openai-community/gpt2` repository). Where gpt_jax differs from the peer:
every linear layer and LayerNorm has a bias (nanoGPT trains with bias=False); the
vocabulary is GPT-2's 50,257 rows (both peers pad to 50,304 for speed); `<|endoftext|>`
follows each document (llm.c puts it before; nanoGPT after, as here); the lr warms up from
0 (llm.c and nanoGPT start at peak/warmup).
"""

from gpt_jax.config import base_config

SIZES = {  # name: (n_layer, d_model, n_head, peak_lr)
    "small": (12, 768, 12, 6e-4),
    "medium": (24, 1024, 16, 3e-4),
    "large": (36, 1280, 20, 2.5e-4),
    "xl": (48, 1600, 25, 2e-4),
}
RECIPES = ("124m_fineweb", "124m_owt")
VARIANTS = tuple(SIZES) + RECIPES

GPT2_BPE_DIR = "data/gpt2"  # GPT-2's vocab.json and merges.txt (module docstring)
FINEWEB_10BT = "hf://datasets/HuggingFaceFW/fineweb/sample/10BT/*.parquet"
# The Hub's own parquet conversion of the `openwebtext` dataset that nanoGPT's prepare.py
# loads (8,013,769 documents), in its row order; not opened here (no network).
OPENWEBTEXT = "hf://datasets/Skylion007/openwebtext@refs/convert/parquet/plain_text/train/*.parquet"


def get_config(size: str = "small"):
    if size not in VARIANTS:
        raise ValueError(f"experiments/gpt2.py:{size} is not one of {list(VARIANTS)}")
    if size in RECIPES:
        return llmc_fineweb() if size == "124m_fineweb" else nanogpt_owt()
    n_layer, d_model, n_head, lr = SIZES[size]
    cfg = base_config()
    cfg.name = f"gpt2-{size}"
    m = cfg.model
    m.vocab_size, m.context = 50257, 1024
    m.n_layer, m.n_head, m.d_model, m.d_ff = n_layer, n_head, d_model, 4 * d_model
    m.norm = "pre"
    m.dtype = "bfloat16"  # compute on accelerators; params and Adam state stay float32
    o = cfg.optim
    o.schedule, o.peak_lr, o.warmup_steps, o.final_lr_frac = "cosine", lr, 2000, 0.1
    cfg.train.batch_size = 512
    cfg.train.steps = 600_000
    return cfg


def _gpt2_124m(name: str, data_files: str):
    """GPT-2 small (12 x 768, 12 heads, context 1024) without dropout (llm.c has none;
    nanoGPT's train.py: dropout = 0.0), AdamW 0.9/0.95/1e-8, decay 0.1 on matrices and
    embeddings only (both peers), clip 1.0, cosine schedule; GPT-2 BPE over parquet text."""
    cfg = get_config("small")
    cfg.name = name
    m = cfg.model
    m.embd_pdrop = m.resid_pdrop = m.attn_pdrop = 0.0
    o = cfg.optim
    o.schedule, o.peak_lr, o.warmup_steps = "cosine", 6e-4, 0
    o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip = 0.9, 0.95, 1e-8, 0.1, 1.0
    d = cfg.data
    d.update(dict(source="hf", hf_path="parquet", hf_data_files=data_files,
                  hf_text_field="text", tokenizer="gpt2", tokenizer_path=GPT2_BPE_DIR))
    return cfg


def llmc_fineweb():
    """llm.c's GPT-2 124M: `mpirun -np 8 ./train_gpt2cu -b 64 -t 1024 -d 524288 -c 0.1
    -l 0.0006 -q 0.0 -u 700 -v 250 -h 1 ...` (scripts/run_gpt2_124M.sh)."""
    cfg = _gpt2_124m("gpt2-124m-fineweb", FINEWEB_10BT)
    batch_tokens = 524_288  # -d 524288: 8 GPUs x -b 64 x -t 1024, no accumulation
    o, t = cfg.optim, cfg.train
    o.peak_lr = 6e-4  # -l 0.0006
    o.warmup_tokens = 700 * batch_tokens  # -u 700 steps
    o.final_lr_frac = 0.0  # -q 0.0: cosine (-k's default) to 0 at the last step
    o.weight_decay = 0.1  # -c 0.1; betas 0.9/0.95, eps 1e-8, clip 1.0 in train_gpt2.cu
    t.batch_size, t.microbatches = batch_tokens // 1024, 1
    # 18,865 steps, the script's header: one epoch (no -x) of the train shards, 9.89B tokens
    t.tokens = 18_865 * batch_tokens
    t.steps = 18_865
    t.eval_every = 250  # -v 250
    t.eval_batches = 20  # train_gpt2.cu's val_max_steps default: 20 x 512 rows, 10.5M tokens
    t.ckpt_every = 5000  # -n 5000
    # fineweb.py writes its first shard (10^8 tokens, the first documents in the dataset's
    # order, the document at the boundary split across it and the next) as validation, the
    # rest as training. Here the first `val_docs` documents: 150,000 of them hold about
    # 100M GPT-2 tokens if a FineWeb document averages ~670 (an estimate, not counted here;
    # prepare's manifest reports the validation tokens, so tune val_docs to read 100M).
    cfg.data.update(dict(val_split_rule="first", val_docs=150_000))
    return cfg


def nanogpt_owt():
    """nanoGPT's GPT-2 124M: `torchrun --standalone --nproc_per_node=8 train.py
    config/train_gpt2.py` (the config's values over train.py's defaults)."""
    cfg = _gpt2_124m("gpt2-124m-owt", OPENWEBTEXT)
    batch_tokens = 491_520  # 12 batch x 1024 block x 5 grad accum x 8 GPUs
    o, t = cfg.optim, cfg.train
    o.peak_lr = 6e-4  # learning_rate
    o.warmup_tokens = 2000 * batch_tokens  # warmup_iters = 2000
    o.final_lr_frac = 0.1  # min_lr = 6e-5; lr_decay_iters = max_iters: decay ends at the end
    o.weight_decay = 0.1  # weight_decay = 1e-1; beta1 0.9, beta2 0.95, grad_clip 1.0
    t.batch_size, t.microbatches = batch_tokens // 1024, 5  # 480 rows, 5 accumulation steps
    t.tokens = 600_000 * batch_tokens  # max_iters = 600000: 294.9B tokens
    t.steps = 600_000
    t.eval_every = 1000  # eval_interval = 1000
    t.eval_batches = 25  # eval_iters = 200 batches of 12 rows: 2,400 rows, 25 x 96 here
    t.ckpt_every = 1000
    # prepare.py: load_dataset("openwebtext")["train"].train_test_split(test_size=0.0005,
    # seed=2357, shuffle=True): 4,007 validation documents, the first ceil(0.0005 n) of
    # numpy's default_rng(2357).permutation(n), the same set here (data/sources.py
    # `permutation_val`) if these parquet files hold the same rows in the same order.
    # nanoGPT writes both splits in the permuted order; the store keeps the files' order,
    # which nanoGPT's random windows (torch.randint over train.bin) do not see.
    cfg.data.update(dict(val_split_rule="permutation", val_fraction=0.0005,
                         val_split_seed=2357))
    return cfg
