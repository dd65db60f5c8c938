"""What a user installs and sees: the wheel's contents and its dependencies, configs run
by name, the overrides in summary.md, each model's loss in the progress line.

The wheel tests build it offline (`python -m build --no-isolation`, with `build` and
`hatchling` from the dev extra) and install it without the network; they skip where
those are missing. The install test (about 15-25 s here) runs with `-m slow`.
"""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest
import tomllib

from experiments.report import Progress
from jaxode import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Import name -> distribution name, for the third-party modules the code imports.
DISTRIBUTIONS = {
    "jax": "jax", "jaxlib": "jaxlib", "equinox": "equinox", "numpy": "numpy",
    "optax": "optax", "yaml": "pyyaml", "matplotlib": "matplotlib", "rich": "rich",
    "sklearn": "scikit-learn", "scipy": "scipy", "pytest": "pytest", "chex": "chex",
    "diffrax": "diffrax", "optimistix": "optimistix", "torch": "torch",
    "torchdiffeq": "torchdiffeq",
    "typing_extensions": "typing-extensions", "jaxtyping": "jaxtyping",
}
# Tiny settings for ode_demo_quick: a run of a few seconds.
TINY = ["train.steps=3", "train.log_every=2", "train.eval_every=0", "data.n_points=40",
        "data.t_end=4.0", "data.batch_time=4", "train.batch_size=4", "model.width=8",
        "solver.rtol=1e-4", "solver.atol=1e-5"]


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-")
            for r in requirements}


def _py_files(directory: str, exclude: tuple[str, ...] = ()) -> list[str]:
    paths = []
    for base, _, names in os.walk(os.path.join(ROOT, directory)):
        paths += [os.path.join(base, n) for n in names
                  if n.endswith(".py") and os.path.join(base, n) not in exclude]
    return paths


def _distributions(paths: list[str]) -> set[str]:
    """The distributions of the third-party modules the files import (lazily too)."""
    found = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    local = {"jaxode", "experiments", "benchmarks", "__future__", "hatchling"}
    return {DISTRIBUTIONS[m] for m in found - local if m not in sys.stdlib_module_names}


def test_dependencies_say_what_is_imported():
    project = _pyproject()["project"]
    core = _names(project["dependencies"])
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    cli_file = os.path.join(ROOT, "jaxode", "cli.py")  # the runner's front end
    library = _distributions(_py_files("jaxode", exclude=(cli_file,)))
    assert library <= core and core - {"jaxlib"} == library  # jaxlib: jax's backend
    # (a failure names the import to declare in [project] dependencies, or the
    # declared dependency nothing imports)
    runner = _distributions(_py_files("experiments") + [cli_file])
    assert runner <= core | extras["experiments"]
    assert _distributions(_py_files("tests")) <= core | extras["dev"]
    assert _distributions(_py_files("benchmarks")) <= core | extras["experiments"] | extras[
        "bench"]
    assert extras["experiments"] <= extras["dev"]  # the tests run the experiments
    assert "chex" in extras["dev"] and "chex" not in core  # the tests' tool, not the library's
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= extras["docs"]


def test_config_by_name_resolves_to_the_shipped_file(tmp_path, monkeypatch):
    shipped = os.path.join(cli.configs_dir(), "odenet_digits_quick.yaml")
    assert os.path.isfile(shipped)
    assert "odenet_digits_quick" in cli.config_names()
    monkeypatch.chdir(tmp_path)  # from any directory
    assert cli.resolve_config("odenet_digits_quick") == shipped
    assert cli.resolve_config("odenet_digits_quick.yaml") == shipped
    own = tmp_path / "odenet_digits_quick.yaml"  # an existing file wins over the name
    own.write_text("kind: odenet\n")
    assert cli.resolve_config("odenet_digits_quick.yaml") == "odenet_digits_quick.yaml"
    assert cli.resolve_config("sub/none.yaml") == "sub/none.yaml"  # a path stays a path


def test_unknown_config_name_is_refused_with_a_suggestion(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "odenet_digits_quik"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "jaxode list" in err and "'odenet_digits_quick'" in err
    assert err.count("\n") == 1


def test_run_by_name_lists_overrides_and_shows_progress_at_once(tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.chdir(tmp_path)  # not the repository: the name finds the shipped config
    args = ["run", "ode_demo_quick", "--out", str(tmp_path / "out")]
    for override in TINY:
        args += ["--set", override]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("training ode_demo_quick:") and "compiling" in lines[0]
    assert lines[1].startswith("step 1/3")  # the first line after one step, not log_every
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "ode_demo_quick.yaml" in summary
    for override in TINY:
        assert f"`--set {override}`" in summary
    assert not (tmp_path / "runs").exists()


def test_summary_says_when_there_are_no_overrides(tmp_path, monkeypatch):
    from experiments.registry import load_config
    from experiments.runner import run

    path = os.path.join(cli.configs_dir(), "ode_demo_quick.yaml")
    cls, cfg = load_config(path, TINY)
    result = run(cls, cfg, config_file=path, out_dir=str(tmp_path / "a"), progress=False,
                 stream=io.StringIO())
    assert "- overrides: none" in open(result.summary_path).read()


def test_progress_line_shows_each_models_loss_not_their_sum():
    stream = io.StringIO()
    bar = Progress(10, 0, ("loss", "nfe"), stream=stream, models=["odenet", "resnet", "mlp"])
    bar.log(5, {"loss": 6.0, "mlp/loss": 3.0, "odenet/loss": 1.0, "resnet/loss": 2.0,
                "odenet/acc": 0.5, "nfe": 26.0})
    line = stream.getvalue()
    assert "odenet loss 1  resnet loss 2  mlp loss 3  nfe 26" in line  # in the given order
    assert "loss 6" not in line and "acc" not in line
    stream = io.StringIO()
    Progress(10, 0, ("loss", "nfe"), stream=stream).log(1, {"loss": 0.25, "nfe": 14.0})
    assert "loss 0.25  nfe 14" in stream.getvalue()  # one model: its loss as it is


def _build_wheel(out_dir) -> str:
    pytest.importorskip("build")
    pytest.importorskip("hatchling")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(out_dir), ROOT], check=True, capture_output=True, timeout=300)
    (wheel,) = [f for f in os.listdir(out_dir) if f.endswith(".whl")]
    return os.path.join(out_dir, wheel)


def test_wheel_carries_runner_configs_license_and_py_typed(tmp_path):
    with zipfile.ZipFile(_build_wheel(tmp_path)) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "jaxode/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "jaxode/experiments/__init__.py" in names and "jaxode/experiments/runner.py" in names
    assert "jaxode/configs/odenet_digits_quick.yaml" in names
    top = {n.split("/")[0] for n in names}
    assert top == {"jaxode", next(t for t in top if t.endswith(".dist-info"))}
    assert not any(n.endswith(".pyc") for n in names)
    assert "Provides-Extra: experiments" in metadata
    chex = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: chex")]
    assert chex and all("extra == 'dev'" in line for line in chex)


@pytest.mark.slow  # 13 s alone, 26 s on a loaded 2-core machine
def test_wheel_installed_in_a_fresh_venv_runs_configs_from_anywhere(tmp_path):
    """Build the wheel, install it (no network: --no-index, --no-deps) into a new venv
    whose dependencies come from this environment's site-packages (a path in a .pth
    file: its own .pth files, among them the editable install of this clone, are not
    processed), then run `jaxode list`, a config by name and a config by path from a
    directory outside the repository."""
    wheel = _build_wheel(tmp_path / "dist")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run([str(bindir / "python"), "-m", "pip", "install", "--quiet", "--no-index",
                    "--no-deps", wheel], check=True, timeout=300)
    site = subprocess.run([str(bindir / "python"), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "zz_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "JAXODE_JAX_CACHE": "off", "PYTHONPATH": ""}

    def jaxode(*args):
        return subprocess.run([str(bindir / "jaxode"), *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)

    where = subprocess.run([str(bindir / "python"), "-c", textwrap.dedent("""
        import importlib.util, jaxode.cli as c
        print(c.__file__); print(c.experiments_package()); print(c.configs_dir())
        print(importlib.util.find_spec('experiments'))""")], cwd=work, env=env,
        capture_output=True, text=True, check=True).stdout.split()
    assert where[0].startswith(site) and where[1] == "jaxode.experiments"
    assert where[2].startswith(site) and where[3] == "None"  # no top-level `experiments`
    listing = jaxode("list")
    assert listing.returncode == 0, listing.stderr
    assert "odenet_digits_quick" in listing.stdout and "ode_demo_quick" in listing.stdout
    sets = [a for o in TINY for a in ("--set", o)]
    by_name = jaxode("run", "ode_demo_quick", "--no-progress", *sets)
    assert by_name.returncode == 0, by_name.stderr
    assert (work / "runs" / "ode_demo_quick" / "summary.md").exists()
    mine = work / "configs" / "my.yaml"
    mine.parent.mkdir()
    with open(os.path.join(where[2], "ode_demo_quick.yaml")) as f:
        mine.write_text(f.read())
    by_path = jaxode("run", "configs/my.yaml", "--no-progress", *sets)
    assert by_path.returncode == 0, by_path.stderr
    assert (work / "runs" / "my" / "summary.md").exists()


def test_docs_build_strict(tmp_path):
    """The documentation site builds with warnings as errors: every public name of
    jaxode and jaxode.nn is on an API page with a docstring (docs/hooks.py), every
    link and included config resolves."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "solving" / "index.html").read_text()
    assert "odeint" in api and "Solution" in api


def test_curves_put_models_together_with_readable_labels(tmp_path, monkeypatch):
    from experiments import report

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, out, name: figures.append(fig) or name)
    records = [{"step": s, "odenet/test_error": 0.1 / s, "resnet/test_error": 0.2 / s,
                "rnn/loss": 1.0} for s in (1, 2, 3)]
    report.plot_curves(records, ["odenet/test_error", "resnet/test_error"], str(tmp_path), "a")
    (ax,) = figures[-1].axes  # one panel, the models together
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ODE-Net", "ResNet"]
    assert ax.get_ylabel() == "test error (%)" and ax.get_xlabel() == "training step"
    assert max(ax.lines[0].get_ydata()) == pytest.approx(10.0)  # in percent
    legend = ax.get_legend().get_window_extent(figures[-1].canvas.get_renderer())
    assert legend.y1 < ax.get_window_extent(figures[-1].canvas.get_renderer()).y0  # below
    flows = [{"step": 1, "cnf_U1_M8/kl": 1.0, "nf_U1_M8/kl": 2.0, "cnf_U2_M8/kl": 3.0}]
    report.plot_curves(flows, ["cnf_U1_M8/kl", "cnf_U2_M8/kl", "nf_U1_M8/kl"], str(tmp_path), "b",
                       group=lambda key: f"target {key.split('_')[1]}")
    left, right = figures[-1].axes
    assert left.get_title() == "target U1" and right.get_title() == "target U2"
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["CNF M=8", "NF K=8"]
    assert report.model_label("rnn") == "RNN" and report.model_label("nf_moons") == "NF moons"
