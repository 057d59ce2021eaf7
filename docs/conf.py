"""Sphinx configuration: `sphinx-build -W -b html docs docs/_build/html` (tests/test_docs.py runs it)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "daskrecon"
author = "the daskrecon developers"
copyright = "2026, the daskrecon developers"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py", "auto_examples/*.zip",
                    "auto_examples/*.json", "auto_examples/*.md5"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autosummary_generate = False
html_theme = "alabaster"
html_static_path = ["_static"]
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing", "config.cache"]
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": "^$",  # render, do not execute: tests/test_examples.py runs every example
    "plot_gallery": "False",
    "download_all_examples": False,
}
