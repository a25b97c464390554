"""What sealing a checkpoint with checksums costs: save time vs checksum time.

    python benchmarks/checkpoint_bench.py --config=experiments/tiny.py
    python benchmarks/checkpoint_bench.py --config=experiments/gpt2.py:small

Saves the config's freshly initialised params and AdamW state with the loop's
Checkpointer (synchronously, so the save time is the whole write, the seal inside its
commit included), then times `checkpoint.write_checksums` again on the saved step (sha256
of every file the save wrote, read back from disk) and `Checkpointer.verify` (what a
restore adds). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from gpt_jax import checkpoint, loop, sharding
from gpt_jax import config as config_lib

config_flags.DEFINE_config_file("config", None, "Experiment config file.")
flags.DEFINE_integer("repeats", 3, "Saves to time (the median is reported).")


def main(argv: list[str]) -> None:
    del argv
    cfg = config_lib.validate(flags.FLAGS.config)
    cfg.mesh.data, cfg.mesh.model, cfg.mesh.fsdp = -1, 1, False
    trainer = loop.build_trainer(cfg, sharding.make_mesh(cfg))
    state = trainer.init_state(jax.random.key(0))
    jax.block_until_ready(state)
    save_s, seal_s, verify_s, size = [], [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint.Checkpointer(tmp, keep=flags.FLAGS.repeats + 1, async_save=False)
        for step in range(1, flags.FLAGS.repeats + 1):
            t = time.perf_counter()
            ckpt.save(step, state["params"], state["opt_state"], {"step": step}, force=True)
            save_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            checkpoint.write_checksums(os.path.join(ckpt.directory, str(step)))
            seal_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert ckpt.verify(step) is None
            verify_s.append(time.perf_counter() - t)
        step_dir = os.path.join(ckpt.directory, "1")
        size = sum(os.path.getsize(os.path.join(d, f))
                   for d, _, fs in os.walk(step_dir) for f in fs)
        ckpt.manager.close()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(json.dumps({"config": cfg.name, "checkpoint_mb": round(size / 2**20, 1),
                      "save_s": round(med(save_s), 3), "checksum_s": round(med(seal_s), 3),
                      "verify_s": round(med(verify_s), 3),
                      "checksum_over_save": round(med(seal_s) / med(save_s), 3),
                      "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
