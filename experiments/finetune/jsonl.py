"""Any task from JSONL files: `--config=experiments/finetune/jsonl.py:classification`
with `--config.finetune.train_jsonl=train.jsonl --config.finetune.val_jsonl=val.jsonl`.

One JSON object per line with the task's fields and a `label`:
  classification   {"text": ..., "label": class}
  entailment       {"premise": ..., "hypothesis": ..., "label": class}
  similarity       {"a": ..., "b": ..., "label": score or class}
  multiple_choice  {"context": ..., "choices": [...], "label": index of the right choice}
"""

from gpt_jax.config import finetune_base

VARIANTS = ("classification", "entailment", "similarity", "multiple_choice")  # finetune.TASK_TYPES


def get_config(task_type: str = "classification"):
    if task_type not in VARIANTS:
        raise ValueError(f"experiments/finetune/jsonl.py:{task_type} is not one of "
                         f"{list(VARIANTS)}")
    cfg = finetune_base(task_type, num_outputs=2)
    cfg.name = f"finetune-{task_type}"
    return cfg
