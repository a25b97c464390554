"""Writes the small synthetic RLHF data set of the CPU example into experiments/rlhf/data/.

    python experiments/rlhf/make_data.py [--out=experiments/rlhf/data] [--seed=0]

A toy world of one-line Python functions, `def mix(x, y):\\n    return x * y + 1\\n`:

  corpus/part*.txt pretraining text: 1,500 functions, blank-line separated, in 10 files
  sft.jsonl        demonstrations {"prompt": "def f(x, y):\\n", "response": "    return ...\\n"}
  rankings.jsonl   {"prompt", "responses": K = 4..9 bodies, "ranking"}; every prompt has an
                   argument x, and the labeller's taste is: more occurrences of "x" is better
                   (rank 0 = most x's), an equal count is a tie
  prompts.jsonl    {"prompt": ...} for PPO rollouts (each with an argument x): the train split
  valid_prompts.jsonl  75 of the 150 headers with an argument x that prompts.jsonl lacks:
                   the validation split, for tuning (PPO's evaluation during training)
  test_prompts.jsonl   the other 75: the test split, read once for PPO's final report and
                   never for a choice

Everything is a pure function of the seed, and the files total about 150 KB.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random

NAMES = ("add", "mul", "mix", "scale", "step", "area", "f", "g", "h", "blend")
ARGS = ("x", "y", "n", "k")
OPS = (" + ", " - ", " * ")
PARTS = 10  # corpus files (data.py splits train/validation by file)


def header(rng: random.Random, with_x: bool = False) -> str:
    args = rng.sample(ARGS, rng.randint(1, 3))
    if with_x and "x" not in args:
        args[rng.randrange(len(args))] = "x"
    return f"def {rng.choice(NAMES)}({', '.join(args)}):\n"


def all_headers(with_x: bool = False) -> list[str]:
    """Every header `header` can draw."""
    return [f"def {name}({', '.join(args)}):\n" for name in NAMES for k in (1, 2, 3)
            for args in itertools.permutations(ARGS, k) if not with_x or "x" in args]


def body(rng: random.Random, prompt: str) -> str:
    """`    return <expr>\\n` over the function's arguments and small constants."""
    names = prompt[prompt.index("(") + 1:prompt.index(")")].split(", ")
    atoms = names + ["1", "2", "3"]
    terms = [rng.choice(atoms) for _ in range(rng.randint(1, 4))]
    expr = terms[0] + "".join(rng.choice(OPS) + t for t in terms[1:])
    return f"    return {expr}\n"


def ranking(responses: list[str]) -> list[int]:
    """Rank 0 for the most x's; equal counts share a rank (a tie)."""
    counts = sorted({r.count("x") for r in responses}, reverse=True)
    return [counts.index(r.count("x")) for r in responses]


def write(out: str, seed: int = 0) -> dict[str, str]:
    """Writes the files under `out`; returns their paths by name."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "corpus"), exist_ok=True)
    names = [f"corpus/part{i}.txt" for i in range(PARTS)]
    paths = {name: os.path.join(out, name) for name in
             (*names, "sft.jsonl", "rankings.jsonl", "prompts.jsonl", "valid_prompts.jsonl",
              "test_prompts.jsonl")}
    for part in range(PARTS):
        with open(paths[f"corpus/part{part}.txt"], "w") as f:
            for _ in range(1500 // PARTS):
                prompt = header(rng)
                f.write(prompt + body(rng, prompt) + "\n")
    with open(paths["sft.jsonl"], "w") as f:
        for _ in range(400):
            prompt = header(rng)
            f.write(json.dumps({"prompt": prompt, "response": body(rng, prompt)}) + "\n")
    with open(paths["rankings.jsonl"], "w") as f:
        for _ in range(240):
            prompt = header(rng, with_x=True)
            responses = [body(rng, prompt) for _ in range(rng.randint(4, 9))]
            f.write(json.dumps({"prompt": prompt, "responses": responses,
                                "ranking": ranking(responses)}) + "\n")
    seen = set()
    with open(paths["prompts.jsonl"], "w") as f:
        for _ in range(200):
            prompt = header(rng, with_x=True)
            seen.add(prompt)
            f.write(json.dumps({"prompt": prompt}) + "\n")
    unseen = sorted(set(all_headers(with_x=True)) - seen)
    rng.shuffle(unseen)  # last: the files above keep the draws they had before the split
    for name, split in (("valid_prompts.jsonl", unseen[:len(unseen) // 2]),
                        ("test_prompts.jsonl", unseen[len(unseen) // 2:])):
        with open(paths[name], "w") as f:
            for prompt in sorted(split):
                f.write(json.dumps({"prompt": prompt}) + "\n")
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write(args.out, args.seed).values():
        print(f"{path}: {os.path.getsize(path):,} bytes")
