"""Sphinx hooks of the book (listed in _config.yml under sphinx.local_extensions).

Three small jobs that configuration alone cannot do:

1. **MathJax from the book, one script.** The Makefile installs the ``mathjax`` npm package
   (pinned) into the git-ignored folder named by ``rwkv_mathjax_dir``. After the build, only
   the combined bundle ``tex-chtml.js`` and the web fonts it asks for
   (``output/chtml/fonts/woff-v2/``, which MathJax finds relative to the bundle's own URL) are
   copied into the site's ``_static/mathjax/``: about 1.6 MB instead of the package's 24 MB,
   and no other MathJax file for a page to load. Every macro the chapters use is in the bundle
   (base and AMS); a macro that MathJax would fetch an extension for shows up as a failed
   request in ``make book-check``.
2. **Readable figures.** ``MATPLOTLIBRC`` is pointed at ``book/matplotlibrc`` before any
   notebook runs, so every chapter's kernel (which inherits the environment) draws at the
   book's dpi and font size without a line of plotting set-up in the chapters.
3. **Solutions collapsed.** In the instructor chapters an exercise cell (first line
   ``# EXERCISE``) holds the solution; in the solutions notebooks every code cell after the
   set-up cell does. Those cells get the ``hide-input`` tag as they are read, so the page shows
   a "Show code cell source" toggle and the cell's output; the notebooks on disk are unchanged.

And one clean-up: with thebe switched off (_config.yml, launch_buttons.thebe: false) Jupyter
Book still adds sphinx-thebe's scripts, one inline script twice (a SyntaxError in the console,
"THEBE_JS_URL has already been declared"); ``drop_thebe`` removes them from every page.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:    # sphinx is imported only by the build, so that the tests can use this file
    from sphinx.application import Sphinx

HERE = Path(__file__).resolve().parent
BOOK = HERE.parent
MATPLOTLIBRC = BOOK / "matplotlibrc"
# What tex-chtml.js needs, relative to its folder (es5/ of the npm package).
MATHJAX_FILES = ("tex-chtml.js",)
MATHJAX_FONTS = Path("output") / "chtml" / "fonts" / "woff-v2"
HIDE = "hide-input"


def mathjax_source(app: Sphinx) -> Path:
    """The es5/ folder of the npm-installed MathJax, or a ConfigError saying how to get it."""
    source = (Path(app.confdir) / app.config.rwkv_mathjax_dir).resolve()
    if not (source / MATHJAX_FILES[0]).is_file() or not (source / MATHJAX_FONTS).is_dir():
        from sphinx.errors import ConfigError

        raise ConfigError(f"MathJax is missing from {source}: build the book with `make book`, "
                          "which installs it once with npm (no CDN is used)")
    return source


def on_config_inited(app: Sphinx, config) -> None:
    mathjax_source(app)                      # fail before minutes of notebook execution
    os.environ["MATPLOTLIBRC"] = str(MATPLOTLIBRC)


def copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    """Copy the bundle and its fonts into the built site's _static/mathjax/."""
    if exception is not None or app.builder.format != "html":
        return
    source = mathjax_source(app)
    target = Path(app.outdir) / "_static" / "mathjax"
    shutil.rmtree(target, ignore_errors=True)
    (target / MATHJAX_FONTS).parent.mkdir(parents=True)
    for name in MATHJAX_FILES:
        shutil.copy2(source / name, target / name)
    shutil.copytree(source / MATHJAX_FONTS, target / MATHJAX_FONTS)


def cells_to_hide(docname: str, cells: list[dict]) -> list[int]:
    """Indices of the code cells that hold solutions, for a chapter or a solutions notebook.

    Args:
        docname: e.g. "notebooks/03_numerical_stability" or
            "notebooks/solutions/03_numerical_stability_solutions".
        cells: the notebook's cells (nbformat 4 dicts).
    Returns:
        indices into ``cells``.
    """
    code = [i for i, cell in enumerate(cells) if cell["cell_type"] == "code"]
    if docname.startswith("notebooks/solutions/"):
        sources = ["".join(cells[i]["source"]) for i in code]
        # the set-up cell (NOTATION.md) installs the package; it is not a solution
        return [i for i, s in zip(code, sources) if "find_spec(\"rwkv_ref\")" not in s]
    if docname.startswith("notebooks/"):
        return [i for i in code if "".join(cells[i]["source"]).lstrip().startswith("# EXERCISE")]
    return []


def on_source_read(app: Sphinx, docname: str, source: list[str]) -> None:
    """Tag the solution cells of a notebook ``hide-input`` as Sphinx reads it."""
    if not str(app.env.doc2path(docname)).endswith(".ipynb"):
        return
    notebook = json.loads(source[0])
    hide = cells_to_hide(docname, notebook["cells"])
    if not hide:
        return
    for i in hide:
        tags = notebook["cells"][i].setdefault("metadata", {}).setdefault("tags", [])
        if HIDE not in tags:
            tags.append(HIDE)
    source[0] = json.dumps(notebook)


def drop_thebe(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Remove sphinx-thebe's scripts and style from a page when thebe is off."""
    if app.config.html_theme_options.get("launch_buttons", {}).get("thebe"):
        return
    for key in ("script_files", "css_files"):
        if key in context:
            context[key] = [f for f in context[key] if not _is_thebe(f)]


def _is_thebe(asset) -> bool:
    """Whether a Sphinx _JavaScript/_CascadingStyleSheets (or str) asset belongs to thebe."""
    if isinstance(asset, str):
        return "thebe" in asset
    name = os.fspath(asset.filename or "")
    return "thebe" in name or "THEBE_JS_URL" in asset.attributes.get("body", "")


def setup(app: Sphinx) -> dict:
    app.add_config_value("rwkv_mathjax_dir", "_build/mathjax/node_modules/mathjax/es5", "env")
    app.connect("config-inited", on_config_inited)
    app.connect("source-read", on_source_read)
    app.connect("build-finished", copy_mathjax)
    app.connect("html-page-context", drop_thebe)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
