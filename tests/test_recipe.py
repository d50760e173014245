"""Recipes: validation with messages that name the key, overrides, built-in recipes, strategies."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynconvert
from dynconvert.errors import DynconvertError
from dynconvert.recipe import (
    Recipe,
    apply_override,
    build_recipe,
    builtin_recipe_names,
    from_dict,
    parse_override,
    read_recipe_source,
    strategy_config,
    validate_recipe,
)
from dynconvert.strategies import Strategy, get_strategy, list_strategies, register_strategy

TOP_KEYS = ["calibrate", "data", "device", "evaluate", "model", "models", "options", "seed", "strategy", "train"]


def build(*overrides: str, **kwargs) -> Recipe:
    return build_recipe(model=kwargs.pop("model", "cifar_resnet20"), overrides=list(overrides), **kwargs)


def test_defaults_are_valid():
    recipe = from_dict(Recipe, {"model": {"name": "resnet18"}})
    validate_recipe(recipe)
    assert recipe.strategy == "early-exit" and recipe.device == "cpu"


def test_unknown_top_level_key_names_it_and_the_valid_ones():
    with pytest.raises(DynconvertError) as err:
        from_dict(Recipe, {"trian": {"epochs": 3}})
    message = str(err.value)
    assert "'trian'" in message
    assert all(key in message for key in TOP_KEYS)


def test_unknown_nested_key_names_the_full_key_and_the_valid_ones():
    with pytest.raises(DynconvertError) as err:
        build("train.epoch=3")
    message = str(err.value)
    assert "'train.epoch'" in message
    assert "epochs" in message and "distill_weight" in message
    assert "model" not in message.split("valid keys here:")[1]  # the keys of this section only


def test_unknown_key_in_a_recipe_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("strategy: early-exit\ncalibrate:\n  max_acuracy_drop: 0.02\n")
    with pytest.raises(DynconvertError) as err:
        build_recipe(str(path), model="cifar_resnet20")
    assert "'calibrate.max_acuracy_drop'" in str(err.value)
    assert str(path) in str(err.value)
    assert "max_accuracy_drop" in str(err.value)


def test_unknown_strategy_option_names_it():
    with pytest.raises(DynconvertError, match=r"'options\.head_pools'.*head_pool"):
        build("options.head_pools=2")


@pytest.mark.parametrize(
    "override,key,expected",
    [
        ("train.epochs=three", "train.epochs", "int"),
        ("train.epochs=2.5", "train.epochs", "int"),
        ("model.pretrained=3", "model.pretrained", "bool"),
        ("train.lr=fast", "train.lr", "float"),
        ("seed=true", "seed", "int"),
        ("model.leaf_modules={a: 1}", "model.leaf_modules", "str"),
        ("options={a: 1, b: 2}", "options.a", "valid keys"),
        ("options=[1, 2]", "options", "mapping"),
        ("train=5", "train", "mapping"),
    ],
)
def test_wrong_type_names_the_key(override, key, expected):
    with pytest.raises(DynconvertError) as err:
        build(override)
    assert f"'{key}'" in str(err.value) or f"section '{key}'" in str(err.value)
    assert expected in str(err.value)


def test_int_is_accepted_where_a_float_is_expected():
    recipe = build("train.lr=1", "calibrate.max_accuracy_drop=0")
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    assert recipe.calibrate.max_accuracy_drop == 0.0


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.calibration_fraction=0.95", "data.calibration_fraction"),
        ("data.batch_size=0", "data.batch_size"),
        ("train.epochs=-1", "train.epochs"),
        ("train.distill_weight=1.5", "train.distill_weight"),
        ("train.lr=-0.1", "train.lr"),
        ("calibrate.max_accuracy_drop=2", "calibrate.max_accuracy_drop"),
        ("calibrate.criterion=margin", "calibrate.criterion"),
        ("calibrate.reference=teacher", "calibrate.reference"),
        ("options.latency_runtime=tensorrt", "options.latency_runtime"),
        ("options.latency_threads=-1", "options.latency_threads"),
        ("options.head_overhead_mflops=-1", "options.head_overhead_mflops"),
        ("device=tpu", "device"),
        ("options.fractions=[0.2, 1.2]", "options.fractions"),
        ("options.head_pool=0", "options.head_pool"),
        ("options.head_norm=group", "options.head_norm"),
        ("options.head_activation=tanh", "options.head_activation"),
        ("options.token_pooling=max", "options.token_pooling"),
    ],
)
def test_out_of_range_value_names_the_key(override, key):
    with pytest.raises(DynconvertError, match=re.escape(f"'{key}'")):
        build(override)


@pytest.mark.parametrize(
    "override,key",
    [
        # measure_latency: statistics.median([]) raises StatisticsError after the whole conversion
        ("evaluate.latency_samples=-1", "evaluate.latency_samples"),
        # seed_everything: np.random.seed(-1) raises ValueError, a traceback instead of exit status 2
        ("seed=-1", "seed"),
        # comparisons with NaN are False, so NaN passes every _check_range
        ("train.lr=.nan", "train.lr"),
        # nn.Linear(64, -3) raises RuntimeError in build_model
        ("model.num_classes=-3", "model.num_classes"),
    ],
)
def test_values_that_crash_later_are_rejected(override, key):
    with pytest.raises(DynconvertError, match=re.escape(f"'{key}'")):
        build(override)


def test_parse_override():
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("calibrate.max_accuracy_drop=null") == (["calibrate", "max_accuracy_drop"], None)
    assert parse_override("calibrate.flops_ratio=0.5") == (["calibrate", "flops_ratio"], 0.5)
    assert parse_override("model.pretrained=false") == (["model", "pretrained"], False)
    assert parse_override("options.fractions=[0.2, 0.5]") == (["options", "fractions"], [0.2, 0.5])
    assert parse_override("model.weights=/a/b=c.pt") == (["model", "weights"], "/a/b=c.pt")
    with pytest.raises(DynconvertError, match="KEY=VALUE"):
        parse_override("train.epochs")


def test_apply_override_creates_sections_and_refuses_to_descend_into_values():
    data = {"train": {"lr": 0.1}}
    apply_override(data, ["train", "epochs"], 3)
    apply_override(data, ["options", "head_pool"], 2)
    assert data == {"train": {"lr": 0.1, "epochs": 3}, "options": {"head_pool": 2}}
    with pytest.raises(DynconvertError, match="not a section"):
        apply_override(data, ["train", "lr", "x"], 1)


def test_overrides_switch_the_calibration_target():
    recipe = build("train.epochs=3", "calibrate.max_accuracy_drop=null", "calibrate.flops_ratio=0.5")
    assert recipe.train.epochs == 3
    assert recipe.calibrate.max_accuracy_drop is None and recipe.calibrate.flops_ratio == 0.5


@pytest.mark.parametrize(
    "overrides", [["calibrate.max_accuracy_drop=null"], ["calibrate.flops_ratio=0.5"]], ids=["none", "both"]
)
def test_exactly_one_calibration_target(overrides):
    with pytest.raises(DynconvertError, match="exactly one of max_accuracy_drop and flops_ratio"):
        build(*overrides)


def test_overrides_as_a_dict_and_last_wins():
    recipe = build_recipe(model="cifar_resnet20", overrides={"train.epochs": 4, "train.lr": 0.5})
    assert (recipe.train.epochs, recipe.train.lr) == (4, 0.5)
    assert build("train.epochs=3", "train.epochs=7").train.epochs == 7


def test_builtin_recipe_found_by_name():
    assert "cifar_resnet-early-exit" in builtin_recipe_names()
    data, source = read_recipe_source("cifar_resnet-early-exit")
    assert "built-in recipe 'cifar_resnet-early-exit'" in source
    recipe = build_recipe("cifar_resnet-early-exit", model="cifar_resnet56")
    assert recipe.model.name == "cifar_resnet56"
    assert recipe.train.lr == data["train"]["lr"]
    assert recipe.options["fractions"] == data["options"]["fractions"]
    # without --recipe, the model family's built-in recipe is the default
    assert build_recipe(model="cifar_resnet110") == build_recipe("cifar_resnet-early-exit", model="cifar_resnet110")


def test_no_builtin_recipe_means_plain_defaults():
    recipe = build_recipe(model="resnet18")
    assert recipe.train == type(recipe.train)()
    assert recipe.options == {}


def test_unknown_recipe_lists_the_builtin_ones():
    with pytest.raises(DynconvertError, match="neither a built-in recipe.*cifar_resnet-early-exit"):
        build_recipe("no-such-recipe", model="cifar_resnet20")


@pytest.mark.parametrize("text,expected", [("train: [1\n", "not valid YAML"), ("- 1\n- 2\n", "mapping")])
def test_bad_recipe_file(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DynconvertError, match=expected):
        build_recipe(str(path), model="cifar_resnet20")


def test_a_recipe_needs_a_model():
    with pytest.raises(DynconvertError, match="names no model"):
        build_recipe()


def test_unknown_strategy_lists_the_available_ones():
    with pytest.raises(DynconvertError) as err:
        build(strategy="block-dorp")
    assert "'block-dorp'" in str(err.value)
    assert all(name in str(err.value) for name in list_strategies())
    assert "early-exit" in list_strategies()
    assert dynconvert.list_strategies() == list_strategies()


def test_strategy_names_accept_underscores():
    assert get_strategy("early_exit") is get_strategy("early-exit")


def test_outside_code_can_register_a_strategy(monkeypatch):
    from dataclasses import dataclass

    from dynconvert.strategies import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @dataclass
    class NoopConfig:
        keep: float = 1.0

    @register_strategy
    class Noop(Strategy):
        name = "noop"
        config_class = NoopConfig

    assert "noop" in list_strategies()
    recipe = build("options.keep=0.5", strategy="noop")
    assert strategy_config(recipe) == NoopConfig(keep=0.5)
    with pytest.raises(DynconvertError, match="'options.drop'"):
        build("options.drop=0.5", strategy="noop")


def test_recipe_yaml_round_trip():
    recipe = build("train.epochs=3", "options.fractions=[0.25, 0.5]", "model.leaf_modules=[layer1]")
    again = from_dict(Recipe, yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    validate_recipe(again)


# --- fuzz: from_dict never raises anything but DynconvertError -------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["early-exit", "cpu", "cuda:1", "max_softmax", "entropy", "labels", "mean", "layer1"])
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3),
    max_leaves=8,
)


def _typed(hint) -> st.SearchStrategy:
    """Values of the type ``hint`` asks for, often outside the valid range."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint):
        return st.none() | _typed(args[0])
    if typing.get_origin(hint) is list:
        return st.lists(_typed(args[0]), max_size=3)
    if typing.get_origin(hint) is dict or hint is typing.Any:
        return st.dictionaries(st.text(max_size=6), _values, max_size=2)
    return {
        bool: st.booleans(),
        int: st.integers(-3, 600),
        float: st.floats(-0.5, 1.5) | st.sampled_from([0.0, 1.0, float("nan"), float("inf")]),
        str: st.sampled_from(["early-exit", "cpu", "cuda:0", "tpu", "max_softmax", "entropy", "labels", "cls", "x"]),
    }.get(hint, _values)


def _section(cls) -> st.SearchStrategy:
    """Dicts for dataclass ``cls``: its own keys with values of the declared type, sometimes a stray key."""
    hints = typing.get_type_hints(cls)
    valid = st.fixed_dictionaries({}, optional={f.name: _typed(hints[f.name]) for f in dataclasses.fields(cls)})
    stray = st.dictionaries(st.text(max_size=6), _values, min_size=1, max_size=2)
    return st.one_of(valid, valid, valid, valid, st.builds(lambda a, b: {**a, **b}, valid, stray))


def _recipe_dicts() -> st.SearchStrategy:
    """Recipe-shaped dicts (typed, mostly valid keys, values often out of range) and arbitrary ones."""
    hints = typing.get_type_hints(Recipe)
    sections = {
        f.name: _section(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else _typed(hints[f.name])
        for f in dataclasses.fields(Recipe)
    }
    sections["options"] = _section(get_strategy("early-exit").config_class)
    typed = st.fixed_dictionaries({}, optional=sections)
    untyped = st.fixed_dictionaries({}, optional={k: _values for k in sections})
    anything = st.dictionaries(st.text(max_size=6) | st.integers(-2, 2), _values, max_size=4)
    return st.one_of(typed, typed, typed, untyped, anything)


@settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(_recipe_dicts())
def test_fuzz_from_dict_builds_or_raises_dynconvert_error(data):
    try:
        recipe = from_dict(Recipe, data)
    except DynconvertError as exc:
        assert str(exc)
        return
    assert isinstance(recipe, Recipe)
    try:
        validate_recipe(recipe)
    except DynconvertError:
        return
    assert isinstance(recipe.train.epochs, int) and recipe.train.epochs >= 0
    assert isinstance(recipe.train.lr, float) and not recipe.train.lr < 0


def test_a_recipe_saved_before_strategy_options_moved_is_upgraded_on_load():
    from dynconvert.recipe import upgrade_saved_recipe

    saved = {
        "strategy": "early-exit",
        "model": {"name": "cifar_resnet20"},
        "train": {"epochs": 2, "tune_backbone": [], "backbone_lr": 1e-4},
        "calibrate": {"max_accuracy_drop": 0.01, "cost": "flops", "head_overhead_mflops": 4.0},
        "options": {"fractions": [0.5]},
    }
    recipe = from_dict(Recipe, upgrade_saved_recipe(saved))
    assert recipe.options == {"fractions": [0.5], "cost": "flops", "head_overhead_mflops": 4.0}
    assert strategy_config(recipe).head_overhead_mflops == 4.0
    skipnet = upgrade_saved_recipe({"strategy": "skipnet", "train": {"tune_backbone": ["layer3"], "backbone_lr": 0.01}})
    assert skipnet["options"] == {"tune_backbone": ["layer3"], "backbone_lr": 0.01} and skipnet["train"] == {}


def test_keys_that_moved_say_where_they_went():
    with pytest.raises(DynconvertError, match="has moved: set 'options.cost"):
        build("calibrate.cost=latency")
