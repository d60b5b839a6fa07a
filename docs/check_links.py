"""Checks the docs' relative links: every ``](target)`` in README.md, experiments/README.md
and docs/*.md names a file that exists, and a ``#anchor`` names a heading of its target
(GitHub's slugs). Outside code blocks; URLs are skipped.

    python docs/check_links.py        # prints each broken link; exit code 1 if any
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = re.compile(r"```.*?```", flags=re.S)


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = CODE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, flags=re.M)}


def broken(root: Path = ROOT) -> list[str]:
    files = [root / "README.md", root / "experiments" / "README.md"]
    files += sorted((root / "docs").glob("*.md"))
    problems = []
    for file in files:
        for match in re.finditer(r"\]\(([^)\s]+)\)", CODE.sub("", file.read_text())):
            target = match.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (file.parent / path).resolve() if path else file
            name = file.relative_to(root)
            if not dest.exists():
                problems.append(f"{name}: no such file: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{name}: no such heading: {target}")
    return problems


if __name__ == "__main__":
    problems = broken()
    print("\n".join(problems) or "all links ok")
    sys.exit(1 if problems else 0)
