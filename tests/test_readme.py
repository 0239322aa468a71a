"""The README's shape a new user relies on: the two opening commands and a contents line that
names every section."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_opens_with_make_run_and_make_test():
    block = README.split("```", 2)[1]
    assert re.search(r"^make run\b", block, flags=re.M) and re.search(r"^make test\b", block, flags=re.M)


def test_the_contents_line_links_every_section():
    contents = next(line for line in README.splitlines() if line.startswith("Contents: "))
    linked = re.findall(r"\[([^\]]+)\]\(#([^)]+)\)", contents)
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    assert [name for name, _ in linked] == headings
    for name, anchor in linked:  # GitHub's anchor: lower case, punctuation dropped, spaces to '-'
        assert anchor == re.sub(r"[^\w\- ]", "", name.lower()).replace(" ", "-")


def test_the_tables_section_names_every_lake_table():
    from cellsynth.schemas import TABLES

    section = README.split("\n## Tables\n", 1)[1].split("\n## ", 1)[0]
    listed = section.split(". Schemas are declared", 1)[0]
    assert sorted(t for t in TABLES if f"`{t}`" not in listed) == []
