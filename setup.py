# All metadata lives in pyproject.toml; this file only lets old tools run `python setup.py develop`.
from setuptools import setup

setup()
