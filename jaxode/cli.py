"""The `jaxode` command: run an experiment from a YAML config, or list them.

    jaxode run configs/NAME.yaml [--set key.sub=value ...] [--out DIR]
    jaxode list

This module only parses arguments and dispatches to the experiment runner in the
`experiments` package next to `jaxode` (the library itself never imports it). A bad
config is refused before any work with one line naming the file and the key, exit
status 2; an interrupted run exits with 130 after saving its checkpoint.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def _import_experiments():
    """The `experiments` package: importable from the working directory or an
    editable install, else from the directory above this package."""
    try:
        import experiments.registry as registry
    except ModuleNotFoundError as error:
        if error.name not in ("experiments", "experiments.registry"):
            raise
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isdir(os.path.join(root, "experiments")):
            raise SystemExit(
                "jaxode: the experiments package is not importable; run from the "
                "repository root (it holds experiments/ and configs/)"
            ) from None
        sys.path.insert(0, root)
        import experiments.registry as registry
    return registry


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
    run.add_argument("config", help="a YAML file, e.g. configs/odenet_digits_quick.yaml")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value (dotted key, value parsed as YAML); repeatable",
    )
    run.add_argument("--out", default=None, metavar="DIR", help="output directory")
    run.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    commands.add_parser("list", help="list the experiment kinds and the configs in configs/")
    return parser


def _configs_dir() -> str:
    if os.path.isdir("configs"):
        return "configs"
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _list(registry) -> int:
    print("experiment kinds:")
    for kind, (_, _, description) in registry.KINDS.items():
        print(f"  {kind:22s} {description}")
    directory = _configs_dir()
    paths = sorted(glob.glob(os.path.join(directory, "*.yaml")))
    print(f"\nconfigs ({directory}):")
    if not paths:
        print("  (none)")
    import yaml

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
    args = _parser().parse_args(argv)
    registry = _import_experiments()
    from experiments.config import ConfigError

    if args.command == "list":
        return _list(registry)
    try:
        cls, cfg = registry.load_config(args.config, args.overrides)
        _compilation_cache()
        from experiments.runner import run

        result = run(cls, cfg, config_file=args.config, out_dir=args.out,
                     progress=not args.no_progress)
    except ConfigError as error:
        print(f"jaxode: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("jaxode: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if result.status == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
