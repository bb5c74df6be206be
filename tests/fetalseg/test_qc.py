"""Tissue volumes and the GA-aware check against the published curve (fetalseg.growth / fetalseg.qc).

Cases are placed inside and outside the published cerebellum curve on purpose: label maps are built with a chosen
number of cerebellum voxels, so the expected verdict follows from the published equation, not from the phantom.
"""

from __future__ import annotations

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


def test_published_table_and_mapping():
    cbv = growth.measure("cerebellum").reference
    # Ren et al. 2022 Table 1, CBV at completed week 28: 5.63 ± 0.70 ml; 28.9 weeks is still week 28
    assert cbv.mean_sd(28.0) == cbv.mean_sd(28.9) == (5.63, 0.70)
    assert cbv.mean_sd(19.0) == (1.32, 0.15) and cbv.mean_sd(37.99) == (18.83, 0.64)
    assert not cbv.covers(18.9) and not cbv.covers(38.0)
    with pytest.raises(ValueError):
        cbv.mean_sd(38.0)
    # the table is internally consistent: TBV = GMV + SBV + CBV + BM and ICV = TBV + e-CSFV + VV (within rounding)
    for week in range(19, 38):
        mean = {m.reference.key: m.reference.mean_sd(week)[0] for m in growth.MEASURES if m.reference}
        assert mean["TBV"] == pytest.approx(mean["GMV"] + mean["SBV"] + mean["CBV"] + mean["BM"], rel=0.07)
        assert mean["ICV"] == pytest.approx(mean["TBV"] + mean["e-CSFV"] + mean["VV"], rel=0.07)
    # mapping: the tissues' values are the bundle's; white and deep grey matter are only published together
    from fetalseg.labels import label_ids

    ids = label_ids()
    for m in growth.MEASURES[:7]:
        assert m.labels == (ids[m.name],)
    assert growth.measure("white_matter").reference is None and growth.measure("deep_grey_matter").reference is None
    assert growth.measure("subcortical").labels == (ids["white_matter"], ids["deep_grey_matter"])
    assert growth.measure("intracranial").labels == tuple(range(1, 8))


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
    ("ga", "z", "status"),
    [(28.0, 0.0, "ok"), (28.5, 2.9, "ok"), (28.0, -2.9, "ok"), (28.0, 3.2, "high"), (28.0, -3.2, "low"),
     (22.0, 0.0, "ok"), (34.0, -4.0, "low"), (36.2, 5.0, "high")],
)  # fmt: skip
def test_cases_inside_and_outside_the_published_range(ga, z, status):
    mean, sd = growth.measure("cerebellum").reference.mean_sd(ga)
    report = qc.assess_label(label_with(mean + z * sd), AFFINE, ga, ga_source="test")
    cerebellum = next(t for t in report["tissues"] if t["tissue"] == "cerebellum")
    assert cerebellum["status"] == status
    assert cerebellum["z"] == pytest.approx(z, abs=0.01)
    assert cerebellum["expected_ml"] == mean and cerebellum["sd_ml"] == sd
    assert any(f.startswith("Cerebellum ") for f in report["flags"]) is (status != "ok")
    if status != "ok":
        assert f"{ga:g} weeks" in report["flags"][0] and "z = " in report["flags"][0]
    no_ref = {t["tissue"] for t in report["tissues"] if t["status"] == "no reference"}
    assert no_ref == {"white_matter", "deep_grey_matter"}


@pytest.mark.parametrize("ga", [19.0, 23.5, 28.0, 32.3, 37.9])
def test_a_case_at_the_published_means_is_normal_everywhere(ga):
    shape = (160, 160, 160)  # 4.1 M voxels of 0.5 mm (512 ml): room for the 37-week intracranial volume (492 ml)
    label = qc.label_with_volumes(qc.typical_volumes_ml(ga), shape, AFFINE)
    report = qc.assess_label(label, AFFINE, ga)
    assert not report["flagged"], report["flags"]
    z = {t["tissue"]: t["z"] for t in report["tissues"] if "z" in t}
    assert set(z) == {m.name for m in growth.MEASURES if m.reference}
    assert all(abs(v) < 1.0 for v in z.values()), z  # sums of means land near the published sums
    # the same case read as 4 weeks older: the brain is far too small
    older = qc.assess_label(label, AFFINE, min(ga + 4, 37.0))
    assert older["flagged"] == (ga <= 33) and (not older["flagged"] or "Total brain" in " ".join(older["flags"]))


def test_label_with_volumes_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        qc.label_with_volumes({"grey_matter": 1000.0}, (10, 10, 10), AFFINE)


def test_sums_are_checked_too():
    """A grey-matter-only label map is far below Ren's total brain volume and far above its cortex."""
    report = qc.assess_label(label_with(0.0), AFFINE, 28.0)  # 60³ voxels of grey matter = 27 ml, no cerebellum
    by = {t["tissue"]: t for t in report["tissues"]}
    assert by["grey_matter"]["status"] == "ok"  # 27.0 ml vs 29.98 ± 2.66
    assert by["total_brain"]["status"] == "low" and by["total_brain"]["volume_ml"] == pytest.approx(27.0)
    assert by["cerebellum"]["status"] == "low" and by["subcortical"]["status"] == "low"
    assert report["flagged"] and len(report["flags"]) == sum(t["flagged"] for t in report["tissues"])


def test_same_volume_flagged_at_one_age_normal_at_another():
    label = label_with(growth.measure("cerebellum").reference.mean_sd(33.0)[0])  # normal for 33 weeks
    checks = {w: qc.assess_label(label, AFFINE, w)["tissues"][4] for w in (33.0, 24.0)}
    assert checks[33.0]["status"] == "ok" and checks[24.0]["status"] == "high"


def test_missing_ga_reports_volumes_without_flags():
    report = qc.assess_label(label_with(50.0), AFFINE, None)
    assert report["status"] == "no GA" and report["flagged"] is False and report["flags"] == []
    assert "gestational age unknown" in report["message"]
    assert report["volumes_ml"]["cerebellum"] == pytest.approx(50.0, abs=0.001)


def test_ga_outside_the_published_weeks_is_not_compared():
    for ga in (16.0, 38.0, 43.0):
        report = qc.assess_label(label_with(50.0), AFFINE, ga)
        statuses = {t["status"] for t in report["tissues"]}
        assert statuses == {"outside reference GA range", "no reference"} and not report["flagged"]


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
    mean_sd = growth.measure("cerebellum").reference.mean_sd
    points = [
        qc.CasePoint("in", 26.0, qc.tissue_volumes_ml(label_with(mean_sd(26.0)[0]), AFFINE)),
        qc.CasePoint("out", 30.0, qc.tissue_volumes_ml(label_with(mean_sd(30.0)[0] * 3), AFFINE)),
        qc.CasePoint("undated", None, qc.tissue_volumes_ml(label_with(1.0), AFFINE)),
    ]
    out = qc.plot_growth(points, tmp_path / "plots" / "growth.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
