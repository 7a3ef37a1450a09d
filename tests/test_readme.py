"""The README's tour runs and prints what its comments say."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_prints_what_it_promises():
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    # Each print(...) line carries the expected output in its trailing comment.
    expected = [m.group(1).strip() for m in re.finditer(r"print\(.*\)\s+#\s*(.*)", code)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    assert out.getvalue().splitlines() == expected and len(expected) == 2


def test_readme_commands_name_files_that_exist():
    text = README.read_text()
    root = README.parent
    for path in re.findall(r"(examples/[\w.-]+)", text):
        assert (root / path).exists(), path
