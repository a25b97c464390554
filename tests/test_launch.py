"""Dry-run tests for launch/: the exact gcloud / SLURM commands the scripts would run.

No gcloud or SLURM is needed: `--dry-run` prints commands instead of running them, and every
test puts stub `gcloud`, `sbatch`, `srun` and `scontrol` first on PATH that record any call,
so a dry run that tried to run one of them fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu.sh"
SUBMIT = LAUNCH / "slurm" / "submit.sh"
SBATCH = LAUNCH / "slurm" / "train.sbatch"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
BASE = ["--name", "t1", "--zone", "us-central2-b"]
TRAIN = ["--config", "experiments/gpt2.py:small", "--workdir", "gs://bkt/runs/a"]
STUBBED = ("gcloud", "sbatch", "srun", "scontrol")


@pytest.fixture()
def stubs(tmp_path):
    """A bin dir whose gcloud/sbatch/srun/scontrol record their calls in calls.log and fail."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in STUBBED:
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexit 99\n')
        stub.chmod(0o755)
    return bin_dir, log


def sh(script: Path, *args: str, stubs: tuple[Path, Path], env: dict | None = None,
       cwd: Path = ROOT) -> subprocess.CompletedProcess:
    bin_dir, log = stubs
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCH_", "SLURM_"))}
    full_env["PATH"] = f"{bin_dir}{os.pathsep}{full_env['PATH']}"
    full_env.update(env or {})
    proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=20)
    assert not log.exists(), f"a dry run called a real tool: {log.read_text()}"
    return proc


def with_dry_run(script: Path, args: tuple[str, ...] | list[str]) -> list[str]:
    """args with --dry-run early (after tpu.sh's command): never after a `--`."""
    at = 1 if script == TPU else 0
    return [*args[:at], "--dry-run", *args[at:]]


def dry(script: Path, *args: str, stubs: tuple[Path, Path],
        env: dict | None = None) -> list[list[str]]:
    """Runs a dry run that must succeed; returns its commands, each split like a shell would."""
    proc = sh(script, *with_dry_run(script, args), stubs=stubs, env=env)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]


def remote(cmd: list[str]) -> str:
    """The --command of a `gcloud compute tpus tpu-vm ssh` command."""
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], cmd
    return cmd[cmd.index("--command") + 1]


# ---- every script --------------------------------------------------------------------------

def test_scripts_found():
    names = {p.relative_to(LAUNCH).as_posix() for p in SCRIPTS}
    assert {"common.sh", "tpu.sh", "slurm/submit.sh", "slurm/train.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "set -euo pipefail" in script.read_text() or script.name == "common.sh"


@pytest.mark.parametrize("script", [TPU, SUBMIT, SBATCH], ids=lambda p: p.name)
def test_help(script, stubs):
    proc = sh(script, "--help", stubs=stubs)
    assert proc.returncode == 0
    assert "Usage:" in proc.stdout and "--dry-run" in proc.stdout


# ---- tpu.sh create --------------------------------------------------------------------------

@pytest.mark.parametrize("accel,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_tpu_vm(accel, runtime, stubs):
    assert dry(TPU, "create", *BASE, "--accelerator", accel, stubs=stubs) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "t1", "--zone=us-central2-b",
        f"--accelerator-type={accel}", f"--version={runtime}"]]


def test_create_spot_preemptible_project_runtime(stubs):
    [cmd] = dry(TPU, "create", *BASE, "--accelerator", "v4-8", "--spot", "--project", "p1",
                "--runtime", "tpu-vm-custom", stubs=stubs)
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1", "--zone=us-central2-b",
                   "--project=p1", "--accelerator-type=v4-8", "--version=tpu-vm-custom", "--spot"]
    [cmd] = dry(TPU, "create", *BASE, "--accelerator=v4-8", "--preemptible", stubs=stubs)
    assert cmd[-1] == "--preemptible" and "--spot" not in cmd


def test_create_queued_resource(stubs):
    [cmd] = dry(TPU, "create", *BASE, "--accelerator", "v5litepod-16", "--queued", "--spot",
                stubs=stubs)
    assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "create", "t1",
                   "--zone=us-central2-b", "--accelerator-type=v5litepod-16",
                   "--runtime-version=v2-alpha-tpuv5-lite", "--node-id=t1", "--spot"]


def test_create_multislice(stubs):
    [cmd] = dry(TPU, "create", *BASE, "--accelerator", "v5p-128", "--node-count", "4",
                stubs=stubs)
    assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "create", "t1",
                   "--zone=us-central2-b", "--accelerator-type=v5p-128",
                   "--runtime-version=v2-alpha-tpuv5", "--node-count=4", "--node-prefix=t1"]


# ---- setup / train / logs / stop / status / delete -----------------------------------------

def test_setup_copies_checkout_to_all_workers(stubs):
    archive, scp, ssh = dry(TPU, "setup", *BASE, stubs=stubs)
    assert archive == ["git", "-C", str(ROOT), "archive", "--format=tar.gz",
                       "--output=/tmp/gpt_jax-t1.tar.gz", "HEAD"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/gpt_jax-t1.tar.gz",
                   "t1:gpt_jax.tar.gz", "--zone=us-central2-b", "--worker=all"]
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1",
                       "--zone=us-central2-b", "--worker=all"]
    assert remote(ssh) == (
        "rm -rf ~/gpt_jax && mkdir -p ~/gpt_jax && tar -xzf ~/gpt_jax.tar.gz -C ~/gpt_jax"
        ' && cd ~/gpt_jax && python3 -m pip install -U pip && python3 -m pip install -e ".[tpu]"')


def test_setup_from_git_repo(stubs):
    [ssh] = dry(TPU, "setup", *BASE, "--repo", "https://example.com/g.git", "--ref", "v1",
                stubs=stubs)
    assert "--worker=all" in ssh
    assert remote(ssh).startswith(
        "rm -rf ~/gpt_jax && git clone --depth=1 --branch=v1 https://example.com/g.git ~/gpt_jax"
        " && cd ~/gpt_jax && python3 -m pip install")


def shell_words(text: str) -> list[str]:
    """The words a real bash makes of `text` (shlex gets `\\$` inside double quotes wrong)."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {text}"], capture_output=True,
                         check=True, timeout=10).stdout.decode()
    return out.split("\0")[:-1]


def trainer_argv(remote_cmd: str) -> list[str]:
    """The python argv inside the background wrapper of `tpu.sh train`."""
    m = re.search(r"nohup (.*?) & echo \$! > ~/train.pid", remote_cmd)
    assert m, remote_cmd
    return shell_words(m.group(1))


def test_train_runs_trainer_on_all_workers_in_background(stubs):
    [ssh] = dry(TPU, "train", *BASE, *TRAIN, "--", "--config.train.steps=100",
                "--config.train.sample_prompt=it's $HOME", stubs=stubs)
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1",
                       "--zone=us-central2-b", "--worker=all"]
    cmd = remote(ssh)
    assert cmd.startswith("cd ~/gpt_jax && ")
    assert cmd.endswith(">> ~/train.log 2>&1 < /dev/null &")
    assert trainer_argv(cmd) == [
        "python3", "-m", "gpt_jax.train", "--config=experiments/gpt2.py:small",
        "--workdir=gs://bkt/runs/a", "--config.train.steps=100",
        "--config.train.sample_prompt=it's $HOME"]


def test_train_overrides_without_separator(stubs):
    [ssh] = dry(TPU, "train", *BASE, *TRAIN, "--config.train.steps=7", stubs=stubs)
    assert trainer_argv(remote(ssh))[-1] == "--config.train.steps=7"


def test_train_remote_command_really_runs(stubs, tmp_path):
    """Executes the printed remote command with a stub python3: the quoting survives a real shell,
    the job backgrounds, and pid/exit/log files appear where the supervisor looks for them."""
    [ssh] = dry(TPU, "train", *BASE, *TRAIN, "--python", "fakepy", "--",
                "--config.x=a b", "--config.y=it's \"q\" $HOME `x`", stubs=stubs)
    home = tmp_path / "home"
    (home / "gpt_jax").mkdir(parents=True)
    fakepy = stubs[0] / "fakepy"
    fakepy.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$HOME/argv"\necho trained\nexit 0\n')
    fakepy.chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{stubs[0]}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", remote(ssh)], env=env, check=True, timeout=10)
    for _ in range(100):
        if (home / "train.exit").exists():
            break
        subprocess.run(["sleep", "0.05"])
    assert (home / "train.exit").read_text().strip() == "0"
    assert (home / "train.pid").read_text().strip().isdigit()
    assert "trained" in (home / "train.log").read_text()
    assert (home / "argv").read_text().splitlines() == [
        "-m", "gpt_jax.train", "--config=experiments/gpt2.py:small",
        "--workdir=gs://bkt/runs/a", "--config.x=a b", "--config.y=it's \"q\" $HOME `x`"]


def test_train_multislice_every_slice_and_dcn(stubs):
    cmds = dry(TPU, "train", *BASE, *TRAIN, "--node-count", "2", stubs=stubs)
    assert [c[5] for c in cmds] == ["t1-0", "t1-1"]
    for c in cmds:
        assert "--worker=all" in c
        assert trainer_argv(remote(c))[-1] == "--config.mesh.dcn_data=2"
    # an explicit dcn_data is kept and not duplicated
    [c, _] = dry(TPU, "train", *BASE, *TRAIN, "--node-count", "2", "--",
                 "--config.mesh.dcn_data=1", stubs=stubs)
    argv = trainer_argv(remote(c))
    assert [a for a in argv if "dcn_data" in a] == ["--config.mesh.dcn_data=1"]


def test_logs_stop_status(stubs):
    [logs] = dry(TPU, "logs", *BASE, stubs=stubs)
    assert logs[5:8] == ["t1", "--zone=us-central2-b", "--worker=0"]
    assert remote(logs) == "tail -n 200 -F ~/train.log"
    [logs] = dry(TPU, "logs", *BASE, "--worker", "all", stubs=stubs)
    assert "--worker=all" in logs
    [stop] = dry(TPU, "stop", *BASE, stubs=stubs)
    assert "--worker=all" in stop and "kill -TERM" in remote(stop)
    assert dry(TPU, "status", *BASE, stubs=stubs) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "describe", "t1", "--zone=us-central2-b",
        "--format", "value(state)"]]
    assert dry(TPU, "status", *BASE, "--queued", stubs=stubs)[0][3:5] == [
        "queued-resources", "describe"]


def test_delete(stubs):
    assert dry(TPU, "delete", *BASE, stubs=stubs) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "t1", "--zone=us-central2-b",
        "--quiet"]]
    assert dry(TPU, "delete", *BASE, "--node-count", "2", stubs=stubs) == [[
        "gcloud", "compute", "tpus", "queued-resources", "delete", "t1",
        "--zone=us-central2-b", "--force", "--quiet"]]


# ---- usage errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("args,flag", [
    (["create", "--zone", "z", "--accelerator", "v4-8"], "--name"),
    (["create", "--name", "n", "--accelerator", "v4-8"], "--zone"),
    (["create", *BASE], "--accelerator"),
    (["train", *BASE, "--workdir", "gs://b/r"], "--config"),
    (["train", *BASE, "--config", "c.py"], "--workdir"),
    (["supervise", *BASE, "--accelerator", "v4-8", "--config", "c.py"], "--workdir"),
    (["train", *BASE, "--config", "c.py", "--workdir", "/local/dir"], "gs://"),
    (["create", *BASE, "--accelerator", "v3-8"], "--accelerator"),
    (["create", *BASE, "--accelerator", "v4-8", "--queued", "--preemptible"], "--preemptible"),
    (["create", *BASE, "--node-count", "x"], "--node-count"),
    (["create", *BASE, "--bogus"], "--bogus"),
    (["create", *BASE, "--accelerator"], "--accelerator"),
    (["launch", *BASE], "launch"),
])
def test_tpu_usage_errors(args, flag, stubs):
    proc = sh(TPU, *with_dry_run(TPU, args), stubs=stubs)
    assert proc.returncode == 2, proc.stderr
    assert flag in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("script,args,flag", [
    (SUBMIT, ["--workdir", "/w"], "--config"),
    (SUBMIT, ["--config", "c.py"], "--workdir"),
    (SUBMIT, ["--config", "c.py", "--workdir", "/w", "--nodes", "0"], "--nodes"),
    (SBATCH, ["--config", "c.py"], "--workdir"),
])
def test_slurm_usage_errors(script, args, flag, stubs):
    proc = sh(script, *with_dry_run(script, args), stubs=stubs)
    assert proc.returncode == 2 and flag in proc.stderr, proc.stderr


@pytest.mark.parametrize("script,args", [
    (TPU, ["train", *BASE, *TRAIN, "--", "--dry-run"]),
    (SUBMIT, [*TRAIN, "--", "--dry-run"]),
    (SBATCH, [*TRAIN, "--", "--dry-run"]),
])
def test_dry_run_after_separator_is_refused(script, args, stubs):
    """After `--` it would reach the trainer and the commands would really run."""
    proc = sh(script, *args, stubs=stubs)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr, proc.stderr


def test_fake_hooks_refused_without_dry_run(stubs):
    proc = sh(TPU, "supervise", *BASE, "--accelerator", "v4-8", *TRAIN, stubs=stubs,
              env={"LAUNCH_FAKE_STATES": "READY"})
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


# ---- supervise -------------------------------------------------------------------------------

def kinds(cmds: list[list[str]]) -> list[str]:
    """Names each command: describe, check (trainer status), create, delete, scp, setup, train..."""
    out = []
    for c in cmds:
        if c[0] == "sleep":
            out.append(f"sleep {c[1]}")
        elif c[0] == "git":
            out.append("archive")
        elif c[4] in ("describe", "create", "delete", "scp"):
            out.append(c[4])
        elif c[4] == "ssh":
            r = remote(c)
            out.append("check" if "train.exit" in r and r.startswith("if") else
                       "setup" if "pip install" in r else
                       "train" if "gpt_jax.train" in r else
                       "stop" if "kill -TERM" in r else r)
        else:
            out.append(" ".join(c))
    return out


SUP = ["supervise", *BASE, "--accelerator", "v4-32", "--spot", *TRAIN, "--poll", "7"]


def test_supervise_recreates_after_preemption(stubs):
    env = {"LAUNCH_FAKE_STATES": "NOT_FOUND,CREATING,READY,READY,PREEMPTED,READY,READY,READY",
           "LAUNCH_FAKE_TRAIN": "none,running,none,exit:0"}
    cmds = dry(TPU, *SUP, "--max-restarts", "1", "--", "--config.train.steps=5", stubs=stubs,
               env=env)
    bring_up = ["archive", "scp", "setup", "train"]
    assert kinds(cmds) == [
        "describe", "create", "sleep 7",             # NOT_FOUND
        "describe", "sleep 7",                       # CREATING
        "describe", "check", *bring_up, "sleep 7",   # READY, no trainer yet
        "describe", "check", "sleep 7",              # READY, running
        "describe", "delete", "create", "sleep 7",   # PREEMPTED
        "describe", "check", *bring_up, "sleep 7",   # READY on the new VM: same command again
        "describe", "check", "sleep 7", "describe",  # exit 0, still READY a poll later: done
    ]
    creates = [c for c in cmds if c[0] == "gcloud" and c[4] == "create"]
    assert creates[0] == creates[1] and "--spot" in creates[0]
    trains = [trainer_argv(remote(c)) for c, k in zip(cmds, kinds(cmds)) if k == "train"]
    assert trains[0] == trains[1]
    assert trains[0][-2:] == ["--workdir=gs://bkt/runs/a", "--config.train.steps=5"]


def test_supervise_gives_up_after_max_restarts(stubs):
    env = {"LAUNCH_FAKE_STATES": "READY,PREEMPTED,READY,SUSPENDED",
           "LAUNCH_FAKE_TRAIN": "running,none"}
    proc = sh(TPU, *with_dry_run(TPU, SUP), "--max-restarts", "1", stubs=stubs, env=env)
    assert proc.returncode == 1
    assert "giving up" in proc.stderr
    assert kinds([shlex.split(x) for x in proc.stdout.splitlines()])[-2:] == ["sleep 7",
                                                                              "describe"]


def test_supervise_queued_multislice_suspended(stubs):
    env = {"LAUNCH_FAKE_STATES": "ACTIVE,SUSPENDED,ACTIVE,ACTIVE,ACTIVE",
           "LAUNCH_FAKE_TRAIN": "running,none,exit:0"}
    cmds = dry(TPU, *SUP, "--node-count", "2", stubs=stubs, env=env)
    ks = kinds(cmds)
    assert ks[:7] == ["describe", "check", "sleep 7", "describe", "delete", "create", "sleep 7"]
    assert cmds[0][3:5] == ["queued-resources", "describe"]
    assert cmds[4] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "t1",
                       "--zone=us-central2-b", "--force", "--quiet"]
    assert ks.count("setup") == 2 and ks.count("train") == 2  # once per slice
    assert cmds[1][5] == "t1-0" and "--worker=0" in cmds[1]


def test_supervise_restarts_failed_trainer_and_recreates_after_ssh_failures(stubs):
    env = {"LAUNCH_FAKE_STATES": "READY,READY,READY,READY,READY,READY,READY",
           "LAUNCH_FAKE_TRAIN": "exit:1,ssh-failed,ssh-failed,ssh-failed,none,exit:0"}
    ks = kinds(dry(TPU, *SUP, "--max-restarts", "2", stubs=stubs, env=env))
    assert ks[:6] == ["describe", "check", "stop", "sleep 60", "train", "sleep 7"]
    assert ks[6:16] == ["describe", "check", "sleep 7", "describe", "check", "sleep 7",
                        "describe", "check", "delete", "create"]


def test_supervise_default_dry_run_terminates(stubs):
    ks = kinds(dry(TPU, *SUP, stubs=stubs))
    assert ks[:2] == ["describe", "create"] and ks[-1] == "describe"


# ---- SLURM -----------------------------------------------------------------------------------

def test_submit_dry_run(stubs):
    proc = sh(SUBMIT, "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
              "--account", "acct", "--time", "01:00:00", "--config", "experiments/gpt2.py:small",
              "--workdir", "/shared/runs/a", "--dry-run", "--", "--config.train.steps=3",
              stubs=stubs)
    assert proc.returncode == 0, proc.stderr
    mkdir, sbatch, job = proc.stdout.splitlines()
    assert shlex.split(mkdir) == ["mkdir", "-p", f"{ROOT}/runs/slurm"]
    assert shlex.split(sbatch) == [
        "sbatch", "--job-name=gpt-jax", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4",
        "--time=01:00:00", "--partition=gpu", "--account=acct", f"--chdir={ROOT}",
        "--output=runs/slurm/%x-%j.out", f"{ROOT}/launch/slurm/train.sbatch",
        "--config", "experiments/gpt2.py:small", "--workdir", "/shared/runs/a", "--",
        "--config.train.steps=3"]
    assert job.startswith("# in the job, on 2 node(s) x 4 task(s): srun ")
    assert shlex.split(job.split(": ", 1)[1]) == [
        "srun", "--kill-on-bad-exit=1", "python3", "-m", "gpt_jax.train",
        "--config=experiments/gpt2.py:small", "--workdir=/shared/runs/a",
        "--config.train.steps=3"]


def test_sbatch_directives():
    text = SBATCH.read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    for d in ("--requeue", "--signal=B:TERM@120", "--open-mode=append", "--gpus-per-node=8",
              "--ntasks-per-node=8"):
        assert d in directives
    assert "scontrol requeue" in text and "jax.distributed.initialize()" in text


def test_sbatch_forwards_sigterm_and_requeues(stubs, tmp_path):
    """Runs train.sbatch (not a dry run) with stub srun/scontrol, as SLURM would, and sends it
    the SIGTERM of --signal=B:TERM@120: srun must get it, then the job requeues itself."""
    bin_dir = tmp_path / "slurmbin"
    bin_dir.mkdir()
    events = tmp_path / "events"
    (bin_dir / "srun").write_text(
        f'#!/bin/bash\ntrap \'echo "srun TERM" >> {events}; kill $! 2>/dev/null; exit 0\' TERM\n'
        f'echo "srun $*" >> {events}\nsleep 10 > /dev/null 2>&1 & wait\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "scontrol $*" >> {events}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="77")
    proc = subprocess.Popen(["bash", str(SBATCH), "--config", "c.py", "--workdir", "/w"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(100):
        if events.exists():
            break
        subprocess.run(["sleep", "0.05"])
    proc.terminate()
    proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert events.read_text().splitlines() == [
        "srun --kill-on-bad-exit=1 python3 -m gpt_jax.train --config=c.py --workdir=/w",
        "srun TERM", "scontrol requeue 77"]


# ---- README ----------------------------------------------------------------------------------

def readme_commands() -> tuple[list[str], list[str]]:
    """(variable definitions, launch commands) from the README's bash blocks."""
    text = (LAUNCH / "README.md").read_text()
    setup, commands = [], []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if re.match(r"(export |[A-Z_]+=\()", line):
                setup.append(line)
            elif re.match(r"([A-Z_]+=\S+ )*(launch/|sbatch )", line):
                commands.append(line)
    return setup, commands


def as_dry_run(line: str) -> str:
    line = re.sub(r"^sbatch (\S+ )*(launch/slurm/train.sbatch)", r"bash \2 --dry-run", line)
    line = re.sub(r"(launch/tpu.sh \w+)", r"\1 --dry-run", line)
    return re.sub(r"(launch/slurm/submit.sh)", r"\1 --dry-run", line)


def test_readme_commands_run(stubs):
    setup, commands = readme_commands()
    assert len(commands) >= 12
    text = (LAUNCH / "README.md").read_text()
    printed = []
    for line in commands:
        script = "set -euo pipefail\n" + "\n".join(setup) + "\n" + as_dry_run(line)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCH_", "SLURM_"))}
        env["PATH"] = f"{stubs[0]}{os.pathsep}{env['PATH']}"
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=20)
        assert proc.returncode == 0, (line, proc.stderr)
        printed += proc.stdout.replace(str(ROOT), "REPO").splitlines()
    assert not stubs[1].exists()
    # the commands the README says the scripts run are what they print
    for shown in (
        "gcloud compute tpus tpu-vm create gpt2-small --zone=us-central2-b "
        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot",
        "mkdir -p REPO/runs/slurm",
        "sbatch --job-name=gpt-jax --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 "
        "--time=24:00:00 --partition=gpu --chdir=REPO --output=runs/slurm/%x-%j.out "
        "REPO/launch/slurm/train.sbatch --config experiments/gpt2.py:small "
        "--workdir /shared/runs/gpt2-small -- --config.train.steps=20000",
    ):
        assert shown in text and shown in printed, shown
    for fragment in (
        "python3 -m gpt_jax.train --config=experiments/gpt2.py:small "
        "--workdir=gs://my-gpt-bucket/runs/gpt2-small --config.train.steps=20000",
        "srun --kill-on-bad-exit=1 python3 -m gpt_jax.train "
        "--config=experiments/gpt2.py:small --workdir=/shared/runs/gpt2-small "
        "--config.train.steps=20000",
        "queued-resources create gpt2-ms",
        "--node-count=2 --node-prefix=gpt2-ms",
    ):
        assert fragment in text.replace("\n", " "), fragment
        assert any(fragment in p for p in printed), fragment
    assert any(p == "gcloud compute tpus queued-resources delete gpt2-ms --zone=us-east5-a "
               "--force --quiet" for p in printed)
