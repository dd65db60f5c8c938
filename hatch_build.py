"""Wheel build hook: the runner and the shipped configs go inside the `jaxode` package.

The repository keeps `experiments/` and `configs/` at the top level; a regular wheel
installs them as `jaxode/experiments/` and `jaxode/configs/` (never as a top-level
`experiments` package). An editable install maps nothing: it puts the repository root
on `sys.path`, where `jaxode.cli` finds both directories.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MAPPED = {"experiments": "jaxode/experiments", "configs": "jaxode/configs"}


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"].update(MAPPED)
