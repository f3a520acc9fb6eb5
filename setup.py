"""The build step pyproject.toml cannot say: the wheel also installs tinylm-lm-eval.pth at the top of
site-packages, the import hook that registers tinylm's lm-evaluation-harness backend with lm-eval releases that
do not read the `lm_eval.models` entry point (see _tinylm_lm_eval.py). An editable install leaves it out; there
`import tinylm.evals.harness` registers the backend in-process."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "tinylm-lm-eval.pth"


class BuildPyWithPth(build_py):
    """build_py, plus the .pth file copied to the root of the build (the wheel's site-packages level)."""

    def run(self) -> None:
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
