"""HellaSwag from the official files: reading and validating records, llm.c's and
lm-evaluation-harness's prompts and metrics on hand-made examples computed by hand, and the
task file's adapter through `evaluate.load_task`."""

from __future__ import annotations

import json

import pytest

from gpt_jax import evaluate as E
from gpt_jax.config import ConfigError
from gpt_jax.evaluation import hellaswag as H
from gpt_jax.tokenizer import CharTokenizer

# ActivityNet style (llm.c's docstring example): ctx = ctx_a + " " + ctx_b
ROOF = {"ind": 24, "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain",
        "label": 3, "endings": ["is using wrap to wrap a pair of skis.",
                                "is ripping level tiles off.", "is holding a rubik's cube.",
                                "starts pulling up roofing on a roof."],
        "source_id": "activitynet~v_-JhWjGDPHMY"}
# WikiHow style: [header]/[title]/[step] markup, empty ctx_b, an ending with outer spaces
GRILL = {"ind": 7, "activity_label": "Home and Garden",
         "ctx_a": "[header] How to clean a grill [title] Heat the grill.", "ctx_b": "",
         "ctx": "[header] How to clean a grill [title] Heat the grill.", "split": "val",
         "split_type": "zeroshot", "label": 0,
         "endings": ["[step] Scrub  the grates with a brush.", "Eat the grill [title] now.",
                     " Paint it red. ", "[substeps] Call a friend."],
         "source_id": "wikihow~1"}
# capitalize() lowercases the rest of ctx_b; three spaces become two (one pass)
TENNIS = {"ind": 3, "activity_label": "Tennis", "ctx_a": "Two players  rally.",
          "ctx_b": "the BALL", "ctx": "Two players  rally. the BALL", "split": "val",
          "split_type": "indomain", "label": 1,
          "endings": ["goes   over the net.", "bounces.", "sings.", "flies away."],
          "source_id": "activitynet~v_x"}


def write_jsonl(path, records, blank_first=False):
    path.write_text(("\n" if blank_first else "") + "".join(json.dumps(r) + "\n"
                                                            for r in records))
    return str(path)


def test_lmeval_preprocessing_by_hand():
    assert H.preprocess(" a [title] b  c [x]d ") == "a. b c d"
    assert H.preprocess("goes   over") == "goes  over"  # one pass, as the harness does
    assert H.lmeval_query(ROOF) == "Roof shingle removal: A man is sitting on a roof. He"
    assert H.lmeval_query(GRILL) == "Home and Garden: How to clean a grill. Heat the grill."
    assert H.lmeval_query(TENNIS) == "Tennis: Two players rally. The ball"
    # the harness strips before removing brackets: "[step] X" keeps X's leading space
    assert [H.preprocess(e) for e in GRILL["endings"]] == [
        " Scrub the grates with a brush.", "Eat the grill. now.", "Paint it red.",
        " Call a friend."]
    assert H.preprocess(TENNIS["endings"][0]) == "goes  over the net."


def test_prompts_of_both_conventions_by_hand():
    p = H.prompts(GRILL)
    assert p["llmc"] == ("[header] How to clean a grill [title] Heat the grill.",
                         [" [step] Scrub  the grates with a brush.",
                          " Eat the grill [title] now.", "  Paint it red. ",
                          " [substeps] Call a friend."])
    assert p["lmeval"] == ("Home and Garden: How to clean a grill. Heat the grill.",
                           ["  Scrub the grates with a brush.", " Eat the grill. now.",
                            " Paint it red.", "  Call a friend."])
    p = H.prompts(TENNIS)
    assert p["llmc"][0] == "Two players  rally. the BALL"
    assert p["lmeval"][1][0] == " goes  over the net."
    tok = CharTokenizer("".join(sorted({c for r in (ROOF, GRILL, TENNIS)
                                        for c in json.dumps(r)})))
    enc = H.encode(tok, ROOF)
    ctx, cont = enc["llmc"][2]
    assert tok.decode(ctx) == "A man is sitting on a roof. he"
    assert tok.decode(cont) == " is holding a rubik's cube."
    ctx, cont = enc["lmeval"][3]
    assert tok.decode(ctx) == "Roof shingle removal: A man is sitting on a roof. He"
    assert tok.decode(cont) == " starts pulling up roofing on a roof."


def test_metrics_of_both_conventions_by_hand():
    S = E.Score
    # llm.c, (summed log-likelihood, tokens) per ending: the sum picks 0 (-5); the mean
    # per token (-2.5, -1.0, -2.0, -0.75) picks 3
    llmc = [S(-5.0, 2, False), S(-9.0, 9, False), S(-8.0, 4, False), S(-6.0, 8, False)]
    # the harness: the sum picks 2 (-8); per character of the choices, 37, 27, 26 and 36
    # long: -10/37 = -0.270, -12/27 = -0.444, -8/26 = -0.308, -11/36 = -0.306: picks 0,
    # where llm.c's mean per token picked 3
    lmeval = [S(-10.0, 9, False), S(-12.0, 7, False), S(-8.0, 6, False), S(-11.0, 9, False)]
    assert [len(H.preprocess(e)) for e in ROOF["endings"]] == [37, 27, 26, 36]
    got = H.picks(ROOF, {"llmc": llmc, "lmeval": lmeval})
    assert got == {"llmc_acc": 0, "llmc_acc_norm": 3, "lmeval_acc": 2, "lmeval_acc_norm": 0}
    # the same scores, normalised by tokens (llm.c) or by characters (the harness):
    # -5/37 = -0.135 is the best per character, -6/8 the best per token
    got_same = H.picks(ROOF, {"llmc": llmc, "lmeval": llmc})
    assert (got_same["llmc_acc_norm"], got_same["lmeval_acc_norm"]) == (3, 0)
    # ties go to the first ending, as torch.argmin and numpy.argmax do
    same = [S(-4.0, 2, False)] * 4
    assert set(H.picks(ROOF, {"llmc": same, "lmeval": same}).values()) == {0}
    chosen = [got,  # ROOF (label 3): only llmc_acc_norm is right
              dict.fromkeys(H.METRICS, 0),  # GRILL (label 0): all right
              {"llmc_acc": 1, "llmc_acc_norm": 1, "lmeval_acc": 2, "lmeval_acc_norm": 1}]
    m = H.metrics([ROOF, GRILL, TENNIS], chosen)
    assert m == {"llmc_acc": 2 / 3, "llmc_acc_norm": 1.0, "lmeval_acc": 1 / 3,
                 "lmeval_acc_norm": 2 / 3}


def test_sample_line_has_every_count():
    S = E.Score
    scores = {"llmc": [S(-1.0 * i, i, False) for i in range(1, 5)],
              "lmeval": [S(-2.0 * i, i + 1, False) for i in range(1, 5)]}
    chosen = H.picks(GRILL, scores)
    line = H.sample(5, GRILL, scores, chosen)
    assert (line["doc_id"], line["ind"], line["label"]) == (5, 7, 0)
    c = line["lmeval"]["choices"][0]
    assert c == {"continuation": "  Scrub the grates with a brush.", "logprob": -2.0,
                 "num_tokens": 2, "num_chars": 32, "num_bytes": 32}
    assert line["llmc"]["choices"][2]["continuation"] == "  Paint it red. "
    assert line["picks"] == chosen
    assert line["correct"] == {m: i == 0 for m, i in chosen.items()}
    json.dumps(line)  # one JSONL line


def test_read_records_validates_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", [ROOF, GRILL, TENNIS],
                       blank_first=True)
    assert H.read_records(path) == [ROOF, GRILL, TENNIS]
    assert H.read_records(path, max_examples=2) == [ROOF, GRILL]
    bad = [({k: v for k, v in TENNIS.items() if k != "ctx_b"}, "missing field 'ctx_b'"),
           ({k: v for k, v in TENNIS.items() if k != "label"},
            "missing field 'label' .*unlabelled"),
           (TENNIS | {"label": "1"}, "'label'='1' must be a JSON int"),
           (TENNIS | {"label": True}, "'label'=True must be a JSON int"),
           (TENNIS | {"label": 4}, r"'label'=4 must be an index into 'endings' \(0 to 3\)"),
           (TENNIS | {"endings": ["a", "b"]}, "'endings' must be a list of 4 strings"),
           (TENNIS | {"endings": ["a", "b", "c", 4]}, "'endings' must be a list of 4 strings"),
           (TENNIS | {"ctx": None}, "'ctx'=None must be a JSON str")]
    for record, message in bad:
        path = write_jsonl(tmp_path / "bad.jsonl", [ROOF, record], blank_first=True)
        with pytest.raises(ConfigError, match=f"bad.jsonl:3: {message}"):
            H.read_records(path)
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROOF) + "\n{nope\n")
    with pytest.raises(ConfigError, match="bad.jsonl:2: not JSON"):
        H.read_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match="no such HellaSwag JSONL file"):
        H.read_records(str(tmp_path / "missing.jsonl"))


def test_task_file_with_the_adapter(tmp_path):
    write_jsonl(tmp_path / "hellaswag_val.jsonl", [ROOF, GRILL, TENNIS])
    task = tmp_path / "hs.json"
    fields = {"name": "hellaswag", "type": "multiple_choice", "eval": "hellaswag_val.jsonl",
              "adapter": "hellaswag"}
    task.write_text(json.dumps(fields))
    spec, evals, train = E.load_task(str(task), limit=2)
    assert spec.adapter == "hellaswag" and evals == [ROOF, GRILL] and train is None
    E.check_shots(spec, [0])
    with pytest.raises(ConfigError, match="--shots=0,5: task 'hellaswag' .* is zero-shot"):
        E.check_shots(spec, [0, 5])
    for extra, message in [({"adapter": "piqa"}, "adapter='piqa' is not one of"),
                           ({"type": "completion"}, "needs type 'multiple_choice'"),
                           ({"train": "x.jsonl"}, "'train', 'description' and"),
                           ({"answer_context": "Answer:"}, "'answer_context' do not apply")]:
        task.write_text(json.dumps(fields | extra))
        with pytest.raises(ConfigError, match=f"hs.json: task 'hellaswag': .*{message}"):
            E.load_task(str(task))
    write_jsonl(tmp_path / "hellaswag_val.jsonl", [ROOF, GRILL | {"endings": []}])
    task.write_text(json.dumps(fields))
    with pytest.raises(ConfigError, match="hellaswag_val.jsonl:2: 'endings'"):
        E.load_task(str(task))
