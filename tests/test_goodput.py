"""The goodput ledger: its arithmetic by hand, persistence across a restart, and a real run
killed after a checkpoint and resumed."""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import pytest
from conftest import run_python
from test_train import kill_script, train_args

from gpt_jax import goodput, metrics


class Clock:
    """A hand-driven wall clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_ledger_arithmetic_by_hand():
    clock = Clock(100.0)
    ledger = goodput.Ledger(None, clock=clock, start=90.0, listen=False)
    clock.now = 102.0
    with ledger.timer("restore"):
        clock.now = 105.0
    ledger.resume(4, 0)
    ledger.switch("steps")
    clock.now = 106.0
    with ledger.timer("data"):
        clock.now = 106.5
    ledger.compile_span(106.7, 107.0)  # an inner trace, reported first
    ledger.compile_span(106.6, 107.6)  # the outer one: the union is 1.0 s
    clock.now = 108.0
    with ledger.timer("eval"):
        ledger.compile_span(108.2, 108.4)
        clock.now = 110.0
    clock.now = 111.0
    with ledger.timer("save"):
        clock.now = 111.5
    ledger.trained(9)
    clock.now = 112.0
    live = ledger.fields()  # charged up to now, nothing changed
    ledger.close()
    want = {"startup": 12.0, "restore": 3.0, "data": 0.5, "compile": 1.2, "eval": 1.8,
            "save": 0.5, "steps": 3.0, "recomputed": 0.0, "lost": 0.0}
    assert ledger.attempt.seconds == pytest.approx(want)
    t = goodput.totals([ledger.attempt])
    assert t["wall_s"] == pytest.approx(112.0 - 90.0)
    assert t["goodput"] == pytest.approx(3.0 / 22.0)
    assert live == pytest.approx(ledger.fields())
    assert live["goodput/eval_s"] == pytest.approx(1.8) and live["goodput/attempts"] == 1
    assert (ledger.attempt.first_step, ledger.attempt.reached) == (4, 9)
    assert ledger.line().startswith("goodput 13.6% of 22.0 s over 1 attempt: steps 3.0 s; "
                                    "badput startup 12.0 s, compile 1.2 s, restore 3.0 s")
    with pytest.raises(ValueError, match="not one of"):
        ledger.switch("idle")


def test_compile_time_is_measured_from_jax_on_the_loop_thread():
    ledger = goodput.Ledger(None)
    with ledger.timer("eval"):
        jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.ones(7)).block_until_ready()
    compiled = ledger.attempt.seconds["compile"]
    assert compiled > 0
    with ledger.timer("data"):  # another thread compiles: its time is not this thread's
        other = threading.Thread(
            target=lambda: jax.jit(lambda x: jnp.cos(x) - 2)(jnp.ones(5)).block_until_ready())
        other.start()
        other.join()
    ledger.close()
    assert ledger.attempt.seconds["compile"] == compiled
    assert ledger.attempt.seconds["data"] > 0


def test_settle_by_hand():
    a0 = goodput.Attempt(start=0.0, last_seen=100.0, first_step=0, reached=30, heartbeat_s=10)
    a0.seconds.update(steps=60.0, startup=40.0)
    # a new attempt starts at 104 from the step-20 checkpoint; metrics logged up to 33
    assert goodput.settle([a0], restored=20, logged=33, now=104.0) == 13
    assert a0.status == "killed" and a0.reached == 20 and a0.recomputed_steps == 13
    assert a0.seconds["lost"] == 4.0  # within one heartbeat: all of it
    assert (a0.seconds["steps"], a0.seconds["recomputed"]) == (40.0, 20.0)  # 10 of 30 steps
    a1 = goodput.Attempt(start=110.0, last_seen=200.0, first_step=20, reached=40,
                         status="ended")
    a1.seconds.update(steps=40.0, startup=50.0)
    # the step-40 checkpoint is lost: the next attempt restores 25
    assert goodput.settle([a0, a1], restored=25, logged=40, now=500.0) == 15
    assert a0.recomputed_steps == 13 and a0.seconds["lost"] == 4.0  # settled once
    assert (a1.seconds["steps"], a1.seconds["recomputed"], a1.seconds["lost"]) == \
        (10.0, 30.0, 0.0)  # 15 of its 20 steps; it ended cleanly: nothing lost
    t = goodput.totals([a0, a1])
    assert (t["wall_s"], t["steps_s"], t["recomputed_steps"]) == (194.0, 50.0, 28)
    assert t["goodput"] == pytest.approx(50.0 / 194.0)
    killed = goodput.Attempt(start=0.0, last_seen=10.0, heartbeat_s=10)
    goodput.settle([killed], restored=0, logged=0, now=3600.0)
    assert killed.seconds["lost"] == 10.0  # an hour's wait before the restart is not charged


def test_persisted_and_reloaded_across_a_restart(tmp_path):
    clock = Clock(1000.0)
    first = goodput.Ledger(tmp_path, clock=clock, start=990.0, listen=False)
    first.resume(0, 0)
    first.switch("steps")
    clock.now = 1007.0
    first.trained(7)
    first.write()  # its last heartbeat; then it is killed
    first.stop()
    (saved,) = goodput.read(tmp_path)
    assert saved.status == "running" and saved.last_seen == 1007.0 and saved.reached == 7
    assert saved.seconds["startup"] == 10.0 and saved.seconds["steps"] == 7.0

    clock.now = 1012.0  # restarted 3 s after the last heartbeat (so it died in them)
    second = goodput.Ledger(tmp_path, clock=clock, start=1010.0, listen=False, heartbeat_s=0)
    assert second.resume(4, 8) == 4  # restored step 4; metrics logged up to step 8
    clock.now = 1020.0
    second.close()
    a, b = goodput.read(tmp_path)
    assert a.status == "killed" and a.recomputed_steps == 4 and a.seconds["lost"] == 3.0
    assert a.seconds["recomputed"] == pytest.approx(3.0)  # 3 of its 7 recorded steps
    assert a.seconds["steps"] == pytest.approx(4.0)
    assert b.status == "ended" and b.seconds["startup"] == 10.0 and b.first_step == 4
    t = goodput.totals([a, b])
    assert t["wall_s"] == pytest.approx(17.0 + 3.0 + 10.0)

    third = goodput.Ledger(tmp_path, clock=clock, start=1030.0, listen=False, heartbeat_s=0)
    assert third.resume(4, 4) == 0  # the run was complete: nothing new to settle
    assert [x.seconds for x in third.history] == [a.seconds, b.seconds]
    third.stop()


def test_heartbeat_thread_writes_while_running(tmp_path):
    ledger = goodput.Ledger(tmp_path, heartbeat_s=0.2, listen=False)
    ledger.resume(0, 0)
    ledger.switch("steps")
    time.sleep(1.5)
    (beat,) = goodput.read(tmp_path)
    assert beat.status == "running" and time.time() - beat.last_seen < 1.3
    ledger.close()
    (done,) = goodput.read(tmp_path)
    assert done.status == "ended" and done.last_seen >= beat.last_seen


def test_unreadable_ledger_starts_a_new_one(tmp_path, capsys):
    (tmp_path / goodput.GOODPUT_FILE).write_text("{not json")
    ledger = goodput.Ledger(tmp_path, listen=False, heartbeat_s=0)
    ledger.resume(0, 0)
    assert ledger.history == []
    assert "is not a readable goodput ledger" in capsys.readouterr().err
    ledger.close()
    assert len(goodput.read(tmp_path)) == 1


# SIGKILL before step 8 (steps 1-7 trained and logged), once the step-4 checkpoint committed.
KILL_AT_7 = kill_script(7, 4)


def test_killed_and_resumed_run_keeps_one_ledger(tmp_path):
    workdir = tmp_path / "run"
    args = train_args(workdir, tmp_path / "data", steps=12, **{
        "train.ckpt_every": 4, "train.eval_every": 6, "train.sample_tokens": 0,
        "model.n_layer": 1})
    t0 = time.time()
    killed = run_python(["-c", KILL_AT_7] + args[2:])
    t1 = time.time()
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (beat,) = goodput.read(workdir)
    assert beat.status == "running" and beat.reached <= 7
    logged = metrics.last_step(workdir)
    assert logged == 7

    resumed = run_python(args)
    t2 = time.time()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 4" in resumed.stdout
    a, b = goodput.read(workdir)
    assert a.status == "killed" and b.status == "ended"
    assert a.recomputed_steps == logged - 4 == 3 and b.recomputed_steps == 0
    assert (b.first_step, b.reached) == (4, 12)
    # every second of an attempt is in one category: they sum to its recorded wall time
    assert sum(a.seconds.values()) - a.seconds["lost"] == pytest.approx(a.last_seen - a.start)
    assert sum(b.seconds.values()) == pytest.approx(b.last_seen - b.start)
    # ... which lies within the processes' lives as this test saw them
    assert t0 - 0.1 <= a.start <= a.last_seen <= t1 + 0.1
    assert a.last_seen + a.seconds["lost"] <= b.start  # lost: an upper bound, until the restart
    assert t1 - 0.1 <= b.start <= b.last_seen <= t2 + 0.1
    assert 0 <= a.seconds["lost"] <= goodput.HEARTBEAT_S
    assert sum(a.seconds.values()) + sum(b.seconds.values()) > 0.5 * (t2 - t0)
    for x in (a, b):
        assert x.seconds["compile"] > 0 and x.seconds["save"] > 0 and x.seconds["steps"] > 0
        assert x.seconds["startup"] > 0.5  # imports and data preparation at least
    assert a.seconds["eval"] > 0 and a.seconds["restore"] == 0 < b.seconds["restore"]

    rows = [r for r in metrics.read_metrics(workdir) if "goodput" in r]
    assert [r["step"] for r in rows] == [6, 12]  # the eval at 6, the end (12: once)
    t = goodput.totals([a, b])
    assert 0 < rows[-1]["goodput"] <= 1
    assert rows[-1]["goodput"] == pytest.approx(t["goodput"])
    assert rows[-1]["goodput/recomputed_steps"] == 3 and rows[-1]["goodput/attempts"] == 2
    assert rows[-1]["goodput/wall_s"] == pytest.approx(t["wall_s"])
    assert 0 < rows[0]["goodput"] <= 1
    lines = [x for x in resumed.stdout.splitlines() if x.startswith("goodput ")]
    print("\n".join(lines))
    assert len(lines) == 2 and "over 2 attempts" in lines[-1]
    assert f"recomputed {t['recomputed_s']:.1f} s (3 steps)" in lines[-1]

    from tensorboard.backend.event_processing import event_accumulator  # a test dependency
    acc = event_accumulator.EventAccumulator(os.fspath(workdir / "tb"))
    acc.Reload()
    assert acc.Scalars("goodput")[-1].value == pytest.approx(rows[-1]["goodput"], rel=1e-6)
