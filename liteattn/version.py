"""liteattn's version, in a module of its own so that subpackages can read it without importing the package."""
__version__ = "0.1.0"
