from fetalseg import labels


def test_labels_are_the_feta_set_in_value_order():
    names = labels.label_names()
    assert names == {
        0: "background",
        1: "external_csf",
        2: "grey_matter",
        3: "white_matter",
        4: "ventricles",
        5: "cerebellum",
        6: "deep_grey_matter",
        7: "brainstem",
    }
    assert labels.num_classes() == 8
    assert labels.max_label() == 7
    assert [lab.value for lab in labels.foreground_labels()] == list(range(1, 8))


def test_every_tissue_has_a_distinct_colour_and_display_name():
    fg = labels.foreground_labels()
    assert len({lab.color for lab in fg}) == len(fg)
    assert all(all(0 <= c <= 255 for c in lab.color) for lab in fg)
    assert labels.all_labels()[1].display_name == "External CSF"
    assert labels.all_labels()[6].display_name == "Deep grey matter"
