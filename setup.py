# Metadata lives in pyproject.toml; this file only names the cffi extension.
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
