"""One ODE-Net training step, MNIST architecture (issue 4), jaxode against its peers.

    PYTHONPATH=. .venv/bin/python -m benchmarks.odenet_step [--batch 128] [--channels 64]

The step is forward + gradient + SGD-momentum update of the paper's classifier
(`jaxode.nn.ODENet`: downsampling convs, one ODE block on t in [0, 1], GN-ReLU-pool-
linear head), batch 128 of 1x28x28 images, 64 channels, dopri5 at rtol = atol = 1e-3.
Each system runs in its own child process:

- `jaxode backsolve`: the model as shipped; its convolutions inside the solver are
  lowered by `jaxode.nn.odenet.loop_conv`: on CPU as matrix products on shifted views
  (`shifted_conv`), elsewhere as XLA's convolution;
- `jaxode backsolve 1e-6`: the same at rtol = atol = 1e-6 (many more steps), to show
  that the compiled memory does not depend on the number of steps;
- `jaxode, XLA conv` / `jaxode, shifted conv`: the same with either lowering forced
  (XLA:CPU runs a convolution inside a while loop with a slow generic kernel);
- `RK-Net rk4 xN`: `jaxode.nn.RKNet`, N fixed rk4 steps differentiated directly: its
  memory grows with N;
- `diffrax backsolve`: the same modules and weights, the block solved by diffrax
  (Dopri5, PIDController, BacksolveAdjoint);
- `torchdiffeq odeint_adjoint` / `odeint`: the architecture in PyTorch (its own random
  weights: compare time together with NFE), on the GPU when torch sees one, else on
  one CPU thread.

Columns: steady-state seconds per step (median), compile seconds (lower + XLA
compile), compiled temporary memory (`memory_analysis()`), forward and backward NFE of
the step (counted by a callback in a separate, untimed run), loss (the JAX systems
share their weights, so the loss of the 1e-3 systems must agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SYSTEMS = (
    "jaxode backsolve",
    "jaxode backsolve 1e-6",
    "jaxode, XLA conv",
    "jaxode, shifted conv",
    "RK-Net rk4 x4",
    "RK-Net rk4 x16",
    "diffrax backsolve",
    "torchdiffeq odeint_adjoint",
    "torchdiffeq odeint",
)


class _Counter:
    """NFE by a host callback in the ODE function (only in the untimed counting run)."""

    def __init__(self):
        self.count = 0

    def __call__(self, _):
        self.count += 1


def _counting(func, counter):
    import equinox as eqx
    import jax

    class Counting(eqx.Module):
        inner: eqx.Module

        def __call__(self, z, t):
            jax.debug.callback(counter, t)
            return self.inner(z, t)

    return Counting(func)


def run_jax(system: str, batch: int, channels: int, repeats: int) -> dict:
    import jax

    import jaxode.nn as nn
    import jaxode.nn.odenet as odenet

    if system == "jaxode, XLA conv":
        odenet.loop_conv = lambda layer, x: layer(x)
    elif system == "jaxode, shifted conv":
        odenet.loop_conv = odenet.shifted_conv
    key = jax.random.PRNGKey(0)
    rtol = 1e-6 if system.endswith("1e-6") else 1e-3
    if system.startswith("RK-Net"):
        model = nn.RKNet(channels=channels, steps=int(system.rsplit("x", 1)[1]), key=key)
    else:
        model = nn.ODENet(channels=channels, rtol=rtol, atol=rtol, key=key)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 1, 28, 28))
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)

    if system == "diffrax backsolve":
        import diffrax

        def block_forward(func, h):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, z, f: f(z, t)), diffrax.Dopri5(), 0.0, 1.0, None, h,
                args=func, stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3),
                adjoint=diffrax.BacksolveAdjoint(), max_steps=4096,
                saveat=diffrax.SaveAt(t1=True))
            return sol.ys[0]
    else:
        block_forward = features_block(model)
    return {"system": system, "rtol": rtol, "device": jax.devices()[0].device_kind,
            **measure_step(model, x, y, block_forward, repeats)}


def features_block(model):
    """The model's own ODE block with its vector field replaced by `func`."""
    import equinox as eqx

    return lambda func, h: eqx.tree_at(lambda m: m.features.func, model, func).features(h)


def measure_step(model, x, y, block_forward, repeats: int) -> dict:
    """One SGD-momentum training step of `model` on (x, y), its ODE block solved by
    block_forward(func, h): steady seconds (median of `repeats`), compile seconds,
    compiled temporary memory, loss, parameter count, and the forward and backward NFE
    (untimed, through a counting vector field)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxode.nn.odenet as odenet

    def logits(m, func):
        h = odenet.per_example(m.downsample, x, 3)
        return odenet.per_example(m.head, block_forward(func, h), 3)

    def loss_fn(m, func):
        return optax.softmax_cross_entropy_with_integer_labels(logits(m, func), y).mean()

    optimizer = optax.sgd(0.1, momentum=0.9)
    arrays, static = eqx.partition(model, eqx.is_array)
    opt_state = optimizer.init(arrays)

    def step(arrays, opt_state):
        def loss_of(a):
            m = eqx.combine(a, static)
            return loss_fn(m, m.features.func)

        loss, grads = jax.value_and_grad(loss_of)(arrays)
        updates, opt_state = optimizer.update(grads, opt_state, arrays)
        return optax.apply_updates(arrays, updates), opt_state, loss

    start = time.perf_counter()
    compiled = jax.jit(step).lower(arrays, opt_state).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = None if memory is None else int(memory.temp_size_in_bytes)
    loss = float(jax.block_until_ready(compiled(arrays, opt_state)[2]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(arrays, opt_state)[2])
        times.append(time.perf_counter() - start)

    # NFE: the forward pass alone, then the whole gradient, with a counting field.
    counter = _Counter()
    counted = _counting(model.features.func, counter)
    jax.block_until_ready(jax.jit(lambda f: logits(model, f))(counted))
    jax.effects_barrier()
    forward = counter.count
    counter.count = 0
    jax.block_until_ready(jax.jit(jax.grad(lambda f: loss_fn(model, f)))(counted))
    jax.effects_barrier()
    return {"step_s": float(np.median(times)), "compile_s": compile_s, "temp_bytes": temp,
            "loss": loss, "forward_nfe": forward, "backward_nfe": counter.count - forward,
            "params": int(sum(a.size for a in jax.tree_util.tree_leaves(arrays)
                              if jnp.issubdtype(a.dtype, jnp.floating)))}


def run_torch(system: str, batch: int, channels: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from torch import nn as tnn
    from torchdiffeq import odeint, odeint_adjoint

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    solve = odeint_adjoint if system.endswith("adjoint") else odeint

    def norm(c):
        return tnn.GroupNorm(min(32, c), c)

    class ConcatConv(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = tnn.Conv2d(c + 1, c, 3, padding=1)

        def forward(self, t, x):
            return self.conv(torch.cat([torch.ones_like(x[:, :1]) * t, x], 1))

    class Func(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm1, self.conv1 = norm(c), ConcatConv(c)
            self.norm2, self.conv2 = norm(c), ConcatConv(c)
            self.norm3 = norm(c)
            self.nfe = 0

        def forward(self, t, x):
            self.nfe += 1
            h = self.conv1(t, torch.relu(self.norm1(x)))
            return self.norm3(self.conv2(t, torch.relu(self.norm2(h))))

    class Block(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.func = Func(c)

        def forward(self, x):
            ts = torch.tensor([0.0, 1.0], device=x.device)
            return solve(self.func, x, ts, rtol=1e-3, atol=1e-3, method="dopri5")[1]

    c = channels
    model = tnn.Sequential(
        tnn.Conv2d(1, c, 3, 1), norm(c), tnn.ReLU(), tnn.Conv2d(c, c, 4, 2, 1), norm(c),
        tnn.ReLU(), tnn.Conv2d(c, c, 4, 2, 1), Block(c), norm(c), tnn.ReLU(),
        tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(c, 10),
    ).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    func = model[7].func

    def step():
        optimizer.zero_grad()
        loss = tnn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())  # waits for the device, so the step is timed whole

    loss = step()
    times, nfes = [], []
    for _ in range(repeats):
        func.nfe = 0
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        nfes.append(func.nfe)
    func.nfe = 0
    with torch.no_grad():
        model(x)
    total = int(np.median(nfes))
    return {"system": system, "step_s": float(np.median(times)), "compile_s": None,
            "temp_bytes": None, "loss": loss, "forward_nfe": func.nfe,
            "backward_nfe": total - func.nfe, "device": str(device),
            "params": sum(p.numel() for p in model.parameters())}


def _jax_on_cpu() -> bool:
    import jax

    return jax.default_backend() == "cpu"


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--out", default="bench_results/odenet_step.json")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = run_torch if args.worker.startswith("torch") else run_jax
        # On CPU the slow systems get one timed repeat: their seconds per step dwarf the
        # noise.
        slow = args.worker in ("jaxode, XLA conv", "jaxode backsolve 1e-6")
        repeats = 1 if slow and _jax_on_cpu() else args.repeats
        print(json.dumps(run(args.worker, args.batch, args.channels, repeats)))
        return
    rows = {}
    for system in args.systems:
        command = [sys.executable, "-m", "benchmarks.odenet_step", "--worker", system,
                   "--batch", str(args.batch), "--channels", str(args.channels),
                   "--repeats", str(args.repeats)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:  # one broken peer should not lose the other rows
            print(f"  failed: {system}\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[system] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  done: {system}", file=sys.stderr)
    print(f"ODE-Net training step, MNIST architecture, batch {args.batch}, {args.channels} "
          "channels, dopri5 rtol=atol=1e-3 unless named")
    libraries = {f"{r['system'].split()[0].rstrip(',')} on {r['device']}" for r in rows.values()}
    print("devices: " + ", ".join(sorted(libraries)))
    print(f"{'system':28s} {'step s':>8s} {'compile s':>10s} {'temp MiB':>9s} "
          f"{'fwd NFE':>8s} {'bwd NFE':>8s} {'loss':>9s}")
    for row in rows.values():
        temp = None if row["temp_bytes"] is None else row["temp_bytes"] / 2**20
        print(f"{row['system']:28s} {row['step_s']:8.3f} {_fmt(row['compile_s'], '10.1f')} "
              f"{_fmt(temp, '9.1f')} {row['forward_nfe']:8d} {row['backward_nfe']:8d} "
              f"{row['loss']:9.5f}")

    def ratio(a, b, key="step_s"):
        if a in rows and b in rows and rows[a][key] and rows[b][key]:
            return rows[a][key] / rows[b][key]
        return None

    ratios = {
        "jaxode / torchdiffeq odeint_adjoint time":
            ratio("jaxode backsolve", "torchdiffeq odeint_adjoint"),
        "jaxode / torchdiffeq odeint time": ratio("jaxode backsolve", "torchdiffeq odeint"),
        "jaxode / diffrax backsolve time": ratio("jaxode backsolve", "diffrax backsolve"),
        "XLA conv / shifted conv time": ratio("jaxode, XLA conv", "jaxode, shifted conv"),
        "XLA conv / shifted conv memory":
            ratio("jaxode, XLA conv", "jaxode, shifted conv", "temp_bytes"),
        "jaxode memory 1e-6 / 1e-3":
            ratio("jaxode backsolve 1e-6", "jaxode backsolve", "temp_bytes"),
        "RK-Net memory x16 / x4": ratio("RK-Net rk4 x16", "RK-Net rk4 x4", "temp_bytes"),
        "jaxode / diffrax backsolve memory":
            ratio("jaxode backsolve", "diffrax backsolve", "temp_bytes"),
    }
    for name, value in ratios.items():
        if value is not None:
            print(f"{name}: {value:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
