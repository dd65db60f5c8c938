"""The examples in the docstrings of jaxode.api, jaxode.nn and jaxode.cli run (doctest).

The examples that compile an ODE solve take seconds each: those run with `-m slow`.
"""

from __future__ import annotations

import doctest

import pytest

import jaxode.api
import jaxode.cli
import jaxode.nn._util
import jaxode.nn.flows
import jaxode.nn.latent
import jaxode.nn.odenet

MODULES = (jaxode.api, jaxode.nn.odenet, jaxode.nn.latent, jaxode.nn.flows, jaxode.nn._util,
           jaxode.cli)
# Examples that compile a solve (2-8 s each here).
SLOW = {"ODENet", "ODEBlock", "RKNet", "ResNet", "LatentODE", "ODERNNEncoder", "CNF",
        "FFJORD"}


def _examples():
    finder = doctest.DocTestFinder()
    for module in MODULES:
        for test in finder.find(module):
            if test.examples:
                name = test.name.rsplit(".", 1)[-1]
                marks = [pytest.mark.slow] if name in SLOW else []
                yield pytest.param(test, id=test.name, marks=marks)


@pytest.mark.parametrize("test", list(_examples()))
def test_docstring_example(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=lambda text: print(text, end=""))
    assert result.failed == 0, f"{test.name}: {result.failed} example(s) failed (output above)"


def test_every_public_model_has_an_example():
    missing = []
    for name in jaxode.nn.__all__:
        obj = getattr(jaxode.nn, name)
        if isinstance(obj, type) and name not in ("ResBlock", "PlanarField", "ConcatMLPField"):
            if ">>>" not in (obj.__doc__ or ""):
                missing.append(name)
        elif not isinstance(obj, type) and ">>>" not in (obj.__doc__ or ""):
            missing.append(name)
    assert not missing, f"public names of jaxode.nn without an example: {missing}"
