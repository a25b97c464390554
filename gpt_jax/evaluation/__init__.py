"""Evaluation formats and conventions, independent of any model: each module reads one
benchmark's own files and turns them into (context ids, continuation ids) requests and its
metrics (the scoring itself is `gpt_jax.evaluate.Scorer`).

- `hellaswag`: the official `hellaswag_{train,val}.jsonl`, scored both as llm.c and as
  lm-evaluation-harness do.
"""
