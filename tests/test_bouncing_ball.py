"""kind: bouncing_ball — the chain of event solves against the closed form (values and
gradients), the quick config's training moving e and g to the truth (its whole run,
stopped and resumed on the way, with the neural event: marked slow), and its config
errors naming the key."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bouncing_ball import Ball, closed_form, flights, raw
from experiments.config import ConfigError
from experiments.parallel import DataParallel
from experiments.registry import load_config
from experiments.runner import Context, make_optimizer, make_train_step, params_of, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "bouncing_ball_quick.yaml")
OPTIONS = dict(solver="dopri5", rtol=1e-8, atol=1e-10, max_steps=1000, throw=False)


def _chain(x, adjoint, k=4):
    out = flights(Ball(x[0], x[1]), 1.0, k, 5.0, {**OPTIONS, "adjoint": adjoint})
    return out["bounce_times"], out["apex_states"][:, 0], out


def test_chained_solves_match_the_closed_form():
    x = jnp.stack(raw(0.8, 9.81, np.float64))
    times, apexes, out = jax.jit(lambda x: _chain(x, "backsolve"))(x)
    true_times, true_apexes = closed_form(0.8, 9.81, 1.0, 4)
    np.testing.assert_allclose(times, true_times, rtol=0, atol=1e-9)
    np.testing.assert_allclose(apexes, true_apexes, rtol=0, atol=1e-9)
    assert np.all(out["happened"])
    assert np.max(np.abs(out["bounce_states"][:, 0])) < 1e-9  # on the floor


@pytest.mark.parametrize("adjoint", ["backsolve", pytest.param("direct",
                                                               marks=pytest.mark.slow)])
def test_gradient_through_the_events_matches_the_closed_form(adjoint):
    """d/d(e_logit, log_g) of a weighted sum of bounce times and apexes, against central
    differences of the closed form."""
    w_t, w_h = np.array([1.0, -0.5, 2.0, 0.3]), np.array([0.7, 1.0, -1.5, 2.0])

    def loss(x):
        times, apexes, _ = _chain(x, adjoint)
        return jnp.sum(w_t * times) + jnp.sum(w_h * apexes)

    def closed(x):
        times, apexes = closed_form(1 / (1 + np.exp(-x[0])), np.exp(x[1]), 1.0, 4)
        return np.sum(w_t * times) + np.sum(w_h * apexes)

    x = np.array(raw(0.6, 7.0, np.float64))
    eps = 1e-6
    fd = [(closed(x + eps * d) - closed(x - eps * d)) / (2 * eps) for d in np.eye(2)]
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(jnp.asarray(x)), fd, rtol=1e-6)


def test_quick_config_training_moves_e_and_g_to_the_truth(tmp_path):
    """The quick config's data, solver and optimizer through the runner's own train step,
    without its evaluations and report (so fast): the parametric ball from e = 0.5,
    g = 5 to within 0.5% of the truth (the noisy data's least-squares fit: 0.8003,
    9.815)."""
    cls, cfg = load_config(QUICK, ["model.neural_event=false"])
    ctx = Context(cfg, str(tmp_path), QUICK, DataParallel(), np.dtype("float64"))
    experiment = cls(cfg, ctx)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    train_step = make_train_step(experiment, tx, ctx.parallel)
    models = experiment.init_models(jax.random.PRNGKey(0))
    states = {name: tx.init(params_of(m)) for name, m in models.items()}
    for step in range(cfg.train.steps):
        batch = ctx.parallel.shard_batch(experiment.batch(step))
        models, states, loss, _ = train_step(models, states, batch, jax.random.PRNGKey(step))
    ball = models["ball"]
    assert abs(float(ball.e) - 0.8) < 0.004 and abs(float(ball.g) - 9.81) < 0.05
    assert float(loss) < 1e-4


@pytest.mark.slow
def test_quick_config_learns_e_and_g_and_resumes(tmp_path):
    cls, cfg = load_config(QUICK, ["train.stop_after=150"])
    stopped = run(cls, cfg, config_file=QUICK, out_dir=str(tmp_path), progress=False)
    assert stopped.status == "stopped" and stopped.step == 150
    cls, cfg = load_config(QUICK)
    result = run(cls, cfg, config_file=QUICK, out_dir=str(tmp_path), progress=False)
    assert result.status == "complete" and result.step == cfg.train.steps
    rows = {row["model"]: row for row in result.report.rows}
    # From e = 0.5, g = 5: the parametric ball within 0.5% of the truth (the noisy data's
    # least-squares fit is 0.8003, 9.815), the neural-event ball within 1% and its
    # learned event firing within 5 mm of the floor.
    ball, neural = rows["learned (floor h = 0)"], rows["learned, neural event"]
    assert abs(ball["e"] - 0.8) < 0.004 and abs(ball["g (m/s²)"] - 9.81) < 0.05
    assert abs(neural["e"] - 0.8) < 0.008 and abs(neural["g (m/s²)"] - 9.81) < 0.1
    assert neural["event height max (mm)"] < 5
    assert ball["bounce time error max (ms)"] < 5
    for figure in result.report.figures:
        assert os.path.getsize(tmp_path / figure) > 1000
    assert os.path.exists(result.summary_path)


@pytest.mark.parametrize("override,key", [
    ("model.restitution=0.7", "model.restitution"),
    ("data.e=1.2", "data.e"),
    ("model.e_init=0", "model.e_init"),
    ("data.bounces=0", "data.bounces"),
    ("model.floor_weight=-1", "model.floor_weight"),
    ("data.horizon=0.5", "data.horizon"),
    ("solver.adjoint=forward", "solver.adjoint"),
])
def test_bad_config_values_are_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'") as error:
        load_config(QUICK, [override])
    assert error.value.key == key
