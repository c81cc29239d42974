"""``Spec.from_config`` / ``to_config`` for FBGEMM fp8. Oracle: transformers' ``FbgemmFp8Config``
(seed 001: ``activation_scale_ub`` default 1200.0, ``modules_to_not_convert``)."""
import math

import pytest
import torch
from torch import nn

import fxquant
from fxquant import Spec
from fxquant.modules import QuantizedLinear
from fxquant.schemes import Float8DynamicActivation

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("ub", [None, 1200.0, 600.0, math.inf])
def test_real_config_is_float8dq_row(ub):
    kw = {} if ub is None else {"activation_scale_ub": ub}
    for cfg in (transformers.FbgemmFp8Config(**kw), transformers.FbgemmFp8Config(**kw).to_dict()):
        spec = Spec.from_config(cfg)
        assert spec.default == Float8DynamicActivation(granularity="row", activation_scale_ub=ub or 1200.0)
        assert spec.choose("lm_head").scheme is None and spec.notes == ()
    assert str(Spec.from_config(transformers.FbgemmFp8Config()).default) == "float8dq-row"


@pytest.mark.parametrize("cfg,field,valid", [({"activation_scale_ub": 0}, "activation_scale_ub", "> 0"),
                                             ({"activation_scale_ub": "big"}, "activation_scale_ub", "> 0"),
                                             ({"weights": "fp8"}, "weights", "no version")])
def test_invalid_configs_name_config_and_field(cfg, field, valid):
    with pytest.raises(ValueError) as e:
        Spec.from_config({"quant_method": "fbgemm_fp8", **cfg})
    assert str(e.value).startswith(f"FbgemmFp8Config.{field}") and valid in str(e.value)


@pytest.mark.parametrize("scheme", ["float8dq-row", "float8dq-row-ub448.0", "float8dq-row-ubinf"])
def test_round_trip_through_the_real_config(scheme):
    spec = Spec(default=scheme, skip=Spec.from_config(transformers.FbgemmFp8Config()).skip)
    d = spec.to_config("fbgemm_fp8")
    assert Spec.from_config(d) == spec == Spec.from_config(transformers.FbgemmFp8Config(**{
        k: v for k, v in d.items() if k != "quant_method"}))


@pytest.mark.parametrize("spec", [Spec(default="float8dq"), Spec(default="float8wo"), Spec(default="int8dq")], ids=str)
def test_inexpressible_specs_raise(spec):
    with pytest.raises(ValueError, match="to_config\\('fbgemm_fp8'\\).*float8dq-row"):
        spec.to_config("fbgemm_fp8")


def test_end_to_end():
    spec = Spec.from_config(transformers.FbgemmFp8Config(activation_scale_ub=600.0, modules_to_not_convert=[]))
    model = nn.Sequential(nn.Linear(128, 64))
    fxquant.quantize_(model, spec, (torch.randn(2, 128),))
    assert isinstance(model[0], QuantizedLinear) and "float8dq-row-ub600.0" in str(fxquant.report(model))
