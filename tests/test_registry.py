from __future__ import annotations

import csv
import json
from typing import Literal

import pytest
from sklearn.metrics import roc_auc_score

from adkit.core.components import Loss
from adkit.core.errors import AdkitError
from adkit.core.grammar import split_spec
from adkit.core.registry import ComponentRejected, DuplicateComponentError, Register, Registry


def make(a: int = 1, b: float = 0.5, flag: bool = False, mode: Literal["x", "y"] = "x",
         sizes: tuple[int, ...] = (3, 5), name: str | None = None):
    """A factory for tests."""
    return {"a": a, "b": b, "flag": flag, "mode": mode, "sizes": sizes, "name": name}


@pytest.fixture
def registry():
    reg = Registry("sampler")  # a kind whose factories may be functions
    Register(reg, "tests")("thing", make)
    Register(reg, "tests")("other", lambda: None, help="other one")
    return reg


def test_split_spec():
    assert split_spec("draem") == ("draem", {})
    assert split_spec(" a:k=1, j = x ") == ("a", {"k": "1", "j": "x"})
    with pytest.raises(AdkitError, match="not key=value"):
        split_spec("a:k")
    with pytest.raises(AdkitError, match="empty"):
        split_spec(":k=1")


def test_values_parse_to_parameter_types(registry):
    built = make(**registry.parse("thing:a=7,b=2,flag=yes,mode=y,sizes=3+5+7,name=none").params)
    assert built == {"a": 7, "b": 2.0, "flag": True, "mode": "y", "sizes": (3, 5, 7), "name": None}
    assert make(**registry.parse("thing").params) == make()
    assert str(registry.parse("thing:sizes=1+2,b=3")) == "thing:b=3.0,sizes=1+2"  # the factory's order


def test_help_defaults_to_first_docstring_line(registry):
    assert registry.get("thing").help == "A factory for tests."
    assert registry.get("other").help == "other one"


def test_unknown_name_lists_close_matches(registry):
    with pytest.raises(AdkitError) as info:
        registry.get("thnig")
    assert "unknown sampler 'thnig'" in info.value.message
    assert "did you mean thing" in info.value.message


@pytest.mark.parametrize("spec,needle", [
    ("thing:zzz=1", "has no parameter 'zzz'; its parameters: a: int"),
    ("thing:a=1.5", "parameter 'a' expects int, got '1.5'"),
    ("thing:a=abc", "parameter 'a' expects int"),
    ("thing:flag=maybe", "parameter 'flag' expects bool"),
    ("thing:mode=z", "parameter 'mode' expects x|y"),
    ("thing:sizes=3+x", "parameter 'sizes' expects int+..."),
])
def test_bad_parameters_name_parameter_and_type(registry, spec, needle):
    with pytest.raises(AdkitError) as info:
        registry.parse(spec)
    assert needle in info.value.message


def test_duplicate_names_error_names_both_plugins(registry):
    with pytest.raises(DuplicateComponentError, match="both plugin 'tests' and plugin 'intruder'"):
        Register(registry, "intruder")("thing", make)


def takes_list(sizes: list[int] = [3]):  # noqa: B006 - the annotation is what is tested
    return sizes


def takes_dict(table: dict | None = None):
    return table


def takes_pair(pair: tuple[int, str] = (1, "a")):
    return pair


@pytest.mark.parametrize("factory,needle", [
    (takes_list, "parameter 'sizes' has type int+... (specs give tuples: write tuple[T, ...])"),
    (takes_dict, "parameter 'table' has type dict | none (specs cannot write it)"),
    (takes_pair, "parameter 'pair' has type int+... (write tuple[T, ...]"),
])
def test_parameter_types_specs_cannot_write_are_refused_at_registration(registry, factory, needle):
    with pytest.raises(ComponentRejected) as info:
        Register(registry, "author")("odd", factory)
    assert "sampler 'odd' of plugin 'author' is not registered: " + needle in str(info.value)
    assert "odd" not in registry
    with pytest.raises(AdkitError, match="is not registered: parameter"):  # asking for it says why
        registry.get("odd")


class MSE(Loss):
    def __init__(self):
        super().__init__()
        self.reduction = "mean"

    def forward(self, prediction, target):
        return (prediction - target).pow(2).mean()


def test_loss_kind_accepts_weight_extra():
    reg = Registry("loss")
    Register(reg, "tests")("mse", MSE)
    spec = reg.parse("mse:weight=0.25")
    assert spec.extras == {"weight": 0.25} and spec.params == {}
    assert reg.parse("mse").extras == {"weight": 1.0}
    assert reg.create("mse:weight=2").reduction == "mean"  # the weight is the caller's, not the factory's
    with pytest.raises(AdkitError, match="'weight' expects float"):
        reg.parse("mse:weight=heavy")


def test_factory_value_error_becomes_user_error():
    reg = Registry("sampler")

    def picky(k: int = 1):
        if k < 1:
            raise ValueError("k must be >= 1")

    Register(reg, "tests")("picky", picky)
    with pytest.raises(AdkitError, match="k must be >= 1"):
        reg.create("picky:k=0")


def test_nested_specs_round_trip_in_parentheses(catalog):
    registry = catalog["detector"]
    parsed = registry.parse("ebm-image:depth=10,sampler=(pyld:M=5,N=3),lr=0.001")
    assert parsed.params["sampler"] == "pyld:M=5,N=3" and parsed.params["lr"] == 0.001
    # one text: parameters in the factory's order, whatever order they were written in
    assert str(parsed) == "ebm-image:depth=10,lr=0.001,sampler=(pyld:M=5,N=3)"
    assert str(registry.parse("ebm-image:lr=0.001,sampler=(pyld:M=5,N=3),depth=10")) == str(parsed)
    assert registry.parse(str(parsed)) == parsed  # what a checkpoint stores reads back
    with pytest.raises(AdkitError, match="a '\\(' without its '\\)'"):
        registry.parse("ebm-image:sampler=(pyld:M=5")


def test_an_ebm_quick_checkpoint_can_be_tested(invoke, tmp_path):
    data = "synthetic:size=32,n_train=6,n_test=6"
    code, _, err = invoke("train", "--detector", "ebm-image", "--data", data, "--category", "tile", "--steps", "2",
                          "--out", str(tmp_path / "run"))
    assert code == 0, err
    code, _, err = invoke("test", "--checkpoint", str(tmp_path / "run" / "tile" / "checkpoint.pt"), "--data", data)
    assert code == 0, err  # the preset's sampler=pyld:M=5,N=3 was split at its comma before
    tested = tmp_path / "run" / "tile" / "test" / "tile"
    metrics = json.loads((tested / "metrics.json").read_text())
    rows = list(csv.DictReader((tested / "scores.csv").open()))
    scores = [float(r["score"]) for r in rows]
    assert metrics["n_test"] == len(rows) == 6 and len(set(scores)) == 6  # a score per image, not a constant
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score([int(r["label"]) for r in rows], scores))
