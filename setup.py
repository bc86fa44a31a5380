"""Builds the native parts: the cffi helper module (stages._native)."""

from setuptools import setup

setup(cffi_modules=["native/build_helpers.py:ffibuilder"])
