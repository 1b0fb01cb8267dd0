"""The package version, in one place for the producer metadata and the packaging."""

__version__ = "0.1.0"
