"""The README and docs/ link to each other's sections by anchor; a renamed heading or a moved section must not
leave a link that lands nowhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```.*?```", re.S)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.*)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(files: list[Path]) -> list[str]:
    bad = []
    for f in files:
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", f.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (f.parent / path).resolve() if path else f
            if not dest.exists():
                bad.append(f"{f.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{f.name}: {target} (no such heading)")
    return bad


def test_every_link_in_the_readme_and_docs_resolves():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(files) > 5
    assert broken_links(files) == []


def test_a_link_to_a_missing_heading_or_file_is_caught(tmp_path):
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# B\n\n## A section: with, punctuation (2026)\n\n```bash\n# not a heading\n```\n")
    page.write_text("[ok](b.md#a-section-with-punctuation-2026) [gone](b.md#not-a-heading) [no file](c.md) "
                    "[self](#a) [web](https://example.com/x#y)\n\n# A\n")
    assert broken_links([page]) == ["a.md: b.md#not-a-heading (no such heading)", "a.md: c.md (no such file)"]
