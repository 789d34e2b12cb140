"""The examples of README.md and of the pages in docs/ are checked, every page the same way:

- Programs run as written. A ```python block whose first line is an ``import`` statement is a complete
  program (the others are fragments), unless it talks to a server (``base_url=``). So is a file a page
  names (a block right after a line ending in "`name.py`:", or one that opens with the docstring
  ``\"\"\"name.py: ...``) when the page runs it (``$ python name.py``); then what it prints must be what
  the page shows (whitespace aside: pages wrap lines). Each runs in an empty folder that holds every
  file its page names (``no_digits.py``, ``person.json``, ...).
- Relative links resolve: the file exists, and a ``#anchor`` is a heading of it.
- README.md starts with the two commands, stays short, and links every page of docs/."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
NAMED = re.compile(r"`([\w.-]+\.\w+)`\)?:\n\n```\w*\n(.*?)^```", re.M | re.S)  # "`name.py`:" then its block
DOCSTRING_NAME = re.compile(r'"""([\w-]+\.py): ')  # a file that says its own name
COMING: set = set()  # pages linked before they are written (none now)


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def named_files(text: str) -> dict:
    files = dict(NAMED.findall(text))
    for language, block in FENCE.findall(text):
        match = DOCSTRING_NAME.match(block)
        if language == "python" and match:
            files[match[1]] = block
    return files


def shown_output(text: str, name: str):
    """What a page shows ``$ python name`` print, or None when it does not run it."""
    match = re.search(rf"^\$ python {re.escape(name)}\n(.*?)^```", text, re.M | re.S)
    return match and match[1]


def examples():
    found = []
    for page in PAGES:
        text = page.read_text()
        files = named_files(text)
        programs = [(None, block) for language, block in FENCE.findall(text) if language == "python"]
        programs = [(name, block) for name, block in programs if block.startswith("import ")]
        programs += [(name, block) for name, block in files.items() if shown_output(text, name) is not None]
        for number, (name, block) in enumerate(programs):
            if "base_url=" not in block:
                found.append(pytest.param(page, name, block, files, id=f"{page_id(page)}:{name or f'block{number}'}"))
    return found


EXAMPLES = examples()


@pytest.mark.model
@pytest.mark.parametrize("page, name, code, files", EXAMPLES)
def test_example_runs(page, name, code, files, tmp_path):
    for file, content in files.items():
        (tmp_path / file).write_text(content)
    script = tmp_path / (name or "example.py")
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    if "generate(" in code:
        assert len(done.stdout.split()) >= 20, done.stdout  # it streamed a real continuation
    shown = name and shown_output(page.read_text(), name)
    if shown:
        assert done.stdout.split() == shown.split(), done.stdout  # greedy: what the page shows


def test_there_are_runnable_examples():
    by_page = {page_id(param.values[0]) for param in EXAMPLES}
    # the README's two quick starts, and the pages whose examples were the README's or come with files
    assert len(EXAMPLES) >= 6, EXAMPLES
    assert {"README.md", "docs/events-and-playground.md", "docs/writing-a-strategy.md"} <= by_page, by_page
    readme = [param for param in EXAMPLES if param.values[0].name == "README.md"]
    assert len(readme) >= 2, "the README's Python quick starts are no longer complete programs"


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```")[0].splitlines()
    assert [line.split("#")[0].strip() for line in lines] == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def test_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    index = (ROOT / "docs" / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "README.md":
            assert f"(docs/{page.name}" in readme or f"({page.name}" in index, f"{page.name} is linked from nowhere"


def test_the_strategy_file_on_the_page_is_the_example_the_tests_run():
    files = named_files((ROOT / "docs" / "writing-a-strategy.md").read_text())
    assert files["no_digits.py"] == (ROOT / "examples" / "no_digits.py").read_text()


# --- links ------------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def anchors(page: Path) -> set:
    prose = FENCE.sub("", page.read_text())
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose, re.M):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


def links(page: Path):
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))  # not in code
    return re.findall(r"\]\(([^)\s]+)\)", prose)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page):
    bad = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() and str(file.relative_to(ROOT)) not in COMING:
            bad.append(f"{target}: no such file")
        elif anchor and file.exists() and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not bad, bad


def test_the_link_checker_sees_links_and_anchors():
    assert slug("Data sets: `backtrack-sampler batch`") == "data-sets-backtrack-sampler-batch"
    assert (
        slug("What AntiSlop does to the instruct model's stories")
        == "what-antislop-does-to-the-instruct-models-stories"
    )
    assert "docs/strategies.md" in links(ROOT / "README.md")
