"""Shared test setup: the whole suite runs with float64 enabled.

Tests that need float32 create float32 arrays explicitly. A hang is a failure: every
test runs under a watchdog that dumps the stacks and ends the run if one test takes
longer than HANG_SECONDS (a stuck `lax.while_loop` never returns to Python, so a
signal-based timeout would not fire; faulthandler's watchdog thread does).
"""

import faulthandler
import os
import pathlib
import sys

# One thread a process: two pytest-xdist workers share two cores (`make test`). A user's
# own XLA_FLAGS win.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

# Import the working tree's jaxode even where the package is not installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

HANG_SECONDS = 300


@pytest.fixture(autouse=True, scope="module")
def _clear_compiled_programs():
    """Each compiled XLA program holds memory maps; a process that keeps hundreds of them
    can pass Linux's limit (65,530) and crash inside XLA. Each module starts afresh."""
    yield
    jax.clear_caches()


@pytest.fixture(autouse=True)
def _hang_guard():
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()
