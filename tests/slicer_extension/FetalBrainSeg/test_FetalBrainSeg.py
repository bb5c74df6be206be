"""The scripted module's layout follows Slicer's conventions and its parts fit together (no Slicer here to run it).

What can be checked without Slicer is checked: CMake lists every script and resource; the .ui is Designer XML
with every widget the Widget uses; the Widget calls only Logic members that exist; the Logic has no Qt; the icon
is a valid PNG; every file parses as Python 3.9 (Slicer 5.6's Python).
"""

from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest
from FetalBrainSegLib.workflow import Workflow

from ..conftest import MODULE_DIR

EXTENSION_DIR = MODULE_DIR.parent
MODULE_FILE = MODULE_DIR / "FetalBrainSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "FetalBrainSeg.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "FetalBrainSeg.png"

REQUIRED_WIDGETS = {
    "serverUrlLineEdit": "QLineEdit",
    "tokenLineEdit": "QLineEdit",
    "connectButton": "QPushButton",
    "modelNameLabel": "QLabel",
    "modelVersionLabel": "QLabel",
    "modelOriginLabel": "QLabel",
    "privacyLabel": "QLabel",
    "nextCaseButton": "QPushButton",
    "openCaseButton": "QPushButton",
    "segmentButton": "QPushButton",
    "submitButton": "QPushButton",
    "fineTuneButton": "QPushButton",
    "trainingStatusLabel": "QLabel",
    "resendButton": "QPushButton",
    "statusLabel": "QLabel",
    "messageTextEdit": "QPlainTextEdit",
    "segmentEditorWidget": "qMRMLSegmentEditorWidget",
}


def _classes() -> dict[str, ast.ClassDef]:
    tree = ast.parse(MODULE_FILE.read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _attribute_chains(node: ast.AST, prefix: tuple[str, ...]) -> set[str]:
    """Names ``X`` in ``<prefix>.X`` (e.g. prefix ('self', 'ui') -> widget names)."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute):
            chain, cur = [sub.attr], sub.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                chain.append(cur.id)
                chain.reverse()
                if tuple(chain[: len(prefix)]) == prefix and len(chain) > len(prefix):
                    found.add(chain[len(prefix)])
    return found


def test_module_cmake_lists_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "FetalBrainSeg")
    assert "set(MODULE_NAME FetalBrainSeg)" in (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT" in text
    scripts = set(re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1).split())
    resources = set(re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", text, re.S).group(1).split())
    on_disk_py = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    on_disk_res = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert scripts == on_disk_py
    assert resources == on_disk_res


def test_extension_cmake_has_the_metadata_and_the_module():
    text = (EXTENSION_DIR / "CMakeLists.txt").read_text()
    assert "project(FetalBrainFL)" in text
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', text), key
    assert "add_subdirectory(FetalBrainSeg)" in text
    assert "include(${Slicer_EXTENSION_CPACK})" in text


def test_ui_is_designer_xml_with_every_widget_the_widget_uses():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.find("class").text == "FetalBrainSeg"
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    for name, cls in REQUIRED_WIDGETS.items():
        assert widgets.get(name) == cls, name
    used = _attribute_chains(_classes()["FetalBrainSegWidget"], ("self", "ui"))
    assert used - set(widgets) == set()
    custom = {c.find("class").text for c in root.iter("customwidget")}
    assert {"ctkCollapsibleButton", "qMRMLWidget", "qMRMLSegmentEditorWidget"} <= custom


def test_module_has_the_four_classes_and_a_thin_widget():
    classes = _classes()
    assert {"FetalBrainSeg", "FetalBrainSegWidget", "FetalBrainSegLogic", "FetalBrainSegTest"} <= set(classes)
    logic = classes["FetalBrainSegLogic"]
    logic_members = {n.name for n in logic.body if isinstance(n, ast.FunctionDef)}
    logic_members |= _attribute_chains(logic, ("self",))
    widget = classes["FetalBrainSegWidget"]
    assert _attribute_chains(widget, ("self", "logic")) - logic_members == set()
    workflow_members = {n for n in dir(Workflow) if not n.startswith("_")} | {"model", "case", "labels", "outbox"}
    assert _attribute_chains(widget, ("self", "logic", "workflow")) - workflow_members == set()
    # the Logic holds no Qt (it runs without a GUI)
    assert "qt" not in {n.id for n in ast.walk(logic) if isinstance(n, ast.Name)}


def test_icon_is_a_valid_png():
    data = ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (width, height, depth, colour) == (128, 128, 8, 6)
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + 4 * width)


@pytest.mark.parametrize(
    "path", sorted(p for p in EXTENSION_DIR.rglob("*.py") if "__pycache__" not in p.parts), ids=lambda p: p.name
)
def test_sources_parse_as_python_3_9(path: Path):
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))
