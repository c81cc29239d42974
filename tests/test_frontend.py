"""The export front end keeps the guards that matter: a model that branches on a size of 1 never
runs the other branch's graph at size 1; PyTorch's own size-oblivious exclusions are dropped, so a
one-token / batch-1 call of a graph traced at batch 2 still works."""
import pytest
import torch
from torch import nn

import fxquant
from fxquant.frontend import export_program, framework_exclusions


class BranchesOnBatchOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 32)

    def forward(self, x):
        h = self.lin(x)
        if x.shape[0] == 1:  # a real branch of the model's own code
            return h * 2
        return h.transpose(0, 1).reshape(x.shape[1], x.shape[0], 32).transpose(0, 1) * 3


def test_model_branch_on_size_one_is_guarded(tmp_path):
    m = BranchesOnBatchOne()
    x2 = torch.randn(2, 4, 32)
    qm = fxquant.compile(m, "int8wo", (x2,))
    for b in (2, 3):
        x = torch.randn(b, 4, 32)
        assert torch.allclose(qm(x), m(x), rtol=0.05, atol=0.05)
    # at batch 1 the model computes h * 2; the graph holds the h * 3 path: it must refuse, not answer
    with pytest.raises(Exception, match=r"Guard failed: x.size\(\)\[0\] != 1"):
        qm(torch.randn(1, 4, 32))
    fxquant.save(qm, tmp_path / "b.safetensors")
    lm = fxquant.load(tmp_path / "b.safetensors")
    with pytest.raises(Exception, match="Guard failed"):
        lm(torch.randn(1, 4, 32))
    assert torch.equal(lm(x2), qm(x2))


def test_framework_exclusions_are_dropped(tiny_llama_model, tmp_path):
    """The Llama attention's reshape-of-transpose adds a PyTorch-internal ``!=`` guard on the
    sequence length; it is listed as droppable and a 1-token call works, also after save / load."""
    ids = torch.randint(0, 512, (2, 8))
    ep = export_program(tiny_llama_model, (ids,), {})
    internal = framework_exclusions(ep)
    assert internal and all("!=" in g for g in internal)
    assert set(internal) <= set(ep._guards_code)
    qm = fxquant.compile(tiny_llama_model, "int8wo", (ids,))
    one = torch.randint(0, 512, (1, 1))
    assert torch.allclose(qm(one), tiny_llama_model(one), rtol=0.05, atol=0.05)
    fxquant.save(qm, tmp_path / "l.safetensors")
    assert torch.equal(fxquant.load(tmp_path / "l.safetensors")(one), qm(one))


def test_user_branch_guard_is_not_droppable():
    ep = export_program(BranchesOnBatchOne(), (torch.randn(2, 4, 32),), {})
    assert any("!= 1" in g for g in ep._guards_code)
    assert not any("size()[0]) != 1" in g or g.endswith("size()[0] != 1") for g in framework_exclusions(ep))
