"""Multiple choice on HellaSwag (TFDS hellaswag): <s> context $ ending_k <e> for each of
the 4 endings, a scalar per choice, softmax over choices."""

from gpt_jax.config import finetune_base


def get_config():
    cfg = finetune_base("multiple_choice", num_outputs=1)
    cfg.name = "finetune-hellaswag"
    cfg.finetune.tfds_name = "hellaswag"
    cfg.finetune.max_len = 160
    return cfg
