"""Provenance: every checkpoint records what it was trained with, and a resume whose inputs
changed (config, config.json, tokenizer, token store, the schedule) stops in one line
unless --accept_changes takes the change; a run extends with a continuous learning rate."""

from __future__ import annotations

import glob
import hashlib
import json
import shutil

import ml_collections
import numpy as np
import pytest
from conftest import record_fault, run_python
from test_train import train_args as _train_args

from gpt_jax import config as config_lib
from gpt_jax import optim, provenance

# A short warmup, so the 20-step cosine decays and a longer train.steps moves the lr.
BASE = {"optim.warmup_steps": 2, "train.sample_tokens": 0}


def train_args(workdir, data_dir, steps=20, *extra):
    return _train_args(workdir, data_dir, steps, **BASE) + list(extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One 20-step run (checkpoints 10 and 20) that every test copies."""
    root = tmp_path_factory.mktemp("provenance")
    out = run_python(train_args(root / "base", root / "data"))
    assert out.returncode == 0, out.stderr[-3000:]
    return {"root": root, "data": root / "data", "run": root / "base"}


def copy_run(base, name):
    workdir = base["root"] / name
    shutil.copytree(base["run"], workdir)
    return workdir


def rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def meta(workdir, step):
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def error_line(out):
    lines = out.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def refused(out, workdir, before):
    """Exit 2 with one `error:` line, before anything in the workdir was written."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert error_line(out).startswith("error: ")
    assert "Traceback" not in out.stderr
    assert (workdir / "metrics.jsonl").read_bytes() == before["metrics"]
    assert (workdir / "config.json").read_bytes() == before["config"]
    return error_line(out)


def snapshot(workdir):
    return {"metrics": (workdir / "metrics.jsonl").read_bytes(),
            "config": (workdir / "config.json").read_bytes()}


def lr_at(config_plain, step):
    return float(optim.learning_rate_schedule(ml_collections.ConfigDict(config_plain))(step))


# ---------------------------------------------------------------------------- recording


def test_checkpoints_and_metrics_record_provenance(base):
    run = base["run"]
    record = meta(run, 20)["provenance"]
    cfg = json.loads((run / "config.json").read_text())
    assert record["config"] == cfg
    assert record["config_sha256"] == hashlib.sha256(
        json.dumps(cfg, indent=2, sort_keys=True).encode()).hexdigest()
    tok = json.loads((run / "tokenizer.json").read_text())
    assert tok["kind"] == record["tokenizer_kind"] == "char"
    [path] = glob.glob(str(base["data"] / "tokens" / "*" / "manifest.json"))
    manifest = json.loads(open(path).read())
    assert record["store_fingerprint"] == provenance.store_fingerprint(manifest)
    assert record["gpt_jax_version"]
    first = rows(run)[0]
    assert first["step"] == 0 and set(first) == {"step", "provenance"}
    assert first["provenance"]["config_sha256"] == record["config_sha256"]
    assert first["provenance"]["changes"] == []
    assert meta(run, 10)["provenance"] == record


# ---------------------------------------------------------------------------- refusals


def test_edited_config_json_is_refused(base):
    workdir = copy_run(base, "edited")
    cfg = json.loads((workdir / "config.json").read_text())
    cfg["optim"]["peak_lr"] = 3e-4
    (workdir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    before = snapshot(workdir)
    out = run_python(train_args(workdir, base["data"]))
    line = refused(out, workdir, before)
    assert "config.json: optim.peak_lr was edited to 0.0003 after checkpoint 20, which was " \
           "trained with 0.003" in line, line
    record_fault("a value in the workdir's `config.json` edited, then the run resumed"
                 " (`test_provenance`)",
                 "exit 2 before compute, one line naming config.json and the field; "
                 "config.json and metrics untouched", "passed")


@pytest.mark.parametrize("override,expect", [
    # tiny decays to 0 at its last step (20 here), where both rates are 0: the first
    # trained step whose rate differs is named instead
    ("optim.peak_lr=0.001", "optim.peak_lr changed from 0.003 to 0.001 since checkpoint 20, "
                            "so the learning rate of trained step 1 would be"),
    ("optim.b2=0.99", "optim.b2 changed from 0.95 to 0.99 since checkpoint 20; add "
                      "--accept_changes=config"),
])
def test_changed_override_is_refused(base, override, expect):
    workdir = copy_run(base, "override-" + override.split("=")[0])
    before = snapshot(workdir)
    out = run_python(train_args(workdir, base["data"], 20, f"--config.{override}"))
    line = refused(out, workdir, before)
    assert expect in line, line
    if override.startswith("optim.peak_lr"):
        record_fault("`--config.optim.peak_lr` (or another config field) changed on resume"
                     " (`test_provenance`)",
                     "exit 2 before compute, one line naming the field, old and new value "
                     "(and the lr jump for a schedule field)", "passed")


def test_replaced_workdir_tokenizer_is_refused(base):
    workdir = copy_run(base, "tokenizer")
    tok = json.loads((workdir / "tokenizer.json").read_text())
    tok["chars"] = tok["chars"].replace("~", "\u00e9")  # one character another
    (workdir / "tokenizer.json").write_text(json.dumps(tok))
    before = snapshot(workdir)
    out = run_python(train_args(workdir, base["data"]))
    line = refused(out, workdir, before)
    assert f"{workdir / 'tokenizer.json'} sha256" in line, line
    assert "differs from the one checkpoint 20 was trained with" in line, line
    record_fault("the workdir's tokenizer replaced, then the run resumed"
                 " (`test_provenance`)",
                 "exit 2 before compute, one line naming the tokenizer file", "passed")


def copy_store(base, name, change=False):
    """A copy of the run's token store; with `change`, its training tokens reversed (a
    complete, consistent store of other data, made with the same tokenizer)."""
    [source] = glob.glob(str(base["data"] / "tokens" / "*"))
    target = base["root"] / name
    shutil.copytree(source, target)
    if change:
        manifest = json.loads((target / "manifest.json").read_text())
        [shard] = manifest["sources"]["text"]["splits"]["train"]["shards"]
        data = (target / shard["file"]).read_bytes()
        tokens = np.frombuffer(data, np.uint16)[::-1].tobytes()
        (target / shard["file"]).write_bytes(tokens)
        shard["sha256"] = hashlib.sha256(tokens).hexdigest()
        (target / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return target


def test_other_token_store_is_refused_a_copy_is_taken(base):
    workdir = copy_run(base, "store")
    other = copy_store(base, "store_other", change=True)
    before = snapshot(workdir)
    out = run_python(train_args(workdir, base["data"], 20, f"--config.data.store={other}"))
    line = refused(out, workdir, before)
    assert f"the token store {other} (fingerprint" in line, line
    assert "is not the one checkpoint 20 was trained with" in line, line

    same = copy_store(base, "store_copy")
    out = run_python(train_args(workdir, base["data"], 20, f"--config.data.store={same}"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "note: data.store changed from '' to" in out.stderr
    record_fault("`data.store` pointed at another store on resume (a copy of the same store)"
                 " (`test_provenance`)",
                 "exit 2 before compute, one line naming the store (a copy resumes)", "passed")


def test_accept_changes_resumes_and_records(base):
    workdir = copy_run(base, "accept")
    out = run_python(train_args(workdir, base["data"], 20, "--config.optim.b2=0.99",
                                "--accept_changes=config"))
    assert out.returncode == 0, out.stderr[-3000:]
    warning = ("warning: accepted by --accept_changes=config: optim.b2 changed from 0.95 to "
               "0.99 since checkpoint 20")
    assert warning in out.stderr.splitlines(), out.stderr[-3000:]
    last = [r for r in rows(workdir) if "provenance" in r][-1]
    assert last["step"] == 20
    assert last["provenance"]["changes"] == [
        "config: optim.b2 changed from 0.95 to 0.99 since checkpoint 20"]
    assert json.loads((workdir / "config.json").read_text())["optim"]["b2"] == 0.99

    out = run_python(train_args(workdir, base["data"], 20, "--accept_changes=confg"))
    assert out.returncode == 2 and "--accept_changes: 'confg' is not one of" in error_line(out)
    record_fault("a changed input resumed with `--accept_changes=<category>`"
                 " (`test_provenance`)",
                 "resumes; one warning line naming the change, recorded in metrics.jsonl",
                 "passed")


# ---------------------------------------------------------------------------- the schedule


def test_longer_train_steps_is_refused_with_the_lr_jump(base):
    workdir = copy_run(base, "longer")
    before = snapshot(workdir)
    out = run_python(train_args(workdir, base["data"], 30))
    line = refused(out, workdir, before)
    old = meta(workdir, 20)["provenance"]["config"]
    new = json.loads(json.dumps(old))
    new["train"]["steps"] = 30
    jump = f"from {lr_at(old, 20):.3e} to {lr_at(new, 20):.3e}"
    assert ("train.steps changed from 20 to 30 since checkpoint 20, so the learning rate at "
            f"step 20 would jump {jump}") in line, line
    assert "--config.optim.decay_steps=20" in line and "extend_from_step=20" in line
    record_fault("resume with a larger `train.steps` (the cosine horizon would move)"
                 " (`test_provenance`)",
                 "exit 2 before compute, one line naming train.steps, the lr jump at the "
                 "resumed step and how to extend", "passed")


def test_extension_keeps_the_learning_rate_continuous(base):
    """Extended at step 10 of 20 to 30 steps: the decay horizon pinned at 20 and a new decay
    from step 10's rate to the floor at 30; the lr of step 10 is the one the 20-step run
    used, and the resumed run decays from it."""
    workdir = copy_run(base, "extended")
    shutil.rmtree(workdir / "checkpoints" / "20")  # resume mid-run, at step 10
    lr_base = {r["step"]: r["lr"] for r in rows(base["run"]) if "lr" in r}
    out = run_python(train_args(workdir, base["data"], 30, "--config.optim.decay_steps=20",
                                "--config.optim.extend_from_step=10"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "note: optim.extend_from_step changed from 0 to 10 since checkpoint 10" in out.stderr
    lr = {r["step"]: r["lr"] for r in rows(workdir) if "lr" in r and r["step"] > 10}
    assert sorted(lr) == list(range(11, 31))
    # a row of step s logs lr(s - 1): row 11 is the lr of step 10, the first one resumed
    assert lr[11] == pytest.approx(lr_base[11], rel=1e-6)
    assert all(lr[s + 1] < lr[s] for s in range(11, 30))
    cfg = meta(workdir, 30)["provenance"]["config"]
    assert lr[30] == pytest.approx(lr_at(cfg, 29), rel=1e-6)
    floor = cfg["optim"]["peak_lr"] * cfg["optim"]["final_lr_frac"]
    assert lr_at(cfg, 30) == pytest.approx(floor, rel=1e-6)
    assert (cfg["train"]["steps"], cfg["optim"]["extend_from_step"]) == (30, 10)
    record_fault("a run extended (`optim.decay_steps` pinned, `optim.extend_from_step`)"
                 " (`test_provenance`)",
                 "resumes; lr continuous at the resumed step, then decays to the floor at "
                 "the new train.steps", "passed")


# ---------------------------------------------------------------------------- pure parts


def tiny_cfg(**optim_fields):
    cfg = config_lib.base_config()
    cfg.optim.warmup_steps, cfg.train.steps = 2, 20
    cfg.optim.update(optim_fields)
    return cfg


def test_schedule_jump_only_where_the_rate_moves():
    old, longer = tiny_cfg(), tiny_cfg()
    longer.train.steps = 30
    at, a, b = provenance.schedule_jump(old, longer, 10)
    assert at == 10 and a == pytest.approx(lr_at(old.to_dict(), 10)) and b > a
    pinned = tiny_cfg(decay_steps=20)
    pinned.train.steps = 30
    assert provenance.schedule_jump(old, pinned, 20) is None
    assert provenance.schedule_jump(old, pinned, 10) is None
    in_warmup = tiny_cfg(warmup_steps=100)
    in_warmup_longer = tiny_cfg(warmup_steps=100)
    in_warmup_longer.train.steps = 30
    assert provenance.schedule_jump(in_warmup, in_warmup_longer, 15) is None


def test_code_changes():
    record = {"gpt_jax_version": "0.1.0", "git_commit": "a" * 40, "git_dirty": False}
    moved = dict(record, git_commit="b" * 40)
    [change] = provenance.input_changes(record, moved, 20)
    assert change.category == "code" and "commit aaaaaaaaaa then, bbbbbbbbbb now" in change.text
    assert provenance.input_changes(record, dict(moved, git_dirty=True), 20) == []
    [change] = provenance.input_changes(record, dict(record, gpt_jax_version="0.2.0"), 20)
    assert "trained by gpt_jax 0.1.0, this is 0.2.0" in change.text
    with pytest.raises(provenance.ProvenanceError, match="--accept_changes=code"):
        provenance.refuse_or_accept([change], frozenset())
    assert provenance.refuse_or_accept([change], frozenset({"code"})) == [change]


def test_fields_added_since_count_as_their_default():
    new = provenance.plain_config(config_lib.base_config())
    old = json.loads(json.dumps(new))
    del old["optim"]["extend_from_step"]
    assert provenance.field_changes(old, new) == []
    old["data"]["mixture"] = {"web": 1.0}
    assert provenance.field_changes(old, new) == [("data.mixture.web", 1.0, "<absent>")]
