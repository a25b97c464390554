"""Bad inputs and interruptions of the real commands: each is one `error:` line with the
right exit status (2: the command line was wrong, found before compute; 1: the run failed;
130: Ctrl-C), no traceback, and a refused run leaves nothing behind (issue 27, items 2-3).
The systematic table over every command is tests/test_fuzz.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, record_fault, run_python, tiny_config
from test_sharding import free_port, start_processes
from test_train import train_args

from gpt_jax.tokenizer import build_char_tokenizer
from gpt_jax.workdir import Workdir


def one_line(out: subprocess.CompletedProcess, status: int, *needles: str) -> str:
    """The single stderr line of a refused command, checked for `needles`."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == status, (out.returncode, out.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def init_from(tmp_path_factory) -> str:
    """A pretrained run's config.json and tokenizer: all fine-tuning reads before it checks
    the task's examples (no checkpoint needed to be refused)."""
    root = tmp_path_factory.mktemp("init")
    Workdir(root).write_config(tiny_config())
    build_char_tokenizer(["abcdefghijklmnopqrstuvwxyz .,?"]).save(root)
    return str(root)


@pytest.mark.parametrize("text,needles", [
    ("def get_config(:\n    pass\n", ["bad.py:1:", "invalid syntax"]),
    ("import ml_collections\n\ndef get_config():\n    return undefined_name\n",
     ["bad.py:4:", "NameError", "undefined_name"]),
    ("", ["bad.py", "defines no get_config()"]),
])
def test_config_file_that_does_not_load_is_one_line(tmp_path, text, needles):
    (tmp_path / "bad.py").write_text(text)
    out = run_python(["-m", "gpt_jax.train", "--config=bad.py", "--workdir=run"], cwd=tmp_path)
    one_line(out, 2, *needles)
    assert sorted(os.listdir(tmp_path)) == ["bad.py"]
    record_fault("a config file with a syntax error, a NameError, or empty (`test_bad_inputs`)",
                 "exit 2, one line naming file:line, nothing created", "passed")


@pytest.mark.parametrize("flag,needle", [
    ("--temperature=-0.5", "--temperature=-0.5 must be >= 0"),
    ("--top_p=0", "--top_p=0.0 must be in (0, 1]"),
    ("--top_p=1.5", "--top_p=1.5 must be in (0, 1]"),
    ("--num_samples=0", "--num_samples=0 must be >= 1"),
    ("--prompt_file=missing.txt", "--prompt_file=missing.txt: no such file"),
])
def test_sample_flags_are_checked_before_loading(tmp_path, init_from, flag, needle):
    """`init_from` has no checkpoint: a flag checked after loading would fail on that."""
    out = run_python(["-m", "gpt_jax.sample", f"--workdir={init_from}", flag], cwd=tmp_path)
    one_line(out, 2, needle)


def test_sample_help_matches_behaviour():
    out = run_python(["-m", "gpt_jax.sample", "--help"])
    assert "at most context" not in out.stdout
    assert "may exceed the context" in out.stdout


def test_eval_label_out_of_range_names_file_and_line(tmp_path, init_from):
    rows = [{"context": "Q?", "choices": [" a", " b"], "label": 0}, {},
            {"context": "Q2?", "choices": [" a", " b"], "label": 2}]
    (tmp_path / "mc.jsonl").write_text(
        "\n".join(json.dumps(r) if r else "" for r in rows) + "\n")  # a blank line 2
    (tmp_path / "mc.json").write_text(json.dumps({"type": "multiple_choice",
                                                  "eval": "mc.jsonl"}))
    out = run_python(["-m", "gpt_jax.evaluate", f"--workdir={init_from}", "--tasks=mc.json"],
                     cwd=tmp_path)
    one_line(out, 2, f"{tmp_path}/mc.jsonl:3:", "'label'=2", "index into 'choices'")


@pytest.mark.parametrize("task,label,needle", [
    ("classification", 2, "'label'=2 must be a class of finetune.num_outputs=2"),
    ("classification", -1, "'label'=-1"),
    ("classification", 0.7, "'label'=0.7"),
    ("classification", "pos", "'label'='pos'"),
    ("similarity", "high", "'label'='high' must be a finite number"),
    ("multiple_choice", 3, "'label'=3 must be an index into 'choices'"),
])
def test_finetune_labels_are_checked_against_the_task(tmp_path, init_from, task, label,
                                                      needle):
    good = {"classification": {"text": "a b", "label": 1},
            "similarity": {"a": "a b", "b": "c", "label": 0.5},
            "multiple_choice": {"context": "a?", "choices": ["b", "c", "d"], "label": 2}}[task]
    bad = {**good, "label": label}
    (tmp_path / "train.jsonl").write_text(f"{json.dumps(good)}\n\n{json.dumps(bad)}\n")
    out = run_python(["-m", "gpt_jax.finetune", f"--config=experiments/finetune/jsonl.py:{task}",
                      f"--init_from={init_from}", f"--workdir={tmp_path}/ft",
                      f"--config.finetune.train_jsonl={tmp_path}/train.jsonl",
                      f"--config.finetune.val_jsonl={tmp_path}/train.jsonl"]
                     + (["--config.finetune.num_outputs=1"] if task == "similarity" else []))
    one_line(out, 2, f"{tmp_path}/train.jsonl:3:", needle)
    assert not os.path.exists(tmp_path / "ft")  # refused: nothing created
    record_fault("fine-tuning labels out of range, negative, fractional or strings; an "
                 "evaluation label out of range (`test_bad_inputs`)",
                 "exit 2 before compute, one line naming file:line and the task's classes",
                 "passed")


def test_refused_run_creates_no_workdir(tmp_path):
    out = run_python(["-m", "gpt_jax.train", "--config=experiments/tiny.py",
                      f"--workdir={tmp_path}/new/run", "--config.optim.warmup_steps=-5"])
    one_line(out, 2, "optim.warmup_steps=-5 must be an integer >= 0")
    assert os.listdir(tmp_path) == []


def test_prepare_summary_prints_the_funnel_in_pipeline_order():
    counts = {"after_exact_dedup": 9, "after_fuzzy_dedup": 8, "after_quality_filter": 7,
              "kept_fraction": 0.7, "read": 10}  # as the manifest's sorted JSON has them
    manifest = {"sources": {"web": {"counts": counts, "splits": {}}}}
    code = ("from gpt_jax import prepare; import json, sys; "
            "print(prepare.summary(json.loads(sys.argv[1]), 1.0))")
    out = run_python(["-c", code, json.dumps(manifest)])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("web: read 10 -> after_exact_dedup 9 -> after_fuzzy_dedup 8 "
                                 "-> after_quality_filter 7 (kept 70.0%)"), out.stdout


def test_prepare_against_an_unreachable_endpoint_is_one_line_and_fast(tmp_path):
    """A Cloud Storage endpoint that refuses connections fails before the pipeline starts,
    in one line naming the endpoint and the path (it was 120 lines after 94 s)."""
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "STORAGE_EMULATOR_HOST": endpoint}
    env.pop("TENSORSTORE_GCS_HTTP_URL", None)
    tic = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "gpt_jax.prepare", "--config",
                          os.path.join(REPO, "experiments", "tiny.py"), "--output",
                          "gs://test-bucket/store"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    one_line(out, 1, endpoint, "gs://test-bucket/store", "refused")
    assert time.monotonic() - tic < 60, time.monotonic() - tic


def _interrupt(tmp_path, times: int) -> tuple[subprocess.CompletedProcess, float]:
    """A training run sent Ctrl-C (SIGINT) `times` times once it is stepping; (result,
    seconds from the first signal to the exit)."""
    workdir, env = tmp_path / "run", {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen(
        [sys.executable, *train_args(workdir, tmp_path / "data", steps=100000,
                                     **{"train.ckpt_every": 100000, "train.eval_every": 100000,
                                        "train.eval_at_start": False})],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        path = workdir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    tic = time.time()
    for _ in range(times):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.time() - tic


def test_ctrl_c_saves_and_exits_130(tmp_path):
    out, _ = _interrupt(tmp_path, 1)
    assert out.returncode == 130, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "interrupted (Ctrl-C): checkpointed step" in out.stderr.splitlines()[-1]
    assert [d for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit()]
    record_fault("Ctrl-C (SIGINT) in the loop; twice (`test_bad_inputs`)",
                 "checkpoint at the next step, exit 130, one line; a second Ctrl-C exits at "
                 "once (130, one line)", "passed")


def test_second_ctrl_c_exits_at_once(tmp_path):
    out, seconds = _interrupt(tmp_path, 2)
    assert out.returncode == 130, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: interrupted twice (Ctrl-C): exiting now, without saving")
    assert seconds < 10


def test_a_dead_peer_is_one_line_within_the_heartbeat_timeout(tmp_path):
    """SIGKILL one of two processes mid-run: the survivor names it and exits 1 within
    cli.PEER_TIMEOUT_S (plus one heartbeat interval), not after JAX's 100 s abort."""
    from gpt_jax.cli import PEER_TIMEOUT_S
    workdir = tmp_path / "run"
    args = train_args(workdir, tmp_path / "data", steps=100000,
                      **{"mesh.cpu_devices": 1, "train.ckpt_every": 100000,
                         "train.eval_every": 100000, "train.sample_tokens": 0})
    procs = start_processes(args, free_port(), devices=1)
    try:
        deadline = time.time() + 300
        while not ((workdir / "metrics.jsonl").exists()
                   and len((workdir / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert time.time() < deadline and procs[0].poll() is None, "no steps logged"
            time.sleep(0.2)
        procs[1].kill()
        tic = time.time()
        _, err = procs[0].communicate(timeout=PEER_TIMEOUT_S + 60)
        seconds = time.time() - tic
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: lost process 1 of 2: no heartbeat"), \
        err[-3000:]
    assert "Traceback" not in err
    assert seconds < PEER_TIMEOUT_S + PEER_TIMEOUT_S / 6 + 10, seconds
    print(f"\nthe survivor stopped {seconds:.1f} s after its peer was killed")
    record_fault("SIGKILL of one of two processes mid-run (`test_bad_inputs`)",
                 "the survivor exits 1 in one line naming the lost process, within the "
                 f"{PEER_TIMEOUT_S:.0f} s heartbeat timeout", "passed")
