"""The dependency directions of docs/architecture.md ("Who may import whom"), checked on the import statements of
every module. Change that page and this test together.

- core (fetalseg) imports neither monailabel nor nvflare, nor any other part of the project;
- privacy imports fetalseg and opacus; only its NVFlare adapter module may import nvflare;
- the MONAI Label app and the NVFlare jobs never import each other;
- the Slicer extension imports nothing of the project (it speaks HTTP) and its Lib imports no slicer/qt.
"""

import ast
from pathlib import Path

import pytest

from fetalseg.paths import REPO_ROOT

PROJECT = {"fetalseg", "privacy", "apps", "nvflare_jobs", "fetal_fl", "slicer_extension"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(folder: str):
    root = REPO_ROOT / folder
    if not root.exists():
        pytest.skip(f"{folder}/ not in this checkout")
    return [p for p in root.rglob("*.py") if "__pycache__" not in p.parts]


def _violations(folder: str, forbidden: set[str], *, allow: dict[str, set[str]] | None = None) -> list[str]:
    out = []
    for path in _modules(folder):
        rel = str(path.relative_to(REPO_ROOT))
        allowed = (allow or {}).get(rel, set())
        for name in _imports(path):
            top = name.split(".")[0]
            if top in forbidden and top not in allowed:
                out.append(f"{rel} imports {name}")
    return out


def test_core_is_plain_monai_pytorch():
    assert _violations("fetalseg", {"monailabel", "nvflare", *PROJECT} - {"fetalseg"}) == []


def test_privacy_only_adapts_nvflare_in_its_adapter():
    allow = {"privacy/nvflare_filters.py": {"nvflare"}}
    assert _violations("privacy", {"monailabel", "nvflare", "apps", "nvflare_jobs", "fetal_fl"}, allow=allow) == []


def test_app_and_fl_jobs_meet_only_through_files():
    assert _violations("apps", {"nvflare", "nvflare_jobs", "fetal_fl"}) == []
    assert _violations("nvflare_jobs", {"monailabel", "apps", "fetal_fl"}) == []


def test_slicer_extension_imports_nothing_of_the_project():
    assert (
        _violations("slicer_extension", {"monailabel", "nvflare", "monai", "torch", *PROJECT} - {"slicer_extension"})
        == []
    )
    lib_dirs = [p for p in (REPO_ROOT / "slicer_extension").rglob("*Lib") if p.is_dir()]
    for lib in lib_dirs:
        for path in lib.rglob("*.py"):
            bad = {n for n in _imports(path) if n.split(".")[0] in {"slicer", "qt", "ctk", "vtk"}}
            assert not bad, f"{path.relative_to(REPO_ROOT)} imports {bad}"


def test_the_rules_checked_here_are_the_documented_ones():
    page = (REPO_ROOT / "docs" / "architecture.md").read_text()
    assert "tests/test_architecture.py" in page
    # the one allowed exception is named where the rules are written down
    assert "privacy/nvflare_filters.py" in page


def test_the_scanner_sees_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import nvflare.app_common\nfrom monailabel.interfaces import app\nfrom . import x\n")
    assert _imports(sample) == {"nvflare.app_common", "monailabel.interfaces"}
