import json
import subprocess
import sys

import pytest
import torch
from opacus.validators import ModuleValidator

from fetalseg.bundle import Bundle, load_checkpoint, save_checkpoint, variants
from fetalseg.paths import bundle_dir
from fetalseg.subspace import parameter_names


def test_network_comes_from_the_bundle_and_is_opacus_compatible():
    net = Bundle("train").network()
    assert type(net).__name__ == "UNet"
    assert ModuleValidator.validate(net, strict=False) == []
    out = net(torch.zeros(1, 1, 32, 32, 32))
    assert out.shape == (1, 8, 32, 32, 32)


def test_num_classes_follows_metadata_labels():
    meta = json.loads((bundle_dir() / "configs" / "metadata.json").read_text())
    assert Bundle("common").num_classes == len(meta["network_data_format"]["outputs"]["pred"]["channel_def"])


def test_variants_overlay_patch_and_spacing():
    assert set(variants()) >= {"tiny", "feta"}
    tiny = Bundle("train", variant="tiny")
    assert tiny.patch_size == (32, 32, 32)
    assert tiny.pixdim == (4.0, 4.0, 4.0)
    assert Bundle("train").patch_size != tiny.patch_size
    with pytest.raises(ValueError, match="unknown bundle variant"):
        Bundle("train", variant="nope")


def test_overrides_change_values_without_editing_json():
    b = Bundle("train", overrides={"max_epochs": 3, "learning_rate": 0.01})
    assert b.get("max_epochs") == 3
    opt = b.optimizer(b.network().parameters())
    assert opt.param_groups[0]["lr"] == 0.01


def test_fresh_instances_each_call():
    b = Bundle("train")
    assert b.network() is not b.network()
    assert b.preprocessing() is not b.preprocessing()


def test_checkpoint_roundtrip_is_atomic_and_keeps_info(tmp_path):
    b = Bundle("common", variant="tiny")
    net = b.network()
    path = save_checkpoint(net, tmp_path / "m" / "model.pt", origin="test", round=3)
    assert not list(path.parent.glob(".*tmp"))
    other = b.network()
    info = load_checkpoint(other, path)
    assert info == {"origin": "test", "round": 3}
    for (k, v), (_, w) in zip(net.state_dict().items(), other.state_dict().items()):
        assert torch.equal(v, w), k


def test_bad_purpose_is_rejected():
    with pytest.raises(ValueError, match="purpose"):
        Bundle("eval")


@pytest.mark.slow
def test_monai_bundle_run_inference(tmp_path, write_case):
    """``python -m monai.bundle run`` works on the bundle the way MONAI users run it."""
    from fetalseg.data.io import read_volume

    b = Bundle("common", variant="tiny")
    ckpt = save_checkpoint(b.network(), tmp_path / "model.pt")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    img, _ = write_case("case", folder=inputs)
    root = bundle_dir()
    configs = [str(root / "configs" / n) for n in ("common.json", "inference.json", "variants/tiny.json")]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", repr(configs),
        "--meta_file", str(root / "configs" / "metadata.json"),
        "--bundle_root", str(root),
        "--input_dir", str(inputs),
        "--output_dir", str(tmp_path / "eval"),
        "--checkpoint", str(ckpt),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = list((tmp_path / "eval").glob("*.nii.gz"))
    assert len(outputs) == 1
    pred, src = read_volume(outputs[0]), read_volume(img)
    assert pred.array.shape == src.array.shape
    assert set(pred.array.ravel().tolist()) <= set(range(8))


def test_model_saved_before_affine_norm_loads_unchanged(tmp_path):
    """Bundle 0.2.0 made the instance norm affine: a 0.1.0 checkpoint (no norm scale/shift) still loads, with the
    identity scale and shift, so it computes what it computed; any other missing or extra key is still an error."""
    bundle = Bundle("train", variant="tiny")
    torch.manual_seed(0)
    net = bundle.network()
    norm = set(parameter_names(net, "norm"))
    assert norm
    old = {k: v for k, v in net.state_dict().items() if k not in norm}
    torch.save({"model": old, "origin": "0.1.0"}, tmp_path / "old.pt")
    fresh = bundle.network()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # nothing of the fresh network may survive the load
    assert load_checkpoint(fresh, tmp_path / "old.pt") == {"origin": "0.1.0"}
    for name, p in fresh.named_parameters():
        if name in norm:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
    torch.save({"model": {**old, "extra.weight": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match=r"extra\.weight"):
        load_checkpoint(fresh, tmp_path / "bad.pt")
    broken = dict(old)
    broken.pop(next(k for k in old if k.endswith("conv.weight")))
    torch.save({"model": broken}, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_checkpoint(fresh, tmp_path / "broken.pt")


def test_component_lookup_survives_imports_in_another_thread() -> None:
    """NVFlare threads import while a site parses the bundle; MONAI's own walk of sys.modules raised
    'dictionary changed size during iteration' then. Here a thread keeps adding modules during every lookup."""
    import sys
    import threading
    import types

    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            name = f"monai_fetalseg_churn_{i % 50}"
            sys.modules[name] = types.ModuleType(name)
            sys.modules.pop(f"monai_fetalseg_churn_{(i + 25) % 50}", None)
            i += 1

    worker = threading.Thread(target=churn, daemon=True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a loaded machine does
    worker.start()
    try:
        for _ in range(20):
            assert Bundle("common").parser.locator.get_component_module_name("UNet")
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        worker.join()
        for name in [m for m in list(sys.modules) if m.startswith("monai_fetalseg_churn_")]:
            del sys.modules[name]
