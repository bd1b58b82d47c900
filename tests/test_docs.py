"""The README stays true to itself and to CI: its links within the page land on headings, and the
test command it gives is the one .ci/run runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped (``-`` and ``_``
    kept), spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor_follows_githubs_rule() -> None:
    assert github_anchor("Your own folder: `data=folder`") == "your-own-folder-datafolder"
    assert github_anchor("The paper's combinations") == "the-papers-combinations"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_links_within_a_page_land_on_its_headings(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    # Headings outside fenced code blocks only: a "# comment" in a bash example is no heading.
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    anchors = {github_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", prose, flags=re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", prose))
    if doc.name == "README.md":
        assert links, "the README links to none of its sections (did the link syntax change?)"
    assert links <= anchors, f"{doc.name}: links to missing headings: {sorted(links - anchors)}"


def test_readme_test_command_is_the_one_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = re.findall(r'^pip install "\.\[dev,launchers\]" && (python -m pytest .+)$', readme, flags=re.M)
    assert len(commands) == 1, "the README gives one test command after installing .[dev,launchers]"
    assert re.search(rf"^{re.escape(commands[0])}$", ci, flags=re.M), f".ci/run does not run {commands[0]!r}"
    assert re.search(r'^python -m pip install "\.\[dev,launchers\]"$', ci, flags=re.M)
