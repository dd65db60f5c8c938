"""The models of `jaxode.nn`: shapes, batches, parameter counts, gradients, and the
mathematics each model rests on (change of variables, invertibility, unbiased traces,
the Poisson integral, an ELBO that training improves).

XLA compilation dominates the cost here, so the models are tiny (8 channels, 12x12
images, 2-D flows of a few units), each test compiles only what it checks, in one
`_jit` call, and `_jit` compiles at XLA's lowest backend optimisation level (about
half the compile time; the same numbers). The costliest checks are marked slow.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxode
from jaxode import nn

KEY = jax.random.PRNGKey(0)
_jit = functools.partial(
    eqx.filter_jit, compiler_options={"xla_backend_optimization_level": 0}
)


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def _cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


# ---------------------------------------------------------------- image classifiers


def test_parameter_counts_match_the_paper():
    """Table 1 with the default widths on 28x28 MNIST (counted from shapes only)."""
    counts = {
        name: nn.count_params(eqx.filter_eval_shape(cls, key=KEY))
        for name, cls in [
            ("odenet", nn.ODENet), ("rknet", nn.RKNet), ("resnet", nn.ResNet),
            ("mlp", nn.MLPClassifier),
        ]
    }
    assert counts == {"odenet": 208_266, "rknet": 208_266, "resnet": 576_778, "mlp": 238_510}
    assert 0.20e6 < counts["odenet"] < 0.23e6  # paper: 0.22M
    assert 0.55e6 < counts["resnet"] < 0.62e6  # paper: 0.60M
    assert 0.23e6 < counts["mlp"] < 0.25e6  # paper: 0.24M
    small = nn.ODENet(channels=8, key=KEY)
    assert nn.count_params(small) == nn.count_params(eqx.filter_eval_shape(nn.ODENet,
                                                                          channels=8, key=KEY))


def test_odefunc_sees_time_and_batches():
    func = nn.ODEFunc(channels=8, key=KEY)
    z = jax.random.normal(KEY, (3, 8, 4, 4))
    out, later = _jit(lambda f, z: (f(z, 0.5), jax.vmap(f, (0, None))(z, 1.0)))(func, z)
    assert out.shape == z.shape
    np.testing.assert_allclose(later, func(z, 1.0), rtol=1e-12, atol=1e-12)
    assert not np.allclose(out, later)
    assert func.norm1.groups == 8 and nn.group_norm(64).groups == 32


def test_odenet_batch_nfe_and_backsolve_gradient():
    # bosh3 rather than the default dopri5 only to halve the compilation.
    model = nn.ODENet(channels=8, solver="bosh3", key=KEY)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 1, 12, 12))
    labels = jnp.array([0, 3, 7])

    @_jit
    def loss_and_grad(model, x):
        def loss(model):
            logits, stats = model.with_stats(x)
            return _cross_entropy(logits, labels), (logits, stats)

        return eqx.filter_value_and_grad(loss, has_aux=True)(model)

    (value, (logits, stats)), grads = loss_and_grad(model, x)
    assert logits.shape == (3, 10) and jnp.isfinite(value)
    assert int(stats["nfe"]) > 0 and int(stats["num_accepted"]) > 0
    assert _finite(grads)
    for conv in (grads.features.func.conv1, grads.downsample.layers[0]):
        assert float(jnp.max(jnp.abs(conv.weight))) > 0


@pytest.mark.slow
def test_odeblock_joint_and_per_sample_batches():
    """The batch as one system and sample by sample agree to within the solves' error;
    per-sample solves report one NFE per sample."""
    options = dict(channels=4, rtol=1e-6, atol=1e-6, key=KEY)
    joint = nn.ODEBlock(**options)
    per_sample = nn.ODEBlock(batch_mode="per_sample", **options)
    x = jax.random.normal(KEY, (2, 4, 3, 3))

    @_jit
    def run(joint, per_sample, x):
        return joint.solve(x), per_sample.solve(x)

    (y_joint, joint_stats), (y, stats) = run(joint, per_sample, x)
    assert y.shape == x.shape and stats["nfe"].shape == (2,)
    assert joint_stats["nfe"].shape == ()
    np.testing.assert_allclose(y_joint, y, atol=2e-3)
    with pytest.raises(ValueError, match="batch_mode"):
        nn.ODEBlock(channels=4, batch_mode="lanes", key=KEY)


def test_baselines_shapes_and_vmap():
    x = jax.random.normal(KEY, (2, 1, 12, 12))
    resnet = nn.ResNet(channels=8, num_blocks=2, key=KEY)
    batched, vmapped = _jit(lambda m, x: (m(x), jax.vmap(m)(x)))(resnet, x)
    np.testing.assert_allclose(vmapped, batched, rtol=1e-12, atol=1e-12)
    assert len(resnet.features.blocks) == 2
    mlp = nn.MLPClassifier(in_features=144, hidden_size=16, key=KEY)
    assert mlp(x).shape == (2, 10) and mlp(x[0]).shape == (10,)
    rknet = nn.RKNet(channels=8, steps=2, key=KEY)
    block = rknet.features
    assert (block.solver, block.adjoint, block.dt0) == ("rk4", "direct", 0.5)
    with pytest.raises(ValueError, match="x: expected"):
        resnet(x[0, 0])
    with pytest.raises(ValueError, match=r"x: expected.*\(N, 1, H, W\)"):
        resnet(jnp.ones((2, 3, 12, 12)))  # three channels for a one-channel model


@pytest.mark.slow
def test_rknet_direct_gradient():
    rknet = nn.RKNet(channels=8, steps=2, key=KEY)
    x = jax.random.normal(KEY, (2, 1, 12, 12))

    @_jit
    def loss_and_grad(model):
        def loss(model):
            logits, stats = model.with_stats(x)
            return _cross_entropy(logits, jnp.array([1, 2])), stats

        return eqx.filter_value_and_grad(loss, has_aux=True)(model)

    (value, stats), grads = loss_and_grad(rknet)
    assert int(stats["nfe"]) == 2 * 4 + 1 and jnp.isfinite(value) and _finite(grads)


# ---------------------------------------------------------------------------- flows


def test_planar_flow_invertible_with_exact_logdet():
    flow = nn.PlanarFlow(num_layers=6, init_scale=1.0, key=KEY)
    z = 1.5 * jax.random.normal(jax.random.PRNGKey(2), (5, 2))
    direction = jax.random.normal(KEY, flow.w.shape)
    h = 1e-6

    @_jit
    def run(flow, z):
        x, logdet = flow.transform(z)
        z_back, logdet_back = flow.inverse(x)
        jac = jax.vmap(jax.jacfwd(lambda v: flow.transform(v)[0]))(z)
        loss = lambda w: eqx.tree_at(lambda f: f.w, flow, w).nll(x)
        derivative = jnp.vdot(jax.grad(loss)(flow.w), direction)
        difference = (loss(flow.w + h * direction) - loss(flow.w - h * direction)) / (2 * h)
        kl = flow.reverse_kl(KEY, 8, lambda v: -0.5 * jnp.sum(v**2))
        return x, logdet, z_back, logdet_back, jac, flow.log_prob(x), derivative, difference, kl

    x, logdet, z_back, logdet_back, jac, log_p, derivative, difference, kl = run(flow, z)
    assert bool(jnp.all(jnp.sum(flow.w * flow.constrained_u(), axis=-1) > -1))
    np.testing.assert_allclose(z_back, z, atol=1e-10)
    np.testing.assert_allclose(logdet_back, logdet, atol=1e-10)
    sign, reference = jnp.linalg.slogdet(jac)
    assert bool(jnp.all(sign > 0))
    np.testing.assert_allclose(logdet, reference, rtol=1e-10)
    np.testing.assert_allclose(log_p, flow.base_log_prob(z) - logdet, rtol=1e-10)
    # The inverse's gradient (one Newton step past the bisection) matches finite differences.
    np.testing.assert_allclose(derivative, difference, rtol=1e-6)
    assert jnp.isfinite(kl)


def test_cnf_density_integrates_to_one_and_round_trip():
    """One inverse solve of a grid and of pushed-forward samples: the density sums to 1
    over the grid, and the samples come back with log q as sampling reported it."""
    cnf = nn.CNF(width=4, hyper_hidden=8, key=jax.random.PRNGKey(3))
    grid = jnp.linspace(-6.0, 6.0, 49)
    points = jnp.stack(jnp.meshgrid(grid, grid), -1).reshape(-1, 2)
    base_key, noise_key = jax.random.split(KEY)  # as sample_and_log_prob splits its key
    z = cnf.base_std * jax.random.normal(base_key, (4, 2))

    @_jit
    def run(cnf):
        samples, log_q = cnf.sample_and_log_prob(KEY, 4)
        z_back, logdet = cnf.inverse(jnp.concatenate([points, samples]))
        return samples, log_q, z_back, cnf.base_log_prob(z_back) - logdet

    samples, log_q, z_back, log_p = run(cnf)
    mass = jnp.sum(jnp.exp(log_p[:-4])) * (grid[1] - grid[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-2
    assert float(jnp.max(jnp.abs(log_p[:-4] - cnf.base_log_prob(points)))) > 1e-2
    assert float(jnp.max(jnp.abs(samples - z))) > 1e-2  # the flow moved them
    np.testing.assert_allclose(z_back[-4:], z, atol=1e-4)
    np.testing.assert_allclose(log_p[-4:], log_q, atol=1e-4)


@pytest.mark.slow
def test_cnf_logdet_jacobian_and_loss_gradients():
    """∫ tr(∂f/∂z) dt equals log|det| of the flow map's Jacobian (taken by the adjoint),
    and both losses, maximum likelihood and density matching, have finite gradients."""
    cnf = nn.CNF(width=4, hyper_hidden=8, rtol=1e-10, atol=1e-10, key=jax.random.PRNGKey(4))
    z = jnp.array([0.4, -1.1])
    data = jnp.array([[0.3, 0.2], [-1.0, 0.5]])

    @_jit
    def run(cnf):
        x, logdet = cnf.transform(z)
        jac = jax.jacrev(lambda v: cnf.transform(v)[0])(z)
        nll_grad = eqx.filter_grad(lambda m: m.nll(data))(cnf)
        kl_grad = eqx.filter_grad(lambda m: m.reverse_kl(KEY, 3, lambda v: -jnp.sum(v**4)))(cnf)
        return x, logdet, jac, nll_grad, kl_grad

    x, logdet, jac, nll_grad, kl_grad = run(cnf)
    np.testing.assert_allclose(logdet, jnp.linalg.slogdet(jac)[1], atol=1e-7)
    assert _finite((nll_grad, kl_grad))


def test_planar_field_divergence_in_closed_form():
    func = nn.PlanarField(dim=3, width=5, hyper_hidden=4, key=jax.random.PRNGKey(8))
    z, t = jnp.array([0.3, -0.5, 0.8]), 0.7
    value, divergence = func.with_divergence(z, t)
    np.testing.assert_allclose(value, func(z, t), rtol=1e-12)
    np.testing.assert_allclose(divergence, jnp.trace(jax.jacfwd(lambda v: func(v, t))(z)),
                               rtol=1e-12)


def test_hutchinson_trace_is_unbiased():
    a = jax.random.normal(KEY, (3, 3))
    f = lambda z: jnp.tanh(a @ z) + z**2
    z = jnp.array([0.3, -0.5, 0.8])
    _, exact = nn.exact_trace(f, z)
    np.testing.assert_allclose(exact, jnp.trace(jax.jacfwd(f)(z)), rtol=1e-12)
    n = 20_000
    for noise in (jax.random.normal, jax.random.rademacher):
        eps = noise(jax.random.PRNGKey(5), (n, 3), jnp.float64)
        fz, estimates = jax.vmap(lambda e: nn.hutchinson_trace(f, z, e))(eps)
        np.testing.assert_allclose(fz[0], f(z), rtol=1e-12)
        error = abs(float(jnp.mean(estimates) - exact))
        assert error < 5 * float(jnp.std(estimates)) / np.sqrt(n) + 1e-12


def test_ffjord_noise_fixed_per_solve_and_unbiased():
    kwargs = dict(hidden=(8,), rtol=1e-6, atol=1e-6, key=jax.random.PRNGKey(6))
    stochastic = nn.FFJORD(noise="rademacher", **kwargs)
    exact = nn.FFJORD(trace="exact", **kwargs)
    x = jnp.array([[0.5, -1.0], [1.5, 0.2]])
    keys = jax.random.split(KEY, 64)

    @_jit
    def run(stochastic, exact):
        return (
            jax.vmap(lambda k: stochastic.solve(x, 1.0, 0.0, key=k))(keys),
            exact.solve(x, 1.0, 0.0),
        )

    (z_hutch, integrals, stats), (z_exact, integral_exact, stats_exact) = run(stochastic, exact)
    np.testing.assert_allclose(z_hutch[0], z_exact, atol=1e-4)
    # Each solve draws its noise once, so it takes about the steps of the exact trace
    # (noise redrawn at every evaluation would make the step count explode).
    assert int(jnp.max(stats["nfe"])) <= 2 * int(stats_exact["nfe"])
    error = jnp.abs(jnp.mean(integrals, 0) - integral_exact)
    assert bool(jnp.all(error < 5 * jnp.std(integrals, 0) / np.sqrt(64) + 1e-6))
    with pytest.raises(ValueError, match="key"):
        stochastic.log_prob(x)


# ------------------------------------------------------------------------ latent ODE


def _spirals(key, n=6, t=12):
    """A tiny version of the paper's data: 2-D spirals, half clockwise, random phases,
    with Gaussian noise, sampled at t equally spaced times."""
    ts = jnp.linspace(0.0, 2.0, t)
    phase_key, noise_key = jax.random.split(key)
    phases = jax.random.uniform(phase_key, (n,), maxval=2 * np.pi)
    spin = jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0)
    angle = phases[:, None] + spin[:, None] * 1.5 * ts
    radius = 1.0 + 0.3 * ts
    xs = jnp.stack([radius * jnp.cos(angle), radius * jnp.sin(angle)], -1)
    return ts, xs + 0.05 * jax.random.normal(noise_key, xs.shape)


def test_latent_ode_elbo_improves_with_training():
    ts, xs = _spirals(KEY)
    mask = jnp.ones_like(xs).at[:, 3::4].set(0.0)  # some times unobserved
    model = nn.LatentODE(rtol=1e-5, atol=1e-6, key=KEY)
    keys = jax.random.split(jax.random.PRNGKey(7), xs.shape[0])

    def loss(model):
        elbos = jax.vmap(model.elbo, in_axes=(0, None, 0, 0))(keys, ts, xs, mask)
        return -jnp.mean(elbos)

    optimizer = optax.adam(2e-2)
    state = optimizer.init(eqx.filter(model, eqx.is_array))

    @_jit
    def step(model, state):
        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, state = optimizer.update(grads, state)
        return eqx.apply_updates(model, updates), state, value

    losses = []
    for _ in range(10):
        model, state, value = step(model, state)
        losses.append(float(value))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 10.0  # about 80 -> 30 here

    # Reconstruction and extrapolation from the posterior mean, at any times.
    ts_pred = jnp.linspace(0.0, 3.0, 7)

    @_jit
    def reconstruct(model):
        mean, _ = model.encode(ts, xs[0], mask[0])
        return model.reconstruct(ts, xs[0], mask[0], ts_pred), model.decode(mean)

    pred, at_t0 = reconstruct(model)
    assert pred.shape == (7, 2) and _finite(pred)
    np.testing.assert_allclose(pred[0], at_t0, rtol=1e-12)


def test_latent_ode_dynamics_depth():
    # dyn_depth=2: the authors' released dynamics network, two hidden layers of 20 units
    deep = nn.LatentODE(dyn_depth=2, key=KEY).func.mlp
    assert [layer.weight.shape for layer in deep.layers] == [(20, 4), (20, 20), (4, 20)]
    assert len(nn.LatentODE(key=KEY).func.mlp.layers) == 2


def test_latent_ode_poisson_likelihood():
    ts, xs = _spirals(KEY, n=1, t=6)
    model = nn.LatentODE(poisson=True, learn_std=True, rtol=1e-8, atol=1e-10, key=KEY)
    z0 = jnp.array([0.5, -0.3, 0.8, 0.1])
    fine = jnp.linspace(0.0, 2.0, 2001)  # holds ts[:3] = 0, 0.4, 0.8 at 0, 400, 800

    @_jit
    def run(model):
        terms = model.elbo_terms(KEY, ts, xs[0])
        log_lik = model.poisson_log_likelihood(z0, ts[:3], t_end=2.0)
        return terms, log_lik, jax.vmap(model.intensity)(model.trajectory(z0, fine))

    terms, log_lik, rates = run(model)
    assert set(terms) == {"elbo", "log_likelihood", "kl", "poisson", "nfe"} and _finite(terms)
    assert terms["nfe"] > 0
    np.testing.assert_allclose(
        terms["elbo"], terms["log_likelihood"] + terms["poisson"] - terms["kl"]
    )
    # The integrated intensity carried in the ODE state against a quadrature of λ(z(t)).
    integral = jnp.sum((rates[1:] + rates[:-1]) / 2) * (fine[1] - fine[0])
    expected = jnp.sum(jnp.log(rates[jnp.array([0, 400, 800])])) - integral
    np.testing.assert_allclose(log_lik, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="poisson=True"):
        nn.LatentODE(key=KEY).poisson_log_likelihood(z0, ts)


@pytest.mark.slow
def test_latent_ode_with_odernn_encoder():
    ts, xs = _spirals(KEY, n=1, t=6)
    mask = jnp.ones_like(xs[0]).at[2].set(0.0)
    model = nn.LatentODE(encoder="odernn", rtol=1e-5, atol=1e-6, key=KEY)
    assert isinstance(model.encoder, nn.ODERNNEncoder)
    value, grads = _jit(
        eqx.filter_value_and_grad(lambda m: m.elbo(KEY, ts, xs[0], mask))
    )(model)
    assert jnp.isfinite(value) and _finite(grads)
    assert float(jnp.max(jnp.abs(grads.encoder.func.mlp.layers[0].weight))) > 0


def test_latent_ode_passes_max_steps_to_the_odernn_encoder():
    ts, xs = _spirals(KEY, n=1, t=4)
    model = nn.LatentODE(encoder="odernn", rtol=1e-8, atol=1e-8, max_steps=1, key=KEY)
    assert model.encoder.max_steps == 1
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(eqx.filter_jit(lambda m: m.encode(ts, xs[0]))(model))


def test_fixed_step_solvers_take_dt0_in_the_latent_ode_and_the_flows():
    model = nn.LatentODE(encoder="odernn", solver="rk4", dt0=0.25, key=KEY)
    assert model.dt0 == model.encoder.dt0 == 0.25  # the encoder's solves too
    x = jnp.array([[0.3, -0.2]])
    log_prob = lambda **o: nn.CNF(dim=2, width=4, key=KEY, **o).log_prob(x)
    coarse, fine = log_prob(solver="rk4", dt0=0.5), log_prob(solver="rk4", dt0=0.125)
    assert not np.allclose(coarse, fine, rtol=1e-12, atol=0)  # dt0 reaches the solve
    np.testing.assert_allclose(coarse, fine, rtol=1e-3)  # and two steps of rk4 are close
    with pytest.raises(ValueError, match="dt0"):
        nn.CNF(dim=2, width=4, solver="rk4", key=KEY).log_prob(x)


def test_rnn_baseline_likelihood_gradient_and_extrapolation():
    ts, xs = _spirals(KEY, n=1, t=8)
    model = nn.RNNBaseline(cell="rnn", key=KEY)

    @_jit
    def run(model):
        value, grads = eqx.filter_value_and_grad(lambda m: -m.log_likelihood(ts, xs[0]))(model)
        future = model.predict(ts, xs[0], None, jnp.linspace(2.1, 3.0, 4))
        return value, grads, model.one_step_predictions(ts, xs[0]), future

    value, grads, preds, future = run(model)
    assert jnp.isfinite(value) and _finite(grads)
    assert preds.shape == (8, 2) and future.shape == (4, 2) and _finite(future)
    with pytest.raises(ValueError, match="cell"):
        nn.RNNBaseline(cell="lstm", key=KEY)


def test_models_are_exported():
    assert jaxode.nn is nn
    for name in ["ODEBlock", "ODENet", "ResNet", "RKNet", "MLPClassifier", "LatentODE",
                 "RNNBaseline", "CNF", "PlanarFlow", "FFJORD", "count_params"]:
        assert name in nn.__all__
        assert getattr(nn, name).__doc__


@pytest.mark.parametrize("lowering", ["shifted_conv", "loop_conv"])
@pytest.mark.parametrize("padding", [0, 1])
def test_shifted_conv_equals_the_convolution_and_its_gradient(padding, lowering):
    """The loop-friendly convolution of the ODE function (and the backend's choice of
    lowering, `loop_conv`) is the same map as equinox's Conv2d, values and
    vector-Jacobian products alike."""
    from jaxode.nn import odenet

    lowered = getattr(odenet, lowering)
    conv = eqx.nn.Conv2d(5, 4, 3, padding=padding, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 7, 6))
    np.testing.assert_allclose(lowered(conv, x), conv(x), rtol=1e-10, atol=1e-12)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), conv(x).shape)
    grad = lambda apply: jax.vjp(lambda c, x_: apply(c, x_), conv, x)[1](cotangent)
    for a, b in zip(jax.tree_util.tree_leaves(grad(lowered)),
                    jax.tree_util.tree_leaves(grad(lambda c, x_: c(x_)))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_loop_conv_lowers_to_matrix_products_on_cpu_only():
    """On CPU the ODE function's convolution must avoid XLA's convolution (slow inside
    the solver's loop there); on other backends it is XLA's convolution."""
    from jaxode.nn.odenet import loop_conv

    conv = eqx.nn.Conv2d(3, 2, 3, padding=1, key=jax.random.PRNGKey(0))
    jaxpr = str(jax.make_jaxpr(lambda x: loop_conv(conv, x))(jnp.ones((3, 5, 5))))
    on_cpu = jax.default_backend() == "cpu"
    assert ("conv_general_dilated" in jaxpr) is not on_cpu
