"""GPT-1 fine-tuning on RTE (TFDS glue/rte): <s> premise $ hypothesis <e> -> 2 classes."""

from gpt_jax.config import finetune_base


def get_config():
    cfg = finetune_base("entailment", num_outputs=2)
    cfg.name = "finetune-rte"
    cfg.finetune.tfds_name = "glue/rte"
    cfg.finetune.max_len = 256
    return cfg
