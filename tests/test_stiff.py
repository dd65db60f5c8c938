"""The stiff solvers: Kvaerno3/4/5 (ESDIRK) and Rodas5P (Rosenbrock).

* their coefficients as data (Butcher order conditions, Rosenbrock's linear order,
  L-stability and dense output), and bad tableaus refused;
* four classic stiff problems against scipy's Radau at rtol 1e-12, and dopri5 running
  out of steps on Robertson (the proof that the problem is stiff);
* the observed order with fixed steps;
* gradients w.r.t. Robertson's rate constants through Backsolve, Direct and Forward
  against central finite differences;
* vmap, batch_axis, float32, complex states, dense output, stats, and a field that
  turns NaN.

XLA compilation dominates: every test compiles as little as it can (small spans, one
solver where one suffices); the gradient tests of the other solvers are marked slow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

import jaxode
from benchmarks.stiff import problems
from jaxode.loop import MAX_STEPS_REACHED, NONFINITE_STATE, SUCCESS
from jaxode.solvers import implicit, rosenbrock

# Direct through a stiff solver: kvaerno3's in the fast suite, the others' in the slow one.
SLOW_DIRECT = pytest.param("direct", marks=pytest.mark.slow)

STIFF = ["kvaerno3", "kvaerno4", "kvaerno5", "rodas5p"]


def make(name, rtol=1e-8, atol=1e-10):
    """The solver, its Newton iteration (ESDIRK) at the solve's tolerances."""
    cls = jaxode.SOLVERS[name]
    if issubclass(cls, implicit.ESDIRK):
        return cls(newton_rtol=rtol, newton_atol=atol)
    return cls()


# ------------------------------------------------------------------ the problems


robertson, van_der_pol, hires, oregonator = (
    problems()[name][0] for name in ("robertson", "van_der_pol", "hires", "oregonator"))


K_ROBERTSON = np.array([0.04, 3e7, 1e4])
PROBLEMS = {
    # name: (field, y0, ts, params, atol of the comparison)
    "robertson": (robertson, [1.0, 0.0, 0.0], [0, 1e-3, 1, 1e2, 1e4, 1e5], K_ROBERTSON, 1e-12),
    "van_der_pol": (van_der_pol, [2.0, 0.0], [0, 1, 300, 600, 1200, 3000], 1000.0, 1e-6),
    "hires": (hires, [1, 0, 0, 0, 0, 0, 0, 0.0057], [0, 1, 10, 100, 321.8122], None, 1e-10),
    "oregonator": (oregonator, [1.0, 2.0, 3.0], [0, 30, 90, 180, 270, 360], None, 1e-6),
}


def radau(problem):
    """scipy Radau at rtol 1e-12 with the exact Jacobian."""
    field, y0, ts, params, atol = PROBLEMS[problem]
    fun = jax.jit(lambda y: field(y, 0.0, params))
    jac = jax.jit(jax.jacfwd(lambda y: field(y, 0.0, params)))
    sol = solve_ivp(lambda t, y: np.asarray(fun(y)), (ts[0], ts[-1]), np.asarray(y0, float),
                    method="Radau", rtol=1e-12, atol=1e-3 * atol, t_eval=np.asarray(ts, float),
                    jac=lambda t, y: np.asarray(jac(y)))
    assert sol.success
    return sol.y.T


# `radau(problem)` as it came out (scipy 1.x; 2-5 s each, so stored: see
# test_stored_references_are_radau's).
REFERENCES = {
    "robertson": [
        [1.0, 0.0, 0.0],
        [0.9999600015632168, 2.9169034944937892e-05, 1.0829401837908418e-05],
        [0.9664597373330025, 3.074626578578609e-05, 0.03350951640121254],
        [0.6172348823963533, 6.153591274645306e-06, 0.3827589640123723],
        [0.10730042853795953, 4.800166972579232e-07, 0.8926990914453437],
        [0.017865921142277866, 7.274751468510269e-08, 0.9821340061102071]],
    "van_der_pol": [
        [2.0, 0.0], [1.9993333705060317, -0.0006670371231733152],
        [1.7793977694949152, -0.000821415700693627], [1.4845756953204485, -0.001233069872480437],
        [-1.699714006261061, 0.0008997819440394805], [-1.5106069447581267, 0.0011783799846807924]],
    "hires": [
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057],
        [0.2554926929715084, 0.056908789086526745, 0.01945807497709716, 0.45851946967117735,
         0.02014773912506993, 0.18228795775950296, 0.005499081272420942, 0.0002009187275790572],
        [0.008324735469244846, 0.0016526725080030068, 0.0014103426593089711, 0.017433224297477973,
         0.1857204640652346, 0.7494166221553276, 0.005651253341825123, 4.874665817488627e-05],
        [0.004520859364125121, 0.0008839056323375941, 0.0007971942865687099, 0.007811326061371831,
         0.13238525409508506, 0.5301676923205585, 0.005631339757842627, 6.866024215738042e-05],
        [0.0007371312573323958, 0.00014424857263158465, 5.88872974096444e-05,
         0.0011756513432828251, 0.0023863561988264194, 0.006238968252727304,
         0.0028499983951826287, 0.002850001604817374]],
    "oregonator": [
        [1.0, 2.0, 3.0], [1.0006614671804939, 1512.778937347456, 10358.543127686342],
        [1.0018903684387503, 529.9926232296597, 1.6622795790150133],
        [1.0197634725371132, 51.597613229485674, 1.0169857789558412],
        [1.249102130055063, 5.013945178510965, 1.2083266262046999],
        [1.0008148703185222, 1228.1785215503014, 132.05549428495283]],
}


def reference(problem):
    return np.asarray(REFERENCES[problem])


@pytest.mark.slow
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_stored_references_are_radau(problem):
    # Radau at rtol 1e-12 reproduces them to a few 1e-9 across scipy builds (3.4e-9 on one
    # element of Van der Pol, 2026-12-02): far below the 1e-6 the solvers are held to.
    np.testing.assert_allclose(radau(problem), reference(problem), rtol=1e-8, atol=1e-13)


# Solve tolerances: kvaerno3 (third order) at 1e-6 takes as many steps as the others at 1e-8.
RTOL = {"kvaerno3": 1e-6, "kvaerno4": 1e-8, "kvaerno5": 1e-8, "rodas5p": 1e-8}


# Every solver on Robertson; the others (2-3 s each, compilation mostly) with
# kvaerno5 and rodas5p, and the rest marked slow.
RADAU_CASES = [pytest.param(name, problem, marks=[] if problem == "robertson" or name in (
    "kvaerno5", "rodas5p") else [pytest.mark.slow]) for problem in PROBLEMS for name in STIFF]


@pytest.mark.parametrize("name,problem", RADAU_CASES)
def test_stiff_problems_against_radau(name, problem):
    """Within 300 rtol of Radau at the steps' own ends (ts[-1]); outputs inside a step come
    from the dense output, which for Kvaerno is the cubic Hermite interpolant (third order,
    like diffrax's): there 1e4 rtol (measured: up to 4e3 rtol on Van der Pol, 600 on HIRES;
    Rodas5P's own fourth-order extension stays within 300 rtol)."""
    field, y0, ts, params, atol = PROBLEMS[problem]
    rtol = RTOL[name]
    sol = jaxode.solve(field, jnp.asarray(y0, float), jnp.asarray(ts, float), params,
                       solver=make(name, rtol, atol * rtol * 1e4), rtol=rtol,
                       atol=atol * rtol * 1e4, max_steps=20_000)
    ref = reference(problem)
    error = np.abs(np.asarray(sol.zs) - ref) / (np.abs(ref) + atol)
    assert np.max(error[-1]) < 300 * rtol, (name, problem, error[-1])
    inside = 300 if name == "rodas5p" else 1e4
    assert np.max(error) < inside * rtol, (name, problem, np.max(error, axis=1))
    assert int(sol.stats["num_jacobians"]) == int(sol.stats["num_steps"])
    assert int(sol.stats["num_linear_solves"]) >= int(sol.stats["num_steps"])


def test_dopri5_runs_out_of_steps_on_robertson():
    field, y0, ts, params, _ = PROBLEMS["robertson"]
    sol = jaxode.solve(field, jnp.asarray(y0), jnp.asarray(ts, float), params, solver="dopri5",
                       rtol=1e-6, atol=1e-10, max_steps=5000, throw=False)
    assert int(sol.status) == MAX_STEPS_REACHED
    stiff = jaxode.solve(field, jnp.asarray(y0), jnp.asarray(ts, float), params,
                         solver="rodas5p", rtol=1e-6, atol=1e-10, max_steps=5000)
    assert int(stiff.status) == SUCCESS and int(stiff.stats["num_steps"]) < 500
    assert int(sol.stats["num_jacobians"]) == 0 == int(sol.stats["num_linear_solves"])


# ------------------------------------------------------------------ coefficients


@pytest.mark.parametrize("tab,order,error_order", [
    (implicit.KVAERNO3, 3, 2), (implicit.KVAERNO4, 4, 3), (implicit.KVAERNO5, 5, 4)])
def test_esdirk_order_conditions(tab, order, error_order):
    assert implicit.satisfied_order(tab.a, tab.b, 8) == order
    assert implicit.satisfied_order(tab.a, tab.b - tab.b_err, 8) == error_order
    assert len(implicit.rooted_trees(5)) == 9 and len(implicit.rooted_trees(6)) == 20


def test_bad_tableaus_are_refused():
    tab = implicit.KVAERNO5
    a = tab.a.copy()
    a[4, 2] += 1e-6
    with pytest.raises(ValueError, match="order conditions"):
        implicit.ESDIRKTableau(a=a, b_err=tab.b_err, predictor=tab.predictor, order=5,
                               error_order=4)
    with pytest.raises(ValueError, match="b_err must sum to 0"):
        implicit.ESDIRKTableau(a=tab.a, b_err=tab.b_err + 1e-3, predictor=tab.predictor,
                               order=5, error_order=4)
    r = rosenbrock.RODAS5P
    fields = dict(a=r.a, C=r.C, gamma=r.gamma, c=r.c, d=r.d, H=r.H, order=5, error_order=4,
                  dense_order=4)
    C = r.C.copy()
    C[5, 1] *= 1.001
    with pytest.raises(ValueError, match="linear order"):
        rosenbrock.RosenbrockTableau(**{**fields, "C": C})
    H = r.H.copy()
    H[1, 3] += 1e-3
    with pytest.raises(ValueError, match="dense output"):
        rosenbrock.RosenbrockTableau(**{**fields, "H": H})
    with pytest.raises(ValueError, match="max_iterations"):
        jaxode.Kvaerno5(max_iterations=0)


# ------------------------------------------------------------------ order, fixed steps


def _nonautonomous(y, t, p):
    """Non-stiff and non-autonomous, so Rodas5P's ∂f/∂t term is exercised."""
    return jnp.stack([-y[1] + jnp.sin(t) * y[0], y[0] - 0.5 * y[1] * jnp.cos(2 * t)])


@pytest.mark.parametrize("name", STIFF)
def test_observed_order_with_fixed_steps(name):
    cls = jaxode.SOLVERS[name]
    solver = cls(newton_rtol=1e-14, newton_atol=1e-14) if issubclass(cls, implicit.ESDIRK) \
        else cls()
    y0, ts = jnp.array([1.0, 0.5]), jnp.array([0.0, 2.0])
    ref = jaxode.odeint(_nonautonomous, y0, ts, None, solver="dopri8", rtol=1e-13,
                        atol=1e-13)[-1]
    run = jax.jit(lambda dt: jaxode.odeint(
        _nonautonomous, y0, ts, None, solver=solver, dt0=dt,
        controller=jaxode.ConstantStep(), max_steps=200)[-1])
    errors = [float(jnp.max(jnp.abs(run(2.0 / n) - ref))) for n in (16, 32)]
    observed = np.log2(errors[0] / errors[1])
    assert abs(observed - cls.order) < 0.4, (name, observed, errors)


@pytest.mark.parametrize("name", [pytest.param("kvaerno5", marks=pytest.mark.slow), "rodas5p"])
def test_dense_output(name):
    field, y0, ts, params, _ = PROBLEMS["oregonator"]
    sol = jaxode.solve(field, jnp.asarray(y0), jnp.array([0.0, 60.0]), params,
                       solver=make(name), rtol=1e-8, atol=1e-8, dense=True)
    t = jnp.array([5.0, 17.3, 42.0])
    inside = jax.vmap(sol.evaluate)(t)
    direct = jaxode.odeint(field, jnp.asarray(y0), jnp.concatenate([jnp.zeros(1), t]), params,
                           solver=make(name), rtol=1e-8, atol=1e-8)[1:]
    np.testing.assert_allclose(inside, direct, rtol=1e-4)


# ------------------------------------------------------------------ gradients

GRAD_TS = jnp.array([0.0, 1.0, 10.0, 100.0])
GRAD_W = jnp.array([1.0, 1e4, 1.0])  # y2 ~ 1e-5: weight it up


GRAD_RTOL = {"kvaerno3": 1e-8, "kvaerno4": 1e-10, "kvaerno5": 1e-10, "rodas5p": 1e-10}


def _robertson_loss(log_k, name, adjoint, rtol=None):
    rtol = rtol or GRAD_RTOL[name]
    solver = make(name, rtol, 1e-14)
    zs = jaxode.odeint(robertson, jnp.array([1.0, 0.0, 0.0]), GRAD_TS, jnp.exp(log_k),
                       solver=solver, rtol=rtol, atol=1e-14, adjoint=adjoint, max_steps=20_000)
    return jnp.sum(zs[1:] * GRAD_W)


@functools.cache
def _finite_differences():
    """Central differences of a Rodas5P solve at rtol 1e-12 (its solution is smooth in
    the parameters: no Newton iteration)."""
    loss = jax.jit(lambda lk: _robertson_loss(lk, "rodas5p", "direct", 1e-12))
    log_k, eps = jnp.log(jnp.asarray(K_ROBERTSON)), 1e-5
    return np.array([(loss(log_k + eps * e) - loss(log_k - eps * e)) / (2 * eps)
                     for e in np.eye(3)])


def _check_gradient(name, adjoint):
    log_k = jnp.log(jnp.asarray(K_ROBERTSON))
    if adjoint == "forward":
        grad = jax.jacfwd(lambda lk: _robertson_loss(lk, name, adjoint))(log_k)
    else:
        grad = jax.grad(lambda lk: _robertson_loss(lk, name, adjoint))(log_k)
    fd = _finite_differences()
    bound = 1e4 * GRAD_RTOL[name]  # the solves' own global error, relative
    np.testing.assert_allclose(grad, fd, rtol=bound, atol=bound * np.max(np.abs(fd)))


@pytest.mark.parametrize("adjoint", ["backsolve", SLOW_DIRECT, pytest.param(
    "forward", marks=pytest.mark.slow)])
def test_rodas5p_gradients(adjoint):
    _check_gradient("rodas5p", adjoint)


@pytest.mark.parametrize("adjoint", ["backsolve", "direct", "forward"])
def test_kvaerno3_gradients(adjoint):
    _check_gradient("kvaerno3", adjoint)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kvaerno4", "kvaerno5"])
@pytest.mark.parametrize("adjoint", ["backsolve", "direct", "forward"])
def test_kvaerno_gradients(name, adjoint):
    _check_gradient(name, adjoint)


@pytest.mark.slow
def test_backsolve_with_batch_axis_matches_per_sample():
    y0s = jnp.array([[1.0, 0.0, 0.0], [0.8, 1e-6, 0.2]])
    ts = jnp.array([0.0, 1.0, 10.0])
    p = jnp.asarray(K_ROBERTSON)

    def loss(k, **kw):
        zs = jaxode.odeint(robertson, y0s, ts, k, solver="rodas5p", rtol=1e-9, atol=1e-13,
                           **kw)
        return jnp.sum(zs[1:] * GRAD_W)

    batched = jax.grad(lambda k: loss(k, batch_axis=0))(p)
    vmapped = jax.grad(lambda k: jnp.sum(jax.vmap(lambda y: jnp.sum(jaxode.odeint(
        robertson, y, ts, k, solver="rodas5p", rtol=1e-9, atol=1e-13)[1:] * GRAD_W))(y0s)))(p)
    np.testing.assert_allclose(batched, vmapped, rtol=1e-6)


# ------------------------------------------------------------------ vmap, float32, NaN


def test_vmap_over_initial_conditions_and_parameters():
    field, _, _, _, _ = PROBLEMS["van_der_pol"]
    ts = jnp.array([0.0, 0.5, 1.0])
    solve = lambda y0, mu: jaxode.odeint(field, y0, ts, mu, solver="kvaerno5", rtol=1e-7,
                                         atol=1e-9)
    y0s, mus = jnp.array([[2.0, 0.0], [1.5, 0.1]]), jnp.array([100.0, 1000.0])
    batched = jax.jit(jax.vmap(solve))(y0s, mus)
    for i in range(2):
        np.testing.assert_allclose(batched[i], solve(y0s[i], mus[i]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["kvaerno5", "rodas5p"])
def test_float32(name):
    field, y0, ts, params, _ = PROBLEMS["robertson"]
    ts32 = jnp.asarray(ts[:4], jnp.float32)
    sol = jaxode.solve(field, jnp.asarray(y0, jnp.float32), ts32,
                       jnp.asarray(params, jnp.float32), solver=name, rtol=1e-4, atol=1e-8)
    assert sol.zs.dtype == jnp.float32
    ref = reference("robertson")[:4]
    error = np.abs(np.asarray(sol.zs, float) - ref) / (np.abs(ref) + 1e-8)
    assert np.max(error) < 1e-2, np.max(error)


@pytest.mark.parametrize("name", ["kvaerno5", "rodas5p"])
def test_a_field_that_turns_nan_ends_with_the_nonfinite_status(name):
    def field(y, t, _):
        return jnp.where(t > 0.5, jnp.nan, -50.0 * y)

    sol = jaxode.solve(field, jnp.ones(2), jnp.array([0.0, 1.0]), None, solver=name,
                       throw=False)
    assert int(sol.status) == NONFINITE_STATE
    assert not np.all(np.isfinite(np.asarray(sol.zs[-1])))
    with pytest.raises(Exception, match="non-finite"):
        jaxode.odeint(field, jnp.ones(2), jnp.array([0.0, 1.0]), None, solver=name)


def test_newton_failure_rejects_the_step():
    """One Newton iteration allowed: steps whose iteration has not converged are rejected,
    the solve still succeeds (with smaller steps) and matches a converged solve."""
    field, y0, ts, params, _ = PROBLEMS["oregonator"]
    y0, ts = jnp.asarray(y0), jnp.array([0.0, 30.0])
    tight = jaxode.solve(field, y0, ts, params, solver=jaxode.Kvaerno3(max_iterations=2),
                         rtol=1e-6, atol=1e-8, max_steps=20_000)
    loose = jaxode.solve(field, y0, ts, params, solver="kvaerno3", rtol=1e-6, atol=1e-8)
    assert int(tight.status) == SUCCESS
    assert int(tight.stats["num_rejected"]) > int(loose.stats["num_rejected"])
    np.testing.assert_allclose(tight.zs[-1], loose.zs[-1], rtol=1e-4)


def test_pytree_state_and_vmap_over_ts():
    """A (dict) pytree state, and vmap over the output times."""

    def field(z, t, k):
        y = jnp.concatenate([z["a"], z["bc"]])
        dy = robertson(y, t, k)
        return {"a": dy[:1], "bc": dy[1:]}

    z0 = {"a": jnp.array([1.0]), "bc": jnp.array([0.0, 0.0])}
    ends = jnp.array([1.0, 10.0])
    solve = lambda end: jaxode.odeint(field, z0, jnp.stack([0.0, end]), jnp.asarray(K_ROBERTSON),
                                      solver="rodas5p", rtol=1e-8, atol=1e-12)
    zs = jax.vmap(solve)(ends)
    ref = reference("robertson")[2]  # t = 1
    np.testing.assert_allclose(jnp.concatenate([zs["a"][0, -1], zs["bc"][0, -1]]), ref,
                               rtol=1e-5, atol=1e-10)
    assert zs["bc"].shape == (2, 2, 2)


def test_unrolled_stages_match_the_stage_loop():
    field, y0, _, params, _ = PROBLEMS["oregonator"]
    ts = jnp.array([0.0, 10.0])
    run = lambda loop: jaxode.odeint(field, jnp.asarray(y0), ts, params,
                                     solver=jaxode.Kvaerno3(stage_loop=loop), rtol=1e-6,
                                     atol=1e-8)
    np.testing.assert_allclose(run(False), run(True), rtol=1e-9)


@pytest.mark.parametrize("name", ["kvaerno5", "rodas5p"])
def test_complex_states(name):
    """A complex state is linearised in its real form: a stiff complex linear system
    against expm, and a field that is not holomorphic (|z|²) against dopri5."""
    from scipy.linalg import expm

    a = jnp.array([[-1000.0 + 5j, 1.0], [0.0, -1.0 + 2j]])
    z0, ts = jnp.array([1.0 + 1j, 2.0 - 1j]), jnp.array([0.0, 0.5, 1.0])
    zs = jaxode.odeint(lambda z, t, p: p @ z, z0, ts, a, solver=make(name), rtol=1e-8,
                       atol=1e-10)
    expected = np.stack([expm(np.asarray(a) * float(t)) @ np.asarray(z0) for t in ts])
    np.testing.assert_allclose(zs, expected, rtol=1e-6, atol=1e-9)

    field = lambda z, t, p: -100.0 * (z - jnp.exp(1j * t)) + 0.1j * jnp.abs(z) ** 2
    got = jaxode.odeint(field, z0, ts, None, solver=make(name), rtol=1e-8, atol=1e-10)
    ref = jaxode.odeint(field, z0, ts, None, solver="dopri5", rtol=1e-11, atol=1e-13,
                        max_steps=20_000)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("adjoint", ["backsolve", SLOW_DIRECT])
def test_complex_state_gradient_of_a_real_loss(adjoint):
    field = lambda z, t, k: -k * (z - jnp.exp(1j * t))

    def loss(k, adjoint):
        zs = jaxode.odeint(field, jnp.array([1.0 + 0.5j]), jnp.array([0.0, 1.0]), k,
                           solver="rodas5p", rtol=1e-10, atol=1e-12, adjoint=adjoint)
        return jnp.real(zs[-1, 0]) ** 2 + jnp.imag(zs[-1, 0])

    k, eps = 50.0, 1e-4
    fd = (loss(k + eps, "backsolve") - loss(k - eps, "backsolve")) / (2 * eps)
    np.testing.assert_allclose(jax.grad(loss)(k, adjoint), fd, rtol=1e-5)


def test_direct_gradient_through_rejected_attempts_that_overflow():
    # In float32 Rodas5P's first attempts on Robertson overflow (NaN states, rejected):
    # reverse mode through those discarded attempts gave NaN gradients.
    f32 = lambda x: jnp.asarray(x, jnp.float32)

    def solve(z0, solver):
        sol = jaxode.solve(robertson, z0, f32([0.0, 0.1]), f32(K_ROBERTSON), solver=solver,
                           adjoint="direct", rtol=1e-3, atol=1e-6)
        return sol.zs[-1, 0], sol.stats["num_rejected"]

    loss = lambda z0, solver: solve(z0, solver)[0]
    z0 = f32([1.0, 0.0, 0.0])
    _, pullback, num_rejected = jax.vjp(lambda z0: solve(z0, "rodas5p"), z0, has_aux=True)
    assert int(num_rejected) > 0  # in the loop being differentiated
    (grad,) = pullback(f32(1.0))
    np.testing.assert_allclose(grad, jax.grad(loss)(z0, "kvaerno3"), rtol=1e-3)
    # An explicit solver there rejects overflowed attempts too (its discrete gradient is
    # large, as its solve is barely stable, but finite).
    assert np.all(np.isfinite(jax.grad(loss)(z0, "dopri5")))
