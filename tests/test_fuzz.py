"""Property-based fuzzing of the parsers users feed files to: a random or mutated dataset.json, arch.json, config
file or config ``plan:`` section gives a valid result or a DintsError (one clean line), never another exception."""

import json
import shutil

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dints3d.config import load_config
from dints3d.data.dataset import load_plan
from dints3d.data.fingerprint import (
    PLAN_FIELDS,
    check_overrides,
    check_overrides_for_task,
    make_plan,
)
from dints3d.data.msd import read_task
from dints3d.data.prepare import summary
from dints3d.spaces.dints.supernet import DintsSearchSpace
from dints3d.spaces.factory import architecture_from_dict
from dints3d.utils.errors import DintsError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _mutations(document: dict):
    """Replace, delete or retype one (possibly nested) entry of a valid document."""
    def paths(node, prefix=()):
        yield prefix
        if isinstance(node, dict):
            for k, v in node.items():
                yield from paths(v, (*prefix, k))
        elif isinstance(node, list):
            for i, v in enumerate(node[:3]):
                yield from paths(v, (*prefix, i))

    all_paths = [p for p in paths(document) if p]

    @st.composite
    def mutate(draw):
        doc = json.loads(json.dumps(document))
        path = draw(st.sampled_from(all_paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
        return doc

    return mutate()


def _must_be_clean(call):
    try:
        call()
    except DintsError as e:
        line = e.line()
        assert line and "\n" not in line


@pytest.fixture(scope="module")
def task(small_task):
    return small_task.task


@pytest.fixture(scope="module")
def arch_document():
    arch, _ = DintsSearchSpace(1, 2, num_blocks=3, num_depths=3, channel_mul=0.125).decode()
    return arch.to_dict()


@FUZZ
@given(data=st.data())
def test_mutated_dataset_json(task, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("t")
    copy = shutil.copytree(task, folder / "task")
    document = json.loads((task / "dataset.json").read_text())
    (copy / "dataset.json").write_text(json.dumps(data.draw(_mutations(document))))
    _must_be_clean(lambda: read_task(copy))


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_random_dataset_json_text(task, tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("r")
    (folder / "dataset.json").write_text(text)
    _must_be_clean(lambda: read_task(folder))


@FUZZ
@given(data=st.data())
def test_mutated_arch_json(arch_document, data):
    _must_be_clean(lambda: architecture_from_dict(data.draw(_mutations(arch_document)), "arch.json"))


@FUZZ
@given(value=json_values)
def test_random_arch_json(value):
    _must_be_clean(lambda: architecture_from_dict(value, "arch.json"))


CONFIG = yaml.safe_load("""
space: dints
seed: 0
data: {fold: 0, patch_size: [32, 32, 32], batch_size: 1, cache_rate: 1.0}
dints: {num_blocks: 4, num_depths: 3, channel_mul: 0.25}
search: {iterations: 10, warmup_fraction: 0.5, lr: 0.025, arch_betas: [0.5, 0.999], amp: false}
plan: {patch_size: [32, 32, 32]}
""")


@FUZZ
@given(data=st.data())
def test_mutated_config_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("c") / "config.yaml"
    path.write_text(yaml.safe_dump(data.draw(_mutations(CONFIG))))
    _must_be_clean(lambda: load_config(path))


@FUZZ
@given(text=st.text(max_size=200), overrides=st.lists(st.text(max_size=30), max_size=3))
def test_random_config_text_and_overrides(tmp_path_factory, text, overrides):
    path = tmp_path_factory.mktemp("c") / "config.yaml"
    path.write_text(text)
    _must_be_clean(lambda: load_config(path, overrides))


# ---- plan overrides: a config's plan: section reaches make_plan (prepare) and load_plan (search, training) ----

plan_values = st.one_of(
    json_values,
    st.lists(st.integers(-40, 200) | st.floats(-1, 200) | st.just(float("nan")), max_size=4),
    st.sampled_from(["RAS", "LPS", "RAA", "", "CT", "MR", None, 0, 2, 3, 32]),
    st.lists(st.fixed_dictionaries(
        {"modality": st.sampled_from(["CT", "MR", "", 3]), "scheme": st.sampled_from(["ct", "zscore_nonzero", "z"])},
        optional={"clip": st.lists(st.floats(-2000, 2000) | st.just(float("inf")), max_size=3), "mean": st.floats(),
                  "std": st.floats(), "cilp": st.none()}), max_size=3),
    st.lists(st.sampled_from(["background", "organ", "lesion", "", 1]), max_size=4),
    st.dictionaries(st.sampled_from(["0", "1", "2", "3"]) | st.integers(0, 3), st.sampled_from(["bg", "a", "b", ""]),
                    max_size=4),
)
plan_keys = st.sampled_from(PLAN_FIELDS) | st.text(max_size=8)


@pytest.fixture(scope="module")
def prepared(small_task):
    return small_task.outputs, small_task.work


def _outcome(call):
    """(result, True) or (None, False) for a DintsError with a one-line message; any other exception fails."""
    try:
        return call(), True
    except DintsError as e:
        assert e.line() and "\n" not in e.line()
        return None, False


def _near_valid_overrides(plan: dict):
    """Some fields of a valid plan, as they are or with one entry replaced, deleted or retyped."""
    @st.composite
    def draw(draw):
        keys = draw(st.lists(st.sampled_from(PLAN_FIELDS), min_size=1, max_size=5, unique=True))
        document = {k: plan[k] for k in keys}
        return draw(st.just(document) | _mutations(document))

    return draw()


@FUZZ
@given(data=st.data(), divisor=st.sampled_from([8, 16, 32]))
def test_plan_overrides_give_a_valid_plan_or_one_line(prepared, data, divisor):
    outputs, work = prepared
    fp = outputs["fingerprint"]
    overrides = data.draw(st.dictionaries(plan_keys, plan_values, max_size=4)
                          | _near_valid_overrides(outputs["plan"]))
    _, early_ok = _outcome(lambda: check_overrides_for_task(overrides, "--set", fp["modalities"], fp["labels"],
                                                            divisor))
    plan, ok = _outcome(lambda: make_plan(fp, divisor, overrides, "--set"))
    if ok:
        assert early_ok  # prepare's check before reading cases refuses nothing that make_plan would accept
        check_overrides({k: plan[k] for k in PLAN_FIELDS}, "plan.json")  # every field of the result well-formed
        assert all(p % plan["patch_divisor"] == 0 for p in plan["patch_size"])
        json.dumps(plan, allow_nan=False)
        assert summary({**outputs, "plan": plan}, work)
    _outcome(lambda: load_plan(work, overrides, "--set"))


@FUZZ
@given(key=plan_keys, text=st.text(max_size=40) | plan_values.map(json.dumps))
def test_plan_set_text_reaches_the_plan(prepared, key, text):
    """``--set plan.KEY=TEXT`` through the config parser into the plan, as ``dints3d prepare`` does."""
    outputs, work = prepared
    cfg, ok = _outcome(lambda: load_config(None, [f"plan.{key}={text}"]))
    if ok:
        _outcome(lambda: make_plan(outputs["fingerprint"], 32, cfg.plan, "--set"))
        _outcome(lambda: load_plan(work, cfg.plan, "--set"))
