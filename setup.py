"""Packaging entry point; all metadata lives in setup.cfg (configuration as data)."""

from setuptools import setup

setup()
