"""`config.validate` names the offending field and what would be valid."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from gpt_jax.config import ConfigError, validate


@pytest.mark.parametrize("field,value,message", [
    ("model.d_model", 33, "model.d_model=33 is not divisible by model.n_head=2"),
    ("model.norm", "mid", "model.norm='mid' is not one of ['pre', 'post']"),
    ("model.remat", "some", "model.remat='some' is not one of"),
    ("model.n_layer", 0, "model.n_layer=0 must be a positive integer"),
    ("model.attn_pdrop", 1.0, "model.attn_pdrop=1.0 must be in [0, 1)"),
    ("optim.schedule", "warmup", "optim.schedule='warmup' is not one of"),
    ("optim.peak_lr", -1.0, "optim.peak_lr=-1.0 must be > 0"),
    ("train.microbatches", 3, "train.batch_size=8 is not divisible by train.microbatches=3"),
    ("data.source", "web", "data.source='web' is not one of ['stdlib', 'text', 'tfds', 'hf']"),
    ("data.tokenizer", "file", "data.tokenizer_path=''"),
    ("mesh.model", 3, "model.n_head=2 is not divisible by mesh.model=3"),
    ("mesh.data", 0, "mesh.data=0 must be -1"),
])
def test_errors_name_the_field(field, value, message):
    cfg = tiny_config()
    section, name = field.split(".")
    cfg[section][name] = value
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_scan_alternating_needs_even_layers():
    cfg = tiny_config(n_layer=3, attention_pattern="alternating", scan_layers=True)
    with pytest.raises(ConfigError, match="model.n_layer=3 must be even"):
        validate(cfg)


def test_valid_config_passes():
    cfg = tiny_config()
    assert validate(cfg) is cfg
