"""The one "did the settings change on resume" comparison shared by the search, the random search and training."""

from dints3d.utils.resume_settings import changed_settings, leaves, split_changes


def test_leaves_flatten_nested_mappings_to_dotted_keys():
    tree = {"search": {"lr": 0.1, "amp": {"enabled": True}}, "seed": 0, "plan": {}, "patch": [64, 64]}
    assert leaves(tree) == {"search.lr": 0.1, "search.amp.enabled": True, "seed": 0, "patch": [64, 64]}


def test_changed_settings_name_every_differing_leaf_in_key_order():
    before = {"search": {"lr": 0.1, "iterations": 10}, "seed": 0, "arch": {"node_a": [1, 0]}, "gone": None}
    now = {"search": {"lr": 0.2, "iterations": 10}, "seed": 1, "arch": {"node_a": [1, 1]}, "new": 3}
    assert changed_settings(before, now) == {
        "arch.node_a": ([1, 0], [1, 1]), "new": (None, 3), "search.lr": (0.1, 0.2), "seed": (0, 1)}
    assert list(changed_settings(before, now)) == sorted(changed_settings(before, now))
    assert changed_settings(before, before) == {}
    assert changed_settings({"a": None}, {}) == {}  # a missing leaf counts as None


def test_split_changes_allows_listed_keys_and_keys_under_them():
    changes = changed_settings({"search": {"lr": 0.1, "momentum": 0.9}, "data": {"num_workers": 0}, "searchx": 1},
                               {"search": {"lr": 0.2, "momentum": 0.5}, "data": {"num_workers": 4}, "searchx": 2})
    allowed, refused = split_changes(changes, ("search.lr", "data"))
    assert allowed == {"data.num_workers": (0, 4), "search.lr": (0.1, 0.2)}
    assert refused == {"search.momentum": (0.9, 0.5), "searchx": (1, 2)}
    assert split_changes(changes, ()) == ({}, changes)
