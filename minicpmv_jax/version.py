"""The package's version: one place, read by setuptools (pyproject.toml), the CLI and checkpoint manifests."""

__version__ = "0.1.0"
