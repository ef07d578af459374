"""The shared HTML machinery: filters, escaping, inline figures, and a rendered page in a headless browser."""

from __future__ import annotations

import base64
import math
import subprocess
import sys

import jinja2
import pytest

from gradguard.detect.finding import Finding, Fix
from gradguard.report import html

MALICIOUS = "<script>alert(1)</script>"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A minimal child page, as the diagnosis, lab and post-mortem reports will write theirs.
CHILD = """{% extends "base.html.j2" %}
{% import "macros.html.j2" as m %}
{% block content %}
<section id="findings"><h2>Findings</h2>{{ m.findings(findings) }}</section>
<section id="layers"><h2>Layers</h2>{{ m.table(headers, rows, caption="per layer") }}</section>
<section id="figures"><h2>Figures</h2>
{{ m.figure("Gradient norm (svg)", svg, caption="inline svg") }}
{{ m.figure("Gradient norm (png)", png, caption="data uri") }}
</section>
{% endblock %}
"""


def _figure(title: str):
    fig = html.new_figure(4.0, 2.5)
    ax = fig.add_subplot()
    ax.semilogy([1.0, 1e-2, 1e-4, 1e-6], marker="o")
    ax.set_title(title)
    return fig


def _findings() -> list[dict]:
    vanishing = Finding(
        kind="vanishing_gradient", severity="error", message="gradient norm fell 1e6-fold below the output layer",
        layer=MALICIOUS, step=12, evidence={"ratio": 1.2e-6, "counts": {"a": 1, "b": 2}},
        fixes=(Fix(title="Add residual connections", code="model = residualize(model)  # x < y && y > z",
                   name="residualize"),),
    )
    nonfinite = Finding(kind="nonfinite", severity="warning", message="loss & gradients turned NaN", step=40)
    return [vanishing.to_dict(), nonfinite.to_dict()]


def _page(tmp_path):
    context = {
        "title": "Test report",
        "subtitle": "a page for the browser test",
        "toc": [("findings", "Findings"), ("layers", "Layers"), ("figures", "Figures")],
        "findings": _findings(),
        "headers": ["layer", "grad norm", "dead"],
        "rows": [["fc1", 0.031, 3], [MALICIOUS, 1.2e-5, None]],
        "svg": html.figure_svg(_figure(MALICIOUS)),
        "png": html.figure_png_uri(_figure("png"), dpi=60),
    }
    text = html.environment().from_string(CHILD).render(html._defaults(context))
    path = tmp_path / "page.html"
    path.write_text(text, encoding="utf-8")
    return path


# -- fast unit tests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (None, "\u2014"), (math.nan, "\u2014"), (math.inf, "inf"), (-math.inf, "-inf"), (0.0, "0"),
        (1.2e-5, "1.2e-05"), (0.031, "0.031"), (-0.000123456, "-0.000123"), (42.56, "42.6"),
        (1234.5, "1234"), (123456.0, "1.23e+05"), (7, "7"), (123456789, "123456789"),
    ],
)
def test_sci(x, expected):
    assert html.sci(x) == expected


def test_pct():
    assert html.pct(0.1234) == "12.3%"
    assert html.pct(1) == "100.0%"
    assert html.pct(0.0) == "0.0%"
    assert html.pct(1e-6) == "<0.1%"
    assert html.pct(None) == html.pct(math.nan) == "\u2014"


def test_render_escapes_text_and_is_strict(tmp_path):
    env = html.environment()
    assert env.from_string("{{ x }}").render(x=MALICIOUS) == "&lt;script&gt;alert(1)&lt;/script&gt;"
    page = env.from_string(CHILD).render(html._defaults({
        "title": "a & b", "findings": _findings(), "headers": [], "rows": [], "svg": "<svg></svg>", "png": "",
    }))
    assert MALICIOUS not in page  # not in the finding, nor in the svg given as a plain str
    assert "<code class=\"layer\">&lt;script&gt;alert(1)&lt;/script&gt;</code>" in page
    assert "loss &amp; gradients" in page and "<title>a &amp; b</title>" in page
    with pytest.raises(jinja2.UndefinedError):
        html.render("base.html.j2")  # no title

    out = html.write(tmp_path / "new" / "dir" / "base.html", "base.html.j2", title="Empty", version="9.9")
    text = out.read_text(encoding="utf-8")
    assert "<title>Empty</title>" in text and "gradguard 9.9" in text and "<nav" not in text


def test_figure_svg_and_png():
    svg = html.figure_svg(_figure(MALICIOUS))
    assert isinstance(svg, html.Markup) and svg.startswith("<svg")
    assert "<?xml" not in svg and "DOCTYPE" not in svg and "<metadata" not in svg
    assert MALICIOUS not in svg  # matplotlib escapes the text it records in comments
    assert 'href="http' not in svg and "https:" not in svg
    uri = html.figure_png_uri(_figure("png"), dpi=50)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]).startswith(PNG_SIGNATURE)


def test_imports_stay_lazy():
    code = (
        "import sys, gradguard\n"
        "assert 'jinja2' not in sys.modules and 'matplotlib' not in sys.modules\n"
        "from gradguard.report import html\n"
        "assert 'matplotlib' not in sys.modules\n"
        "fig = html.new_figure(); fig.add_subplot().plot([1, 2]); html.figure_svg(fig)\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the page in a headless browser ------------------------------------------------------------


def test_page_in_browser(open_page, tmp_path):
    path = _page(tmp_path)
    dialogs: list[str] = []
    requests: list[str] = []

    def setup(page):
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))  # the fixture dismisses it

        def record(route):
            requests.append(route.request.url)
            route.fallback()  # on to the fixture's route, which aborts external requests

        page.route("**/*", record)

    page, errors = open_page(path, setup=setup)

    assert errors == []
    assert dialogs == []
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
    assert page.locator("script").count() == 0

    text = page.inner_text("body")
    assert MALICIOUS in text  # the layer name is shown as text, in the finding and in the table
    assert page.inner_text("code.layer") == MALICIOUS
    assert "loss & gradients turned NaN" in text
    assert page.locator(".badge-error").count() == 1 and page.locator(".badge-warning").count() == 1
    assert page.inner_text("nav").split() == ["Contents", "Findings", "Layers", "Figures"]
    assert "model = residualize(model)  # x < y && y > z" in page.inner_text("pre code")
    assert page.eval_on_selector("td.num", "td => getComputedStyle(td).textAlign") == "right"
    assert page.inner_text("footer").startswith("Generated by gradguard")

    for selector in ("figure svg", "figure img"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["width"] > 50 and box["height"] > 30, (selector, box)
    assert page.eval_on_selector("figure img", "img => img.complete && img.naturalWidth") > 0
    # Readable at laptop width: nothing sticks out sideways.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

    shot = page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert shot.startswith(PNG_SIGNATURE) and (tmp_path / "page.png").stat().st_size > 1000


def test_open_page_reports_dialogs_and_external_requests(open_page, tmp_path):
    path = tmp_path / "leaky.html"
    path.write_text('<img src="http://example.invalid/x.png"><script>alert("hi")</script>', encoding="utf-8")
    _, errors = open_page(path)
    assert "dialog alert: hi" in errors
    assert "external request: http://example.invalid/x.png" in errors
