"""Typed configs: YAML + --set overrides, refused keys and types name the key and the nearest valid one."""

import pytest

from dints3d.config import config_from_dict, config_path, config_to_dict, load_config
from dints3d.utils.errors import DintsError
from dints3d.utils.io import load_yaml_text


def test_packaged_configs_load_and_round_trip():
    for name in ("demo", "dints_search"):
        cfg = load_config(config_path(name))
        assert config_from_dict(config_to_dict(cfg)) == cfg
    ref = load_config(config_path("dints_search"))
    assert (ref.dints.num_blocks, ref.dints.num_depths, ref.dints.channel_mul) == (12, 4, 0.5)
    # the reference recipe searches and trains on the plan's patch, not a fixed 96^3
    assert ref.data.patch_size is None and ref.train.patch_size is None and ref.search.ram_cost_factor == 0.8


def test_overrides_apply_in_order_with_yaml_values(tmp_path):
    cfg = load_config(config_path("demo"), ["search.lr=0.1", "data.patch_size=[64, 64, 32]", "search.lr=0.2",
                                            "data.cache_dir=/tmp/c", "plan.patch_size=[8,8,8]"])
    assert cfg.search.lr == 0.2 and cfg.data.patch_size == [64, 64, 32] and cfg.data.cache_dir == "/tmp/c"
    assert cfg.plan == {"patch_size": [8, 8, 8]}
    assert load_config(None, ["search.lr=1"]).search.lr == 1.0  # ints are accepted for floats


@pytest.mark.parametrize(
    "yaml_text, override, message",
    [
        ("search:\n  lrr: 0.1\n", None, "unknown key 'search.lrr'; did you mean 'search.lr'?"),
        ("serch:\n  lr: 0.1\n", None, "unknown key 'serch'; did you mean 'search'?"),
        ("search:\n  amp: maybe\n", None, "'search.amp' must be bool, got 'maybe'"),
        ("data:\n  patch_size: 96\n", None, "'data.patch_size' must be list of int or NoneType, got 96"),
        ("search: 3\n", None, "'search.' must be a mapping"),
        ("search: [1\n", None, "invalid YAML"),
        ("", "dints.num_blocks=two", "'dints.num_blocks' must be int, got 'two'"),
        ("", "nokey", "expected key=value"),
        ("", "search.warmup_fraction=2", "'search.warmup_fraction' must be in [0, 1], got 2.0"),
        ("", "search.iterations=1e3", "'search.iterations' must be int, got 1000.0"),  # no silent float → int
        ("", "search.lr=.nan", "'search.lr' must be a finite number, got nan"),
        ("search:\n  arch_lr: 1e999\n", None, "'search.arch_lr' must be a finite number, got inf"),
        ("", "search.lr=1" + "0" * 400, "'search.lr' must be a finite number"),  # an int beyond float range
        ("", "search.memory_budget_gb=-.inf", "'search.memory_budget_gb' must be float or NoneType, got -inf"),
        # a key given twice: PyYAML would keep the last one silently
        ("search:\n  iterations: 5\nsearch:\n  lr: 0.1\n", None,
         "invalid YAML at line 3: found duplicate key 'search'"),
        ("search:\n  lr: 0.1\n  lr: 0.2\n", None, "invalid YAML at line 3: found duplicate key 'lr'"),
        ("search: " + "[" * 100_000, None, "invalid YAML: nested too deeply"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(tmp_path, yaml_text, override, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(DintsError) as e:
        load_config(path, [override] if override else [])
    assert message in e.value.line()
    assert e.value.where == ("--set" if override else str(path))


def test_scientific_notation_is_a_float_in_files_and_overrides(tmp_path):
    """YAML 1.1 (PyYAML's safe_load) reads 1e-3 as the string '1e-3'; configs follow YAML 1.2 and read a float."""
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  arch_lr: 1e-3\n  weight_decay: 4.0e-5\n  lr: 2.5E-2\n  iterations: 10\n"
                    "data:\n  patch_size: [64, 64, 32]\nplan:\n  target_spacing: [1e0, 1e0, 2.5e0]\n")
    cfg = load_config(path, ["search.momentum=9e-1", "search.memory_budget_gb=1.0e1", "search.lr_min=-1e-4"])
    s = cfg.search
    assert (s.arch_lr, s.weight_decay, s.lr, s.momentum, s.memory_budget_gb) == (1e-3, 4e-5, 2.5e-2, 0.9, 10.0)
    assert s.lr_min == -1e-4 and cfg.plan["target_spacing"] == [1.0, 1.0, 2.5]
    assert all(type(v) is float for v in cfg.plan["target_spacing"])
    # integers stay integers
    assert type(s.iterations) is int and cfg.data.patch_size == [64, 64, 32]
    assert all(type(v) is int for v in cfg.data.patch_size)
    assert load_yaml_text("[1, -2, 0x10, 1_000, 1.5, 1e3, .5e-1, -2E+2, .inf, 1e, e3, 1.2.3]")[:8] == [
        1, -2, 16, 1000, 1.5, 1000.0, 0.05, -200.0]
    assert [type(v) for v in load_yaml_text("[1, 1e3, 1e, e3, 1.2.3]")] == [int, float, str, str, str]


def test_unknown_config_name_is_refused():
    with pytest.raises(DintsError, match="config file not found"):
        config_path("no_such_config")


def test_bundle_set_values_read_scientific_notation_as_numbers():
    """`dints3d train/infer --set` values are checked as what `monai.bundle run` will receive (fire: 5e-1 is 0.5)."""
    from dints3d.bundle.runner import parse_set

    assert parse_set("cache_rate=5e-1") == ("cache_rate", "5e-1", 0.5)
    assert parse_set("num_iterations=10")[2] == 10
    assert parse_set("dataset_dir=/data/Task09")[2] == "/data/Task09"
    assert parse_set("x=[1, 2")[2] == "[1, 2"  # not YAML: stays text


def test_overlays_apply_after_the_config_and_before_set(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("data:\n  patch_size: [64, 64, 64]\n  batch_size: 3\nsearch:\n  checkpoint_cells: true\n")
    second.write_text("# a comment\ndata:\n  batch_size: 2\n")
    cfg = load_config(config_path("demo"), ["data.batch_size=4"], [first])
    assert cfg.data.patch_size == [64, 64, 64] and cfg.data.batch_size == 4 and cfg.search.checkpoint_cells
    cfg = load_config(config_path("demo"), [], [first, second])
    assert cfg.data.batch_size == 2 and cfg.dints.num_blocks == 4  # the rest is the config's
    assert load_config(None, [], [second]).data.batch_size == 2


@pytest.mark.parametrize("text, message", [("data:\n  batch_sise: 2\n", "did you mean 'data.batch_size'?"),
                                           ("data:\n  batch_size: 0\n", "'data.batch_size' must be ≥ 1"),
                                           ("search:\n  checkpoint_fraction: 2\n", "must be in [0, 1]")])
def test_a_bad_overlay_is_named(tmp_path, text, message):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(text)
    with pytest.raises(DintsError) as e:
        load_config(config_path("demo"), [], [overlay])
    assert message in e.value.line() and e.value.where == str(overlay)
