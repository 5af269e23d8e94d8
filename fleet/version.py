"""fleet's version, in a module of its own so that modules needing it do not import the
package (whose ``__init__`` re-exports the Python API, docs/python-api.md)."""

__version__ = "0.1.0"
