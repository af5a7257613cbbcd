"""reducer: per-night CCD reduction directories driven by doit.

The import package is ``reducer``; the distribution is published as ``nightreducer``.
"""
__version__ = "0.1.0"

__all__ = ["__version__"]
