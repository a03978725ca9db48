"""optim.CompiledRMSprop (compile_train's optimizer) against torch.optim.RMSprop, the oracle:
the same weights and state after steps with a changing lr and weight decay, the same
state-dict layout, and one compiled graph however the lr moves."""
import pytest
import torch

from minispin.core.optim import CompiledRMSprop


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).requires_grad_() for shape in ((7, 5), (5,), (3, 4, 2), (1,))]


@pytest.mark.slow
def test_compiled_rmsprop_equals_torch_rmsprop():
    from torch._dynamo.utils import counters
    ours, theirs = _params(0), _params(0)
    kw = dict(lr=1e-2, alpha=0.9, eps=1e-8, weight_decay=0.01)
    opt = CompiledRMSprop(ours, **kw)
    ref = torch.optim.RMSprop(theirs, foreach=True, **kw)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)) for o in (opt, ref)]
    g = torch.Generator().manual_seed(1)
    graphs = None
    for step in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for s in sched:
            s.step()
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs  # lr changed every step: no recompile
    for a, b, start in zip(ours, theirs, _params(0)):
        assert not torch.equal(b, start)  # it trained
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    mine, torchs = opt.state_dict(), ref.state_dict()
    assert mine["state"].keys() == torchs["state"].keys()
    for i, st in torchs["state"].items():
        assert mine["state"][i].keys() == st.keys()
        assert mine["state"][i]["step"].dtype == st["step"].dtype and float(mine["state"][i]["step"]) == 4
        torch.testing.assert_close(mine["state"][i]["square_avg"], st["square_avg"], rtol=1e-6, atol=1e-9)


def test_compiled_rmsprop_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="momentum"):
        CompiledRMSprop(_params(0), lr=1e-3, momentum=0.9)
