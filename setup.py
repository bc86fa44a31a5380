"""Builds the native parts: the cffi helper module (stages._native) and the
freestanding restorer object (stages/apply/restorer.o)."""

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
RESTORER = os.path.join("stages", "apply", "restorer.o")


def _restorer_builder():
    spec = importlib.util.spec_from_file_location("restorer_build", os.path.join(ROOT, "native", "restorer", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildExtWithRestorer(build_ext):
    """build_ext that also compiles the restorer blob next to stages/apply."""

    def run(self):
        super().run()
        builder = _restorer_builder()
        # the source tree (editable installs import from it) and the build dir (wheels)
        builder.build(os.path.join(ROOT, RESTORER))
        if self.build_lib and not getattr(self, "editable_mode", False):
            builder.build(os.path.join(self.build_lib, RESTORER))


setup(
    cffi_modules=["native/build_helpers.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtWithRestorer},
    package_data={"stages.apply": ["restorer.o"]},
)
