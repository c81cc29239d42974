import json

import pytest

import fxquant
from fxquant.schemes import Int4WeightOnly, Int8WeightOnly, parse_scheme, valid_scheme_names
from fxquant.spec import Pattern, Spec

ISSUE_SPEC = dict(default="int4wo-128", skip=["lm_head", "re:.*router.*"],
                  rules={r"re:layers\.0\..*": "int8wo", "layers.*.mlp.down_proj": None})


def test_precedence_skip_then_rules_then_default():
    s = Spec(**ISSUE_SPEC)
    assert s.choose("lm_head").scheme is None and s.choose("lm_head").source == "skip['lm_head']"
    assert s.choose("layers.0.mlp.down_proj").scheme == Int8WeightOnly()  # first matching rule wins
    assert s.choose("layers.3.mlp.down_proj").scheme is None
    assert s.choose("layers.3.mlp.up_proj") == s.choose("layers.3.mlp.up_proj")
    assert s.choose("layers.3.mlp.up_proj").scheme == Int4WeightOnly(group_size=128)
    assert s.choose("layers.3.mlp.up_proj").source == "default"
    assert s.choose("moe.router.gate").scheme is None  # skip wins over default


def test_patterns_anchor_at_module_boundaries():
    assert Pattern("lm_head").matches("lm_head")
    assert Pattern("layers.0.q_proj").matches("model.layers.0.q_proj")
    assert not Pattern("q_proj").matches("layers.0.xq_proj")
    assert not Pattern("layers.0").matches("layers.0.q_proj")  # exact: the whole (suffix) name
    assert Pattern("layers.*.q_proj").matches("model.layers.11.q_proj")
    assert Pattern("layers.?.q_proj").matches("layers.1.q_proj") and not Pattern("layers.?.q_proj").matches("layers.10.q_proj")
    assert Pattern(r"re:layers\.(0|1)\..*").matches("model.layers.1.mlp.up_proj")
    assert not Pattern(r"re:layers\.(0|1)").matches("layers.1.mlp")  # fullmatch


def test_roundtrip_is_json_safe():
    s = Spec(**ISSUE_SPEC)
    d = json.loads(json.dumps(s.to_dict()))
    assert Spec.from_dict(d) == s
    assert d["version"] == 2 and d["rules"]["layers.*.mlp.down_proj"] is None
    assert d["default"] == {"scheme": "int4wo", "group_size": 128, "compute_dtype": None, "method": None}
    obj = Spec(default=Int4WeightOnly(group_size=64), rules=[("a", Int8WeightOnly())])
    assert Spec.from_dict(obj.to_dict()) == obj and obj == Spec(default="int4wo-64", rules={"a": "int8wo"})


def test_frozen():
    with pytest.raises(Exception):
        Spec().default = "int8wo"


@pytest.mark.parametrize("kwargs,match", [
    (dict(default="int4wo-100"), r"Spec.default.*int4wo-100.*valid schemes: int8wo, int4wo-32"),
    (dict(default="int3"), r"Spec.default: unknown scheme 'int3'; valid schemes: .*int4wo-128"),
    (dict(rules={"layers.0": "fp9"}), r"Spec.rules\['layers.0'\]: unknown scheme 'fp9'"),
    (dict(rules={"re:(": "int8wo"}), r"Spec.rules\['re:\('\].*invalid regular expression"),
    (dict(skip="lm_head"), r"Spec.skip must be a list"),
    (dict(skip=["re:["]), r"Spec.skip\[0\].*invalid regular expression"),
])
def test_bad_input_names_the_option_and_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Spec(**kwargs)


def test_unknown_scheme_lists_every_family_grammar():
    """The error names each family's string forms, so a parametrised scheme can be written from it."""
    with pytest.raises(ValueError) as e:
        Spec(default="int9wo")
    msg = str(e.value)
    for form in ("int4wo-<g> (g in 32, 64, 128, 256)", "uint<b>wo-<g>[-axis0|-axis1] (b in 1..8)",
                 "nf4[-<blocksize>][+dq]", "fp4[-<blocksize>][+dq]", "float8dq[-row][-ub<bound>]",
                 "fp<X>_e<A>m<B>", "llm.int8[-<threshold>]", "int8dq", "onebit"):
        assert form in msg
    for name in valid_scheme_names():  # every family that has examples also states its grammar
        assert type(parse_scheme(name)).forms, type(parse_scheme(name)).__name__


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys.*valid: version, default, skip, rules"):
        Spec.from_dict({"defaults": "int8wo"})


def test_unused_entries():
    s = Spec(**ISSUE_SPEC)
    names = ["lm_head", "layers.0.q_proj", "layers.1.q_proj"]
    assert s.unused(names) == ["skip['re:.*router.*']", "rules['layers.*.mlp.down_proj']"]


def test_scheme_strings_and_objects_are_interchangeable():
    for name in valid_scheme_names():
        scheme = parse_scheme(name)
        assert str(scheme) == name and parse_scheme(scheme) is scheme
    assert parse_scheme("INT4WO") == Int4WeightOnly(group_size=128)
    assert fxquant.Spec.coerce("int8wo") == Spec(default="int8wo")
    with pytest.raises(ValueError, match="group_size=7.*valid: 32, 64, 128, 256"):
        Int4WeightOnly(group_size=7)


def test_compute_dtype_roundtrips_and_validates():
    import torch

    s = Spec(default=Int4WeightOnly(group_size=64, compute_dtype=torch.bfloat16))
    d = json.loads(json.dumps(s.to_dict()))
    assert d["default"] == {"scheme": "int4wo", "group_size": 64, "compute_dtype": "bfloat16", "method": None}
    assert Spec.from_dict(d) == s
    with pytest.raises(ValueError, match="compute_dtype=torch.int8 is not supported; valid: None"):
        Int8WeightOnly(compute_dtype=torch.int8)


def test_version_1_dicts_still_read_and_unknown_versions_rejected():
    old = {"default": "int4wo-64", "skip": ["lm_head"], "rules": {"a": "int4wo-128-axis1"}}
    s = Spec.from_dict(old)
    assert s == Spec(default="int4wo-64", skip=["lm_head"], rules={"a": "int4wo-128-sym"})
    assert Spec.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="version 99 is not supported"):
        Spec.from_dict({**s.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="scheme 'int4wo' has no field 'bits'"):
        Spec.from_dict({"version": 2, "default": {"scheme": "int4wo", "bits": 4}})


def test_structured_form_tells_the_int4_formats_apart():
    forms = {name: json.dumps(Spec(default=name).to_dict()["default"], sort_keys=True)
             for name in ("int4wo-128", "int4wo-128-sym", "uint4wo-128", "int8wo", "int8wo-128")}
    assert len(set(forms.values())) == len(forms)
    assert json.loads(forms["int4wo-128-sym"])["symmetric"] is True
    assert json.loads(forms["uint4wo-128"])["symmetric"] is False


def test_a_rule_naming_rtn_opts_out_of_spec_method():
    """``Spec.method`` fills in schemes that name no method; one that names ``@rtn`` (a string, ``RTN()``
    alone, or a format GPTQ cannot take) keeps round-to-nearest, through to_dict / from_dict / JSON."""
    from fxquant.methods import GPTQ, RTN

    spec = Spec(default="int4wo-64", method=GPTQ(), rules={"re:.*q_proj": "int4wo-64@rtn", "re:.*k_proj": RTN(),
                                                          "re:.*v_proj": "nf4@rtn", "re:.*o_proj": "int4wo-32"})
    chosen = {n: spec.choose(f"layers.0.{n}").scheme for n in ("q_proj", "k_proj", "v_proj", "o_proj", "up")}
    assert {n: str(s) for n, s in chosen.items()} == {
        "q_proj": "int4wo-64", "k_proj": "int4wo-64", "v_proj": "nf4-64", "o_proj": "int4wo-32@gptq",
        "up": "int4wo-64@gptq"}
    assert Spec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    named = Spec(default="int8wo@rtn", method=GPTQ(), rules={"x": "int4wo-32"})
    assert str(named.default) == "int8wo" and str(named.rules[0].scheme) == "int4wo-32@gptq"
    assert Spec.from_dict(named.to_dict()) == named
    with pytest.raises(ValueError, match="method 'gptq' cannot quantize nf4-64"):
        Spec(default="int4wo-64", method=GPTQ(), rules={"x": "nf4"})


def test_a_scheme_takes_one_method():
    with pytest.raises(ValueError, match=r"Spec.default: scheme 'int4wo-128@gptq@awq' names more than one method"):
        Spec(default="int4wo-128@gptq@awq")
