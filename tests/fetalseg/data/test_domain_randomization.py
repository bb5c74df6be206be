import numpy as np
import pytest
import torch
from monai.transforms import Compose

from fetalseg.bundle import Bundle
from fetalseg.data.domain_randomization import RandTissueContrastd
from fetalseg.data.loaders import load_dataset


def _blocks(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three tissues in slabs (0, 1, 2) with distinct means and a little texture; channel first."""
    label = torch.zeros(1, 12, 10, 8, dtype=torch.uint8)
    label[:, 4:8] = 1
    label[:, 8:] = 2
    rng = np.random.default_rng(seed)
    base = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float32)[label.long()]
    image = base + torch.as_tensor(rng.normal(0, 0.02, size=label.shape), dtype=torch.float32)
    return {"image": image, "label": label}


def _remap(seed: int = 0, **kw) -> RandTissueContrastd:
    t = RandTissueContrastd(
        "image", num_classes=3, mean_range=(0.2, 0.8), scale_range=(0.5, 1.5), boundary_sigma=0.0, **kw
    )
    t.set_random_state(seed=seed)
    return t


def _tissue_means(image: torch.Tensor, label: torch.Tensor) -> list[float]:
    return [float(image[label == k].double().mean()) for k in range(3)]


def test_each_tissue_gets_its_own_drawn_mean_and_the_label_is_untouched():
    data = _blocks()
    t = _remap(seed=1)
    out = t(data)
    assert torch.equal(out["label"], data["label"])
    assert out["label"].dtype == torch.uint8
    np.testing.assert_allclose(_tissue_means(out["image"], out["label"]), t.means.numpy(), atol=1e-4)
    shifts = np.subtract(_tissue_means(out["image"], out["label"]), _tissue_means(data["image"], data["label"]))
    assert np.ptp(shifts) > 0.05  # not one global shift: tissues moved by different amounts


def test_a_tissue_remap_does_not_depend_on_other_tissues():
    data = _blocks()
    other = {"image": data["image"].clone(), "label": data["label"]}
    other["image"][:, 10:] += 0.05  # change half of tissue 2 (slabs 8..11) only
    a, b = _remap(seed=4)(data), _remap(seed=4)(other)
    inside = data["label"] != 2
    torch.testing.assert_close(a["image"][inside], b["image"][inside], rtol=0, atol=1e-6)
    assert not torch.allclose(a["image"][~inside], b["image"][~inside], atol=1e-3)


def test_smoothed_boundaries_blend_neighbouring_tissues():
    data = _blocks()
    t = RandTissueContrastd("image", num_classes=3, boundary_sigma=1.5)
    t.set_random_state(seed=2)
    weights = t.memberships(data["label"])
    torch.testing.assert_close(weights.sum(0), torch.ones(12, 10, 8), rtol=0, atol=1e-5)
    assert 0.1 < float(weights[0, 3].mean()) < 0.9  # the voxel row next to the 0|1 boundary is mixed
    assert float(weights[0, 0].mean()) > 0.95  # far from it: nearly pure tissue


def test_a_fixed_seed_reproduces_and_another_seed_differs():
    data = _blocks()
    first, again, other = _remap(seed=7)(data), _remap(seed=7)(data), _remap(seed=8)(data)
    assert torch.equal(first["image"], again["image"])
    assert not torch.allclose(first["image"], other["image"])


def test_prob_zero_returns_the_image_unchanged():
    data = _blocks()
    out = _remap(seed=0, prob=0.0)(data)
    assert torch.equal(out["image"], data["image"])


def test_labels_outside_num_classes_are_an_error():
    data = _blocks()
    data["label"][0, 0, 0, 0] = 5
    with pytest.raises(ValueError, match="label values"):
        _remap()(data)


def _first_case(tiny_federation) -> dict:
    return load_dataset(tiny_federation[0])[0].as_item()


def test_bundle_train_transforms_with_domain_randomization_give_patches_of_the_right_shape(tiny_federation):
    bundle = Bundle("train", variant="tiny", overrides={"domain_randomization": True})
    transforms = bundle.train_transforms()
    assert any(isinstance(t, RandTissueContrastd) for t in transforms.transforms)
    transforms.set_random_state(seed=0)
    (out,) = transforms(_first_case(tiny_federation))  # num_samples=1 crop: a list of one
    assert tuple(out["image"].shape) == (1, *bundle.patch_size)
    assert out["image"].dtype == torch.float32
    assert torch.isfinite(out["image"]).all()
    assert out["label"].dtype == torch.uint8
    assert tuple(out["label"].shape) == (1, *bundle.patch_size)


def test_with_domain_randomization_off_train_transforms_are_preprocessing_plus_augmentation(tiny_federation):
    bundle = Bundle("train", variant="tiny")
    assert bundle.get("domain_randomization") is False
    assert bundle.domain_randomization_transforms() == []
    augmentation = bundle.parser.get_parsed_content("augmentation_transforms", instantiate=True, lazy=False)
    today = Compose(
        bundle.parser.get_parsed_content("preprocessing_transforms", instantiate=True, lazy=False) + augmentation
    )
    ours = bundle.train_transforms()
    assert [type(t) for t in ours.transforms] == [type(t) for t in today.transforms]
    assert [type(t) for t in bundle.augmentation_transforms()] == [type(t) for t in augmentation]
    item = _first_case(tiny_federation)
    ours.set_random_state(seed=3)
    today.set_random_state(seed=3)
    (a,), (b,) = ours(dict(item)), today(dict(item))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
