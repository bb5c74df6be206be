"""FetalBrainSegLib imports no slicer/qt and needs nothing beyond the standard library and numpy (Slicer's Python)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from ...conftest import MODULE_DIR

BLOCKED = ["slicer", "qt", "ctk", "vtk", "PythonQt", "requests", "nibabel", "nrrd", "SimpleITK", "slicerio",
           "fetalseg", "monailabel", "torch"]  # fmt: skip

PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    blocked = set(json.loads(sys.argv[1]))

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ImportError("blocked for this test: " + name)
            return None

    sys.meta_path.insert(0, Block())
    before = set(sys.modules)
    import FetalBrainSegLib
    for info in pkgutil.iter_modules(FetalBrainSegLib.__path__):
        importlib.import_module("FetalBrainSegLib." + info.name)
    new = {name.split(".")[0] for name in set(sys.modules) - before}
    ours = ("FetalBrainSegLib", "cython_runtime")  # cython_runtime: numpy's compiled-module helper
    third_party = sorted(n for n in new if n not in sys.stdlib_module_names and n not in ours and not n.startswith("_"))
    print(json.dumps(third_party))
    """
)


def test_lib_imports_without_slicer_qt_or_project_packages():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(BLOCKED)],
        cwd=str(MODULE_DIR),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["numpy"]


def test_the_probe_does_block():  # the test above would be worthless if blocking silently failed
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.replace("import FetalBrainSegLib\n", "import nrrd\nimport FetalBrainSegLib\n"),
         json.dumps(BLOCKED)],
        cwd=str(MODULE_DIR), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "blocked for this test: nrrd" in proc.stderr
