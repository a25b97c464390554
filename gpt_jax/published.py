"""The peers' published endpoints for the recipes, each with its source, for
`python -m gpt_jax.plot --reference=published:<recipe>`: how far a run is from the
number it is meant to reproduce, at a glance (docs/recipes/gpt2_124m.md has the table).

Only validation losses are drawn today: HellaSwag's accuracies (from `evaluate`, or in the
loop with `train.eval_tasks=experiments/eval/hellaswag_official.json`) have no panel in
the plot yet, so its published figures are listed here with their sources, not drawn.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A published figure: `metric` (a metrics.jsonl key) reached `value` after `tokens`
    training tokens (None: a released model's score, not a point on a curve)."""

    label: str
    metric: str
    value: float
    tokens: float | None
    source: str


PUBLISHED: dict[str, tuple[Endpoint, ...]] = {
    "124m_fineweb": (
        Endpoint("llm.c 124M, FineWeb 10B", "eval_loss", 3.28, 18_865 * 524_288,
                 "karpathy/llm.c README -> discussion #481 (as issue 30 quotes it; not "
                 "read at its source here)"),
        Endpoint("OpenAI GPT-2 124M, llm.c's HellaSwag", "hellaswag/llmc_acc_norm", 0.2955,
                 None, "karpathy/llm.c dev/data/hellaswag.py docstring"),
        Endpoint("OpenAI GPT-2 124M, lm-eval's HellaSwag", "hellaswag/lmeval_acc_norm",
                 0.3114, None, "karpathy/llm.c dev/data/hellaswag.py docstring"),
    ),
    "124m_owt": (
        Endpoint("nanoGPT 124M, OpenWebText 600k iterations", "eval_loss", 2.85,
                 600_000 * 491_520, "karpathy/nanoGPT README"),
        Endpoint("OpenAI GPT-2 124M on OpenWebText", "eval_loss", 3.12, None,
                 "karpathy/nanoGPT README, baselines"),
    ),
}


def endpoints(name: str) -> tuple[Endpoint, ...]:
    """The endpoints of recipe `name` ('published:' prefix allowed); ValueError naming the
    recipes there are when it has none."""
    key = name.removeprefix("published:")
    if key not in PUBLISHED:
        raise ValueError(f"--reference={name}: no published endpoints for {key!r}; known: "
                         f"{', '.join('published:' + k for k in PUBLISHED)}")
    return PUBLISHED[key]
