"""The `jaxode` command: run an experiment from a YAML config, or list them.

    jaxode run NAME | path/to/config.yaml [--set key.sub=value ...] [--out DIR]
    jaxode list

`NAME` is one of the configs that `jaxode list` prints (`odenet_digits_quick`); any other
argument is read as a file path. This module only parses arguments and dispatches to
the experiment runner (the library itself never imports it). The runner and the
shipped configs are found in one of two places:

- an installed wheel: the packages `jaxode.experiments` and `jaxode/configs/`
  (the wheel maps the repository's top-level `experiments/` and `configs/` there);
- a clone or an editable install: `experiments/` and `configs/` next to the `jaxode/`
  directory.

A bad config is refused before any work with one line naming the file and the key,
exit status 2; an interrupted run exits with 130 after saving its checkpoint.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import importlib
import os
import sys
from types import ModuleType

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_PACKAGE_DIR)
_CONFIG_SUFFIXES = (".yaml", ".yml")


def experiments_package() -> str:
    """The import name of the experiment runner: `jaxode.experiments` when installed
    from a wheel, `experiments` in a clone (its root is put on `sys.path` if needed).

    Raises:
        SystemExit: neither is there (a wheel built without the runner).
    """
    if os.path.isfile(os.path.join(_PACKAGE_DIR, "experiments", "__init__.py")):
        return "jaxode.experiments"
    if os.path.isfile(os.path.join(_REPO_ROOT, "experiments", "__init__.py")):
        if _REPO_ROOT not in sys.path:
            sys.path.insert(0, _REPO_ROOT)
        return "experiments"
    raise SystemExit(
        "jaxode: the experiment runner is missing: expected jaxode/experiments/ (an "
        f"installed wheel) or experiments/ next to {_PACKAGE_DIR} (a clone)"
    )


def _import_experiments() -> ModuleType:
    """The runner's `registry` module (see `experiments_package`)."""
    package = experiments_package()
    try:
        return importlib.import_module(f"{package}.registry")
    except ModuleNotFoundError as error:
        missing = error.name.split(".")[0] if error.name else ""
        if missing in ("yaml", "matplotlib", "rich", "sklearn", "optax"):
            raise SystemExit(
                f"jaxode: the experiments need {missing!r}, which is not installed; "
                "install the extra: pip install 'jaxode[experiments]'"
            ) from None
        raise


def configs_dir() -> str:
    """The directory of the shipped configs: `jaxode/configs/` when installed from a
    wheel, `configs/` at the repository root in a clone."""
    installed = os.path.join(_PACKAGE_DIR, "configs")
    if os.path.isdir(installed):
        return installed
    return os.path.join(_REPO_ROOT, "configs")


def config_names() -> list[str]:
    """The names `jaxode run NAME` accepts: the stems of the shipped configs."""
    paths = glob.glob(os.path.join(configs_dir(), "*.yaml"))
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in paths)


def resolve_config(arg: str) -> str:
    """The config file that `jaxode run ARG` reads.

    An existing file wins; otherwise a bare name (no directory part; `.yaml` optional)
    names a shipped config. Anything else is returned unchanged, for the loader to
    refuse as a file that does not exist.

    Examples:
        >>> os.path.basename(resolve_config("odenet_digits_quick"))
        'odenet_digits_quick.yaml'
    """
    if os.path.exists(arg) or os.path.dirname(arg):
        return arg
    stem, suffix = os.path.splitext(arg)
    if suffix not in _CONFIG_SUFFIXES:
        stem = arg
    for ext in _CONFIG_SUFFIXES:
        path = os.path.join(configs_dir(), stem + ext)
        if os.path.isfile(path):
            return path
    return arg


def _not_found_hint(arg: str) -> str:
    close = difflib.get_close_matches(os.path.splitext(arg)[0], config_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"config file not found, and not the name of a shipped config "
            f"(`jaxode list` prints them){hint}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxode", description="Neural ODE experiments (Chen et al. 2018) in JAX."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    run = commands.add_parser(
        "run", help="train and evaluate the experiment a YAML config describes",
        description="Train and evaluate one experiment; outputs go to runs/<name>/ (or --out). "
        "Running the same command again resumes from the checkpoint.",
    )
    run.add_argument(
        "config", help="a config name that `jaxode list` prints (odenet_digits_quick) or a "
        "YAML file (path/to/my.yaml)",
    )
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value (dotted key, value parsed as YAML); repeatable",
    )
    run.add_argument("--out", default=None, metavar="DIR", help="output directory")
    run.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    commands.add_parser("list", help="list the experiment kinds and the shipped configs")
    return parser


def _list(registry) -> int:
    print("experiment kinds:")
    for kind, (_, _, description) in registry.KINDS.items():
        print(f"  {kind:22s} {description}")
    import yaml

    directory = configs_dir()
    paths = sorted(glob.glob(os.path.join(directory, "*.yaml")))
    print(f"\nconfigs (run one by name: jaxode run NAME; files in {directory}):")
    if not paths:
        print("  (none)")
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
            kind, description = data.get("kind", "?"), data.get("description", "")
        except (OSError, yaml.YAMLError, AttributeError):
            kind, description = "?", "(unreadable)"
        name = os.path.splitext(os.path.basename(path))[0]
        print(f"  {name:28s} {kind:22s} {description}")
    return 0


def _compilation_cache() -> None:
    """JAX's persistent compilation cache, so that a rerun (a resume) skips recompiling
    what it can: $JAXODE_JAX_CACHE, default ~/.cache/jaxode/jax ("off" disables it; an
    explicit JAX_COMPILATION_CACHE_DIR wins). Programs with host callbacks (the
    solvers' run-time checks) are not cached by JAX; the many small ones are."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    directory = os.environ.get("JAXODE_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxode", "jax")
    if directory.lower() == "off":
        return
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default `sys.argv[1:]`); returns the exit status:
    0, 2 for a bad config, 130 for an interrupted run."""
    args = _parser().parse_args(argv)
    registry = _import_experiments()
    package = registry.__name__.rpartition(".")[0]
    ConfigError = importlib.import_module(f"{package}.config").ConfigError

    if args.command == "list":
        return _list(registry)
    path = resolve_config(args.config)
    try:
        if not os.path.exists(path) and not os.path.dirname(path):
            raise ConfigError(path, None, _not_found_hint(path))
        cls, cfg = registry.load_config(path, args.overrides)
        _compilation_cache()
        run = importlib.import_module(f"{package}.runner").run

        result = run(cls, cfg, config_file=path, out_dir=args.out,
                     progress=not args.no_progress, overrides=args.overrides)
    except ConfigError as error:
        print(f"jaxode: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("jaxode: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if result.status == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
