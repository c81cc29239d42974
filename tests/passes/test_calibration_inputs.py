"""Calibration inputs as users give them: batches that break a traced shape guard, padded batches on a
trace that takes attention_mask, items that are not model inputs, method parameters that are not the
method's."""
import pytest
import torch
from torch import nn

import fxquant
from fxquant.methods import GPTQ
from passes.test_calibrate import IDS, TwoLinears, _batches, _Masked, _xs


class _BranchOnBatch(nn.Module):
    """Branches on a batch of one, as Hugging Face's mask code does: the export guards the size."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(self, x):
        return self.proj(x) * 2 if x.shape[0] == 1 else self.proj(x)


@pytest.mark.parametrize("method", ["gptq", "awq"])  # the sequential walk, the observers
def test_calibration_batch_breaking_a_traced_guard_is_named_before_any_work(method):
    g = torch.Generator().manual_seed(0)
    model = _BranchOnBatch().eval()
    calib = [torch.randn(2, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"calibration\[1\]: x of shape \[1, 5, 16\] does not fit the traced graph "
                                         r"\(traced with \{'x': \[2, 5, 16\]\}\): it holds for x.size\(0\) != 1 only"):
        fxquant.quantize_(model, f"uint4wo-16@{method}", example_inputs=(calib[0],), calibration=calib)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model.proj) is nn.Linear
    fxquant.quantize_(model, f"uint4wo-16@{method}", example_inputs=(calib[0],), calibration=calib[:1])  # fits


def test_unknown_method_parameters_and_number_lists_say_what_to_do():
    with pytest.raises(TypeError, match=r"GPTQ takes no parameter 'sym'; its parameters: damp_percent.*belong to "
                                        r"the scheme"):
        GPTQ(sym=True)
    with pytest.raises(ValueError, match=r"calibration\[0\]: a list of 3 numbers; token ids .* go in a tensor"):
        fxquant.compile(TwoLinears().eval(), "int4wo-32@gptq", example_inputs=(_xs(1)[0],), calibration=[[1, 2, 3]])


@pytest.mark.parametrize("sequential", [True, False])
def test_padded_batches_on_a_trace_with_attention_mask_leave_the_padding_out(sequential):
    """Traced with attention_mask, a padded batch runs as it is and its padded positions are left out of
    every statistic: the codes and token count of calibrating on the real tokens alone."""
    m = _Masked().eval()
    spec = fxquant.Spec(default="int4wo-32", method=GPTQ(true_sequential=sequential))
    ex = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    ids = _batches(2, rows=3, seq=20)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[2, 12:] = 0  # right padding
    real = torch.cat([ids[0][0, 5:], ids[0][1], ids[0][2, :12]])[None]  # the same tokens, one row
    got = fxquant.compile(m, spec, example_kwargs=ex, calibration=[
        {"input_ids": ids[0], "attention_mask": mask}, {"input_ids": ids[1], "attention_mask": torch.ones_like(ids[1])}])
    want = fxquant.compile(m, spec, example_kwargs=ex, calibration=[
        {"input_ids": real, "attention_mask": torch.ones_like(real)},
        {"input_ids": ids[1], "attention_mask": torch.ones_like(ids[1])}])
    assert fxquant.report(got).results["proj"]["calibration_tokens"] == 15 + 20 + 12 + 3 * 20
    assert torch.equal(got.get_buffer("proj.qweight"), want.get_buffer("proj.qweight"))
