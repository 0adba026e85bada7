"""Write requirements/lock.txt: the exact version of every package the project's extras pull in, as installed now.

Run it in the environment whose test run passed (`python tools/lock.py`); `.ci/run` and the README install with
`-c requirements/lock.txt`, so a fresh machine gets what CI tested. Walks the installed metadata from
the requirements in pyproject.toml (the core and every extra: bench, dev), so unrelated packages in the
environment stay out of the lock. pyproject.toml is read directly, not the installed profit-bench's metadata, which
an editable install leaves stale until it is reinstalled.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> tuple[str, list[str]]:
    """The project's name and its requirements: the core dependencies and those of every extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return project["name"], project.get("dependencies", []) + [r for reqs in extras.values() for r in reqs]


def closure() -> dict[str, str]:
    root, requirements = project_requirements()
    todo = [(Requirement(r), set()) for r in requirements]
    pinned: dict[str, str] = {}
    while todo:
        req, want_extras = todo.pop()
        env = [{"extra": e} for e in want_extras] or [{"extra": ""}]
        if req.marker is not None and not any(req.marker.evaluate(e) for e in env):
            continue
        name = _canon(req.name)
        try:
            d = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this platform does not install
        first = name not in pinned
        pinned[name] = d.version
        if first or req.extras:
            todo += [(Requirement(r), set(req.extras)) for r in d.requires or []]
    pinned.pop(_canon(root), None)
    return pinned


def main() -> int:
    pins = closure()
    out = ROOT / "requirements" / "lock.txt"
    out.parent.mkdir(exist_ok=True)
    lines = [f"{n}=={v}" for n, v in sorted(pins.items())]
    out.write_text("# Written by `python tools/lock.py` from the environment CI last passed with; do not edit by hand.\n"
                   f"# Python {sys.version.split()[0]}. Used as a constraints file (`pip install -c requirements/lock.txt ...`).\n"
                   + "\n".join(lines) + "\n")
    print(f"{out.relative_to(ROOT)}: {len(lines)} packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
