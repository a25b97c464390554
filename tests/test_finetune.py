"""GPT-1 fine-tuning: the four input layouts, and a tiny model learning a task."""

from __future__ import annotations

import json
import random
import sysconfig

import numpy as np
import pytest
from test_optim import experiment

from gpt_jax import finetune, train
from gpt_jax.finetune import Specials

SP = Specials(100, 101, 102)


def enc(text):
    return [ord(c) - ord("a") for c in text]


def test_layouts():
    assert finetune.transform("classification", {"text": "abc"}, enc, SP, 16) == [
        [100, 0, 1, 2, 102]]
    assert finetune.transform("entailment", {"premise": "ab", "hypothesis": "c"}, enc, SP,
                              16) == [[100, 0, 1, 101, 2, 102]]
    assert finetune.transform("similarity", {"a": "ab", "b": "c"}, enc, SP, 16) == [
        [100, 0, 1, 101, 2, 102], [100, 2, 101, 0, 1, 102]]
    assert finetune.transform("multiple_choice", {"context": "a", "choices": ["b", "cd"]},
                              enc, SP, 16) == [[100, 0, 101, 1, 102], [100, 0, 101, 2, 3, 102]]


def test_truncation_keeps_specials_and_trims_the_longest_part():
    out = finetune.transform("entailment", {"premise": "abcdefgh", "hypothesis": "xy"}, enc,
                             SP, 8)
    assert out == [[100, 0, 1, 2, 101, 23, 24, 102]]
    assert len(finetune.transform("classification", {"text": "a" * 50}, enc, SP, 8)[0]) == 8


def test_pack():
    seqs = [finetune.transform("multiple_choice", {"context": "a", "choices": ["b", "cd"]},
                               enc, SP, 8)]
    arrays = finetune.pack(seqs, [1], 8)
    assert arrays["tokens"].shape == (1, 2, 8)
    assert arrays["extract"].tolist() == [[4, 5]]
    assert arrays["tokens"][0, 1, 5] == SP.extract
    assert arrays["mask"][0, 0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


def test_scores():
    assert finetune.scores(np.array([1, 0, 1]), np.array([1, 1, 1]), False) == {
        "accuracy": pytest.approx(2 / 3)}
    s = finetune.scores(np.array([0.1, 0.5, 0.9, 2.0]), np.array([0.0, 1.0, 2.0, 3.0]), True)
    assert s["spearman"] == pytest.approx(1.0) and 0.9 < s["pearson"] < 1.0


WORDS = "the a json value key list object string number array parse dump load".split()


def synthetic(path, n, seed):
    """Learnable: label 1 iff the sentence ends in 'yes' rather than 'no'."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.randrange(2)
            words = [rng.choice(WORDS) for _ in range(rng.randrange(3, 8))]
            words.append("yes" if label else "no")
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    cfg = experiment("tiny", "char")
    # vocab 256 (json's characters fit): the accuracy bar below was set on this model
    cfg.model.update(dict(context=64, n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=256))
    cfg.data.update(dict(source="text", data_dir=str(root / "data"),
                         text_glob=f"{sysconfig.get_paths()['stdlib']}/json/*.py"))
    cfg.train.update(dict(steps=30, batch_size=8, eval_every=30, ckpt_every=30,
                          sample_tokens=0))
    train.train(cfg, str(root / "run"))
    return str(root / "run")


@pytest.mark.parametrize("lm_coef", [0.5, 0.0])
def test_learns_a_synthetic_task(pretrained, tmp_path, lm_coef):
    synthetic(tmp_path / "train.jsonl", 320, seed=0)
    synthetic(tmp_path / "val.jsonl", 64, seed=1)
    cfg = experiment("finetune/jsonl", "classification")
    cfg.finetune.update(dict(train_jsonl=str(tmp_path / "train.jsonl"),
                             val_jsonl=str(tmp_path / "val.jsonl"), max_len=48, epochs=12,
                             lm_coef=lm_coef))
    cfg.optim.peak_lr = 3e-3
    cfg.train.update(dict(batch_size=16, eval_every=120, ckpt_every=120))
    final = finetune.finetune(cfg, pretrained, str(tmp_path / "ft"))
    assert final["accuracy"] >= 0.85, final  # chance is 0.5
    assert np.isfinite(final["loss"])


def test_tfds_glue_with_mock_data(pretrained, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = experiment("finetune/sst2")
    cfg.finetune.update(dict(max_len=32, epochs=1, tfds_data_dir=str(tmp_path / "tfds")))
    cfg.train.update(dict(batch_size=8, eval_every=5, ckpt_every=5))
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        final = finetune.finetune(cfg, pretrained, str(tmp_path / "ft"))
    assert 0.0 <= final["accuracy"] <= 1.0 and np.isfinite(final["eval_loss"])
