"""GPT-3 (Brown et al. 2020), the eight sizes of Table 2.1.

`--config=experiments/gpt3.py:small|medium|large|xl|2.7b|6.7b|13b|175b`.
GPT-2 architecture with alternating dense / locally banded attention. The band
width is unstated; we use a window of 256 (the Sparse Transformer used 128).
Adam 0.9/0.95/1e-8, clip 1.0, weight decay 0.1; linear warmup over 375M tokens,
cosine to 10% at 260B tokens, then flat; 300B tokens. Batch ramp from 32k
tokens over the first 4B (<=760M), 8B (1.3B-13B) or 12B (175B) tokens: the
paper says "4-12B depending on model size" without the split, so that is ours.
All four are tokens actually consumed, the ramp's small early steps included
(`python -m gpt_jax.schedule --config=experiments/gpt3.py:175b` prints them).
xl prints 24 heads of 128, which does not divide 2048; we use 16 x 128.
13b prints d_model 5140, a typo for 5120 (Table D.1's 12,850M fits 5120).
The paper states no dropout; we keep GPT-2's embedding and residual dropout (0.1) but
not attention dropout, which the flash-attention kernels (splash on TPU, cuDNN on GPU)
do not implement: with it, every layer would fall back to the XLA path.
"""

import ml_collections

from gpt_jax.config import base_config

CONTEXT = 2048
SIZES = {  # name: (n_layer, d_model, n_head, batch tokens, peak_lr, ramp tokens)
    "small": (12, 768, 12, 2**19, 6.0e-4, 4_000_000_000),
    "medium": (24, 1024, 16, 2**19, 3.0e-4, 4_000_000_000),
    "large": (24, 1536, 16, 2**19, 2.5e-4, 4_000_000_000),
    "xl": (24, 2048, 16, 2**20, 2.0e-4, 8_000_000_000),
    "2.7b": (32, 2560, 32, 2**20, 1.6e-4, 8_000_000_000),
    "6.7b": (32, 4096, 32, 2**21, 1.2e-4, 8_000_000_000),
    "13b": (40, 5120, 40, 2**21, 1.0e-4, 8_000_000_000),
    "175b": (96, 12288, 96, 1536 * CONTEXT, 0.6e-4, 12_000_000_000),  # 3.2M tokens
}
VARIANTS = tuple(SIZES)


def get_config(size: str = "small"):
    if size not in VARIANTS:
        raise ValueError(f"experiments/gpt3.py:{size} is not one of {list(VARIANTS)}")
    n_layer, d_model, n_head, batch_tokens, lr, ramp = SIZES[size]
    cfg = base_config()
    cfg.name = f"gpt3-{size}"
    m = cfg.model
    m.vocab_size, m.context = 50257, CONTEXT
    m.n_layer, m.n_head, m.d_model, m.d_ff = n_layer, n_head, d_model, 4 * d_model
    m.attention_pattern, m.window = "alternating", 256
    m.attn_pdrop = 0.0  # not in the paper; the flash kernels (splash, cuDNN) have none
    m.dtype, m.scan_layers, m.remat = "bfloat16", True, "dots_with_no_batch_dims_saveable"
    o = cfg.optim
    o.schedule, o.peak_lr, o.final_lr_frac = "cosine", lr, 0.1
    o.warmup_tokens, o.decay_tokens = 375_000_000, 260_000_000_000
    o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip = 0.9, 0.95, 1e-8, 0.1, 1.0
    o.batch_ramp_tokens, o.batch_ramp_start_tokens = ramp, 32768
    t = cfg.train
    t.batch_size = batch_tokens // CONTEXT
    t.microbatches = t.batch_size // 16  # ramp granularity: 16 x 2048 = 32k tokens
    t.tokens = 300_000_000_000  # `config.validate` sets train.steps from it
    t.steps = 300_000_000_000 // batch_tokens  # at the full batch; the ramp adds a few
    data_recipe(cfg.data)
    return cfg


# Table 2.2's datasets as their public stand-ins on the Hugging Face hub. OpenAI's Common
# Crawl crawl, WebText2 and Books1/2 are not public: FineWeb is Common Crawl text, OpenWebText
# replicates WebText, BookCorpus and PG-19 stand in for Books1 and Books2.
SOURCES = {  # name: (hf_path, hf_name, weight in the training mix)
    "common_crawl": ("HuggingFaceFW/fineweb", "CC-MAIN-2019-30", 0.60),
    "webtext2": ("Skylion007/openwebtext", "", 0.22),
    "books1": ("bookcorpus/bookcorpus", "", 0.08),
    "books2": ("deepmind/pg19", "", 0.08),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en", 0.03),
}


def data_recipe(d: ml_collections.ConfigDict) -> None:
    """GPT-3 Appendix A: five sources, fuzzy dedup within each, Common Crawl quality-filtered
    against WebText/Wikipedia/books, a 60/22/8/8/3 mixture. Prepare the store with
    `python -m gpt_jax.prepare --config=experiments/gpt3.py:175b --output=gs://B/gpt3 --
    --runner=DataflowRunner ...` (README "Data at scale"), then train with
    `--config.data.store=gs://B/gpt3`. For GPT-3's own vocabulary add
    `--config.data.tokenizer=gpt2 --config.data.tokenizer_path=DIR` (GPT-2's BPE files)."""
    d.sources = {name: {"source": "hf", "hf_path": path, "hf_name": name_}
                 for name, (path, name_, _) in SOURCES.items()}
    # Table 2.2's rounded percentages sum to 101%; the mixture needs them to sum to 1.
    total = sum(w for _, _, w in SOURCES.values())
    d.mixture = {name: w / total for name, (_, _, w) in SOURCES.items()}
    d.dedup.exact = d.dedup.fuzzy = True  # within each dataset, Spark MinHashLSH, 10 hashes
    d.quality.update(enabled=True, sources="common_crawl", raw_sources="common_crawl",
                     reference_sources="webtext2,wikipedia,books1,books2")
