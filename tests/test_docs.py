"""The README stays a short landing page whose commands CI can find, and the docs site (mkdocs.yml, docs/) is whole.

The site itself is built by the README's test command (`mkdocs build --strict`); these checks need no mkdocs.
"""

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS = ROOT / "mkdocs.yml"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
CONTRIBUTING = ROOT / "CONTRIBUTING.md"

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


# ---- every measured number of the README's tables is recorded in benchmarks/RESULTS.md ----------------------------

# Columns that name a row's setting (its k, K, number of tasks, model, method...), not a measurement: their numbers
# ("28x28, width 4", "2nd order, 1 step") are not checked.
SETTING_COLUMNS = {"k", "tasks", "method", "model", "case", "learner"}
# A number starts a word: the digits inside an md5 sum or a name (`eb9058c3`, `small1.zip`) are not numbers.
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[-+]?\d+)?")
# A table of measurements has at least one decimal or exponent outside its setting columns (`91.5 +- 0.6`, `6e-15`);
# the algorithms and data-set tables (years, class counts, md5 sums) have none.
_MEASUREMENT = re.compile(r"(?<![\w.])\d+(?:\.\d|e[-+]?\d)")


def _tables(text: str) -> list[tuple[list[str], list[str]]]:
    """Each markdown table outside fenced code: (header cells, body lines)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            if len(block) > 2 and re.fullmatch(r"[|\s:-]+", block[1]):
                tables.append((_cells(block[0]), block[2:]))
            block = []
    return tables


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _measured_cells(header: list[str], line: str) -> list[str]:
    keep = [name.strip("`* ").lower() not in SETTING_COLUMNS for name in header]
    return [cell for cell, kept in zip(_cells(line), keep) if kept]


def _readme_measured_rows(text: str) -> list[tuple[str, list[str]]]:
    """(row, its measured numbers) for every row of every measured table of the README."""
    rows = []
    for header, body in _tables(text):
        if any(_MEASUREMENT.search(cell) for line in body for cell in _measured_cells(header, line)):
            rows += [(line, [n for cell in _measured_cells(header, line) for n in _NUMBER.findall(cell)])
                     for line in body]
    return rows


def _rows_missing_from_results(readme: str, results: str) -> list[str]:
    """README table rows whose measured numbers are not all in one table row of RESULTS.md."""
    recorded = [Counter(_NUMBER.findall(line)) for _, body in _tables(results) for line in body]
    return [row for row, numbers in _readme_measured_rows(readme)
            if not any(Counter(numbers) <= have for have in recorded)]


def test_readme_tables_are_found_and_every_row_has_measurements():
    rows = _readme_measured_rows(README.read_text())
    tables = {_cells(body_line)[0] for body_line, _ in rows}
    # the sinusoid table (K), the gradient errors, Omniglot, CLINC150, checkpointed memory (k), the peers
    for first_cell in ["10", "plain MLP", "MAML", "ProtoNet on the frozen MiniLM embeddings", "200",
                       "first-order MAML, 1 step"]:
        assert first_cell in tables, f"{first_cell!r} row not parsed from the README's tables"
    assert len(rows) >= 30  # 4 + 3 + 11 + 4 + 4 + 6 rows when this was written (the peers: 16 and 32 tasks)
    for row, numbers in rows:
        assert numbers, f"a README table row with no measured number: {row}"


def test_every_readme_table_number_is_recorded_in_results():
    """RESULTS.md is the one place for each number: a row of a measured README table must have all its measured
    numbers in one table row of benchmarks/RESULTS.md (where the device and the command are)."""
    missing = _rows_missing_from_results(README.read_text(), RESULTS.read_text())
    assert not missing, "README rows whose numbers are not in one row of benchmarks/RESULTS.md:\n" + "\n".join(missing)


def _bump_first_measured_number(header: list[str], line: str) -> str:
    cells = _cells(line)
    keep = [name.strip("`* ").lower() not in SETTING_COLUMNS for name in header]
    i = next(i for i, cell in enumerate(cells) if keep[i] and _NUMBER.search(cell))
    m = _NUMBER.search(cells[i])
    digit = str((int(m.group()[0]) + 1) % 10)
    cells[i] = cells[i][:m.start()] + digit + cells[i][m.start() + 1:]
    return "| " + " | ".join(cells) + " |"


def test_a_changed_readme_number_is_caught():
    readme, results = README.read_text(), RESULTS.read_text()
    measured = [(header, body) for header, body in _tables(readme)
                if any(_MEASUREMENT.search(c) for line in body for c in _measured_cells(header, line))]
    assert len(measured) >= 6
    for header, body in measured:
        for line in body:
            changed = _bump_first_measured_number(header, line)
            assert changed != line
            missing = _rows_missing_from_results(readme.replace(line, changed, 1), results)
            assert missing == [changed], f"changing {line!r} to {changed!r} went unnoticed"
    # a setting is not a measurement: changing the Conv-4's width in the gradient table's label is not checked
    assert _rows_missing_from_results(readme.replace("(28x28, width 4) |", "(28x28, width 5) |"), results) == []


def test_the_number_parser():
    header = ["k", "unrolled (exact) peak", "ratio", "cos"]
    assert _measured_cells(header, "| 100 | 605.6 MiB | **14.4x** | 1.0000000 |") == ["605.6 MiB", "**14.4x**",
                                                                                     "1.0000000"]
    assert _NUMBER.findall("91.5 +- 0.6 | 6e-15 | 90.05% +- 0.72% | 57 s / 143 s") == [
        "91.5", "0.6", "6e-15", "90.05", "0.72", "57", "143"]
    assert _tables("| a | b |\n|---|---|\n| 1 | 2.5 |\n\n```\n| x | y |\n|---|---|\n| 3 | 4 |\n```\n") == [
        (["a", "b"], ["| 1 | 2.5 |"])]


# ---- one test command: the README's ---------------------------------------------------------------------------------

def _readme_test_command() -> str:
    lines = README.read_text().splitlines()
    return lines[lines.index("<!-- test-command -->") + 2]  # what .ci/run's awk takes


def _code_lines(text: str) -> list[str]:
    """Lines of fenced code blocks and the contents of inline code spans."""
    fenced = [line for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
              for line in block.splitlines()]
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    return [line.strip() for line in fenced + spans]


def test_docs_index_gives_the_readme_test_command():
    command = _readme_test_command()
    assert command == TEST_COMMAND
    index_commands = [line for line in _code_lines((DOCS / "index.md").read_text()) if "pytest" in line]
    assert index_commands == [command]


def test_every_full_test_command_is_the_readme_one():
    """A line that installs and runs the tests (pip install ... pytest) anywhere in the docs, README or CONTRIBUTING
    is exactly the README's test command; partial runs (`python -m pytest tests/test_gradients.py`) are fine."""
    command = _readme_test_command()
    found = []
    for page in [README, CONTRIBUTING, *_pages()]:
        for line in _code_lines(page.read_text()):
            if "pytest" in line and "pip install" in line:
                assert line == command, f"{page.relative_to(ROOT)} gives another test command: {line}"
                found.append(page.name)
    assert "README.md" in found and "index.md" in found
