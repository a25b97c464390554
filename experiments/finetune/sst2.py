"""GPT-1 fine-tuning on SST-2 (TFDS glue/sst2): <s> sentence <e> -> 2 classes."""

from gpt_jax.config import finetune_base


def get_config():
    cfg = finetune_base("classification", num_outputs=2)
    cfg.name = "finetune-sst2"
    cfg.finetune.tfds_name = "glue/sst2"
    cfg.finetune.max_len = 128
    return cfg
