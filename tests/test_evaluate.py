"""The evaluation harness: scoring vs direct log-softmax, sliding windows, the in-context
protocol, TFDS adapters, the CLI, and a cross-check against transformers."""

from __future__ import annotations

import functools
import json
import os
import sysconfig

import jax
import ml_collections
import numpy as np
import pytest
from conftest import REPO, run_python, tiny_config
from test_hellaswag import GRILL, ROOF, TENNIS

from gpt_jax import cli, sharding
from gpt_jax import evaluate as E
from gpt_jax import model as model_lib
from gpt_jax.tokenizer import EOT, CharTokenizer
from gpt_jax.workdir import open_run

STDLIB = sysconfig.get_paths()["stdlib"]
TOY_MC = os.path.join(REPO, "experiments", "eval", "toy_mc.json")
TOY_LAMBADA = os.path.join(REPO, "experiments", "eval", "toy_lambada.json")
TOY_QA = os.path.join(REPO, "experiments", "eval", "toy_qa.json")


# ---------------------------------------------------------------- pure functions

@pytest.mark.parametrize("n,context,stride", [(1, 8, 4), (7, 8, 8), (8, 8, 3), (30, 8, 4),
                                              (30, 8, 1), (17, 4, 4)])
def test_windows_score_every_token_once(n, context, stride):
    ids = list(range(100, 100 + n))
    requests = E.window_requests(ids, context, stride, eot_id=0)
    scored = [t for r in requests for t in r.continuation]
    assert scored == ids
    seq = [0, *ids]
    for r in requests:
        assert len(r.context) + len(r.continuation) <= context + 1
        start = seq.index(r.continuation[0])
        assert list(r.context) == seq[start - len(r.context):start]
        # full context in the first window, then context - stride (+1 for the shifted input)
        assert len(r.context) == min(start, context + 1 - len(r.continuation))
    assert all(len(r.continuation) <= stride for r in requests[1:])


def test_bucket_and_pack():
    assert [E.bucket_length(n, 64) for n in (1, 16, 17, 33, 64, 70)] == [16, 16, 32, 64, 64, 64]
    seq, n = E.pack(E.Request((), (5, 6)), context=8, eot_id=9)
    assert seq == [9, 5, 6] and n == 2
    seq, n = E.pack(E.Request(tuple(range(20)), (50, 51)), context=8, eot_id=9)
    assert seq == [*range(13, 20), 50, 51] and n == 2


def _examples(n):
    return [{"context": f"q{i}", "choices": [" a", " b"], "label": i % 2} for i in range(n)]


def test_demos_are_seeded_nested_and_exclude_self():
    evals, train = _examples(6), _examples(20)
    five = E.draw_demos(6, 3, train, evals, 5, seed=1)
    assert five == E.draw_demos(6, 3, train, evals, 5, seed=1)
    assert E.draw_demos(6, 3, train, evals, 2, seed=1) == five[:2]
    assert five != E.draw_demos(6, 3, train, evals, 5, seed=2)
    own = E.draw_demos(6, 3, None, evals, 10, seed=1)
    assert len(own) == 5 and evals[3] not in own


def test_prompt_drops_demos_then_truncates():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz :\n")
    spec = E.TaskSpec(name="t", type="multiple_choice", eval="x", separator="\n",
                      description="d:")
    demos = [{"context": "aa", "choices": [" x", " y"], "label": 1},
             {"context": "bb", "choices": [" z", " w"], "label": 0}]
    ex = {"context": "cc", "choices": [" p"], "label": 0}
    ids, used = E.make_prompt(tok, spec, ex, demos, budget=100)
    assert tok.decode(ids) == "d:aa y\nbb z\ncc" and used == 2
    ids, used = E.make_prompt(tok, spec, ex, demos, budget=9)
    assert tok.decode(ids) == "d:bb z\ncc" and used == 1
    ids, used = E.make_prompt(tok, spec, ex, demos, budget=3)
    assert tok.decode(ids) == ":cc" and used == 0


def test_metrics_by_hand():
    S = E.Score
    evals = [{"context": "", "choices": [" a", " bbbb"], "label": 1}]
    scores = [[S(-2.0, 1, False), S(-3.0, 4, False)]]  # sum picks 0; per token/byte pick 1
    uncond = [[S(-1.0, 1, False), S(-5.0, 4, False)]]  # -1 vs +2: picks 1
    m = E.multiple_choice_metrics(evals, scores, uncond)
    assert m == {"acc": 0.0, "acc_per_token": 1.0, "acc_per_byte": 1.0, "acc_uncond": 1.0}
    m = E.completion_metrics([[S(-1.0, 2, True)], [S(-3.0, 2, False)]])
    assert m["acc"] == 0.5 and np.isclose(m["perplexity"], np.exp(1.0))


def test_answer_metrics_by_hand():
    assert E.normalize_answer(" The  Eiffel-Tower!\n") == "eiffeltower"
    assert E.normalize_answer("An apple, a day") == "apple day"
    p, r = 1.0, 2 / 3  # "cat sat" vs "cat sat down"
    assert E.f1_score("the cat sat", "a cat sat down") == pytest.approx(2 * p * r / (p + r))
    assert E.f1_score("dog", "cat") == 0.0 and E.f1_score("the", "a") == 1.0  # both empty
    evals = [{"answers": [" Paris", " Paris, France"]}, {"answers": [" eight", " 8"]}]
    m = E.generation_metrics([" paris france", "8 legs"], evals)
    assert m == {"exact_match": 0.5, "f1": pytest.approx((1.0 + 2 / 3) / 2)}
    assert E.cut_at_stop(" Paris\nQ: next", ["\n", "Q:"]) == " Paris"
    assert E.cut_at_stop(" Paris", ["\n"]) == " Paris"


def test_generation_task_schema_errors(tmp_path):
    spec, evals, _ = E.load_task(TOY_QA)
    assert (spec.type, spec.num_beams, spec.length_penalty, spec.stop) == (
        "generation", 4, 0.6, ["\n"])
    assert evals[1]["answers"] == [" eight", " 8"]
    with pytest.raises(ValueError, match=r"task 'q': num_beams=0 must be in \[1, 64\]"):
        E.TaskSpec(name="q", type="generation", eval="x", num_beams=0)
    with pytest.raises(ValueError, match="'answers' must be a list of 1\\+ non-empty strings"):
        E.check_example({"context": "Q:", "answers": []}, "generation", "q eval example 0")


def test_task_files_load_and_validate(tmp_path):
    spec, evals, train = E.load_task(TOY_MC)
    assert spec.type == "multiple_choice" and spec.answer_context == "Answer:"
    assert len(evals) == 6 and len(train) == 6
    spec, evals, train = E.load_task(TOY_LAMBADA)
    assert spec.type == "completion" and train is None and evals[0]["target"] == " tea"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"context": "x", "choices": [" a"],
                                                    "label": 0}) + "\n")
    (tmp_path / "bad.json").write_text(json.dumps({"type": "multiple_choice",
                                                   "eval": "bad.jsonl"}))
    with pytest.raises(ValueError, match="bad.jsonl:1: 'choices'"):
        E.load_task(str(tmp_path / "bad.json"))


def test_adapters_on_hand_made_examples():
    h = E.hellaswag({"activity_label": b"Baking", "context": b"She mixes flour [title] and",
                     "endings": [b"eggs.", b"runs away."], "label": np.int32(0)})
    assert h == {"context": "Baking: She mixes flour. and", "choices": [" eggs.", " runs away."],
                 "label": 0}
    assert E.hellaswag({"activity_label": b"x", "context": b"y", "endings": [b"a", b"b"],
                        "label": -1}) is None  # unlabelled test split
    a = E.ai2_arc({"question": b"Why?", "answerKey": 2,
                   "choices": {"text": [b"no", b"yes"], "label": [0, 2]}})
    assert a == {"context": "Question: Why?\nAnswer:", "choices": [" no", " yes"], "label": 1}
    assert E.lambada({"passage": b"the cat sat on the mat"}) == {
        "context": "the cat sat on the", "target": " mat"}
    p = E.piqa({"goal": b"open a jar", "sol1": b"twist", "sol2": b"sing", "label": 0})
    assert p["choices"] == [" twist", " sing"] and p["label"] == 0


def test_tfds_adapter_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):  # random features: labels may not fit
        out = E.tfds_examples("piqa", "validation", "piqa", max_examples=4)
        assert len(out) == 4
        out += E.tfds_examples("hellaswag", "validation", "hellaswag")  # invalid ones skipped
    for ex in out:
        E.check_example(ex, "multiple_choice", "mock")


# ---------------------------------------------------------------- scoring with a model

@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(vocab_size=32, context=16)
    params = jax.jit(lambda k: model_lib.unbox(model_lib.init_params(cfg.model, k)))(
        jax.random.key(0))
    params = jax.tree.map(lambda x: x * 3.0, params)  # sharper, less uniform predictions
    scorer = E.Scorer(cfg.model, params, sharding.make_mesh(cfg), eot_id=31, batch_size=3,
                      progress=False)
    return cfg, params, scorer


def _full_logits(cfg, params, ids):
    """Logits of `ids` (at most context) from one fixed-length forward pass (compiled once
    per config)."""
    buf = np.zeros((1, cfg.model.context), np.int32)
    buf[0, :len(ids)] = ids  # the causal mask hides the zero tail
    return np.asarray(_forward(cfg.model.to_json())(params, buf))[0, :len(ids)]


@functools.cache
def _forward(model_json):
    net = model_lib.GPT(ml_collections.ConfigDict(json.loads(model_json)))
    return jax.jit(lambda p, b: net.apply({"params": p}, b))


def _direct(cfg, params, seq):
    logits = _full_logits(cfg, params, seq[:-1])
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return logp[np.arange(len(seq) - 1), seq[1:]], logits.argmax(-1) == np.asarray(seq[1:])


def test_scorer_matches_direct_log_softmax(tiny):
    cfg, params, scorer = tiny
    rng = np.random.default_rng(0)
    requests = [E.Request(tuple(rng.integers(0, 31, c)), tuple(rng.integers(0, 31, n)))
                for c, n in [(0, 3), (5, 1), (12, 4), (20, 3), (3, 16), (1, 1), (8, 8)]]
    for req, score in zip(requests, scorer(requests)):
        seq, n = E.pack(req, 16, 31)
        logp, hit = _direct(cfg, params, seq)
        assert score.num_tokens == n
        np.testing.assert_allclose(score.logprob, logp[-n:].sum(), rtol=1e-5, atol=1e-5)
        assert score.greedy == bool(hit[-n:].all())
    # a greedy continuation scores as greedy
    seq = [3, 4]
    for _ in range(5):
        seq.append(int(np.argmax(_full_logits(cfg, params, seq)[-1])))
    assert scorer([E.Request(tuple(seq[:2]), tuple(seq[2:]))])[0].greedy


def test_lm_eval_stride_and_bits_per_byte(tiny):
    cfg, params, scorer = tiny
    tok = CharTokenizer("abcdefghij")
    doc = "abcdefghij" * 4  # 40 tokens: windows needed
    full = E.evaluate_lm(scorer, tok, [doc], stride=16)
    seq = [tok.eot_id, *tok.encode(doc)]
    want = 0.0
    for a in range(1, len(seq), 16):  # stride == context: disjoint windows
        lo = max(0, min(a + 16, len(seq)) - 1 - 16)
        logp, _ = _direct(cfg, params, seq[lo:min(a + 16, len(seq))])
        want += logp[a - lo - 1:].sum()
    assert full["num_tokens"] == 40 and full["num_bytes"] == 40
    np.testing.assert_allclose(full["loss"], -want / 40, rtol=1e-5)
    np.testing.assert_allclose(full["bits_per_byte"], -want / np.log(2) / 40, rtol=1e-5)
    short = E.evaluate_lm(scorer, tok, ["abcde", "", "fgh"], stride=4)
    assert short["num_docs"] == 2 and short["num_tokens"] == 8
    assert E.evaluate_lm(scorer, tok, [doc], stride=4)["num_tokens"] == 40


def test_evaluate_task_reports(tiny):
    _, _, scorer = tiny
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz :\n?")
    spec = E.TaskSpec(name="mc", type="multiple_choice", eval="x", answer_context="A:")
    evals = [{"context": "is a?", "choices": [" y", " n"], "label": i % 2} for i in range(5)]
    reports = E.evaluate_task(scorer, tok, spec, evals, None, shots=[0, 3], seed=0,
                              samples=True)
    assert [r["shots"] for r in reports] == [0, 3]
    assert reports[1]["shots_used_mean"] <= 3 and reports[0]["num_examples"] == 5
    assert set(reports[0]["metrics"]) == {"acc", "acc_per_token", "acc_per_byte", "acc_uncond"}
    assert reports[0]["primary"] == "acc_uncond"
    for r in reports:  # the logged picks are the ones the metrics counted
        assert [x["label"] for x in r["samples"]] == [0, 1, 0, 1, 0]
        assert np.mean([x["shots_used"] for x in r["samples"]]) == r["shots_used_mean"]
        for name, value in r["metrics"].items():
            assert value == np.mean([x["picks"][name] == x["label"] for x in r["samples"]])
    choice = reports[0]["samples"][0]["choices"][1]
    assert (choice["continuation"], choice["num_tokens"], choice["num_bytes"]) == (" n", 2, 2)
    comp = E.TaskSpec(name="c", type="completion", eval="x")
    r = E.evaluate_task(scorer, tok, comp, [{"context": "is a", "target": " yes"}], None,
                        shots=[0], samples=True)[0]
    target = r["samples"][0]["target"]
    assert (target["continuation"], target["num_tokens"], target["num_chars"]) == (" yes", 4, 4)
    assert r["metrics"]["acc"] == float(target["greedy"])
    assert r["metrics"]["logprob"] == pytest.approx(target["logprob"])


# ---------------------------------------------------------------- GPT-2 cross-check and CLI

@pytest.fixture(scope="module")
def gpt2_workdir(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="torch==2.13.0 (hf extra) is not installed")
    transformers = pytest.importorskip("transformers", reason="transformers (hf extra)")
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers (hf extra)")
    from gpt_jax import convert
    root = tmp_path_factory.mktemp("evalgpt2")
    hf_dir = str(root / "hf")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train([os.path.join(STDLIB, n) for n in ("textwrap.py", "string.py")], vocab_size=400,
              min_frequency=2, special_tokens=[EOT], show_progress=False)
    os.makedirs(hf_dir)
    bpe.save_model(hf_dir)
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=400,
        bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(hf_dir)
    convert.import_hf(hf_dir, str(root / "wd"))
    return hf, hf_dir, str(root / "wd")


def test_choice_logprobs_match_transformers(gpt2_workdir):
    import torch
    import transformers
    hf, hf_dir, workdir = gpt2_workdir
    ref_tok = transformers.GPT2Tokenizer(os.path.join(hf_dir, "vocab.json"),
                                         os.path.join(hf_dir, "merges.txt"))
    run = open_run(workdir)
    cfg, mesh, params, tok = run.cfg, run.mesh, run.params, run.tokenizer
    scorer = E.Scorer(cfg.model, params, mesh, tok.eot_id, batch_size=4, progress=False)
    spec, evals, train = E.load_task(TOY_MC)
    evals = evals[:3]
    for k in (0, 2):
        nested, used = E.choice_requests(tok, spec, evals, train, k, seed=0, context=256)
        assert used == [k] * len(evals)  # nothing dropped: the prompts fit
        got = E._flat_scores(scorer, nested, "x")
        for i, ex in enumerate(evals):
            demos = E.draw_demos(len(evals), i, train, evals, k, seed=0)
            prompt = spec.separator.join([d["context"] + E.gold(d) for d in demos]
                                         + [ex["context"]])
            for j, choice in enumerate(ex["choices"]):
                ctx, cont = ref_tok.encode(prompt), ref_tok.encode(choice)
                with torch.no_grad():
                    logits = hf(torch.tensor([ctx + cont])).logits[0, :-1]
                logp = torch.log_softmax(logits, -1)[torch.arange(len(ctx) + len(cont) - 1),
                                                     torch.tensor((ctx + cont)[1:])]
                want = float(logp[-len(cont):].sum())
                assert got[i][j].num_tokens == len(cont)
                np.testing.assert_allclose(got[i][j].logprob, want, rtol=1e-4, atol=1e-4)


def test_cli_tasks_and_lm(gpt2_workdir, tmp_path):
    _, _, workdir = gpt2_workdir
    out = str(tmp_path / "report.json")
    result = run_python([
        "-m", "gpt_jax.evaluate", f"--workdir={workdir}", f"--tasks={TOY_MC},{TOY_LAMBADA}",
        "--shots=0,1", f"--out={out}", f"--lm_text_glob={STDLIB}/json/[ed]*.py",
        "--stride=64", "--batch_size=4"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as f:
        report = json.load(f)
    got = {(r["task"], r.get("shots")) for r in report["results"]}
    assert got == {(f"lm:{STDLIB}/json/[ed]*.py", None), ("toy_mc", 0), ("toy_mc", 1),
                   ("toy_lambada", 0), ("toy_lambada", 1)}
    lm = report["results"][0]["metrics"]
    assert lm["num_docs"] == 2 and lm["bits_per_byte"] > 0 and lm["stride"] == 64
    assert "acc_uncond" in result.stdout and "bits_per_byte" in result.stdout


def test_generation_task_matches_transformers_beam_search(gpt2_workdir):
    """Batched, left-padded beam search (4 beams, penalty 0.6), one shot: every answer
    equals transformers' generate on the same prompt, cut at the first newline."""
    import torch
    import transformers
    hf, hf_dir, workdir = gpt2_workdir
    ref_tok = transformers.GPT2Tokenizer(os.path.join(hf_dir, "vocab.json"),
                                         os.path.join(hf_dir, "merges.txt"))
    run = open_run(workdir)
    tok = run.tokenizer
    scorer = E.Scorer(run.cfg.model, run.params, run.mesh, tok.eot_id, batch_size=4,
                      progress=False)
    spec, evals, _ = E.load_task(TOY_QA)
    evals = evals[:5]  # two batches, the second filled up
    reports = E.evaluate_task(scorer, tok, spec, evals, None, shots=[1], seed=0, samples=True)
    for k, report in zip((1,), reports):
        assert report["shots_used_mean"] == k and report["primary"] == "f1"
        assert report["metrics"] == E.generation_metrics(report["predictions"], evals)
        assert [x["prediction"] for x in report["samples"]] == report["predictions"]
        assert np.mean([x["f1"] for x in report["samples"]]) == report["metrics"]["f1"]
        for i, ex in enumerate(evals):
            demos = E.draw_demos(len(evals), i, None, evals, k, seed=0)
            prompt = ref_tok.encode(spec.separator.join(
                [d["context"] + E.gold(d) for d in demos] + [ex["context"]]))
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, num_beams=4,
                                  length_penalty=0.6, do_sample=False, pad_token_id=0,
                                  eos_token_id=0,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
            want = ref_tok.decode(out[0, len(prompt):].tolist()).split("<|endoftext|>")[0]
            assert report["predictions"][i] == want.split("\n")[0]


def test_cli_hellaswag_both_conventions_and_log_samples(gpt2_workdir, tmp_path):
    """`evaluate --log_samples` on official-format HellaSwag records and toy_mc: every
    logged log-likelihood equals transformers' on the tokens each convention scores (llm.c:
    ctx, then " " + ending encoded apart; the harness: query + " " + choice encoded whole,
    after the query's tokens), and every pick and metric follows from the logged counts."""
    import torch
    import transformers
    hf, hf_dir, workdir = gpt2_workdir
    ref_tok = transformers.GPT2Tokenizer(os.path.join(hf_dir, "vocab.json"),
                                         os.path.join(hf_dir, "merges.txt"))
    records = [ROOF, GRILL, TENNIS]
    (tmp_path / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                          for r in records))
    task = tmp_path / "hs.json"
    task.write_text(json.dumps({"name": "hellaswag", "type": "multiple_choice",
                                "eval": "hellaswag_val.jsonl", "adapter": "hellaswag"}))
    out = str(tmp_path / "report.json")
    result = run_python(["-m", "gpt_jax.evaluate", f"--workdir={workdir}",
                         f"--tasks={task},{TOY_MC}", "--shots=0", f"--out={out}",
                         "--log_samples", "--batch_size=4"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as f:
        hs, mc = json.load(f)["results"]
    assert hs["primary"] == "llmc_acc_norm" and hs["num_examples"] == 3
    assert set(hs["metrics"]) == {"llmc_acc", "llmc_acc_norm", "lmeval_acc", "lmeval_acc_norm"}
    assert "llmc_acc_norm" in result.stdout and "lmeval_acc_norm" in result.stdout
    assert hs["samples_file"] == str(tmp_path / "report.samples.hellaswag.0shot.jsonl")

    def logprob(ctx, cont):
        with torch.no_grad():
            logits = hf(torch.tensor([ctx + cont])).logits[0, :-1]
        logp = torch.log_softmax(logits, -1)[torch.arange(len(ctx) + len(cont) - 1),
                                             torch.tensor((ctx + cont)[1:])]
        return float(logp[-len(cont):].sum())

    with open(hs["samples_file"]) as f:
        lines = [json.loads(line) for line in f]
    assert [(x["doc_id"], x["ind"], x["label"]) for x in lines] == [
        (0, 24, 3), (1, 7, 0), (2, 3, 1)]
    for line, record in zip(lines, records):
        ctx = ref_tok.encode(record["ctx"])
        query = ref_tok.encode(line["lmeval"]["context"])
        for j, ending in enumerate(record["endings"]):
            c = line["llmc"]["choices"][j]
            cont = ref_tok.encode(" " + ending)
            assert c["continuation"] == " " + ending and c["num_tokens"] == len(cont)
            np.testing.assert_allclose(c["logprob"], logprob(ctx, cont), atol=1e-4)
            c = line["lmeval"]["choices"][j]
            cont = ref_tok.encode(line["lmeval"]["context"] + c["continuation"])[len(query):]
            assert c["num_tokens"] == len(cont)
            np.testing.assert_allclose(c["logprob"], logprob(query, cont), atol=1e-4)
        llmc, lmeval = line["llmc"]["choices"], line["lmeval"]["choices"]
        mean_loss = [-c["logprob"] / c["num_tokens"] for c in llmc]  # llm.c's argmin
        per_char = [c["logprob"] / (c["num_chars"] - 1) for c in lmeval]  # no delimiter
        assert line["picks"] == {
            "llmc_acc": int(np.argmax([c["logprob"] for c in llmc])),
            "llmc_acc_norm": int(np.argmin(mean_loss)),
            "lmeval_acc": int(np.argmax([c["logprob"] for c in lmeval])),
            "lmeval_acc_norm": int(np.argmax(per_char))}
    for name, value in hs["metrics"].items():
        assert value == np.mean([x["picks"][name] == x["label"] for x in lines])
    # a schema task logs its choices, picks and the unconditional scores too
    with open(mc["samples_file"]) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == mc["num_examples"] == 6
    for name, value in mc["metrics"].items():
        assert value == pytest.approx(np.mean([x["correct"][name] for x in lines]))
    first = lines[0]["choices"][0]
    assert set(first) == {"continuation", "logprob", "num_tokens", "num_chars", "num_bytes",
                          "greedy", "uncond_logprob"} and first["continuation"] == " Berlin"


def test_log_samples_needs_out_and_zero_shot_hellaswag(tmp_path):
    with pytest.raises(cli.UsageError, match="--log_samples needs --out"):
        E.run(str(tmp_path / "none"), [TOY_MC], log_samples=True)
    assert E.samples_path("r/report.json", "lm:x/y", 1) == "r/report.samples.lm_x_y.1shot.jsonl"
    (tmp_path / "hellaswag_val.jsonl").write_text(json.dumps(ROOF) + "\n")
    task = tmp_path / "hs.json"
    task.write_text(json.dumps({"type": "multiple_choice", "eval": "hellaswag_val.jsonl",
                                "adapter": "hellaswag"}))
    with pytest.raises(E.ConfigError, match="--shots=0,1: task 'hs' .*use --shots=0"):
        E.run(str(tmp_path / "none"), [str(task)], shots=[0, 1])  # before the workdir
