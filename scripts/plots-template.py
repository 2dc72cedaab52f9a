"""Write an HTML template for `dvc plots show --html-template` with Vega inlined.

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so on a machine without internet
its plots stay blank. vl-convert (the Vega project's own converter, a wheel with no other
dependencies: the dev extra) bundles the three libraries into one script; this puts that script
into the page, so `dvc plots show` writes a page that renders anywhere, offline included.

    python scripts/plots-template.py TEMPLATE.html
    dvc plots show --html-template TEMPLATE.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

# DVC's templates are Vega-Lite 5 specs ("$schema": .../vega-lite/v5.json).
VEGA_LITE = "5.21"
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <script type="text/javascript">
{bundle}
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def template() -> str:
    """The page: DVC's default layout, its CDN scripts replaced by the inlined bundle."""
    import vl_convert

    # The default snippet sets window.vegaEmbed, which DVC's plot divs call.
    bundle = vl_convert.javascript_bundle(None, VEGA_LITE)
    if "</script" in bundle.lower():  # would end the inline <script> early
        raise SystemExit("plots-template.py: the Vega bundle contains '</script'; cannot inline it")
    return PAGE.format(bundle=bundle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the template file to write")
    out = parser.parse_args().out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(template(), encoding="utf8")


if __name__ == "__main__":
    main()
