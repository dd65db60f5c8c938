"""Model benchmarks: one training step of the paper's planar CNF, jaxode against peers.

    PYTHONPATH=. python -m benchmarks.models [--quick] [--no-torch] [--out PATH]

Planar CNF (the paper's Section 4 model): `jaxode.nn.CNF`, a `PlanarField` of width
M = 64 whose parameters are the output of a hypernetwork of t (1-32-32-448, tanh);
2-D two-moons-like data, 512 samples, float32; dopri5 at rtol = atol = 1e-5 on [0, 1];
the maximum likelihood loss (mean negative log-likelihood, x integrated from t1 back to
t0 jointly with the exact trace of the 2x2 Jacobian, in closed form everywhere:
Σ_m (1 - tanh²) u_m·w_m, `PlanarField.with_divergence`). One training step = forward +
backward + optax Adam (lr 1e-3) update, all from the same initial weights, as:

  jaxode backsolve / direct         `jaxode.nn.CNF(adjoint=...).nll`
  diffrax Backsolve / RecursiveCkpt the same `PlanarField` module and trace as a plain
                                    field of (t, (z, logp)) in `diffrax.diffeqsolve`
                                    (Dopri5, PIDController(rtol, atol))
  jax.experimental.ode              the same field, time reversed (s = t1 - t)
  torchdiffeq odeint_adjoint/odeint an equivalent torch module with the weights copied
                                    (the same closed-form trace), torch Adam

Reported: the steady time per step (median over interleaved rounds, `common.time_interleaved`,
the same inputs every call, so every call does identical work), compile time and XLA's
compiled temp memory for the JAX systems, the loss and the gradient norm (a correctness
cross-check: same weights, so the same loss within the solver tolerance).

Latent ODE (the paper's Section 5 model): `jaxode.nn.LatentODE` (GRU encoder, latent dim 4,
dynamics MLP 4-20-4 ELU), batch of 64 noisy 2-D spirals with 30 shared irregular
observation times, the negative mean ELBO (one posterior sample per sequence, jax.vmap
over the batch), twice: float32 with dopri5 rtol = atol = 1e-5, and float64 (in a child
process) at the paper's 1.5e-8. Peers: the same model class with its latent solve done by diffrax
(`_diffrax_latent_class`: identical modules and weights), BacksolveAdjoint and
RecursiveCheckpointAdjoint. Same columns as above.

NFE fwd/bwd: right-hand-side evaluations of the loss and of its gradient (minus the
forward ones), counted by a host callback in an untimed run; per sequence for the
latent ODE (vmapped solves also evaluate finished lanes until the batch's slowest
ends, and those are counted).

--quick: 3 rounds instead of 11 (about 2 minutes); --no-torch, --no-latent leave parts out.
Tables to stdout, everything to bench_results/models.json (--out to change).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import fmt, ms, paired_ratio, ratio, table, time_interleaved, write_results

ROOT = Path(__file__).resolve().parents[1]

N_SAMPLES, WIDTH, HYPER_HIDDEN = 512, 64, 32
RTOL = ATOL = 1e-5
T0, T1 = 0.0, 1.0
LR = 1e-3
MAX_STEPS = 4096
LOSS_RTOL = 1e-3  # loss agreement demanded across systems (solver tolerance 1e-5)

JBS, JDIR = "jaxode backsolve", "jaxode direct"
DBS, DRC = "diffrax BacksolveAdjoint", "diffrax RecursiveCheckpoint"
JODE = "jax.experimental.ode"
TADJ, TDIR = "torchdiffeq odeint_adjoint", "torchdiffeq odeint"
REFERENCE_MS = {DRC: 64.0, DBS: 299.0, JODE: 68.0, TADJ: 195.0, TDIR: 78.0}


def two_moons(n: int, seed: int = 0) -> np.ndarray:
    """n two-moons samples (n, 2), float32, roughly standardised, with N(0, 0.1²) noise."""
    rng = np.random.default_rng(seed)
    half = n // 2
    a = rng.uniform(0, math.pi, half)
    b = rng.uniform(0, math.pi, n - half)
    x = np.concatenate([np.stack([np.cos(a), np.sin(a)], 1),
                        np.stack([1 - np.cos(b), 0.5 - np.sin(b)], 1)])
    x = x + 0.1 * rng.standard_normal(x.shape)
    x = (x - np.array([0.5, 0.25])) / np.array([0.87, 0.5])
    return rng.permutation(x).astype(np.float32)


# ================================================================ NFE counting

# Set only during the untimed counting runs: every JAX system's ODE right-hand side
# calls it through a host callback (under jax.vmap once per sample).
_COUNTER: list | None = None


def _tick(t):
    import jax

    if _COUNTER is not None:
        jax.debug.callback(lambda _: _COUNTER.append(1), t)


def _count_jaxode():
    """Patch `jaxode.nn._util.solve_module` (every jaxode.nn model's solve entry) so its
    field ticks."""
    from jaxode.nn import _util as module

    original = module.solve_module

    def counted(field, *args, **kwargs):
        def ticking(z, t, params):
            _tick(t)
            return field(z, t, params)

        return original(ticking, *args, **kwargs)

    module.solve_module = counted


def count_nfe(loss, *args, per: int = 1) -> tuple[float, float]:
    """(forward, backward) right-hand-side evaluations of loss(*args) and of its
    gradient, divided by `per` (the batch size when the solves are vmapped)."""
    import jax

    global _COUNTER
    _COUNTER = []
    try:
        jax.block_until_ready(jax.jit(loss)(*args))
        forward = len(_COUNTER)
        _COUNTER.clear()
        jax.block_until_ready(jax.jit(jax.grad(loss))(*args))
        total = len(_COUNTER)
    finally:
        _COUNTER = None
    return forward / per, (total - forward) / per


def nfe_pair(nfe) -> str:
    return f"{nfe[0]:.0f}/{nfe[1]:.0f}"


def add_timings(rows: dict, times: dict, reference: str) -> None:
    """Each row gets its times and its loss and gradient-norm differences against the
    reference system's (loss_ok: within LOSS_RTOL)."""
    ref_loss, ref_gnorm = rows[reference]["loss"], rows[reference]["grad_norm"]
    for name, row in rows.items():
        row.update(median_s=times[name]["median"], min_s=times[name]["min"],
                   samples=times[name]["samples"],
                   loss_rel_diff=abs(row["loss"] - ref_loss) / abs(ref_loss),
                   grad_norm_rel_diff=abs(row["grad_norm"] - ref_gnorm) / abs(ref_gnorm))
        row["loss_ok"] = row["loss_rel_diff"] <= LOSS_RTOL


def step_table(rows: dict, baseline: str, earlier_ms: dict, earlier_fmt: str):
    """(headers, body) of a training-step table; times relative to `baseline`, and the
    figures quoted in the brief (`earlier_ms`, by system name without its thread count)."""
    headers = ["system", "step ms", "min ms", "vs jaxode bs", "NFE fwd/bwd", "compile s",
               "temp MiB", "loss", "|Δloss|/loss", "|grad|", "Δ|grad| rel", "earlier ms"]
    body = [[
        name, ms(row["median_s"]), ms(row["min_s"]),
        fmt(ratio(row["median_s"], rows[baseline]["median_s"]), ".2f"), nfe_pair(row["nfe"]),
        fmt(row["compile_s"], ".1f"),
        "-" if row["temp_bytes"] is None else f"{row['temp_bytes'] / 2**20:.2f}",
        f"{row['loss']:.6f}", fmt(row["loss_rel_diff"], ".1e"), f"{row['grad_norm']:.5g}",
        fmt(row["grad_norm_rel_diff"], ".1e"),
        fmt(earlier_ms.get(name.split(" (")[0]), earlier_fmt),
    ] for name, row in rows.items()]
    return headers, body


def verdicts(rows: dict, targets: dict, met: dict) -> str:
    """The note's last lines: each target met or not, and whether the losses agree."""
    return ("\n".join(f"target {k}: {v:.3f} -> {'met' if met[k] else 'NOT met'}"
                      for k, v in targets.items())
            + f"\nlosses agree within {LOSS_RTOL:g}: "
            + ("yes" if all(r["loss_ok"] for r in rows.values()) else "NO"))


# ================================================================ JAX systems


def make_cnf(adjoint: str):
    import jax

    from jaxode.nn import CNF

    return CNF(dim=2, width=WIDTH, hyper_hidden=HYPER_HIDDEN, t0=T0, t1=T1, rtol=RTOL,
               atol=ATOL, adjoint=adjoint, max_steps=MAX_STEPS, key=jax.random.PRNGKey(0))


def _pair_field(func, t, state):
    """(dz, dℓ) = (f(z, t), tr ∂f/∂z) for the batch: the closed-form trace jaxode's CNF
    uses (`PlanarField.with_divergence`), so every system integrates the same field."""
    import jax

    _tick(t)
    return jax.vmap(lambda v: func.with_divergence(v, t))(state[0])


def _nll_from(base_log_prob, z, integral):
    """-mean log q(x) with z = z(t0) and integral = ∫_{t1}^{t0} tr ∂f/∂z dt."""
    import jax.numpy as jnp

    return -jnp.mean(base_log_prob(z) + integral)


def jax_loss_fns(cnfs, func_static):
    """{name: loss(arrays, x)} for every JAX system; arrays are the arrays of the CNF's
    field, func_static the rest of it; cnfs[adjoint] a CNF with that adjoint."""
    import diffrax
    import equinox as eqx
    import jax.numpy as jnp
    from jax.experimental.ode import odeint as jode_odeint

    def jaxode_loss(adjoint):
        def loss(arrays, x):
            func = eqx.combine(arrays, func_static)
            return eqx.tree_at(lambda m: m.func, cnfs[adjoint], func).nll(x)

        return loss

    def diffrax_loss(adjoint):
        def loss(arrays, x):
            cnf = cnfs["direct"]
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, func: _pair_field(func, t, y)),
                diffrax.Dopri5(), T1, T0, None, (x, jnp.zeros(x.shape[0], x.dtype)),
                args=eqx.combine(arrays, func_static),
                stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
                adjoint=adjoint, max_steps=MAX_STEPS,
            )
            return _nll_from(cnf.base_log_prob, sol.ys[0][-1], sol.ys[1][-1])

        return loss

    def jode_loss(arrays, x):
        cnf = cnfs["direct"]

        def field(y, s, fa):  # s = t1 - t: d/ds = -d/dt
            dz, tr = _pair_field(eqx.combine(fa, func_static), T1 - s, y)
            return -dz, -tr

        ys = jode_odeint(field, (x, jnp.zeros(x.shape[0], x.dtype)),
                         jnp.asarray([0.0, T1 - T0], x.dtype), arrays, rtol=RTOL,
                         atol=ATOL, mxstep=MAX_STEPS)
        return _nll_from(cnf.base_log_prob, ys[0][-1], ys[1][-1])

    return {
        JBS: jaxode_loss("backsolve"),
        JDIR: jaxode_loss("direct"),
        DBS: diffrax_loss(diffrax.BacksolveAdjoint()),
        DRC: diffrax_loss(diffrax.RecursiveCheckpointAdjoint()),
        JODE: jode_loss,
    }


def train_step(loss, optimizer):
    """step(arrays, opt_state, x) -> (arrays, opt_state, loss, |grad|)."""
    import jax
    import optax

    def step(arrays, opt_state, x):
        value, grads = jax.value_and_grad(loss)(arrays, x)
        updates, opt_state = optimizer.update(grads, opt_state, arrays)
        return optax.apply_updates(arrays, updates), opt_state, value, optax.global_norm(grads)

    return step


def compile_step(step, *args) -> tuple:
    """(compiled, compile seconds (lower + XLA compile), temp bytes, first outputs)."""
    import jax

    start = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = None if memory is None else int(memory.temp_size_in_bytes)
    out = jax.block_until_ready(compiled(*args))
    return compiled, seconds, temp, out


# ================================================================ torch


def torch_systems(cnf, x_np, thread_counts):
    """({name: run() -> (loss, |grad|)}, nfes) for torchdiffeq with the CNF's weights copied,
    each adjoint at each intra-op thread count (set on every call); nfes[solve name,
    threads] holds (forward, backward) evaluations of the last run."""
    import torch
    import torchdiffeq

    layers = [(np.asarray(layer.weight), np.asarray(layer.bias))
              for layer in cnf.func.hyper.layers]
    dim, width = cnf.func.dim, cnf.func.width
    base_std = cnf.base_std

    class Field(torch.nn.Module):
        """PlanarField with (dz, dℓ) = (f, tr ∂f/∂z), the trace in closed form:
        tr = Σ_m (1 - tanh²(a_m)) Σ_d (û ⊙ σ(g))_{md} w_{md}."""

        def __init__(self):
            super().__init__()
            self.weights = torch.nn.ParameterList()
            for w, b in layers:
                self.weights.append(torch.nn.Parameter(torch.tensor(w)))
                self.weights.append(torch.nn.Parameter(torch.tensor(b)))

        def forward(self, t, state):
            self.nfe += 1
            z = state[0]
            h = t.reshape(1).to(z.dtype)
            n = len(self.weights) // 2
            for i in range(n):
                h = h @ self.weights[2 * i].T + self.weights[2 * i + 1]
                if i < n - 1:
                    h = torch.tanh(h)
            block = width * dim
            w = h[:block].reshape(width, dim)
            u = h[block:2 * block].reshape(width, dim) * torch.sigmoid(
                h[2 * block:3 * block].reshape(width, dim))
            act = torch.tanh(z @ w.T + h[3 * block:])  # (N, M)
            dz = act @ u
            tr = (1 - act**2) @ torch.sum(u * w, dim=1)
            return dz, tr

    field = Field()
    field.nfe = 0
    nfes = {}
    initial = [p.detach().clone() for p in field.parameters()]
    x = torch.from_numpy(x_np)
    ts = torch.tensor([T1, T0], dtype=torch.float32)
    log_norm = math.log(base_std) + 0.5 * math.log(2 * math.pi)

    def runner(solve, threads):
        def run():
            torch.set_num_threads(threads)
            with torch.no_grad():
                for p, p0 in zip(field.parameters(), initial):
                    p.copy_(p0)
            opt = torch.optim.Adam(field.parameters(), lr=LR)
            opt.zero_grad()
            field.nfe = 0
            zs, integral = solve(field, (x, torch.zeros(x.shape[0])), ts, rtol=RTOL, atol=ATOL,
                                 method="dopri5")
            forward = field.nfe
            z = zs[-1]
            log_prob = torch.sum(-0.5 * (z / base_std) ** 2 - log_norm, dim=1) + integral[-1]
            loss = -log_prob.mean()
            loss.backward()
            nfes[solve.__name__, threads] = (forward, field.nfe - forward)
            gnorm = torch.sqrt(sum(torch.sum(p.grad**2) for p in field.parameters()))
            opt.step()
            return float(loss.detach()), float(gnorm)

        return run

    systems = {}
    for threads in thread_counts:
        systems[torch_name(TADJ, threads)] = runner(torchdiffeq.odeint_adjoint, threads)
        systems[torch_name(TDIR, threads)] = runner(torchdiffeq.odeint, threads)
    return systems, nfes


def torch_name(base: str, threads: int) -> str:
    return f"{base} ({threads} thr)"


# ================================================================ the section


def section_cnf(repeats: int, use_torch: bool) -> dict:
    import equinox as eqx
    import jax.numpy as jnp
    import optax

    x_np = two_moons(N_SAMPLES)
    x = jnp.asarray(x_np)
    cnf = make_cnf("backsolve")
    arrays, func_static = eqx.partition(cnf.func, eqx.is_array)
    cnfs = {"backsolve": cnf, "direct": make_cnf("direct")}
    optimizer = optax.adam(LR)
    opt_state = optimizer.init(arrays)

    _count_jaxode()
    rows: dict[str, dict] = {}
    fns = {}
    for name, loss in jax_loss_fns(cnfs, func_static).items():
        compiled, seconds, temp, out = compile_step(train_step(loss, optimizer), arrays,
                                                    opt_state, x)
        rows[name] = {"compile_s": seconds, "temp_bytes": temp, "loss": float(out[2]),
                      "grad_norm": float(out[3]), "nfe": count_nfe(loss, arrays, x)}
        fns[name] = (lambda c: lambda: c(arrays, opt_state, x))(compiled)
        print(f"  compiled {name}: {seconds:.1f} s", flush=True)

    torch_threads = None
    if use_torch:
        import torch

        default_threads = torch.get_num_threads()
        torch_threads = sorted({1, default_threads})
        systems, nfes = torch_systems(cnf, x_np, torch_threads)
        for name, run in systems.items():
            value, gnorm = run()
            rows[name] = {"compile_s": None, "temp_bytes": None, "loss": value,
                          "grad_norm": gnorm, "nfe": next(iter(nfes.values()))}
            nfes.clear()
            fns[name] = run

    times = time_interleaved(fns, repeats, min_sample_s=0.0, block=_block_any)
    add_timings(rows, times, DRC)

    targets = {
        "jaxode backsolve / diffrax direct (paired, <= 1.0)": paired_ratio(times, JBS, DRC),
    }
    if use_torch:
        for threads in torch_threads:
            name = torch_name(TADJ, threads)
            targets[f"jaxode backsolve / {name} (paired, <= 0.25)"] = (
                paired_ratio(times, JBS, name))
    met = {k: v <= (1.0 if "<= 1.0" in k else 0.25) for k, v in targets.items()}

    headers, body = step_table(rows, JBS, REFERENCE_MS, ".0f")
    note = (f"one Adam step, {N_SAMPLES} samples, dopri5 rtol=atol={RTOL:g}, float32, "
            f"{repeats} rounds; differences against {DRC}; torch threads: {torch_threads}\n"
            "earlier ms: peer figures quoted in the brief, measured earlier on this machine (not "
            "this run; the workload behind them is not known to be this one)\n"
            + verdicts(rows, targets, met))
    print(table("Planar CNF: one training step (forward + backward + Adam)", headers, body,
                note))
    return {"systems": rows, "targets": targets, "targets_met": met,
            "torch_threads": torch_threads, "repeats": repeats}


# ================================================================ Latent ODE

LAT_BATCH, LAT_T, LAT_DIM = 64, 30, 4
LAT_TOL = {"float32": 1e-5, "float64": 1.5e-8}  # the paper's 1.5e-8 needs float64
LBS, LDIR = "jaxode backsolve", "jaxode direct"
LDBS, LDRC = "diffrax BacksolveAdjoint", "diffrax RecursiveCheckpoint"
LAT_REFERENCE_MS = {LDRC: 2.5, LDBS: 7.9}


def spirals(n: int, num_t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ts (num_t,) sorted random times on [0, 6] and n noisy 2-D spirals (n, num_t, 2)."""
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.uniform(0, 6, num_t))
    ts[0] = 0.0
    radius = 0.5 + rng.uniform(0.1, 0.3, (n, 1)) * ts
    phase = rng.uniform(0, 2 * math.pi, (n, 1))
    sign = rng.choice([-1.0, 1.0], (n, 1))
    xs = np.stack([radius * np.cos(sign * ts + phase), radius * np.sin(sign * ts + phase)], -1)
    xs = xs + 0.05 * rng.standard_normal(xs.shape)
    return ts.astype(np.float32), xs.astype(np.float32)


def _diffrax_latent_class():
    """`jaxode.nn.LatentODE` with its latent solve done by diffrax (Dopri5, PIDController,
    the adjoint from the model's `adjoint` string): same modules, same weights."""
    import diffrax
    import equinox as eqx

    from jaxode.nn import LatentODE

    class DiffraxLatentODE(LatentODE):
        def _odeint(self, f, z0, ts, params):
            arrays, static = eqx.partition(params, eqx.is_array)
            adjoint = (diffrax.BacksolveAdjoint() if self.adjoint == "backsolve"
                       else diffrax.RecursiveCheckpointAdjoint())
            def term(t, z, p):
                _tick(t)
                return f(z, t, eqx.combine(p, static))

            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(term),
                diffrax.Dopri5(), ts[0], ts[-1], None, z0, args=arrays,
                saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=diffrax.PIDController(rtol=self.rtol, atol=self.atol),
                adjoint=adjoint, max_steps=self.max_steps,
            )
            # diffrax counts steps, not evaluations; the benchmark counts NFE itself.
            return sol.ys, {"nfe": -1}

    return DiffraxLatentODE


def section_latent(repeats: int, dtype: str) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    from jaxode.nn import LatentODE

    _count_jaxode()
    tol = LAT_TOL[dtype]
    ts_np, xs_np = spirals(LAT_BATCH, LAT_T)
    ts, xs = jnp.asarray(ts_np, dtype), jnp.asarray(xs_np, dtype)
    keys = jax.random.split(jax.random.PRNGKey(1), LAT_BATCH)
    optimizer = optax.adam(LR)
    diffrax_cls = _diffrax_latent_class()
    systems = {LBS: (LatentODE, "backsolve"), LDIR: (LatentODE, "direct"),
               LDBS: (diffrax_cls, "backsolve"), LDRC: (diffrax_cls, "direct")}

    rows: dict[str, dict] = {}
    fns = {}
    for name, (cls, adjoint) in systems.items():
        model = cls(obs_dim=2, latent_dim=LAT_DIM, rtol=tol, atol=tol, adjoint=adjoint,
                    max_steps=MAX_STEPS, key=jax.random.PRNGKey(0))
        arrays, static = eqx.partition(model, eqx.is_array)
        opt_state = optimizer.init(arrays)

        def loss(arrays, xs, static=static):
            m = eqx.combine(arrays, static)
            return -jnp.mean(jax.vmap(m.elbo, in_axes=(0, None, 0))(keys, ts, xs))

        compiled, seconds, temp, out = compile_step(train_step(loss, optimizer), arrays,
                                                    opt_state, xs)
        rows[name] = {"compile_s": seconds, "temp_bytes": temp, "loss": float(out[2]),
                      "grad_norm": float(out[3]),
                      "nfe": count_nfe(loss, arrays, xs, per=LAT_BATCH)}
        fns[name] = (lambda c, a, o: lambda: c(a, o, xs))(compiled, arrays, opt_state)
        print(f"  compiled {name}: {seconds:.1f} s", flush=True)

    times = time_interleaved(fns, repeats, min_sample_s=0.05, block=_block_any)
    add_timings(rows, times, LDRC)
    key = "jaxode backsolve / diffrax BacksolveAdjoint (paired, <= 0.6)"
    targets = {key: paired_ratio(times, LBS, LDBS)}
    met = {key: targets[key] <= 0.6}
    headers, body = step_table(rows, LBS, LAT_REFERENCE_MS, ".1f")
    note = (f"one Adam step on the negative mean ELBO, batch {LAT_BATCH} (jax.vmap: own steps "
            f"per sequence), {LAT_T} observations, latent dim {LAT_DIM}, GRU encoder, dopri5 "
            f"rtol=atol={tol:g}, {dtype}; NFE per sequence; {repeats} rounds; differences "
            f"against {LDRC}\n"
            "earlier ms: figures quoted in the brief (not this run)\n"
            + verdicts(rows, targets, met))
    print(table(f"Latent ODE, {dtype}: one training step (ELBO, forward + backward + Adam)",
                headers, body, note))
    return {"systems": rows, "targets": targets, "targets_met": met, "repeats": repeats,
            "dtype": dtype, "rtol": tol, "atol": tol}


def _block_any(out):
    import jax

    return jax.block_until_ready(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds: a smoke run")
    parser.add_argument("--no-torch", action="store_true", help="leave out torchdiffeq")
    parser.add_argument("--no-latent", action="store_true", help="leave out the Latent ODE")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "models.json"),
                        help="where to write the JSON results")
    parser.add_argument("--latent64-worker", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 11

    import jax

    if args.latent64_worker:  # a child process: the x64 flag must be set before any work
        jax.config.update("jax_enable_x64", True)
        Path(args.latent64_worker).write_text(
            json.dumps(section_latent(rounds, "float64"), default=float))
        return
    jax.config.update("jax_enable_x64", False)
    jax.config.update("jax_enable_compilation_cache", False)
    jax.block_until_ready(jax.jit(lambda x: x + 1)(1.0))  # backend start-up, not timed
    started = time.perf_counter()
    results = {"meta": {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "python": platform.python_version(), "jax": jax.__version__,
        "machine": platform.machine(), "quick": args.quick,
    }}
    results["cnf"] = section_cnf(rounds, not args.no_torch)
    if not args.no_latent:
        results["latent_ode"] = section_latent(rounds, "float32")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "latent64.json"
            command = [sys.executable, "-m", "benchmarks.models", "--latent64-worker",
                       str(path)] + (["--quick"] if args.quick else [])
            subprocess.run(command, check=True, cwd=ROOT)
            results["latent_ode_float64"] = json.loads(path.read_text())
    results["meta"]["wall_s"] = time.perf_counter() - started
    write_results(results, args.out)


if __name__ == "__main__":
    main()
