"""``Spec.from_config`` / ``to_config`` for EETQ. Oracle: transformers' ``EetqConfig`` (seed 001:
``weights`` "int8" only, ``modules_to_not_convert``)."""
import pytest

from fxquant import Spec
from fxquant.schemes import Int8WeightOnly

transformers = pytest.importorskip("transformers")


def test_real_config_is_int8wo():
    for cfg in (transformers.EetqConfig(), transformers.EetqConfig().to_dict()):
        spec = Spec.from_config(cfg)
        assert spec.default == Int8WeightOnly() and spec.notes == ()
        assert spec.choose("lm_head").scheme is None  # None: transformers skips the output embedding
    spec = Spec.from_config(transformers.EetqConfig(modules_to_not_convert=["vision_tower"]))
    assert spec.choose("model.vision_tower.proj").scheme is None and spec.choose("lm_head").scheme is not None


@pytest.mark.parametrize("cfg,field,valid", [({"weights": "int4"}, "weights", "'int8'"),
                                             ({"weights": "int8", "group_size": 128}, "group_size", "no version")])
def test_invalid_configs_name_config_and_field(cfg, field, valid):
    with pytest.raises(ValueError) as e:
        Spec.from_config({"quant_method": "eetq", **cfg})
    assert str(e.value).startswith(f"EetqConfig.{field}") and valid in str(e.value)


def test_round_trip_through_the_real_config():
    spec = Spec.from_config(transformers.EetqConfig(modules_to_not_convert=["lm_head", "gate"]))
    d = spec.to_config("eetq")
    assert Spec.from_config(d) == spec == Spec.from_config(transformers.EetqConfig.from_dict(d))
    for bad in (Spec(default="int8dq"), Spec(default="int8wo-64"), Spec(default="int8wo@gptq")):
        with pytest.raises(ValueError, match="to_config\\('eetq'\\).*valid: int8wo"):
            bad.to_config("eetq")
