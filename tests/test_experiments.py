"""Data loaders (shapes, ranges, determinism), the MNIST IDX reader on tiny files
written here, the density targets against the formulas of Rezende & Mohamed (2015),
the shipped configs, and (marked slow) every quick config end to end."""

from __future__ import annotations

import glob
import gzip
import math
import os
import struct
import time

import numpy as np
import pytest

from experiments import data
from experiments.config import ConfigError
from experiments.registry import load_config
from experiments.runner import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))

# ------------------------------------------------------------------ digits and batches


def test_digits_split_is_fixed_and_complete():
    a = data.load_digits()
    b = data.load_digits()
    assert a["x_train"].shape == (1438, 1, 8, 8) and a["x_test"].shape == (359, 1, 8, 8)
    assert a["x_train"].dtype == np.float32 and a["y_train"].dtype == np.int32
    assert 0.0 <= a["x_train"].min() and a["x_train"].max() <= 1.0
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert set(np.unique(a["y_test"])) == set(range(10))
    # train and test partition the 1797 images
    from sklearn.datasets import load_digits

    full = (load_digits().images / 16.0).reshape(1797, 64).astype(np.float32)
    mine = np.concatenate([a["x_train"], a["x_test"]]).reshape(1797, 64)
    np.testing.assert_array_equal(full[np.lexsort(full.T)], mine[np.lexsort(mine.T)])
    other = data.load_digits(seed=1)
    assert not np.array_equal(other["y_test"], a["y_test"])


def test_digits_resize():
    d = data.load_digits(size=16)
    assert d["x_train"].shape == (1438, 1, 16, 16)
    assert 0.0 <= d["x_train"].min() and d["x_train"].max() <= 1.0
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    np.testing.assert_allclose(data.resize_images(x, 4), x)
    up = data.resize_images(x, 8)
    assert up.shape == (1, 1, 8, 8) and np.isclose(up.mean(), x.mean())


def _translate(img, dy, dx):
    """img (C, H, W) moved down by dy and right by dx, zeros where nothing moved in."""
    out = np.zeros_like(img)
    for r in range(img.shape[1]):
        for c in range(img.shape[2]):
            if 0 <= r - dy < img.shape[1] and 0 <= c - dx < img.shape[2]:
                out[:, r, c] = img[:, r - dy, c - dx]
    return out


def test_random_shift_translates_with_zero_fill():
    x = np.arange(2 * 1 * 5 * 5, dtype=np.float32).reshape(2, 1, 5, 5) + 1
    assert data.random_shift(x, 0, np.random.default_rng(0)) is x
    shifted = data.random_shift(x, 2, np.random.default_rng(3))
    assert shifted.shape == x.shape
    for i in range(2):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if np.array_equal(_translate(x[i], dy, dx), shifted[i])]
        assert len(matches) == 1
    assert np.array_equal(shifted, data.random_shift(x, 2, np.random.default_rng(3)))


def test_negative_augment_shift_is_refused_by_name():
    config = os.path.join(ROOT, "configs", "odenet_digits_quick.yaml")
    with pytest.raises(ConfigError, match="'data.augment_shift'.*>= 0"):
        load_config(config, ["data.augment_shift=-1"])


def test_batch_indices_cover_each_epoch_once_and_repeat():
    n, b = 10, 3
    epoch0 = np.concatenate([data.batch_indices(n, b, s, seed=4) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # 3 full batches of a permutation
    np.testing.assert_array_equal(data.batch_indices(n, b, 7, 4), data.batch_indices(n, b, 7, 4))
    assert not np.array_equal(data.batch_indices(n, b, 0, 4), data.batch_indices(n, b, 3, 4))
    assert data.batch_indices(2, 5, 0, 0).shape == (5,)  # batch larger than the data


# ------------------------------------------------------------------ MNIST IDX files


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_mnist(directory, n_train=5, n_test=3, gz=True, dotted=False):
    rng = np.random.default_rng(0)
    parts = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)).astype(np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    os.makedirs(directory, exist_ok=True)
    for name, array in parts.items():
        raw = idx_bytes(array)
        if dotted:
            name = name.replace("-idx", ".idx")
        path = os.path.join(directory, name + (".gz" if gz else ""))
        with open(path, "wb") as f:
            f.write(gzip.compress(raw) if gz else raw)
    return parts


@pytest.mark.parametrize("gz,dotted", [(True, False), (False, True)])
def test_mnist_idx_loader(tmp_path, gz, dotted):
    parts = write_mnist(tmp_path, gz=gz, dotted=dotted)
    mnist = data.load_mnist(str(tmp_path))
    assert mnist["x_train"].shape == (5, 1, 28, 28) and mnist["x_test"].shape == (3, 1, 28, 28)
    assert mnist["x_train"].dtype == np.float32 and mnist["y_train"].dtype == np.int32
    np.testing.assert_allclose(mnist["x_train"][:, 0] * 255,
                               parts["train-images-idx3-ubyte"], atol=1e-4)
    np.testing.assert_array_equal(mnist["y_test"], parts["t10k-labels-idx1-ubyte"])
    assert data.load_mnist(str(tmp_path), size=14)["x_test"].shape == (3, 1, 14, 14)


def test_read_idx_types_and_errors(tmp_path):
    path = str(tmp_path / "x.idx")
    values = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    with open(path, "wb") as f:
        f.write(idx_bytes(values, 0x0E))
    np.testing.assert_array_equal(data.read_idx(path), values)
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x02" + struct.pack(">2I", 2, 3) + b"\x00" * 5)
    with pytest.raises(ValueError, match="size mismatch"):
        data.read_idx(path)
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(path)


def test_mnist_missing_files_are_named(tmp_path):
    write_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_mnist(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.find_mnist_files(str(tmp_path / "nowhere"))


def test_mnist_config_names_data_path(tmp_path):
    config = os.path.join(ROOT, "configs", "odenet_mnist.yaml")
    with pytest.raises(ConfigError, match="'data.path': missing value"):
        load_config(config)
    with pytest.raises(ConfigError, match="'data.path'.*missing"):
        load_config(config, [f"data.path={tmp_path}"])
    write_mnist(tmp_path)
    _, cfg = load_config(config, [f"data.path={tmp_path}"])
    assert cfg.data.path == str(tmp_path)


# ------------------------------------------------------------------ spirals


def test_spirals_shapes_halves_and_determinism():
    s = data.make_spirals(n_spirals=40, n_window=20, n_obs=7, n_total=100, seed=3)
    assert s.ts.shape == (40,) and s.clean.shape == s.noisy.shape == (40, 40, 2)
    assert s.obs_mask.shape == (40, 20) and (s.obs_mask.sum(1) == 7).all()
    assert s.clockwise.sum() == 20  # half clockwise, half counter-clockwise
    np.testing.assert_allclose(np.diff(s.ts), s.ts[1] - s.ts[0], rtol=1e-5)
    # different starting points; noise of the requested size
    assert len({tuple(c[0]) for c in s.clean}) > 30
    assert 0.07 < np.std(s.noisy - s.clean) < 0.13
    # the clockwise ones spiral around (-5, 0), the others around (5, 0)
    assert s.clean[s.clockwise][..., 0].mean() < 0 < s.clean[~s.clockwise][..., 0].mean()
    t = data.make_spirals(n_spirals=40, n_window=20, n_obs=7, n_total=100, seed=3)
    np.testing.assert_array_equal(s.noisy, t.noisy)
    np.testing.assert_array_equal(s.obs_mask, t.obs_mask)
    sub = s.subset(np.arange(5))
    assert sub.clean.shape == (5, 40, 2) and sub.n_window == 20
    np.testing.assert_array_equal(sub.starts, s.starts[:5])
    # each window starts at its recorded point of the n_total-point curve
    assert ((s.starts >= 0) & (s.starts <= 100 - 40)).all()
    t_start = s.starts[~s.clockwise] * 6 * np.pi / 99
    expected = np.stack([0.3 * t_start * np.cos(t_start) + 5, 0.3 * t_start * np.sin(t_start)], 1)
    np.testing.assert_allclose(s.clean[~s.clockwise][:, 0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="n_obs"):
        data.make_spirals(n_window=10, n_obs=11)


def test_spirals_windows_can_observe_the_whole_curve():
    s = data.make_spirals(n_spirals=40, n_window=20, n_obs=7, n_total=100, seed=3,
                          max_start=80)
    assert s.starts.max() > 60  # past where an extrapolation window would fit
    assert np.isfinite(s.noisy[:, :20]).all()  # the observed window is on the curve
    for clean, start in zip(s.clean, s.starts):
        on_curve = min(40, 100 - start)
        assert np.isfinite(clean[:on_curve]).all() and np.isnan(clean[on_curve:]).all()
    with pytest.raises(ValueError, match="max_start"):
        data.make_spirals(n_window=100, n_total=1000, max_start=901)


def test_latent_experiment_splits_and_covered_spirals(tmp_path):
    from experiments.parallel import DataParallel
    from experiments.runner import Context

    path = os.path.join(ROOT, "configs", "latent_ode_spirals_quick.yaml")
    covered = {}
    for observe_to_end in (False, True):
        cls, cfg = load_config(path, [f"data.observe_to_end={observe_to_end}"])
        ctx = Context(cfg, str(tmp_path), path, DataParallel(), np.dtype("float32"))
        experiment = cls(cfg, ctx)
        d = cfg.data
        assert len(experiment.train.starts) + len(experiment.test.starts) == d.n_spirals
        assert experiment.test.starts.max() <= d.n_total - 2 * d.n_window
        reach = experiment.train.starts.max() + d.n_window
        assert reach > d.n_total - d.n_window if observe_to_end else reach <= d.n_total - d.n_window
        covered[observe_to_end] = experiment.covered()
    # covered: the test windows whose extrapolation ends where training windows reach
    assert 0 < covered[False].mean() < 0.95 < covered[True].mean()


def test_density_matching_has_a_flow_pair_per_target_and_width(tmp_path):
    import jax

    from experiments.parallel import DataParallel
    from experiments.runner import Context

    path = os.path.join(ROOT, "configs", "cnf_density_matching_quick.yaml")
    cls, cfg = load_config(path, ["model.widths=[2, 3]", "data.targets=[U1, U3]"])
    ctx = Context(cfg, str(tmp_path), path, DataParallel(), np.dtype("float32"))
    models = cls(cfg, ctx).init_models(jax.random.PRNGKey(0))
    pairs = [f"{t}_M{w}" for t in ("U1", "U3") for w in (2, 3)]
    assert sorted(models) == sorted([f"cnf_{p}" for p in pairs] + [f"nf_{p}" for p in pairs])
    for p in pairs:
        width = int(p.split("_M")[1])
        assert models[f"cnf_{p}"].func.width == width  # CNF width M ...
        assert models[f"nf_{p}"].w.shape == (width, 2)  # ... and an NF of K = M layers


def test_spirals_rotate_both_ways():
    s = data.make_spirals(n_spirals=10, n_window=50, n_obs=5, noise_std=0.0, seed=0)
    for clean, cw in zip(s.clean, s.clockwise):
        centre = np.array([-5.0, 0.0]) if cw else np.array([5.0, 0.0])
        v = clean - centre
        angle = np.unwrap(np.arctan2(v[:, 1], v[:, 0]))
        assert (np.diff(angle) < 0).all() if cw else (np.diff(angle) > 0).all()


# ------------------------------------------------------------------ 2-D densities


@pytest.mark.parametrize("name", data.DENSITIES_2D)
def test_2d_densities(name):
    x = data.sample_2d(name, 501, 0)
    assert x.shape == (501, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    np.testing.assert_array_equal(x, data.sample_2d(name, 501, 0))
    assert not np.array_equal(x, data.sample_2d(name, 501, 1))
    assert 0.3 < np.abs(x).mean() < 4


def test_circles_have_the_papers_geometry():
    radii = np.linalg.norm(data.sample_2d("circles", 4000, 0), axis=1)
    inner, outer = radii[radii < 0.75], radii[radii >= 0.75]
    assert abs(inner.mean() - 0.5) < 0.02 and abs(outer.mean() - 1.0) < 0.02
    assert abs(len(inner) - len(outer)) < 10
    with pytest.raises(ValueError, match="unknown 2-D density"):
        data.sample_2d("spiral", 3, 0)


def reference_energy(name, z):
    """U(z) of Rezende & Mohamed (2015), Table 1, written directly with exp/log."""
    z1, z2 = z[:, 0], z[:, 1]
    w1 = np.sin(2 * np.pi * z1 / 4)
    w2 = 3 * np.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    w3 = 3 / (1 + np.exp(-(z1 - 1) / 0.3))
    if name == "U1":
        r = np.sqrt(z1**2 + z2**2)
        return 0.5 * ((r - 2) / 0.4) ** 2 - np.log(
            np.exp(-0.5 * ((z1 - 2) / 0.6) ** 2) + np.exp(-0.5 * ((z1 + 2) / 0.6) ** 2))
    if name == "U2":
        return 0.5 * ((z2 - w1) / 0.4) ** 2
    if name == "U3":
        return -np.log(np.exp(-0.5 * ((z2 - w1) / 0.35) ** 2)
                       + np.exp(-0.5 * ((z2 - w1 + w2) / 0.35) ** 2))
    return -np.log(np.exp(-0.5 * ((z2 - w1) / 0.4) ** 2)
                   + np.exp(-0.5 * ((z2 - w1 + w3) / 0.35) ** 2))


@pytest.mark.parametrize("name", data.TARGETS)
def test_density_targets_match_the_formulas(name):
    z = np.random.default_rng(0).uniform(-3, 3, (200, 2))
    log_p = np.asarray(data.log_target(name)(z))
    np.testing.assert_allclose(log_p, -reference_energy(name, z), rtol=1e-6, atol=1e-6)
    assert np.asarray(data.log_target(name)(z[0])).shape == ()


def test_density_target_landmarks():
    u1 = data.log_target("U1")
    assert abs(float(u1(np.array([2.0, 0.0])))) < 1e-6  # on the ring, at a mode
    assert float(u1(np.array([0.0, 0.0]))) < -10  # the hole in the middle
    assert float(data.log_target("U2")(np.array([1.0, 1.0]))) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown target"):
        data.log_target("U5")


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_validate(path):
    name = os.path.basename(path)
    if name.startswith("odenet_mnist"):
        with pytest.raises(ConfigError, match="data.path"):
            load_config(path)
        return
    cls, cfg = load_config(path)
    assert cfg.name == name[:-5] and cfg.description


def test_every_experiment_has_a_quick_config():
    names = {os.path.basename(p)[:-5] for p in CONFIGS}
    for base in ("odenet_digits", "nfe_study", "latent_ode_spirals", "cnf_density_matching",
                 "cnf_ml_2d"):
        assert base in names and f"{base}_quick" in names
    assert "odenet_mnist" in names and "odenet_mnist_quick" in names


# ------------------------------------------------------------------ end to end (slow)

QUICK = [p for p in CONFIGS if p.endswith("_quick.yaml")]


@pytest.mark.slow
@pytest.mark.parametrize("path", QUICK, ids=os.path.basename)
def test_quick_config_end_to_end(path, tmp_path):
    overrides = []
    if os.path.basename(path).startswith("odenet_mnist"):  # random images in MNIST's files
        write_mnist(tmp_path / "mnist", n_train=300, n_test=100)
        overrides = [f"data.path={tmp_path / 'mnist'}"]
    cls, cfg = load_config(path, overrides)
    start = time.perf_counter()
    result = run(cls, cfg, config_file=path, out_dir=str(tmp_path), progress=False)
    elapsed = time.perf_counter() - start
    assert result.status == "complete" and result.step == cfg.train.steps
    assert result.report.rows and os.path.exists(result.summary_path)
    for figure in result.report.figures:
        assert os.path.getsize(tmp_path / figure) > 1000
    for row in result.report.rows:
        for value in row.values():
            assert not (isinstance(value, float) and math.isnan(value)), row
    print(f"{os.path.basename(path)}: {elapsed:.1f} s\n{result.report.table()}")


@pytest.mark.slow
def test_nfe_counting_agrees_with_solver_stats(tmp_path):
    import jax

    from experiments.parallel import DataParallel
    from experiments.runner import Context

    path = os.path.join(ROOT, "configs", "nfe_study_quick.yaml")
    cls, cfg = load_config(path, ["study.probe_size=8", "model.channels=4"])
    ctx = Context(cfg, str(tmp_path), path, DataParallel(), np.dtype("float32"))
    study = cls(cfg, ctx)
    model = study.init_models(jax.random.PRNGKey(0))["odenet"]
    loose, tight = (study.measure(model, tol, study.probe) for tol in (1e-1, 1e-4))
    for m in (loose, tight):
        assert m["nfe_forward"] == m["nfe_forward_counted"] > 0
        assert m["nfe_backward"] > 0
    assert tight["nfe_forward"] > loose["nfe_forward"]


@pytest.mark.slow
def test_nfe_study_trains_in_float32_and_sweeps_tolerances_in_float64(tmp_path):
    import jax

    from experiments.nfe_study import NFEStudy

    seen = {}

    class Recording(NFEStudy):
        def report(self, models, log):
            seen["trained"] = {x.dtype for x in jax.tree_util.tree_leaves(models)}
            return super().report(models, log)

        def measure(self, model, tol, probe, **options):
            m = super().measure(model, tol, probe, **options)
            seen.setdefault("outputs", set()).add(m["output"].dtype)
            return m

    path = os.path.join(ROOT, "configs", "nfe_study_quick.yaml")
    _, cfg = load_config(path, ["train.steps=2", "train.eval_every=2", "model.channels=4",
                                "study.probe_size=8", "study.tolerances=[0.01]",
                                "study.timing_repeats=1", "study.dtype=float64"])
    assert cfg.dtype == "float32" and Recording.needs_x64(cfg)
    result = run(Recording, cfg, config_file=path, out_dir=str(tmp_path), progress=False)
    assert result.status == "complete"
    assert seen["trained"] == {np.dtype("float32")}
    # The evaluation during training probes in float32, the report's sweep in float64.
    assert seen["outputs"] == {np.dtype("float32"), np.dtype("float64")}
