"""Terminal events: a falling ball's impact time and its gradients against the closed
forms, under every adjoint, jit and not, vmap, batch_axis, decreasing ts, float32,
pytree states; direction semantics, no event, a grazing touch, and bad conds."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxode
from jaxode import events

# Direct's event gradients run fast in TestFallingBall; its other variants in the slow suite.
SLOW_DIRECT = pytest.param("direct", marks=pytest.mark.slow)

G = 9.81
TS = jnp.linspace(0.0, 2.0, 5)


def fall(z, t, g):
    """A ball's (height, velocity) under gravity g."""
    return jnp.array([z[1], -g])


FLOOR = jaxode.Event(lambda z, t, g: z[0], direction=-1)


def impact(h, g):
    return jnp.sqrt(2 * h / g)


def impact_time(h, g, adjoint="backsolve", ts=TS, **options):
    sol = jaxode.solve(fall, jnp.stack([h, 0.0]), ts, g, event=FLOOR, adjoint=adjoint, **options)
    return sol.event_time


class TestImpact(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_impact_time_and_state(self):
        solve = self.variant(lambda h: jaxode.solve(fall, jnp.stack([h, 0.0]), TS, G, event=FLOOR))
        sol = solve(1.0)
        assert bool(sol.event_happened) and int(sol.status) == 0
        # Located to well within atol + rtol |t| (1e-8 + 1e-6 * 0.45) of the crossing.
        assert abs(float(sol.event_time) - float(impact(1.0, G))) < 1e-9
        chex.assert_trees_all_close(sol.event_state, jnp.array([0.0, -np.sqrt(2 * G)]),
                                    atol=1e-8)
        # Outputs after the event hold its state; the one before it is z(0).
        chex.assert_trees_all_close(sol.zs[1:], jnp.broadcast_to(sol.event_state, (4, 2)))
        chex.assert_trees_all_close(sol.zs[0], jnp.array([1.0, 0.0]))


class TestFallingBall:
    @pytest.mark.parametrize("adjoint", ["backsolve", "direct"])
    def test_gradients_against_closed_forms(self, adjoint):
        grads = jax.grad(impact_time, (0, 1))(1.0, G, adjoint)
        chex.assert_trees_all_close(grads, jax.grad(impact, (0, 1))(1.0, G), rtol=1e-7)
        # The event state's velocity -sqrt(2 h g) moves with the event time.
        speed = lambda h, g: jaxode.solve(fall, jnp.stack([h, 0.0]), TS, g, event=FLOOR,
                                          adjoint=adjoint).event_state[1]
        exact = jax.grad(lambda h, g: -jnp.sqrt(2 * h * g), (0, 1))(1.0, G)
        chex.assert_trees_all_close(jax.grad(speed, (0, 1))(1.0, G), exact, rtol=1e-7)

    def test_forward_mode(self):
        jacobian = jax.jacfwd(impact_time, (0, 1))(1.0, G, "forward")
        chex.assert_trees_all_close(jacobian, jax.grad(impact, (0, 1))(1.0, G), rtol=1e-7)

    @pytest.mark.parametrize("adjoint", ["backsolve", SLOW_DIRECT])
    def test_start_time_gradient(self, adjoint):
        # The impact comes sqrt(2h/g) after the start, wherever it is.
        start = lambda t0: impact_time(1.0, G, adjoint, ts=TS.at[0].set(t0))
        assert abs(float(jax.grad(start)(0.0)) - 1.0) < 1e-8

    @pytest.mark.parametrize("adjoint", ["backsolve", SLOW_DIRECT])
    def test_loss_on_outputs_after_the_event(self, adjoint):
        # zs[-1] is the event state: its velocity -sqrt(2 h g).
        loss = lambda h: jaxode.odeint(fall, jnp.stack([h, 0.0]), TS, G, event=FLOOR,
                                       adjoint=adjoint)[-1, 1]
        assert abs(float(jax.grad(loss)(1.0)) + np.sqrt(2 * G) / 2) < 1e-7

    @pytest.mark.parametrize("solver", ["kvaerno5", "rodas5p", "tsit5"])
    def test_other_solvers(self, solver):
        # Backsolve with a stiff solver takes the stiff backward pass.
        value, grad = jax.value_and_grad(lambda h: impact_time(h, G, solver=solver))(1.0)
        assert abs(float(value) - float(impact(1.0, G))) < 1e-7
        assert abs(float(grad) - float(jax.grad(impact)(1.0, G))) < 1e-6


class TestBatches:
    heights = jnp.array([1.0, 2.0, 0.5])

    def test_vmap_one_event_time_per_trajectory(self):
        times = jax.vmap(lambda h: impact_time(h, G))(self.heights)
        chex.assert_trees_all_close(times, impact(self.heights, G), atol=1e-9)
        total = lambda hs: jnp.sum(jax.vmap(lambda h: impact_time(h, G))(hs))
        grads = jax.grad(total)(self.heights)
        chex.assert_trees_all_close(grads, jax.grad(lambda hs: impact(hs, G).sum())(self.heights),
                                    rtol=1e-7)

    @pytest.mark.parametrize("adjoint", ["backsolve", SLOW_DIRECT])
    def test_batch_axis(self, adjoint):
        z0 = jnp.stack([self.heights, jnp.zeros(3)], axis=1)

        def solve(g):
            return jaxode.solve(fall, z0, TS, g, event=FLOOR, adjoint=adjoint, batch_axis=0)

        sol = solve(G)
        assert sol.event_happened.shape == (3,) and sol.event_state.shape == (3, 2)
        chex.assert_trees_all_close(sol.event_time, impact(self.heights, G), atol=1e-9)
        def times_and_heights(g):
            sol = solve(g)
            return sol.event_time, sol.zs[..., 0]

        # One differentiated solve for both losses: the event times' sum, and a loss on the
        # outputs (those before each sample's event and those after it).
        (times, heights), pullback = jax.vjp(times_and_heights, G)
        grad = pullback((jnp.ones_like(times), jnp.zeros_like(heights)))[0]
        exact = jax.grad(lambda g: jnp.sum(impact(self.heights, G * 0 + g)))(G)
        assert abs(float(grad) - float(exact)) < 1e-8
        loss = lambda g: jnp.sum(solve(g).zs[..., 0] ** 2)
        step = 1e-5
        central = (loss(G + step) - loss(G - step)) / (2 * step)
        grad = pullback((jnp.zeros_like(times), 2 * heights))[0]
        assert abs(float(grad) - float(central)) < 1e-6


class TestSemantics:
    def test_the_event_ends_the_solve_whatever_t_end_rounds_to(self):
        """After a crossing the loop's t and t_end hold one value computed twice, which
        XLA may round apart: the solve ends (and keeps its state) one ulp either side."""
        from jaxode import events, loop

        taus = jnp.array([0.0, 2.0])
        static = loop.Static(jaxode.Dopri5(), jaxode.PIController(), 100)
        traced = loop.Traced(jnp.asarray(1e-6), jnp.asarray(1e-8), jnp.asarray(0.1))
        event = events.Event(lambda t, z: z[0], -1)
        pieces = loop.Loop(lambda t, z: jnp.array([z[1], -G]), jnp.array([1.0, 0.0]), taus,
                           static, traced, event)
        c = pieces.init()
        t_event = jnp.asarray(impact(1.0, G))
        for t in (jnp.nextafter(t_event, 10.0), jnp.nextafter(t_event, -10.0)):
            done = c._replace(t=t, t_end=t_event, z=jnp.array([0.0, -4.0]),
                              event_happened=jnp.asarray(True))
            assert not bool(pieces.unfinished(done))
            np.testing.assert_array_equal(pieces.finish(done).zs[-1], done.z)

    def test_an_event_on_the_last_allowed_step_is_a_success(self):
        steps = int(jaxode.solve(fall, jnp.array([1.0, 0.0]), TS, G, event=FLOOR)
                    .stats["num_steps"])
        sol = jaxode.solve(fall, jnp.array([1.0, 0.0]), TS, G, event=FLOOR, max_steps=steps)
        assert bool(sol.event_happened) and int(sol.status) == 0

    def test_decreasing_ts(self):
        # Backwards in time from rest the height falls as well: the impact is at -sqrt(2h/g).
        back = -TS
        for adjoint in ("backsolve", "direct"):
            value, grad = jax.value_and_grad(lambda h: impact_time(h, G, adjoint, ts=back))(1.0)
            assert abs(float(value) + float(impact(1.0, G))) < 1e-9
            assert abs(float(grad) + float(jax.grad(impact)(1.0, G))) < 1e-7

    def test_no_event_in_the_span(self):
        sol = jaxode.solve(fall, jnp.array([100.0, 0.0]), TS, G, event=FLOOR)
        assert not bool(sol.event_happened)
        assert float(sol.event_time) == 2.0
        chex.assert_trees_all_close(sol.event_state, sol.zs[-1])
        chex.assert_trees_all_close(sol.zs[-1], jnp.array([100 - G * 2.0, -2 * G]), rtol=1e-10)

    def test_no_event_where_cond_is_flat(self):
        # cond's slope is zero at the end of a solve without an event: the gradient of
        # the outputs must not see the unused implicit-function step (it gave NaN).
        event = jaxode.Event(lambda z, t, p: z[0] - 5.0)
        for adjoint in ("backsolve", "direct"):
            last = lambda z0: jaxode.odeint(lambda z, t, p: 0.0 * z, jnp.stack([z0]), TS, None,
                                            event=event, adjoint=adjoint)[-1, 0]
            assert float(jax.grad(last)(1.0)) == 1.0

    def test_direction(self):
        height = lambda direction: jaxode.Event(lambda z, t, g: z[0], direction)
        up = jaxode.solve(fall, jnp.array([1.0, 0.0]), TS, G, event=height(1))
        both = jaxode.solve(fall, jnp.array([1.0, 0.0]), TS, G, event=height(0))
        assert not bool(up.event_happened) and bool(both.event_happened)
        # Thrown up from below the floor: only the upward crossing counts.
        thrown = jnp.array([-0.5, 5.0])
        rising = jaxode.solve(fall, thrown, TS, G, event=height(1))
        falling = jaxode.solve(fall, thrown, TS, G, event=height(-1))
        # z(t) = -0.5 + 5t - g t^2 / 2 crosses 0 at its two roots.
        roots = np.sort(np.roots([-G / 2, 5.0, -0.5]))
        assert abs(float(rising.event_time) - roots[0]) < 1e-9
        assert abs(float(falling.event_time) - roots[1]) < 1e-9

    def test_start_on_zero_is_not_a_crossing(self):
        sol = jaxode.solve(fall, jnp.array([0.0, 3.0]), TS, G, event=FLOOR)
        assert abs(float(sol.event_time) - 6.0 / G) < 1e-9  # up and back down

    def test_grazing_touch_is_not_seen(self):
        # The apex of a throw from -1 with speed sqrt(2g) touches zero at t = sqrt(2/g)
        # without a sign change: no event (documented on jaxode.Event).
        sol = jaxode.solve(fall, jnp.array([-1.0, np.sqrt(2 * G)]), TS, G,
                           event=jaxode.Event(lambda z, t, g: z[0], 0))
        assert not bool(sol.event_happened) and int(sol.status) == 0

    def test_two_crossings_inside_one_step_are_not_seen(self):
        # cond = cos(20 t) - 0.99 (positive near t = k pi / 10) is positive at both ends of
        # the fixed steps of pi / 10, negative in between: no crossing is reported.
        # Steps of pi / 40 see the first one.
        cond = jaxode.Event(lambda z, t, p: jnp.cos(20 * t) - 0.99)
        ts = jnp.array([0.0, 3 * np.pi / 10])
        coarse = jaxode.solve(lambda z, t, p: -z, jnp.ones(1), ts, solver="rk4",
                              dt0=np.pi / 10, event=cond)
        fine = jaxode.solve(lambda z, t, p: -z, jnp.ones(1), ts, solver="rk4",
                            dt0=np.pi / 40, event=cond)
        assert not bool(coarse.event_happened)
        assert bool(fine.event_happened)
        assert abs(float(fine.event_time) - np.arccos(0.99) / 20) < 1e-8

    def test_float32(self):
        sol = jaxode.solve(fall, jnp.array([1.0, 0.0], jnp.float32), TS.astype(jnp.float32),
                           G, event=FLOOR, rtol=1e-5, atol=1e-6)
        assert sol.event_time.dtype == jnp.float32
        assert abs(float(sol.event_time) - float(impact(1.0, G))) < 1e-5
        grad = jax.grad(lambda h: jaxode.solve(fall, jnp.stack([h, jnp.float32(0)]),
                                               TS.astype(jnp.float32), G, event=FLOOR,
                                               rtol=1e-5, atol=1e-6).event_time)
        assert abs(float(grad(jnp.float32(1.0))) - float(jax.grad(impact)(1.0, G))) < 1e-4

    def test_complex_state(self):
        # z = exp(i w t): Re z falls through 0 at t = pi / (2 w); dt/dw = -pi / (2 w^2).
        event = jaxode.Event(lambda z, t, w: jnp.real(z[0]), direction=-1)
        hit = lambda w: jaxode.solve(lambda z, t, w: 1j * w * z, jnp.ones(1, jnp.complex128),
                                     TS, w, event=event, rtol=1e-10, atol=1e-10).event_time
        value, grad = jax.value_and_grad(hit)(2.0)
        assert abs(float(value) - np.pi / 4) < 1e-9
        assert abs(float(grad) + np.pi / 8) < 1e-7

    def test_pytree_state(self):
        field = lambda z, t, g: {"height": z["velocity"], "velocity": -g * jnp.ones(())}
        event = jaxode.Event(lambda z, t, g: z["height"], direction=-1)
        z0 = {"height": jnp.array(1.0), "velocity": jnp.array(0.0)}
        sol = jaxode.solve(field, z0, TS, G, event=event)
        assert set(sol.event_state) == {"height", "velocity"}
        assert abs(float(sol.event_time) - float(impact(1.0, G))) < 1e-9
        grad = jax.grad(lambda h: jaxode.solve(field, {**z0, "height": h}, TS, G,
                                               event=event).event_state["velocity"])(1.0)
        assert abs(float(grad) + np.sqrt(2 * G) / 2) < 1e-7

    def test_non_autonomous_cond_and_parameter_gradient(self):
        # z' = -k z from 1 meets the falling line 0.8 - t/4 where exp(-k t) = 0.8 - t/4.
        cond = jaxode.Event(lambda z, t, k: z[0] - (0.8 - t / 4))
        hit = lambda k: jaxode.solve(lambda z, t, k: -k * z, jnp.ones(1), TS, k,
                                     event=cond).event_time
        t, k = float(hit(1.0)), 1.0
        assert abs(np.exp(-k * t) - (0.8 - t / 4)) < 1e-7
        # IFT by hand: c(t, k) = exp(-k t) - 0.8 + t / 4; dt/dk = -c_k / c_t.
        expected = -(-t * np.exp(-k * t)) / (-k * np.exp(-k * t) + 0.25)
        assert abs(float(jax.grad(hit)(1.0)) - expected) < 1e-6

    @pytest.mark.parametrize("adjoint", ["backsolve", SLOW_DIRECT, "forward"])
    def test_cond_with_parameters(self, adjoint):
        # A floor at height p["floor"]: the impact sqrt(2 (1 - floor) / g) after the drop.
        field = lambda z, t, p: jnp.array([z[1], -p["g"]])
        event = jaxode.Event(lambda z, t, p: z[0] - p["floor"], direction=-1)
        hit = lambda p: jaxode.solve(field, jnp.array([1.0, 0.0]), TS, p, event=event,
                                     adjoint=adjoint).event_time
        p = {"g": G, "floor": 0.1}
        derivative = jax.jacfwd if adjoint == "forward" else jax.grad
        exact = jax.grad(lambda p: jnp.sqrt(2 * (1 - p["floor"]) / p["g"]))(p)
        chex.assert_trees_all_close(derivative(hit)(p), exact, rtol=1e-7)

    def test_cond_as_a_module_and_as_a_closure(self):
        # A learned event function is an Equinox module; its arrays are differentiated, as
        # are arrays a plain cond closes over.
        class Floor(eqx.Module):
            height: jax.Array

            def __call__(self, z, t, g):
                return z[0] - self.height

        def hit(cond):
            return jaxode.solve(fall, jnp.array([1.0, 0.0]), TS, G,
                                event=jaxode.Event(cond, direction=-1)).event_time

        exact = float(jax.grad(lambda h: jnp.sqrt(2 * (1 - h) / G))(0.1))
        module = jax.grad(hit)(Floor(jnp.array(0.1))).height
        closure = jax.grad(lambda h: hit(lambda z, t, g: z[0] - h))(0.1)
        assert abs(float(module) - exact) < 1e-7 and abs(float(closure) - exact) < 1e-7

    def test_dense_output_holds_the_event_state_after_it(self):
        sol = jaxode.solve(fall, jnp.array([1.0, 0.0]), TS, G, event=FLOOR, dense=True)
        assert abs(float(sol.evaluate(0.3)[0]) - (1 - G * 0.09 / 2)) < 1e-9
        chex.assert_trees_all_close(sol.evaluate(1.5), sol.event_state)
        assert bool(jnp.all(jnp.isnan(sol.evaluate(2.5))))


class TestRootFinding:
    def test_illinois_converges_on_a_skewed_function(self):
        # Plain regula falsi stalls on a convex function; Illinois does not.
        theta = events.locate(lambda x: x**8 - 0.5**8, jnp.array(-0.5**8), jnp.array(1.0 - 0.5**8),
                              1e-12)
        assert abs(float(theta) - 0.5) < 1e-11 and float(theta) <= 0.5

    def test_root_at_the_step_end(self):
        assert float(events.locate(lambda x: x - 1, jnp.array(-1.0), jnp.array(0.0), 1e-12)) == 1.0


class TestBadInput:
    def test_direction_and_cond_refused(self):
        with pytest.raises(ValueError, match="direction"):
            jaxode.Event(lambda z, t, p: z[0], direction=2)
        with pytest.raises(TypeError, match="cond"):
            jaxode.Event("not a function")
        with pytest.raises(TypeError, match="event"):
            jaxode.solve(fall, jnp.array([1.0, 0.0]), TS, G, event=lambda z, t, p: z[0])

    @pytest.mark.parametrize("cond, problem", [
        (lambda z, t, g: z, "scalar"),
        (lambda z, t, g: z[0] > 0, "floating"),
        (lambda z, t, g: jnp.int32(1), "floating"),
        (lambda z, t, g: z[0] + 0j, "floating"),
    ])
    def test_cond_output_refused_while_tracing(self, cond, problem):
        with pytest.raises((TypeError, ValueError), match=f"cond: .*{problem}"):
            jaxode.solve(fall, jnp.array([1.0, 0.0]), TS, G, event=jaxode.Event(cond))

    def test_second_derivatives_are_refused_not_wrong(self):
        with pytest.raises(TypeError, match="event: .*once"):
            jax.grad(jax.grad(impact_time))(1.0, G)
        with pytest.raises(TypeError, match="event: .*once"):
            jax.jacfwd(jax.jacfwd(impact_time))(1.0, G, "forward")

    def test_a_failed_solve_raises_through_its_event_time(self):
        run = lambda h, **options: jaxode.solve(fall, jnp.stack([h, 0.0]), TS, G, event=FLOOR,
                                                max_steps=2, **options).event_time
        with pytest.raises(Exception, match="max_steps"):
            jax.block_until_ready(jax.jit(run)(1.0))
        with pytest.raises(Exception, match="max_steps"):
            jax.block_until_ready(jax.jit(jax.grad(lambda h: run(h, adjoint="direct")))(1.0))

    def test_adjoint_nfe_refuses_an_event(self):
        with pytest.raises(ValueError, match="event"):
            jaxode.adjoint_nfe(fall, jnp.array([1.0, 0.0]), TS, G, event=FLOOR)
