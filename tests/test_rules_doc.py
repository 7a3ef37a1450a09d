"""docs/rules.md is where the rules' sources live, and citations of it hold.

* No file of the project cites the research notes the rules were first
  collected in (they are outside the repository, so a maintainer who clones
  the project cannot follow such a citation): code and docs cite the SDM, the
  kernel version, or ``docs/rules.md §N``.
* Every section of docs/rules.md has a number and a stable anchor
  ``(rules-N-M)=``; every ``docs/rules.md §N`` cited in code, tests and docs,
  and every ``rules.md#rules-N-M`` link, names a section that exists (and a
  cited note or item of it exists too).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "docs" / "rules.md"

# Where the project's text lives (the build tree, virtual environments and
# egg-info are not the project's).
SCAN_DIRS = ("pks_emu", "tests", "docs", "examples", "benchmarks", ".ci")
SCAN_TOP = ("README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "asv.conf.json")
SKIP_DIRS = {"_build", "__pycache__", ".hypothesis", ".pytest_cache"}
BINARY_SUFFIXES = {".so", ".pyd", ".o", ".xz", ".gz", ".zst", ".lz4", ".bin", ".trace", ".png",
                   ".jpg", ".svg", ".npy", ".npz", ".pkl", ".whl"}

# Spelled in pieces so that this file does not match itself.
_SPEC = "spec"
FORBIDDEN = [
    re.compile(r"pks-" + _SPEC, re.I),          # the file's name
    re.compile(_SPEC + r"\.md", re.I),
    re.compile(r"\b" + _SPEC + r"\s+§"),        # the word, then a section sign
    re.compile(r"\(" + _SPEC + r" "),           # the word after a parenthesis
    re.compile(r"\.\./" + "shared"),            # a path outside the repository
]


def project_files() -> list[Path]:
    files = [ROOT / name for name in SCAN_TOP if (ROOT / name).is_file()]
    for d in SCAN_DIRS:
        base = ROOT / d
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if not p.is_file() or p.suffix in BINARY_SUFFIXES:
                continue
            if SKIP_DIRS.intersection(p.relative_to(ROOT).parts):
                continue
            files.append(p)
    return files


def read_text(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


TEXTS = {p.relative_to(ROOT).as_posix(): t for p in project_files()
         if (t := read_text(p)) is not None}


# --- the sections of docs/rules.md ---------------------------------------------------

HEADING = re.compile(r"^(#{2,3}) (\d+(?:\.\d+)*)\.? \S", re.M)
TARGET = re.compile(r"^\(rules-([0-9-]+)\)=\s*$", re.M)


def rules_sections() -> dict[str, int]:
    """Section number -> offset of its heading in docs/rules.md."""
    text = RULES.read_text(encoding="utf-8")
    return {m.group(2): m.start() for m in HEADING.finditer(text)}


def section_body(number: str) -> str:
    text = RULES.read_text(encoding="utf-8")
    sections = rules_sections()
    start = sections[number]
    later = [o for o in sections.values() if o > start]
    return text[start:min(later) if later else len(text)]


def test_rules_page_exists_and_is_in_the_toctree():
    assert RULES.is_file()
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    toctrees = re.findall(r"```\{toctree\}(.*?)```", index, flags=re.S)
    assert any(re.search(r"^rules$", t, flags=re.M) for t in toctrees), \
        "docs/rules.md is not in a toctree of docs/index.md"


def test_every_section_has_a_number_and_a_stable_anchor():
    text = RULES.read_text(encoding="utf-8")
    lines = text.splitlines()
    numbers = []
    for i, line in enumerate(lines):
        m = re.match(r"^(#{2,3}) (.*)$", line)
        if not m:
            continue
        h = HEADING.match(line)
        assert h, f"docs/rules.md line {i + 1}: section without a number: {line!r}"
        number = h.group(2)
        numbers.append(number)
        want = f"(rules-{number.replace('.', '-')})="
        assert i > 0 and lines[i - 1].strip() == want, \
            f"docs/rules.md line {i + 1}: section {number} is not preceded by its anchor {want}"
        depth = len(h.group(1)) - 1               # "##" -> 1, "###" -> 2
        assert number.count(".") + 1 == depth, f"section {number} at heading level {depth}"
    assert len(numbers) == len(set(numbers)), "a section number is used twice"
    assert {t.replace("-", ".") for t in TARGET.findall(text)} == set(numbers), \
        "an anchor (rules-...)= without its numbered section"
    # The two parts the code relies on.
    assert {"1", "2", "3"} <= set(numbers)


# --- no citation of the outside notes --------------------------------------------------

def test_nothing_cites_the_outside_notes():
    assert len(TEXTS) > 50, "the scan found too few files: is ROOT right?"
    hits = []
    for name, text in TEXTS.items():
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in FORBIDDEN):
                hits.append(f"{name}:{lineno}: {line.strip()}")
    assert not hits, ("cite the SDM, the kernel version or docs/rules.md §N instead:\n"
                      + "\n".join(hits))


# --- citations of docs/rules.md resolve ------------------------------------------------

_SEC = r"§\d+(?:\.\d+)*"
_QUAL = r"(?:,? (?:notes?|items?) \d+(?:-\d+)?)?"
CITATION = re.compile(r"rules\.md(\s*(?:" + _SEC + _QUAL + r"(?:,\s*|\s+and\s+)?)+)")
LINK = re.compile(r"rules\.md#(rules-[0-9-]+)")


def citations() -> list[tuple[str, str, str | None, str | None]]:
    """(where, section, 'note'/'item' or None, its number(s) or None) for every citation."""
    out = []
    for name, text in TEXTS.items():
        if name == "tests/test_rules_doc.py":
            continue
        for m in CITATION.finditer(text):
            where = f"{name}:{text.count(chr(10), 0, m.start()) + 1}"
            for c in re.finditer(r"§(\d+(?:\.\d+)*)(?:,? (note|item)s? (\d+(?:-\d+)?))?",
                                 m.group(1)):
                out.append((where, c.group(1), c.group(2), c.group(3)))
    return out


CITATIONS = citations()


def test_code_cites_the_rules_page():
    # The replacements of the old citations are in place: a good number of
    # files cite sections of docs/rules.md.
    files = {where.split(":")[0] for where, *_ in CITATIONS}
    assert len(files) >= 15, files
    assert any(f.startswith("pks_emu/") for f in files)
    assert any(f.startswith("tests/") for f in files)


@pytest.mark.parametrize("where,section,qual,num", CITATIONS,
                         ids=[f"{w}-s{s}" for w, s, _, _ in CITATIONS])
def test_cited_section_exists(where, section, qual, num):
    sections = rules_sections()
    assert section in sections, f"{where} cites docs/rules.md §{section}, which does not exist"
    if qual is None:
        return
    body = section_body(section)
    first, _, last = num.partition("-")
    for n in range(int(first), int(last or first) + 1):
        if qual == "note":
            ok = re.search(rf"^{n}\. ", body, flags=re.M)
        else:
            ok = re.search(rf"^\| {n} \|", body, flags=re.M)
        assert ok, f"{where} cites docs/rules.md §{section}, {qual} {n}, which does not exist"


def test_links_to_rules_anchors_resolve():
    targets = set(TARGET.findall(RULES.read_text(encoding="utf-8")))
    bad = []
    for name, text in TEXTS.items():
        if name == "tests/test_rules_doc.py":
            continue
        for m in LINK.finditer(text):
            if m.group(1)[len("rules-"):] not in targets:
                bad.append(f"{name}: rules.md#{m.group(1)}")
        if name == "docs/rules.md":
            for m in re.finditer(r"\]\(#(rules-[0-9-]+)\)", text):
                if m.group(1)[len("rules-"):] not in targets:
                    bad.append(f"{name}: #{m.group(1)}")
    assert not bad, "links to anchors that docs/rules.md does not define:\n" + "\n".join(bad)
