from fractions import Fraction

import pytest

from advdef.errors import UserError
from advdef.specs import Spec, format_value, parse_eps, parse_spec, parse_value, split_specs


@pytest.mark.parametrize(
    "text, expected",
    [
        ("20", 20),
        ("8/255", Fraction(8, 255)),
        ("0.5", 0.5),
        ("1e-3", 1e-3),
        ("true", True),
        ("off", False),
        ("none", None),
        ("layer4", "layer4"),
    ],
)
def test_parse_value(text, expected):
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("value", [20, Fraction(8, 255), 0.25, True, False, None, "layer4"])
def test_values_round_trip(value):
    assert parse_value(format_value(value)) == value


def test_parse_spec_with_list_and_positional():
    assert parse_spec("pgd:steps=50,restarts=2") == Spec("pgd", {"steps": 50, "restarts": 2})
    assert parse_spec("denoise:op=mean,points=layer2,layer3").params["points"] == ["layer2", "layer3"]
    assert parse_spec("imagefolder:/data/x").params == {"_": "/data/x"}


def test_canonical_spec_round_trips():
    spec = parse_spec("pgd:steps=50,alpha=1/255,restarts=2")
    assert parse_spec(str(spec)) == spec
    assert str(spec) == "pgd:alpha=1/255,restarts=2,steps=50"


@pytest.mark.parametrize("text", ["", ":x=1", "pgd:steps=3,,x", "pgd:steps=", "pgd:steps=1,steps=2", "p gd", "pgd:=3"])
def test_malformed_specs_are_user_errors(text):
    with pytest.raises(UserError):
        parse_spec(text)


@pytest.mark.parametrize("text, expected", [("8/255", Fraction(8, 255)), ("0.031", Fraction(31, 1000)), ("1", Fraction(1))])
def test_eps_is_an_exact_fraction(text, expected):
    assert parse_eps(text) == expected


@pytest.mark.parametrize("text", ["0", "-8/255", "2", "300/255", "abc", "true"])
def test_eps_outside_unit_interval_is_rejected(text):
    with pytest.raises(UserError, match="epsilon"):
        parse_eps(text)


def test_split_specs_keeps_parameters_with_their_attack():
    assert split_specs("fgsm,pgd20,cw,aa") == ["fgsm", "pgd20", "cw", "aa"]
    assert split_specs("fgsm,pgd:steps=50,restarts=2,cw") == ["fgsm", "pgd:steps=50,restarts=2", "cw"]
    assert split_specs("aa:version=custom,attacks=apgd-ce,square,fgsm") == [
        "aa:version=custom,attacks=apgd-ce,square", "fgsm"
    ]
