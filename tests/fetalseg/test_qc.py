"""Tissue volumes and the GA-aware check against the published curve (fetalseg.growth / fetalseg.qc).

Cases are placed inside and outside the published cerebellum curve on purpose: label maps are built with a chosen
number of cerebellum voxels, so the expected verdict follows from the published equation, not from the phantom.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fetalseg import growth, qc

AFFINE = np.diag([0.5, 0.5, 0.5, 1.0])  # FeTA-like 0.5 mm voxels: 0.000125 ml each
VOXEL_ML = 0.125 / 1000.0


def label_with(cerebellum_ml: float, shape=(80, 80, 80)) -> np.ndarray:
    """Grey matter everywhere in a block, and exactly round(cerebellum_ml / voxel) cerebellum voxels."""
    label = np.zeros(shape, np.uint8)
    label[10:70, 10:70, 10:70] = 2
    n = round(cerebellum_ml / VOXEL_ML)
    flat = label.reshape(-1)
    flat[:n] = 5
    return label


def test_published_equation_and_band():
    curve = growth.curve_for("cerebellum")
    assert curve is growth.LIU_2010_CEREBELLUM
    # CV = 0.034 exp(FA/5.918) cm³ (Liu et al. 2010), checked at 28 weeks by hand: 0.034 * e^(28/5.918)
    assert curve.median_ml(28.0) == pytest.approx(0.034 * math.exp(28 / 5.918))
    assert curve.median_ml(28.0) == pytest.approx(3.856, abs=0.01)
    # the source's own doubling time (~4.1 weeks) is what the factor-2 band means
    assert curve.tau_weeks * math.log(2) == pytest.approx(4.1, abs=0.05)
    low, high = curve.band_ml(28.0)
    assert low == pytest.approx(curve.median_ml(28.0) / 2) and high == pytest.approx(curve.median_ml(28.0) * 2)
    for tissue in ("external_csf", "grey_matter", "white_matter", "ventricles", "deep_grey_matter", "brainstem"):
        assert growth.curve_for(tissue) is None and tissue in growth.NOT_RETRIEVED


def test_volumes_in_ml_follow_the_voxel_size():
    label = label_with(4.0)
    vols = qc.tissue_volumes_ml(label, AFFINE)
    assert vols["cerebellum"] == pytest.approx(4.0, abs=VOXEL_ML)
    assert set(vols) == {"external_csf", "grey_matter", "white_matter", "ventricles", "cerebellum",
                         "deep_grey_matter", "brainstem"}  # fmt: skip
    # same label on 1 mm voxels: 8x the volume; an oblique/flipped affine keeps |det|
    assert qc.tissue_volumes_ml(label, np.diag([1.0, 1.0, 1.0, 1.0]))["cerebellum"] == pytest.approx(32.0, abs=0.01)
    flipped = np.array([[0, -0.5, 0, 3], [0.5, 0, 0, 1], [0, 0, -0.5, 2], [0, 0, 0, 1]])
    assert qc.tissue_volumes_ml(label, flipped)["cerebellum"] == pytest.approx(4.0, abs=VOXEL_ML)


@pytest.mark.parametrize(
    ("ga", "factor", "status"),
    [(28.0, 1.0, "ok"), (28.0, 1.8, "ok"), (28.0, 0.6, "ok"), (28.0, 2.5, "high"), (28.0, 0.35, "low"),
     (22.0, 1.0, "ok"), (34.0, 0.3, "low")],
)  # fmt: skip
def test_cases_inside_and_outside_the_published_curve(ga, factor, status):
    expected = growth.LIU_2010_CEREBELLUM.median_ml(ga)
    report = qc.assess_label(label_with(expected * factor), AFFINE, ga, ga_source="test")
    cerebellum = next(t for t in report["tissues"] if t["tissue"] == "cerebellum")
    assert cerebellum["status"] == status
    assert cerebellum["ratio"] == pytest.approx(factor, rel=0.01)
    assert report["flagged"] is (status != "ok")
    assert len(report["flags"]) == (status != "ok")
    if status != "ok":
        assert "Cerebellum" in report["flags"][0] and f"{ga:g} weeks" in report["flags"][0]
    others = [t for t in report["tissues"] if t["tissue"] != "cerebellum"]
    assert all(t["status"] == "no reference" and not t["flagged"] for t in others)


def test_same_volume_flagged_at_one_age_normal_at_another():
    label = label_with(growth.LIU_2010_CEREBELLUM.median_ml(33.0))  # normal for 33 weeks
    assert not qc.assess_label(label, AFFINE, 33.0)["flagged"]
    assert qc.assess_label(label, AFFINE, 24.0)["flagged"]  # ~9 weeks of growth too big for 24 weeks


def test_missing_ga_reports_volumes_without_flags():
    report = qc.assess_label(label_with(50.0), AFFINE, None)
    assert report["status"] == "no GA" and report["flagged"] is False and report["flags"] == []
    assert "gestational age unknown" in report["message"]
    assert report["volumes_ml"]["cerebellum"] == pytest.approx(50.0, abs=0.001)


def test_ga_outside_the_curves_range_is_not_compared():
    report = qc.assess_label(label_with(500.0), AFFINE, 43.0)
    cerebellum = next(t for t in report["tissues"] if t["tissue"] == "cerebellum")
    assert cerebellum["status"] == "outside reference GA range" and not report["flagged"]


@pytest.mark.parametrize("bad", ["abc", "nan", "inf", 14.9, 45.5, -3, True, "1e9", [28]])
def test_absurd_ga_is_refused(bad):
    with pytest.raises(qc.GestationalAgeError):
        qc.parse_ga(bad)


@pytest.mark.parametrize(("value", "ga"), [(None, None), ("", None), ("  ", None), ("27.5", 27.5), (15, 15.0)])
def test_ga_parsing(value, ga):
    assert qc.parse_ga(value) == ga


def test_ga_from_participants_tsv(tmp_path: Path):
    (tmp_path / "participants.tsv").write_text(
        "participant_id\tGestational age\nsub-001\t27.3\nsub-002\tn/a\ncase00\t31\nsub-009\t60\n"
    )
    assert qc.ga_from_participants(tmp_path, "sub-001_rec-mial_T2w") == 27.3
    assert qc.ga_from_participants(tmp_path, "sub-0010_rec-mial_T2w") is None  # no prefix confusion
    assert qc.ga_from_participants(tmp_path, "sub-002_rec-irtk_T2w") is None
    assert qc.ga_from_participants(tmp_path, "case00") == 31.0
    with pytest.raises(qc.GestationalAgeError, match=r"participants\.tsv"):
        qc.ga_from_participants(tmp_path, "sub-009_T2w")
    assert qc.ga_from_participants(tmp_path / "nowhere", "sub-001") is None


def _dicom_series(folder: Path, **tags: str) -> Path:
    """A tiny DICOM series whose files carry ``tags`` (e.g. LastMenstrualDate, StudyDate)."""
    import pydicom

    from fetalseg.data.dicom_series import write_dicom_series

    for path in write_dicom_series(np.zeros((8, 8, 4), np.float32), np.eye(4), folder, patient_id="qc"):
        ds = pydicom.dcmread(path)
        for key in ("LastMenstrualDate", "StudyDate", "SeriesDate", "AcquisitionDate"):
            if key in ds:
                delattr(ds, key)
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(str(path))
    return folder


def test_ga_from_dicom_last_menstrual_date(tmp_path: Path):
    with_lmp = _dicom_series(tmp_path / "with", LastMenstrualDate="20260101", StudyDate="20260716")
    assert qc.ga_from_dicom(with_lmp) == pytest.approx(196 / 7)  # 196 days = 28 weeks
    assert qc.ga_from_dicom(_dicom_series(tmp_path / "without", StudyDate="20260716")) is None
    absurd = _dicom_series(tmp_path / "absurd", LastMenstrualDate="20250101", StudyDate="20260716")
    with pytest.raises(qc.GestationalAgeError, match="DICOM"):
        qc.ga_from_dicom(absurd)


def test_plot_draws_a_png(tmp_path: Path):
    median = growth.LIU_2010_CEREBELLUM.median_ml
    points = [
        qc.CasePoint("in", 26.0, qc.tissue_volumes_ml(label_with(median(26.0)), AFFINE)),
        qc.CasePoint("out", 30.0, qc.tissue_volumes_ml(label_with(median(30.0) * 3), AFFINE)),
        qc.CasePoint("undated", None, qc.tissue_volumes_ml(label_with(1.0), AFFINE)),
    ]
    out = qc.plot_growth(points, tmp_path / "plots" / "growth.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
