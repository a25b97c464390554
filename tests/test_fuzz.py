"""The bad-input fuzz table (issue 27 item 4): every documented command, bad values made
from the flag definitions and the config schema, each refused the same way.

Cases come from three sources, none of them written out by hand:
- every `python -m gpt_jax.<command>` the README documents;
- each command's own flags, read from its `--helpxml` (absl's machine-readable flag list:
  name, type, default): a wrong type for every typed flag, a negative number for every
  number (but the few that may be negative), zero for the numbers that must be above 0,
  a value past 1 for a fraction, an unknown enum value, a value that does not parse for
  the string flags that are parsed (a TPU slice, lists of integers or kernels), and for
  the flags that name a file or a directory: a missing file, a directory where a file is
  expected, an empty file, a non-UTF-8 file, an unreadable one (a socket: root reads any
  mode-000 file), a config that does not parse; a file where a directory is to be
  written, a directory where a file is;
- `config.base_config()`: for every numeric field a wrong type and a negative value, for
  probabilities and fractions a value past 1, for every choice an unknown one, and
  unknown fields.

Each case must exit 2 with exactly one stderr line, `error: ...`, naming the flag, the
field or the file; no traceback; nothing created in its working directory, and the
fixture files and run directory unchanged.

Cost: a Python start that imports jax takes 2-4 s here, and there are hundreds of cases.
So one driver process (this file run as a script) imports jax and the project once and
forks a child per case; the child runs the command exactly as `python -m gpt_jax.<cmd>`
would (`runpy.run_module(..., run_name="__main__")` with the case's argv, working
directory and stdout/stderr files, ending in the command's own `sys.exit`/`os._exit`).
What differs from a fresh interpreter: modules the driver imported (jax, gpt_jax without
its flags) are not imported again, and JAX is not started before the fork.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from conftest import REPO, record_fault, tiny_config

PER_CASE_S = 20  # a case that is not refused within this runs on: a failure, not a hang

# Flags that may be negative, and numbers that must be above 0 (the rest: >= 0).
NEGATIVE_OK = {"seed", "length_penalty"}
AT_LEAST_ONE = {"num_samples", "max_new_tokens", "batch_size", "num_beams", "stream_chunk",
                "num_processes", "repeats", "steps", "attn_batch", "host_batch", "workers",
                "max_candidates", "input_seconds", "budget_s"}
FLAG_FRACTIONS = {"headroom"}  # a value past 1 is refused
# String flags that are parsed: a value that does not parse.
PARSED = {"topology": "no_such_slice", "contexts": "seven", "prefetch_depths": "seven",
          "table_cases": "seven", "table_kernels": "no_such_kernel"}
# Directories that are read (must exist and be a directory) and files that are read.
INPUT_DIRS = {"workdir", "init_from", "from_hf", "workdirs", "store"}
INPUT_FILES = {"config", "prompt_file", "tasks"}
WRITTEN_DIRS = {("train", "workdir"), ("finetune", "workdir"), ("rlhf.sft", "workdir"),
                ("rlhf.reward", "workdir"), ("rlhf.ppo", "workdir"),
                ("convert", "workdir"), ("prepare", "output"), ("bench", "profile_dir"),
                ("plan", "cache_dir")}
WRITTEN_FILES = {("bench", "json_out"), ("compile", "table"), ("plan", "out"),
                 ("plan", "table")}  # a directory where the file goes
EXCLUSIVE = {"convert": ("from_hf", "to_hf")}  # flags that exclude each other
# Config fields that may be negative (seeds; mesh.data's -1 means all other devices).
FIELD_NEGATIVE_OK = {"seed", "data.seed", "mesh.data"}
FRACTIONS = ("model.embd_pdrop", "model.resid_pdrop", "model.attn_pdrop", "optim.b1",
             "optim.b2", "optim.final_lr_frac", "optim.warmup_frac", "data.val_fraction",
             "data.dedup.threshold", "train.sample_top_p", "optim.muon_momentum")
CHOICES = ("model.norm", "model.attention_pattern", "model.dtype", "model.remat",
           "model.attention_impl", "optim.schedule", "optim.optimizer", "data.source",
           "data.tokenizer", "data.val_split_rule")


def documented_commands() -> list[str]:
    """Every `python -m gpt_jax.<command>` the README shows."""
    text = open(os.path.join(REPO, "README.md")).read()
    return sorted(set(re.findall(r"python -m gpt_jax\.([a-z_.]+[a-z])", text)))


# ------------------------------------------------------------------------------ the driver

def serve(cases_path: str, results_path: str) -> None:
    """Runs each case of `cases_path` in a forked child; writes their outcomes."""
    import importlib
    import runpy
    import traceback

    # What the commands import, imported once here and inherited by every child (no
    # command module itself: run_module must execute it as __main__, as `python -m` does).
    for name in ("jax", "orbax.checkpoint", "ml_collections", "gpt_jax.checkpoint",
                 "gpt_jax.cli", "gpt_jax.config", "gpt_jax.data", "gpt_jax.loop",
                 "gpt_jax.model", "gpt_jax.optim", "gpt_jax.sharding", "gpt_jax.tokenizer",
                 "gpt_jax.workdir"):
        importlib.import_module(name)
    cases = json.load(open(cases_path))
    results = []
    for case in cases:
        out, err = os.path.join(case["logs"], "out"), os.path.join(case["logs"], "err")
        tic = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: `python -m gpt_jax.<cmd> <args>` in the case's cwd
            code = 1
            try:
                os.chdir(case["cwd"])
                for fd, path in ((1, out), (2, err)):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                sys.argv = [case["command"], *case["args"]]
                runpy.run_module(f"gpt_jax.{case['command']}", run_name="__main__",
                                 alter_sys=True)
                code = 0
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - shown as Python would
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        status = None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
            elif time.perf_counter() - tic > PER_CASE_S:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                status = "timeout"
            else:
                time.sleep(0.01)
        results.append({"rc": status, "stderr": open(err, errors="replace").read(),
                        "seconds": time.perf_counter() - tic})
    json.dump(results, open(results_path, "w"))


# ------------------------------------------------------------------------------ the cases

def fixtures(root: str) -> dict[str, str]:
    """Bad files of every kind, a config that does not parse, and a run directory (a
    config.json and a tokenizer; no checkpoint: every case must be refused before one
    would be read)."""
    from gpt_jax.tokenizer import build_char_tokenizer
    from gpt_jax.workdir import Workdir

    paths = {k: os.path.join(root, v) for k, v in (
        ("missing", "missing.txt"), ("directory", "a_directory"), ("empty", "empty.txt"),
        ("not_utf8", "latin1.txt"), ("unreadable", "unreadable.sock"),
        ("syntax", "syntax_error.py"), ("run", "run"), ("task", "task.json"),
        ("jsonl", "eval.jsonl"))}
    os.makedirs(paths["directory"])
    open(paths["empty"], "w").close()
    open(paths["not_utf8"], "wb").write("caf\xe9 = 1\n".encode("latin-1"))
    sock = socket.socket(socket.AF_UNIX)  # opening a socket file fails even for root
    sock.bind(paths["unreadable"])
    sock.close()
    open(paths["syntax"], "w").write("def get_config(:\n    pass\n")
    Workdir(paths["run"]).write_config(tiny_config())
    build_char_tokenizer(["abcdefghijklmnopqrstuvwxyz .,?"]).save(paths["run"])
    open(paths["jsonl"], "w").write(json.dumps({"context": "Q?", "choices": [" a", " b"],
                                                "label": 0}) + "\n")
    open(paths["task"], "w").write(json.dumps({"type": "multiple_choice",
                                               "eval": "eval.jsonl"}))
    return paths


def base_args(command: str, fx: dict[str, str]) -> dict[str, str]:
    """A command line that would run (given a checkpoint): each case breaks one flag."""
    x = os.path.join(REPO, "experiments")
    run_cmd = {"config": f"{x}/tiny.py:char", "workdir": "new_run"}
    init = {"init_from": fx["run"], "workdir": "new_run"}
    return {
        "train": run_cmd,
        "finetune": {"config": f"{x}/finetune/jsonl.py", **init,
                     "config.finetune.train_jsonl": fx["jsonl"],
                     "config.finetune.val_jsonl": fx["jsonl"]},
        "rlhf.sft": {"config": f"{x}/rlhf/sft.py:tiny", **init},
        "rlhf.reward": {"config": f"{x}/rlhf/reward.py:tiny", **init},
        "rlhf.ppo": {"config": f"{x}/rlhf/ppo.py:tiny", **init},
        "sample": {"workdir": fx["run"], "max_new_tokens": "4"},
        "evaluate": {"workdir": fx["run"], "tasks": fx["task"]},
        "convert": {"workdir": fx["run"], "to_hf": "hf_out"},
        "plot": {"workdirs": fx["run"], "out": "curves.png"},
        "prepare": {"config": f"{x}/tiny.py:char", "output": "store"},
        "schedule": {"config": f"{x}/tiny.py"},
        "params": {"config": f"{x}/tiny.py"},
        "babygpt": {"config": f"{x}/babygpt.py"},
        "reference": {"names": "tiny", "root": "ref_root", "check": "true"},
        "bench": {"config": f"{x}/tiny.py:char", "repeats": "1", "steps": "1"},
        "compile": {"config": f"{x}/tiny.py:char", "topology": "cpu:2"},
        "plan": {"config": f"{x}/tiny.py:char", "topology": "v5e-8", "cache_dir": "cache"},
    }[command]


def flag_specs(commands: list[str], scratch: str) -> dict[str, list[dict]]:
    """Each command's own flags (name, type, default), from its --helpxml."""
    cases = []
    for command in commands:
        logs = os.path.join(scratch, f"helpxml-{command}")
        os.makedirs(logs)
        cases.append({"command": command, "args": ["--helpxml"], "cwd": scratch, "logs": logs})
    run_driver(cases, scratch)
    outs = {}
    for case in cases:
        root = ET.fromstring(open(os.path.join(case["logs"], "out")).read())
        outs[case["command"]] = [
            {"name": f.findtext("name"), "type": f.findtext("type")}
            for f in root.iter("flag") if "gpt_jax" in (f.findtext("file") or "")]
    return outs


def flag_cases(command: str, flags: list[dict], fx: dict[str, str]) -> list[tuple]:
    """(flag values, needle) cases from one command's flag definitions."""
    base, out = base_args(command, fx), []
    for flag in flags:
        name, kind = flag["name"], flag["type"]
        if name.startswith("_"):
            continue
        needle = f"--{name}"
        if kind in ("int", "float"):
            out.append(({name: "seven"}, needle))
            if name not in NEGATIVE_OK:
                out.append(({name: "-3"}, needle))
            if name in AT_LEAST_ONE:
                out.append(({name: "0"}, needle))
            if name in FLAG_FRACTIONS:
                out.append(({name: "1.5"}, needle))
        elif kind == "bool":
            out.append(({name: "maybe"}, needle))
        elif kind.endswith("enum"):
            out.append(({name: "no_such_choice"}, needle))
        if name in PARSED:
            out.append(({name: PARSED[name]}, needle))
        if name in INPUT_FILES:
            for bad in ("missing", "directory", "empty", "not_utf8", "unreadable"):
                out.append(({name: fx[bad]}, fx[bad]))
            if name == "config":
                out.append(({name: fx["syntax"]}, f"{fx['syntax']}:1"))
        if name in INPUT_DIRS and (command, name) not in WRITTEN_DIRS:
            for bad in ("missing", "empty"):  # no such directory; a file instead of one
                out.append(({name: fx[bad]}, fx[bad]))
        if (command, name) in WRITTEN_DIRS:
            out.append(({name: fx["empty"]}, fx["empty"]))  # a file where a directory goes
        if (command, name) in WRITTEN_FILES:
            out.append(({name: fx["directory"]}, fx["directory"]))
    out.append(({"no_such_flag": "1"}, "--no_such_flag"))
    return [(with_base(base, values, EXCLUSIVE.get(command, ())), needle)
            for values, needle in out]


def with_base(base: dict, values: dict, exclusive: tuple[str, ...]) -> dict:
    """`base` with `values` on top; a flag of `exclusive` that `values` sets drops the
    others (convert: --from_hf or --to_hf, not both)."""
    drop = set(exclusive) - set(values) if set(values) & set(exclusive) else set()
    return {**{k: v for k, v in base.items() if k not in drop}, **values}


def config_cases(fx: dict[str, str]) -> list[tuple]:
    """(flag values, needle) cases from the config schema, run through `train`."""
    from gpt_jax.config import base_config

    def leaves(node, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    base, out = base_args("train", fx), []
    for field, value in leaves(base_config()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out.append(({f"config.{field}": "seven"}, field))
        if field not in FIELD_NEGATIVE_OK:
            out.append(({f"config.{field}": "-3"}, field))
    out += [({f"config.{field}": "1.5"}, field) for field in FRACTIONS]
    out += [({f"config.{field}": "no_such_choice"}, field) for field in CHOICES]
    out += [({"config.model.no_such_field": "1"}, "config.model.no_such_field"),
            ({"config.no_such_section.x": "1"}, "config.no_such_section")]
    return [({**base, **values}, needle) for values, needle in out]


def run_driver(cases: list[dict], scratch: str) -> list[dict]:
    path, results = os.path.join(scratch, "cases.json"), os.path.join(scratch, "results.json")
    json.dump(cases, open(path, "w"))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GPT_JAX_TRACEBACK")}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), path, results],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60 + PER_CASE_S * len(cases))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.load(open(results))


def snapshot(root: str) -> dict[str, tuple]:
    """Every path under `root` with its size and modification time."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(d, name)
            st = os.lstat(path)
            out[path] = (st.st_size, st.st_mtime_ns)
    return out


def check(case: dict, result: dict, needle: str) -> list[str]:
    """What is wrong with one case's outcome (nothing: [])."""
    lines = result["stderr"].strip().splitlines()
    created = os.listdir(case["cwd"])
    return [what for what, bad in (
        (f"exit {result['rc']}, not 2", result["rc"] != 2),
        (f"{len(lines)} stderr lines", len(lines) != 1),
        ("no 'error: ' line", not (lines and lines[-1].startswith("error: "))),
        (f"{needle!r} not named", not (lines and needle in lines[-1])),
        ("a traceback", "Traceback" in result["stderr"]),
        (f"created {created}", bool(created))) if bad]


def test_every_bad_input_is_one_line(tmp_path):
    fx = fixtures(str(tmp_path / "fx"))
    scratch = str(tmp_path / "scratch")
    os.makedirs(scratch)
    documented = documented_commands()
    assert {"train", "sample", "evaluate", "finetune", "prepare", "convert"} <= set(documented)
    module = {c: os.path.join(REPO, "gpt_jax", *c.split(".")) + ".py" for c in documented}
    off = sorted(c for c in documented if "cli.run(" not in open(module[c]).read())
    assert not off, f"documented commands not on cli.run: {off}"
    commands = documented
    specs = flag_specs(commands, scratch)
    table = [(c, values, needle) for c in commands for values, needle in
             flag_cases(c, specs[c], fx)]
    table += [("train", values, needle) for values, needle in config_cases(fx)]
    before = snapshot(str(tmp_path / "fx"))
    cases = []
    for i, (command, values, _) in enumerate(table):
        case = {"command": command, "cwd": os.path.join(tmp_path, "cwd", str(i)),
                "logs": os.path.join(scratch, str(i)),
                "args": [f"--{k}={v}" for k, v in values.items()]}
        os.makedirs(case["cwd"])
        os.makedirs(case["logs"])
        cases.append(case)
    tic = time.perf_counter()
    results = run_driver(cases, scratch)
    seconds = time.perf_counter() - tic
    failures = []
    for (command, _, needle), case, result in zip(table, cases, results):
        problems = check(case, result, needle)
        if problems:
            failures.append(f"{command} {' '.join(case['args'])}: {'; '.join(problems)}: "
                            f"{result['stderr'].strip()[-300:]!r}")
    changed = {p for p, v in snapshot(str(tmp_path / "fx")).items() if before.get(p) != v}
    print(f"\nfuzz: {len(table)} bad inputs over {len(commands)} commands in {seconds:.0f} s "
          f"({len(failures)} failed)")
    assert not changed, sorted(changed)
    assert not failures, f"{len(failures)} of {len(table)} cases:\n" + "\n".join(failures)
    record_fault(f"bad-input fuzz: {len(table)} generated bad values over all "
                 f"{len(commands)} documented commands (`test_fuzz`)",
                 "exit 2, one line naming the flag, field or file, no traceback, nothing "
                 "created", "passed")

if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
