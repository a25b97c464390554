"""Keeps libtpu quiet on machines without TPU chips; imported first by `gpt_jax/__init__`.

libtpu (the `[tpu]` extra, installed off TPU VMs to compile for slices with
`gpt_jax.compile` / `gpt_jax.plan`) reads the TPU VM's accelerator type and worker
hostnames when a JAX backend starts. Off a TPU VM it finds neither and prints "could not
determine TPU accelerator type" and "INVALID_ARGUMENT: ... TPU_WORKER_HOSTNAMES" on every
command. Placeholders silence it; compile-only topologies (`chips.topology_devices`) name
their own chips and shape, so the placeholder type describes nothing that is compiled.
This module imports no JAX unless libtpu is installed (Beam workers run gpt_jax without
either).
"""

from __future__ import annotations

import importlib.util
import os

# ALLOW_MULTIPLE_LIBTPU_LOAD: with no chip to guard, libtpu's one-process lockfile
# (/tmp/libtpu_lockfile) would only stop two compile-only processes (the plan's workers,
# parallel tests) from loading it at once.
PLACEHOLDERS = {"TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_WORKER_HOSTNAMES": "localhost",
                "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def quiet_libtpu() -> None:
    """Sets `PLACEHOLDERS` (never over the user's own values) where libtpu is installed
    and no TPU chip is attached; a TPU VM is left as it is."""
    if importlib.util.find_spec("libtpu") is None:
        return
    # lazily: jax's own PCI scan for TPU chips (what cloud_tpu_init uses), only with libtpu
    from jax._src import hardware_utils
    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        return
    for name, value in PLACEHOLDERS.items():
        os.environ.setdefault(name, value)
