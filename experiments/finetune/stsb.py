"""GPT-1 fine-tuning on STS-B (TFDS glue/stsb): both orders <s> a $ b <e>, final states
added, one linear output regressed on the 0-5 similarity score (Pearson/Spearman)."""

from gpt_jax.config import finetune_base


def get_config():
    cfg = finetune_base("similarity", num_outputs=1)
    cfg.name = "finetune-stsb"
    cfg.finetune.tfds_name = "glue/stsb"
    cfg.finetune.max_len = 128
    return cfg
