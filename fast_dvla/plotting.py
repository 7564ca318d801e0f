"""matplotlib, headless: the library's and its commands' plots go through :func:`headless_pyplot`."""
from __future__ import annotations


def headless_pyplot():
    """matplotlib's pyplot on the headless backend, or None when matplotlib is absent (plots are
    optional: the JSON beside them has the numbers)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
