"""The README's Python examples run as written: every ```python block whose first line is an
``import`` statement is a complete program (the others are fragments or need a server)."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT

BLOCKS = [
    b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if b.startswith("import ")
]


@pytest.mark.model
@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    if "generate(" in code:
        assert len(done.stdout.split()) >= 20, done.stdout  # it streamed a real continuation


def test_readme_has_runnable_examples():
    assert BLOCKS, "no ```python block starting with an import: the example test above would run nothing"


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```")[0].splitlines()
    assert [line.split("#")[0].strip() for line in lines] == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def test_the_readme_strategy_file_is_the_example_the_tests_run():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"`no_digits.py`:\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert block == (ROOT / "examples" / "no_digits.py").read_text()
