"""fastbn's modules are drop-ins: same class hierarchy, repr, state_dict and checkpoints."""
import io

import pytest
import torch
from torch import nn

import fastbn


@pytest.mark.parametrize("cls_name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
@pytest.mark.parametrize("kwargs", [dict(), dict(affine=False), dict(track_running_stats=False),
                                    dict(momentum=None, eps=1e-3)], ids=str)
def test_state_dict_round_trip_both_ways(cls_name, kwargs):
    torch_bn = getattr(nn, cls_name)(7, **kwargs)
    fast_bn = getattr(fastbn, cls_name)(7, **kwargs)
    assert isinstance(fast_bn, getattr(nn, cls_name))
    assert repr(fast_bn) == repr(torch_bn)
    # give torch's module non-default state: train a few batches
    shape = (8, 7) if cls_name == "BatchNorm1d" else (8, 7, 4, 4) if cls_name == "BatchNorm2d" else (8, 7, 2, 3, 4)
    for _ in range(3):
        torch_bn(torch.randn(shape) * 3 + 1)
    state = torch_bn.state_dict()
    assert list(fast_bn.state_dict().keys()) == list(state.keys())
    fast_bn.load_state_dict(state)
    for key, value in fast_bn.state_dict().items():
        assert torch.equal(value, state[key]), key
    # and back: fastbn's state saved to bytes, loaded into torch's module
    for _ in range(2):
        fast_bn(torch.randn(shape) * 3 + 1)
    buffer = io.BytesIO()
    torch.save(fast_bn.state_dict(), buffer)
    buffer.seek(0)
    fresh_torch = getattr(nn, cls_name)(7, **kwargs)
    fresh_torch.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in fresh_torch.state_dict().items():
        assert torch.equal(value, fast_bn.state_dict()[key]), key


def test_constructor_keywords_of_this_torch_pass_through():
    """Whatever torch's constructor takes (torch 2.14 added bias=), fastbn's takes too."""
    import inspect
    if "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters:
        pytest.skip(f"torch {torch.__version__} has no BatchNorm bias= argument")
    ours, theirs = fastbn.BatchNorm2d(5, bias=False), nn.BatchNorm2d(5, bias=False)
    assert repr(ours) == repr(theirs) and ours.bias is None and ours.weight is not None
    theirs.weight.data.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 5, 3, 3) + 1
    torch.testing.assert_close(ours(x), theirs(x))


def test_old_checkpoint_without_num_batches_tracked_loads():
    torch_bn = nn.BatchNorm2d(4)
    state = torch_bn.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # written before num_batches_tracked existed
    fast_bn = fastbn.BatchNorm2d(4)
    fast_bn.load_state_dict(state)  # torch's own version handling applies
    nn.BatchNorm2d(4).load_state_dict(state)
    assert fast_bn.num_batches_tracked.item() == 0


def test_drop_in_inside_a_model_matches_torch():
    """A new user's view: fastbn.BatchNorm2d(64) in a model behaves exactly as torch's."""
    torch.manual_seed(0)

    def model(norm):
        return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), norm(64), nn.ReLU(), nn.Conv2d(64, 10, 1))

    ours, theirs = model(fastbn.BatchNorm2d), model(nn.BatchNorm2d)
    ours.load_state_dict(theirs.state_dict())
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for _ in range(5):
        x = torch.randn(16, 3, 12, 12) + 2
        for m, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    ours.eval(), theirs.eval()
    x = torch.randn(4, 3, 12, 12)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    # a checkpoint of one loads into the other
    theirs.load_state_dict(ours.state_dict())
