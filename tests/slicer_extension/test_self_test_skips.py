"""The module's in-Slicer self-test reports "skipped", not a pass, when no server is named (issue 23, item 8).

Slicer cannot be installed here, so ``FetalBrainSeg.py`` is loaded with minimal stand-ins for ``qt``, ``vtk`` and
``slicer`` (only what defining the classes and ``setUp`` touch) and its test case is run by ``unittest`` exactly
as the README's ``--python-code`` command runs it inside Slicer.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest

import pytest

from .conftest import MODULE_DIR


def _stub_slicer_modules() -> dict[str, types.ModuleType]:
    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):  # noqa: N802  (Slicer's name)
            pass

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {})
    scripted.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {})
    scripted.ScriptedLoadableModuleLogic = type("ScriptedLoadableModuleLogic", (), {})
    scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    slicer = types.ModuleType("slicer")
    slicer.ScriptedLoadableModule = scripted
    slicer.mrmlScene = types.SimpleNamespace(Clear=lambda: None)
    return {
        "qt": types.ModuleType("qt"),
        "vtk": types.ModuleType("vtk"),
        "slicer": slicer,
        "slicer.ScriptedLoadableModule": scripted,
    }


@pytest.fixture
def module(monkeypatch):
    for name, stub in _stub_slicer_modules().items():
        monkeypatch.setitem(sys.modules, name, stub)
    spec = importlib.util.spec_from_file_location("FetalBrainSeg_under_test", MODULE_DIR / "FetalBrainSeg.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_full_flow_is_reported_skipped_without_a_server_url(module, monkeypatch):
    monkeypatch.delenv(module.SERVER_URL_ENV, raising=False)
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(module.FetalBrainSegTest)
    result = unittest.TestResult()
    suite.run(result)
    assert result.testsRun == 1
    assert not result.errors and not result.failures
    assert len(result.skipped) == 1
    test, reason = result.skipped[0]
    assert test._testMethodName == "test_FullFlow"
    assert module.SERVER_URL_ENV in reason
