"""Generates the package list: the repository root maps to `threefold`, each top-level folder with
an ``__init__.py`` (and its subfolders) to ``threefold.<folder>[.<sub>]``. Everything else is in
pyproject.toml."""

from setuptools import find_packages, setup

TOP = ["pipelines", "geometry", "medical", "science", "graphs", "datasets"]
subpackages = find_packages(where=".", include=[f"{t}" for t in TOP] + [f"{t}.*" for t in TOP])
setup(packages=["threefold"] + [f"threefold.{p}" for p in subpackages])
