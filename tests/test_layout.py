"""README's Layout section against the tree, and the library's promise to need torch alone (CPU)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_block() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1]
    return section.split("```", 2)[1].strip("\n").splitlines()


def _listed_paths() -> set[str]:
    """Paths the Layout block names, folders expanded by their indentation."""
    paths, parents = set(), []
    for line in _layout_block():
        if not line.strip():
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        parents = [*parents[:indent], name]
        paths.add("".join(parents))
    return paths


def test_every_module_of_the_package_is_in_the_readme_layout():
    listed = _listed_paths()
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "attention").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
        and not p.name.startswith("test_")  # the suite's test modules: one test_*.py line
        and "perf" not in p.relative_to(ROOT).parts
    }
    missing = sorted(m for m in modules if m not in listed)
    assert not missing, f"README.md's Layout section lacks {missing}"


def test_every_path_in_the_readme_layout_exists():
    gone = sorted(p for p in _listed_paths() if not any(ROOT.glob(p.rstrip("/"))))
    assert not gone, f"README.md's Layout section names paths that do not exist: {gone}"


def test_importing_the_library_pulls_no_tooling_dependency():
    code = (
        "import sys, attention; print(sorted(m for m in ('matplotlib', 'rich', 'scipy', 'marimo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_library_modules_never_import_the_tooling():
    pattern = re.compile(r"^\s*from \.bench|^\s*import attention\.bench|^\s*from attention\.bench", re.M)
    offenders = [p.name for p in (ROOT / "attention").glob("*.py") if pattern.search(p.read_text())]
    assert not offenders
