"""Sphinx configuration of the pks_emu documentation (built from docs/).

Build: ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors).
The API reference (api.md) is autodoc over the *installed* package, the
compiled core included: its signatures come from Cython's ``embedsignature``.
"""
from __future__ import annotations

import pks_emu

project = "pks_emu"
author = "the pks_emu developers"
copyright = "the pks_emu developers"
release = pks_emu.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown: headings get anchors so that pages can link to sections
# (``semantics.md#tlb-flushes``), as they do on GitHub.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"

html_theme = "alabaster"
html_title = f"pks_emu {release}"
html_static_path: list[str] = []
