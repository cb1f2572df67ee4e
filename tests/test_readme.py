"""The README's code example runs as written (with fewer meta-steps), and .ci/run finds the README's test command."""

import re
import subprocess
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "range(300)" in block
    exec(compile(block.replace("range(300)", "range(3)"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    mse = float(re.search(r"query MSE after 10 inner steps: ([0-9.]+)", out).group(1))
    assert 0.0 < mse < 20.0


def test_ci_runs_the_readme_test_command():
    root = README.parent
    found = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", "README.md"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert found.startswith("pip install torch==2.13.0") and "pytest" in found
    assert "<!-- test-command -->" in (root / ".ci" / "run").read_text()
