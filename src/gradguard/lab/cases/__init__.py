"""The built-in cases, one module per group of sources; importing this registers them all, in report order."""

from . import seeds  # noqa: F401  (the seed documents' own case studies first)
from . import init  # noqa: F401
from . import normalization  # noqa: F401
from . import recurrent  # noqa: F401
