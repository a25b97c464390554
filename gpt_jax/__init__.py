"""gpt_jax: GPT-1/2/3 and InstructGPT in JAX/Flax."""

from gpt_jax import libtpu_env

libtpu_env.quiet_libtpu()  # before any JAX backend starts
