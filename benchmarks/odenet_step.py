"""One ODE-Net training step, MNIST architecture (issue 4): the convolution lowering.

    PYTHONPATH=. .venv/bin/python -m benchmarks.odenet_step [--batch 128] [--channels 64]

Runs the step (forward + backsolve gradient + SGD momentum update; dopri5 at the
paper's rtol = atol = 1e-3; batch 128 of 1x28x28 images, 64 channels) twice, each in a
child process: with the ODE function's convolutions as jaxode writes them
(`jaxode.nn.odenet.shifted_conv`, matrix products on shifted views) and with equinox's
Conv2d (XLA's convolution, which XLA:CPU runs with a slow generic kernel inside the
solver's while loop); and the same architecture in PyTorch with torchdiffeq's
odeint_adjoint (one thread). Prints the times, ratios and losses (the two JAX runs
share their weights, so their losses must agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def run_step(conv: str, batch: int, channels: int, repeats: int) -> dict:
    import equinox as eqx
    import jax
    import numpy as np
    import optax

    import jaxode.nn as nn
    import jaxode.nn.odenet as odenet

    if conv == "xla":
        odenet.shifted_conv = lambda layer, x: layer(x)
    model = nn.ODENet(channels=channels, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 1, 28, 28))
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, state = optimizer.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, loss

    start = time.perf_counter()
    loss = jax.block_until_ready(step(model, state)[2])
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(model, state)[2])
        times.append(time.perf_counter() - start)
    nfe = int(np.max(model.with_stats(x)[1]["nfe"]))
    return {"conv": conv, "first_call_s": first, "step_s": float(np.median(times)),
            "loss": float(loss), "forward_nfe": nfe}


def run_torch_step(batch: int, channels: int, repeats: int) -> dict:
    """The same architecture in PyTorch with torchdiffeq's odeint_adjoint (its own random
    weights: compare the time per step together with the NFE)."""
    import numpy as np
    import torch
    from torch import nn as tnn
    from torchdiffeq import odeint_adjoint

    torch.manual_seed(0)
    torch.set_num_threads(1)

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
            ts = torch.tensor([0.0, 1.0])
            return odeint_adjoint(self.func, x, ts, rtol=1e-3, atol=1e-3, method="dopri5")[1]

    c = channels
    model = tnn.Sequential(
        tnn.Conv2d(1, c, 3, 1), norm(c), tnn.ReLU(), tnn.Conv2d(c, c, 4, 2, 1), norm(c),
        tnn.ReLU(), tnn.Conv2d(c, c, 4, 2, 1), Block(c), norm(c), tnn.ReLU(),
        tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(c, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    func = model[7].func

    def step():
        optimizer.zero_grad()
        loss = tnn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    start = time.perf_counter()
    loss = step()
    first = time.perf_counter() - start
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
    return {"conv": "torchdiffeq", "first_call_s": first, "step_s": float(np.median(times)),
            "loss": loss, "forward_nfe": func.nfe, "total_nfe": int(np.median(nfes))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["shifted", "xla", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "torch":
        print(json.dumps(run_torch_step(args.batch, args.channels, args.repeats)))
        return
    if args.worker:
        print(json.dumps(run_step(args.worker, args.batch, args.channels, args.repeats)))
        return
    rows = []
    for conv in ("shifted", "xla", "torch"):
        command = [sys.executable, "-m", "benchmarks.odenet_step", "--worker", conv,
                   "--batch", str(args.batch), "--channels", str(args.channels),
                   "--repeats", str(args.repeats)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"ODE-Net training step, batch {args.batch}, {args.channels} channels, dopri5 1e-3, "
          "backsolve")
    print(f"{'convolution':12s} {'step s':>8s} {'1st call s':>11s} {'fwd NFE':>8s} {'loss':>10s}")
    for row in rows:
        print(f"{row['conv']:12s} {row['step_s']:8.3f} {row['first_call_s']:11.2f} "
              f"{row['forward_nfe']:8d} {row['loss']:10.5f}")
    print(f"xla / shifted step time: {rows[1]['step_s'] / rows[0]['step_s']:.1f}x; "
          f"losses agree: {abs(rows[0]['loss'] - rows[1]['loss']) < 1e-4}")
    print(f"jaxode (shifted) / torchdiffeq odeint_adjoint step time: "
          f"{rows[0]['step_s'] / rows[2]['step_s']:.2f} (torch: its own random weights, "
          f"forward NFE {rows[2]['forward_nfe']}, forward + backward NFE {rows[2]['total_nfe']})")


if __name__ == "__main__":
    main()
