"""byot's version, in a module of its own: every layer may read it without importing the package's API."""

__version__ = "0.6.0"
