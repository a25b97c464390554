"""The baby GPT: 50 steps move every seen state toward its empirical frequency."""

from __future__ import annotations

from test_optim import experiment

from gpt_jax import babygpt


def test_states_move_toward_empirical():
    cfg = experiment("babygpt")
    before, after, losses = babygpt.train(cfg)
    assert losses[-1] < losses[0]
    emp = babygpt.empirical(cfg.data.sequence, cfg.model.context)
    assert set(emp) == {(0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 1, 1)}
    assert emp[(1, 1, 1)] == 0.5 and emp[(1, 1, 0)] == 1.0
    for i, state in enumerate(babygpt.states(cfg.model.context)):
        key = tuple(int(t) for t in state)
        if key in emp:
            assert abs(after[i] - emp[key]) < abs(before[i] - emp[key]), key
    assert "111" in babygpt.table(cfg, before, after)
