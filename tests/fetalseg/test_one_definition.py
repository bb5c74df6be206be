"""The network, its labels and its patch size are defined once, in the bundle. A second copy fails this test.

Scans every Python and JSON file of the project (not the bundle's own configs) for things that would re-define
them: a MONAI network class being built, raw 3D conv layers, a ``network_def``, a table of FeTA label names, or
a hard-coded ROI/patch size handed to an inferer.
"""

import re
from pathlib import Path

from fetalseg.labels import foreground_labels
from fetalseg.paths import REPO_ROOT, bundle_dir

SKIP_DIRS = {".venv", ".git", "build", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules"}
NETWORK_PATTERNS = [
    re.compile(r"\b(?:Basic)?UNet\s*\("),
    re.compile(r"\bUNETR\s*\(|\bSwinUNETR\s*\(|\bSegResNet\s*\(|\bDynUNet\s*\("),
    re.compile(r"monai\.networks\.nets\s+import"),
    re.compile(r"\"network_def\"\s*:"),
]
# (file, pattern) pairs that name the network without defining one, each with its reason
NETWORK_ALLOWED = {
    ("privacy/encrypted_inference/layers.py", r"monai\.networks\.nets\s+import"):
        "imports UNet only for isinstance checks while walking the module tree Bundle.network() built",
    ("privacy/encrypted_inference/protocol.py", r"\"network_def\"\s*:"):
        "hashes the bundle's own network_def (read from its parser) into the two parties' model fingerprint",
}  # fmt: skip
# raw 3D layers: banned in the project's code; tests may build one-layer toys (e.g. to show BatchNorm is refused)
LAYER_PATTERN = re.compile(r"\bnn\.Conv3d\s*\(|\bConvTranspose3d\s*\(")
# three or more FeTA tissue names paired with their label values in one file = a second label table
# (names used as keys to look values up through fetalseg.labels are fine)
LABEL_NAMES = [lab.name for lab in foreground_labels()]
LABEL_TABLE_ALLOWED = {"tests/fetalseg/test_labels.py"}  # the test that pins the table in metadata.json


def _pairings(text: str) -> list[str]:
    found = []
    for value, name in enumerate(LABEL_NAMES, start=1):  # foreground values are 1..7
        spaced = name.replace("_", "[ _]")
        pair = rf"(?i)['\"]{spaced}['\"]\s*[:=,]\s*{value}\b(?!\.)|\b{value}\s*[:,]\s*['\"]{spaced}['\"]"
        if re.search(pair, text):
            found.append(name)
    return found


ROI_PATTERN = re.compile(r"roi_size\s*=\s*[\(\[]\s*\d+")


def _project_files(suffixes):
    bundle_configs = (bundle_dir() / "configs").resolve()
    this = Path(__file__).resolve()
    for path in REPO_ROOT.rglob("*"):
        if path.suffix not in suffixes or not path.is_file():
            continue
        rel = path.relative_to(REPO_ROOT)
        if SKIP_DIRS & set(rel.parts) or path.resolve() == this:
            continue
        if bundle_configs in path.resolve().parents:
            continue
        yield rel, path.read_text(errors="replace")


def test_no_second_network_definition():
    offenders = [
        f"{rel}: {pat.pattern}" for rel, text in _project_files({".py", ".json"}) for pat in NETWORK_PATTERNS
        if pat.search(text) and (rel.as_posix(), pat.pattern) not in NETWORK_ALLOWED
    ]  # fmt: skip
    offenders += [
        f"{rel}: {LAYER_PATTERN.pattern}" for rel, text in _project_files({".py"})
        if rel.parts[0] != "tests" and LAYER_PATTERN.search(text)
    ]  # fmt: skip
    assert not offenders, "network defined outside the bundle:\n" + "\n".join(offenders)


def test_every_allowed_mention_still_exists():
    """An allowance whose file no longer mentions the pattern is stale: remove it, so the list stays short."""
    texts = dict(_project_files({".py"}))
    stale = [f for f, pat in NETWORK_ALLOWED if not re.search(pat, texts.get(Path(f), ""))]
    assert not stale, f"stale NETWORK_ALLOWED entries: {stale}"


def test_no_second_label_table():
    offenders = []
    for rel, text in _project_files({".py", ".json"}):
        paired = _pairings(text)
        if len(paired) >= 3 and str(rel) not in LABEL_TABLE_ALLOWED:
            offenders.append(f"{rel}: {paired}")
    assert not offenders, "label names typed outside metadata.json (use fetalseg.labels):\n" + "\n".join(offenders)


def test_no_hard_coded_inference_roi():
    offenders = [str(rel) for rel, text in _project_files({".py"}) if ROI_PATTERN.search(text)]
    assert not offenders, "patch/ROI size typed outside the bundle (use Bundle.patch_size):\n" + "\n".join(offenders)


def test_the_guard_itself_detects_a_copy(tmp_path):
    """The patterns really match what a copy would look like (so the tests above can fail)."""
    sample = (
        'net = UNet(spatial_dims=3)\nt = {"Grey matter": 2, 3: "white_matter", "brainstem": 7}\nroi_size=(64, 64, 64)'
    )
    assert any(p.search(sample) for p in NETWORK_PATTERNS)
    assert LAYER_PATTERN.search("self.conv = nn.Conv3d(1, 16, 3)")
    assert _pairings(sample) == ["grey_matter", "white_matter", "brainstem"]
    assert _pairings('ids["white_matter"], ids["brainstem"], ids["grey_matter"]') == []
    assert ROI_PATTERN.search(sample)
