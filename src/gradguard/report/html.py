"""Self-contained HTML pages: one jinja2 environment, inline matplotlib figures and number filters.

Every page extends ``base.html.j2`` from ``gradguard/report/templates`` and loads nothing from
the network: styles are inline and figures are inline SVG or ``data:`` PNG. This module imports
jinja2 when it is imported and matplotlib only when a figure is drawn; its users import it
lazily, so that ``import gradguard`` stays fast.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import numbers
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

_INSTALL = "pip install 'gradguard[report]'"

try:
    import jinja2
    from markupsafe import Markup
except ImportError as exc:  # a broken or minimal install: say how to fix it
    raise ImportError(f"HTML reports need jinja2 ({exc}); install it with: {_INSTALL}") from exc

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["environment", "figure_png_uri", "figure_svg", "new_figure", "pct", "render", "sci", "write"]

DASH = "\u2014"  # shown for a missing number (None or NaN)


def sci(x: Any, digits: int = 3) -> str:
    """A number in compact notation: 1.2e-05, 0.031, 42.5, 1234; integers exactly; an em dash for None or NaN."""
    if x is None:
        return DASH
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return str(int(x))  # steps and counts: exact, never rounded
    x = float(x)
    if math.isnan(x):
        return DASH
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    # "g" switches to an exponent from 10**digits on; 1234 reads better than 1.23e+03 up to 1e5.
    if 10**digits <= abs(x) < 1e5:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def pct(x: Any, digits: int = 1) -> str:
    """A fraction as a percentage: 0.1234 -> 12.3%; <0.1% for a tiny non-zero value; an em dash for None or NaN."""
    if x is None:
        return DASH
    x = float(x)
    if math.isnan(x):
        return DASH
    value = 100.0 * x
    smallest = 10.0**-digits
    if 0 < abs(value) < smallest:
        # "0.0%" would hide that something is there at all.
        return f"<{smallest:.{digits}f}%" if value > 0 else f">-{smallest:.{digits}f}%"
    return f"{value:.{digits}f}%"


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The shared environment: package templates, autoescaping, strict undefined, the sci and pct filters."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gradguard.report", "templates"),
        # Layer names come from user models and may contain markup: always escape (templates and strings).
        autoescape=jinja2.select_autoescape(["html", "htm", "j2"], default_for_string=True),
        # A misspelt context key must fail the render, not leave a silent blank in the page.
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["sci"] = sci
    env.filters["pct"] = pct
    return env


def _defaults(context: dict[str, Any]) -> dict[str, Any]:
    """The context with the keys base.html.j2 needs filled in where the caller left them out."""
    from .. import __version__

    full: dict[str, Any] = {
        "version": __version__,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "subtitle": None,
        "toc": [],
    }
    full.update(context)
    return full


def render(template: str, **context: Any) -> str:
    """Render a package template; ``version``, ``generated``, ``subtitle`` and ``toc`` default if not given."""
    return environment().get_template(template).render(_defaults(context))


def write(path: str | Path, template: str, **context: Any) -> Path:
    """Render a package template to ``path`` (utf-8, parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(template, **context), encoding="utf-8")
    return path


def _matplotlib() -> Any:
    """The matplotlib module, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(f"figures in HTML reports need matplotlib ({exc}); install it with: {_INSTALL}") from exc
    return matplotlib


def new_figure(width: float = 6.4, height: float = 3.6) -> Figure:
    """A matplotlib Figure (constrained layout) made without pyplot, so no interactive backend is touched."""
    _matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _close(fig: Figure) -> None:
    """Release a figure that pyplot manages; a bare Figure is simply garbage collected."""
    pyplot = sys.modules.get("matplotlib.pyplot")  # never import pyplot just to close: it picks a backend
    if pyplot is not None:
        pyplot.close(fig)


def figure_svg(fig: Figure) -> Markup:
    """The figure as an inline ``<svg>`` element (no XML prolog or doctype), ready to embed; closes the figure."""
    matplotlib = _matplotlib()
    buf = io.BytesIO()
    # Text as paths: the page then needs no font. No metadata: it only holds URLs (creator, RDF types).
    no_metadata = {"Date": None, "Creator": None, "Format": None, "Type": None}
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.image_inline": True}):
        fig.savefig(buf, format="svg", backend="svg", metadata=no_metadata)
    _close(fig)
    text = buf.getvalue().decode("utf-8")
    return Markup(text[text.index("<svg") :].strip())


def figure_png_uri(fig: Figure, dpi: int = 110) -> str:
    """The figure as a ``data:image/png;base64,...`` URI rendered with Agg; closes the figure."""
    _matplotlib()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, backend="agg", metadata={"Software": None})
    _close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
