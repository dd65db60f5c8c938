"""Data sets of the paper's experiments, all deterministic in their seed.

- `load_digits`: scikit-learn's 8x8 handwritten digits (shipped with scikit-learn,
  nothing downloaded), split train/test by a fixed permutation.
- `load_mnist`: MNIST from local IDX files (gzip or raw), `read_idx` for the format.
- `make_spirals`: the 2-D spirals of Section 5.1 (as in the authors' latent ODE example).
- `sample_2d`: 2-D toy densities (two moons, two circles, eight Gaussians, pinwheel,
  checkerboard) for maximum-likelihood CNFs.
- `log_target`: the unnormalised log-densities of Rezende & Mohamed (2015), U1..U4,
  the density-matching targets of Figure 4.
- `batch_indices`: the rows of the batch for a given step (a shuffle per epoch).

Images are float32 in [0, 1] with shape (N, 1, H, W) (equinox's channels-first
layout); labels are int32.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import struct

import numpy as np

# ------------------------------------------------------------------ batching


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The indices of the training batch for `step`: epochs of a fresh permutation of
    range(n) (seeded by (seed, epoch)) cut into full batches."""
    if batch_size > n:
        rng = np.random.default_rng([seed, step])
        return rng.choice(n, size=batch_size, replace=True)
    per_epoch = n // batch_size
    epoch, index = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[index * batch_size : (index + 1) * batch_size]


def random_shift(x: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image of x (N, C, H, W) translated by its own random (dy, dx) in
    [-max_shift, max_shift]^2, the uncovered border filled with zeros."""
    if max_shift <= 0:
        return x
    n, _, height, width = x.shape
    pad = max_shift
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
    out = np.empty_like(x)
    for i, (dy, dx) in enumerate(shifts):
        out[i] = padded[i, :, pad - dy : pad - dy + height, pad - dx : pad - dx + width]
    return out


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ------------------------------------------------------------------ images


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, C, H, W) images to (N, C, size, size)."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x

    def coords(old):
        pos = (np.arange(size) + 0.5) * old / size - 0.5
        lo = np.clip(np.floor(pos).astype(int), 0, old - 1)
        hi = np.clip(lo + 1, 0, old - 1)
        return lo, hi, np.clip(pos - lo, 0.0, 1.0)

    r0, r1, rw = coords(h)
    c0, c1, cw = coords(w)
    rows = x[:, :, r0, :] * (1 - rw)[:, None] + x[:, :, r1, :] * rw[:, None]
    out = rows[:, :, :, c0] * (1 - cw) + rows[:, :, :, c1] * cw
    return out.astype(x.dtype)


def load_digits(test_fraction: float = 0.2, seed: int = 0, size: int | None = None) -> dict:
    """scikit-learn's 1797 8x8 digits: {x_train, y_train, x_test, y_test}.

    The split is a fixed permutation seeded by `seed`; pixel values are scaled from
    0..16 to [0, 1]; `size` resizes the images (bilinear) to size x size."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    y = digits.target.astype(np.int32)
    if size is not None:
        x = resize_images(x, size)
    train, test = _split(len(y), test_fraction, seed)
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format), gzip-compressed or raw, as a numpy array."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: header says shape {shape} ({expected} bytes), "
            f"file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def find_mnist_files(directory: str) -> dict[str, str]:
    """{part: path} of the four MNIST IDX files in `directory` (names as on Yann
    LeCun's page, '.gz' or not, '-idx' or '.idx'); FileNotFoundError naming the missing."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"MNIST directory {directory!r} does not exist")
    found, missing = {}, []
    for part, base in MNIST_FILES.items():
        names = [base, base.replace("-idx", ".idx")]
        candidates = [os.path.join(directory, n + ext) for n in names for ext in ("", ".gz")]
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path is None:
            missing.append(base + "[.gz]")
        else:
            found[part] = path
    if missing:
        raise FileNotFoundError(f"MNIST IDX files missing in {directory!r}: {', '.join(missing)}")
    return found


def load_mnist(directory: str, size: int | None = None) -> dict:
    """MNIST from the IDX files in `directory`: {x_train (60000, 1, 28, 28) in [0, 1],
    y_train, x_test, y_test}."""
    data = {}
    for part, path in find_mnist_files(directory).items():
        array = read_idx(path)
        if part.startswith("x"):
            if array.ndim != 3:
                raise ValueError(f"{path}: expected images (N, H, W), got shape {array.shape}")
            array = (array.astype(np.float32) / 255.0)[:, None]
            if size is not None:
                array = resize_images(array, size)
        else:
            if array.ndim != 1:
                raise ValueError(f"{path}: expected labels (N,), got shape {array.shape}")
            array = array.astype(np.int32)
        data[part] = array
    for split in ("train", "test"):
        if len(data[f"x_{split}"]) != len(data[f"y_{split}"]):
            raise ValueError(f"MNIST {split}: {len(data[f'x_{split}'])} images but "
                             f"{len(data[f'y_{split}'])} labels")
    return data


# ------------------------------------------------------------------ spirals


@dataclasses.dataclass
class Spirals:
    """Spirals of Section 5.1. Each spiral is a window of 2 * n_window consecutive,
    equally spaced points of an Archimedean spiral: the first n_window are the observed
    window (n_obs of them, drawn without replacement, are the training observations),
    the last n_window the extrapolation targets.

    ts: (2 n_window,) times from 0; clean, noisy: (N, 2 n_window, 2); clockwise: (N,);
    obs_mask: (N, n_window) with n_obs True per spiral; starts: (N,) the index of each
    window's first point on its spiral of n_total points."""

    ts: np.ndarray
    clean: np.ndarray
    noisy: np.ndarray
    clockwise: np.ndarray
    obs_mask: np.ndarray
    starts: np.ndarray

    @property
    def n_window(self) -> int:
        return self.obs_mask.shape[1]

    def subset(self, index) -> Spirals:
        return Spirals(self.ts, self.clean[index], self.noisy[index], self.clockwise[index],
                       self.obs_mask[index], self.starts[index])


def make_spirals(
    n_spirals: int = 1000,
    n_window: int = 100,
    n_obs: int = 100,
    noise_std: float = 0.1,
    n_total: int = 1000,
    stop: float = 6 * math.pi,
    a: float = 0.0,
    b: float = 0.3,
    seed: int = 0,
    max_start: int | None = None,
) -> Spirals:
    """Half clockwise, half counter-clockwise spirals (the authors' construction: r =
    a + 50 b / (stop + 1 - t) centred at (-5, 0), and r = a + b t centred at (5, 0),
    t in [0, stop] on n_total points), each starting at a random point in [0, max_start],
    plus Gaussian noise of `noise_std`. max_start defaults to n_total - 2 n_window, so
    that every extrapolation window is on the curve; up to n_total - n_window, the
    windows observe the whole curve, and the points past its end are NaN."""
    if not 1 <= n_obs <= n_window:
        raise ValueError(f"n_obs: expected 1 <= n_obs <= n_window={n_window}, got {n_obs}")
    if 2 * n_window > n_total:
        raise ValueError(f"n_total: must be at least 2 * n_window = {2 * n_window}")
    max_start = n_total - 2 * n_window if max_start is None else max_start
    if not 0 <= max_start <= n_total - n_window:
        raise ValueError(f"max_start: expected 0..{n_total - n_window}, got {max_start}")
    rng = np.random.default_rng(seed)
    orig_ts = np.linspace(0.0, stop, n_total)
    zs_cw = stop + 1.0 - orig_ts
    r_cw = a + b * 50.0 / zs_cw
    cw = np.stack([r_cw * np.cos(zs_cw) - 5.0, r_cw * np.sin(zs_cw)], axis=1)
    r_cc = a + b * orig_ts
    cc = np.stack([r_cc * np.cos(orig_ts) + 5.0, r_cc * np.sin(orig_ts)], axis=1)

    length = 2 * n_window
    past_end = np.full((n_window, 2), np.nan)
    cw, cc = np.concatenate([cw, past_end]), np.concatenate([cc, past_end])
    clockwise = np.arange(n_spirals) < n_spirals // 2
    rng.shuffle(clockwise)
    starts = rng.integers(0, max_start + 1, size=n_spirals)
    clean = np.stack(
        [(cw if c else cc)[s : s + length] for c, s in zip(clockwise, starts)]
    ).astype(np.float32)
    noisy = (clean + rng.normal(size=clean.shape) * noise_std).astype(np.float32)
    obs_mask = np.zeros((n_spirals, n_window), bool)
    for i in range(n_spirals):
        obs_mask[i, rng.choice(n_window, size=n_obs, replace=False)] = True
    ts = orig_ts[:length].astype(np.float32)
    return Spirals(ts, clean, noisy, clockwise, obs_mask, starts)


# ------------------------------------------------------------------ 2-D densities

DENSITIES_2D = ("moons", "circles", "8gaussians", "pinwheel", "checkerboard")


def sample_2d(name: str, n: int, rng: np.random.Generator | int) -> np.ndarray:
    """n samples (float32, (n, 2)) of a 2-D toy density: "moons" (two moons, noise
    0.1, scaled as in FFJORD), "circles" (noise 0.06, factor 0.5, as in the authors'
    CNF example), "8gaussians", "pinwheel", "checkerboard" (as in FFJORD)."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    if name == "moons":
        from sklearn.datasets import make_moons

        x = make_moons(n_samples=n, noise=0.1, random_state=_sk_seed(rng))[0]
        x = x * 2 + np.array([-1.0, -0.2])
    elif name == "circles":
        from sklearn.datasets import make_circles

        x = make_circles(n_samples=n, noise=0.06, factor=0.5, random_state=_sk_seed(rng))[0]
    elif name == "8gaussians":
        s = 1 / math.sqrt(2)
        centers = 4.0 * np.array(
            [(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)]
        )
        x = (rng.normal(size=(n, 2)) * 0.5 + centers[rng.integers(0, 8, n)]) / 1.414
    elif name == "pinwheel":
        classes, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
        labels = rng.integers(0, classes, n)
        features = rng.normal(size=(n, 2)) * np.array([radial_std, tangential_std])
        features[:, 0] += 1.0
        angles = 2 * np.pi * labels / classes + rate * np.exp(features[:, 0])
        cos, sin = np.cos(angles), np.sin(angles)
        x = 2 * np.stack(
            [features[:, 0] * cos - features[:, 1] * sin,
             features[:, 0] * sin + features[:, 1] * cos], axis=1
        )
    elif name == "checkerboard":
        x1 = rng.uniform(size=n) * 4 - 2
        x2 = rng.uniform(size=n) - rng.integers(0, 2, n) * 2
        x2 = x2 + np.floor(x1) % 2
        x = np.stack([x1, x2], axis=1) * 2
    else:
        raise ValueError(f"name: unknown 2-D density {name!r}; expected one of {DENSITIES_2D}")
    return x.astype(np.float32)


def _sk_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


# ------------------------------------------------------------------ density targets

TARGETS = ("U1", "U2", "U3", "U4")


def log_target(name: str):
    """The unnormalised log-density log p(z) = -U(z) of Rezende & Mohamed (2015),
    Table 1, for z of shape (..., 2); a jax.numpy function."""
    import jax
    import jax.numpy as jnp

    def w1(z):
        return jnp.sin(2 * jnp.pi * z[..., 0] / 4)

    def w2(z):
        return 3 * jnp.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)

    def w3(z):
        return 3 * jax.nn.sigmoid((z[..., 0] - 1) / 0.3)

    def u1(z):
        radius = jnp.linalg.norm(z, axis=-1)
        return 0.5 * ((radius - 2) / 0.4) ** 2 - jnp.logaddexp(
            -0.5 * ((z[..., 0] - 2) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2) / 0.6) ** 2
        )

    def u2(z):
        return 0.5 * ((z[..., 1] - w1(z)) / 0.4) ** 2

    def u3(z):
        return -jnp.logaddexp(
            -0.5 * ((z[..., 1] - w1(z)) / 0.35) ** 2,
            -0.5 * ((z[..., 1] - w1(z) + w2(z)) / 0.35) ** 2,
        )

    def u4(z):
        return -jnp.logaddexp(
            -0.5 * ((z[..., 1] - w1(z)) / 0.4) ** 2,
            -0.5 * ((z[..., 1] - w1(z) + w3(z)) / 0.35) ** 2,
        )

    energies = {"U1": u1, "U2": u2, "U3": u3, "U4": u4}
    if name not in energies:
        raise ValueError(f"name: unknown target {name!r}; expected one of {TARGETS}")
    energy = energies[name]
    return lambda z: -energy(z)
