"""Atomic checkpoints: model and optimizer leaves by `equinox.tree_serialise_leaves`,
the bookkeeping (step, RNG, pending metrics, ...) in a JSON sidecar.

Every file is written to a temporary file in the same directory, flushed, fsynced,
and moved into place by `os.replace`, so a reader sees either the old file or the new
one, never a torn one. The leaves go to `checkpoint-<step>.eqx`; the sidecar
`checkpoint.json`, written after them, names that file and is the commit point: a
crash between the two leaves the previous checkpoint in force. Older leaf files are
removed once the new sidecar is in place.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile

import equinox as eqx
import jax

from .parallel import to_numpy

SIDECAR = "checkpoint.json"


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb"):
    """Open a temporary file next to `path`; on success fsync it and os.replace it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (a temporary file, then a rename)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def save(directory: str, step: int, tree, meta: dict) -> str:
    """Write the leaves of `tree` and the sidecar {step, file, **meta}; returns the
    leaf file's path."""
    name = f"checkpoint-{step:08d}.eqx"
    path = os.path.join(directory, name)
    host = jax.tree_util.tree_map(
        lambda x: to_numpy(x) if isinstance(x, jax.Array) else x, tree
    )
    with atomic_open(path, "wb") as f:
        eqx.tree_serialise_leaves(f, host)
    write_text(
        os.path.join(directory, SIDECAR),
        json.dumps({"step": int(step), "file": name, **meta}, indent=1, sort_keys=True),
    )
    for old in glob.glob(os.path.join(directory, "checkpoint-*.eqx")):
        if os.path.basename(old) != name:
            with contextlib.suppress(OSError):
                os.remove(old)
    return path


def read_meta(directory: str) -> dict | None:
    """The sidecar of the checkpoint in `directory`, or None when there is none."""
    path = os.path.join(directory, SIDECAR)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load(directory: str, like):
    """(tree, meta): the saved leaves poured into the structure of `like`."""
    meta = read_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"no {SIDECAR} in {directory}")
    path = os.path.join(directory, meta["file"])
    with open(path, "rb") as f:
        tree = eqx.tree_deserialise_leaves(f, like)
    return tree, meta
