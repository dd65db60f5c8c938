"""MkDocs hook: the API reference covers every public name, and each has a docstring.

Every name in `jaxode.__all__` and `jaxode.nn.__all__` is rendered from its docstring:
those placed by hand in an `::: jaxode.NAME` block of a page under docs/api/, and any
other (a name added since) at the end of its module's page (api/solving.md for
`jaxode`, api/nn.md for `jaxode.nn`), under "Other public names". A public name
without a docstring (for data such as `jaxode.SOLVERS`: a string right after the
assignment) fails the build (`mkdocs build --strict`), naming it.
"""

from __future__ import annotations

import glob
import logging
import os
import re

import griffe
from mkdocs.exceptions import PluginError

log = logging.getLogger("mkdocs.hooks.api_coverage")

PUBLIC_MODULES = ("jaxode", "jaxode.nn")
PAGE_OF_MODULE = {"jaxode": "api/solving.md", "jaxode.nn": "api/nn.md"}
_unplaced: dict[str, list[str]] = {}  # page -> public names on no page, filled pre-build
# Data whose docstring (a string literal after the assignment) is still to be written in
# the core modules; reported at INFO level until then. Empty this set once they have one.
PENDING_DOCSTRINGS: set[str] = set()


def _documented(docs_dir: str) -> set[str]:
    names = set()
    for path in glob.glob(os.path.join(docs_dir, "api", "*.md")):
        with open(path, encoding="utf-8") as f:
            names |= set(re.findall(r"^:::\s+([\w.]+)", f.read(), flags=re.M))
    return names


def on_pre_build(config, **kwargs):
    root = os.path.dirname(os.path.abspath(config["docs_dir"]))
    package = griffe.load("jaxode", search_paths=[root], resolve_aliases=True,
                          resolve_external=False)
    documented = _documented(config["docs_dir"])
    problems = []
    _unplaced.clear()
    for module_path in PUBLIC_MODULES:
        module = package if module_path == "jaxode" else package[module_path.split(".", 1)[1]]
        exports = [e if isinstance(e, str) else e.name for e in (module.exports or [])]
        if not exports:
            problems.append(f"{module_path} has no __all__")
        for name in exports:
            full = f"{module_path}.{name}"
            if full not in documented:
                log.info("%s is on no API page: appended to %s", full,
                         PAGE_OF_MODULE[module_path])
                _unplaced.setdefault(PAGE_OF_MODULE[module_path], []).append(full)
            try:
                obj = module[name]
                docstring = obj.docstring
            except (KeyError, griffe.AliasResolutionError):
                problems.append(f"{full} cannot be resolved")
                continue
            if docstring is None or not docstring.value.strip():
                if full in PENDING_DOCSTRINGS:
                    log.info("%s has no docstring yet (PENDING_DOCSTRINGS)", full)
                else:
                    problems.append(f"{full} has no docstring")
    if problems:
        raise PluginError("API reference incomplete:\n  " + "\n  ".join(problems))


def on_page_markdown(markdown, page, config, files, **kwargs):
    names = _unplaced.get(page.file.src_uri)
    if not names:
        return markdown
    blocks = "\n\n".join(f"::: {name}" for name in names)
    return f"{markdown}\n\n## Other public names\n\n{blocks}\n"
