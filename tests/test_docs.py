"""The README stays a short landing page whose commands CI can find, and the docs site (mkdocs.yml, docs/) is whole.

The site itself is built by the README's test command (`mkdocs build --strict`); these checks need no mkdocs.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS = ROOT / "mkdocs.yml"

MAIN_COMMAND = "pip install torch==2.13.0 && pip install -e . && metafunc train"
TEST_COMMAND = ('pip install torch==2.13.0 && pip install -e ".[test,text,docs]" && '
                "mkdocs build --strict --site-dir /tmp/metafunc-site && python -m pytest -q tests benchmarks --benchmark-disable")

# [text](target) and ![alt](target), with an optional "title"; code spans and fenced blocks are removed first.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md"))


def _strip_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _relative_links(text: str) -> list[str]:
    links = []
    for target in _LINK.findall(_strip_code(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s):, mailto:, ... and anchors within the page
        links.append(target.split("#", 1)[0])
    return links


def _nav_pages() -> list[str]:
    nav, inside = [], False
    for line in MKDOCS.read_text().splitlines():
        if re.match(r"^nav:\s*$", line):
            inside = True
        elif inside and re.match(r"^\S", line):
            break
        elif inside:
            nav += re.findall(r"([\w./-]+\.md)\s*$", line)
    return nav


def test_readme_is_a_short_landing_page():
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move detail to docs/"
    assert lines[0] == "# metafunc"


def test_readme_opens_with_the_two_commands_after_their_markers():
    lines = README.read_text().splitlines()
    fences = [i for i, line in enumerate(lines) if line == "```bash"]
    assert len(fences) >= 2
    first, second = fences[:2]
    assert lines[first - 1] == "<!-- main-command -->"
    assert lines[first + 1] == MAIN_COMMAND and lines[first + 2] == "```"
    assert lines[second - 1] == "<!-- test-command -->"
    assert lines[second + 1] == TEST_COMMAND and lines[second + 2] == "```"
    # .ci/run takes the line two lines after the marker; nothing else may come first.
    assert sum(line == "<!-- test-command -->" for line in lines) == 1
    assert sum(line == "<!-- main-command -->" for line in lines) == 1
    assert lines.index("<!-- main-command -->") < lines.index("<!-- test-command -->") < 30
    assert "METAFUNC_DATA" in "\n".join(lines[:second])


def test_readme_python_example_is_still_found():
    # The same search as tests/test_readme.py, which runs the block.
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert block.strip()
    assert "range(300)" in block and "mf.maml(" in block and "query MSE after 10 inner steps" in block
    assert len(block.strip().splitlines()) == 20


def test_every_relative_link_points_at_an_existing_file():
    broken = []
    for source in [README, *_pages()]:
        for target in _relative_links(source.read_text()):
            if target and not (source.parent / target).resolve().is_file():
                broken.append(f"{source.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_link_check_sees_links():
    assert "docs/api.md" in _relative_links(README.read_text())
    assert _relative_links("see [a](b.md#c), ![i](d.png), `[x](y.md)`, [w](https://e.org) and [s](#t)") == [
        "b.md", "d.png"]


def test_every_docs_page_is_in_the_nav():
    nav = _nav_pages()
    assert "index.md" in nav and "api.md" in nav
    pages = [str(p.relative_to(DOCS)) for p in _pages()]
    assert sorted(nav) == sorted(pages), f"nav {sorted(nav)} != pages {sorted(pages)}"


def test_readme_sections_link_to_their_docs_pages():
    text = README.read_text()
    for page in ["gradients", "cli", "data", "metric-learners", "gradient-paths", "performance", "distributed", "api"]:
        assert f"](docs/{page}.md)" in text, page


def test_api_reference_uses_only_top_level_public_names():
    """Only `::: metafunc.NAME` for names in metafunc.__all__ (read from the source, not imported)."""
    tree = ast.parse((ROOT / "metafunc" / "__init__.py").read_text())
    exported = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets))
    referenced = []
    for page in _pages():
        referenced += re.findall(r"^:::\s*(\S+)", page.read_text(), re.M)
    assert referenced, "docs/api.md renders no API"
    for path in referenced:
        prefix, _, name = path.partition(".")
        assert prefix == "metafunc" and "." not in name, f"{path}: reference the top-level name, not a submodule"
        assert name in exported, f"{path} is not in metafunc.__all__"
    for name in ["maml", "meta_batch", "meta_value_and_grad", "functionalize", "MetaLearner", "Task",
                 "checkpointed_maml", "imaml", "protonet", "reptile"]:
        assert f"metafunc.{name}" in referenced, name
