import math

import numpy as np

from fetalseg.metrics import CaseMetrics, dice_per_label, format_table, hd95_per_label, score_case, summarize


def test_dice_exact_values():
    truth = np.zeros((10, 10, 10), int)
    pred = np.zeros_like(truth)
    truth[2:6, 2:6, 2:6] = 1  # 64 voxels
    pred[2:6, 2:6, 2:4] = 1  # 32 voxels, all inside
    scores = dice_per_label(pred, truth, [1, 2])
    assert scores[1] == 2 * 32 / (64 + 32)
    assert math.isnan(scores[2])  # absent from both: no free 1.0


def test_hd95_in_millimetres():
    truth = np.zeros((20, 20, 20), bool)
    truth[5:15, 5:15, 5:15] = True
    shifted = np.roll(truth, 2, axis=0)
    hd = hd95_per_label(shifted.astype(int), truth.astype(int), [1], spacing=(1.5, 1.0, 1.0))[1]
    assert abs(hd - 3.0) < 1e-6  # 2 voxels along an axis of 1.5 mm
    assert math.isnan(hd95_per_label(np.zeros_like(truth, int), truth.astype(int), [1], spacing=(1, 1, 1))[1])


def test_score_summary_and_table():
    truth = np.zeros((8, 8, 8), int)
    truth[1:4] = 3
    truth[4:7] = 4
    perfect = score_case(truth, truth, case_id="a", site="s1", spacing=(1, 1, 1))
    assert perfect.dice["white_matter"] == 1.0 and perfect.dice["ventricles"] == 1.0
    assert math.isnan(perfect.dice["cerebellum"]) and perfect.mean_dice == 1.0
    empty = CaseMetrics("b", "s2", dice={"white_matter": 0.0}, hd95={})
    summary = summarize([perfect, empty])
    assert summary["s1"]["mean"]["dice"] == 1.0
    assert summary["all"]["white_matter"]["dice"] == 0.5
    table = format_table(summary)
    assert table.count("\n") == 4 and "white matter" in table and "n/a" in table
