"""The built-in cases, one module per group of sources; importing this registers them all, in report order."""

from importlib import import_module

# The seed documents' own case studies first, then the papers behind them.
ORDER = ("seeds", "init", "normalization", "recurrent")
for _name in ORDER:
    import_module(f"{__name__}.{_name}")
