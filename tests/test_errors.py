"""Bad inputs: rejected as torch rejects them, with a message naming the problem,
and without touching running statistics or num_batches_tracked."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbn
from conftest import DEVICES


def module_pair(cls_name="BatchNorm2d", channels=3, **kwargs):
    torch_bn = getattr(nn, cls_name)(channels, **kwargs)
    fast_bn = getattr(fastbn, cls_name)(channels, **kwargs)
    fast_bn.load_state_dict(torch_bn.state_dict())
    return torch_bn, fast_bn


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a rejected call"


MODULE_CASES = [
    # (description, module class, input, expected exception, words in fastbn's message)
    ("wrong rank 3D into BatchNorm2d", "BatchNorm2d", lambda: torch.randn(3, 4, 4), ValueError, "expected 4D input"),
    ("wrong rank 5D into BatchNorm2d", "BatchNorm2d", lambda: torch.randn(2, 3, 4, 4, 4), ValueError, "expected 4D"),
    ("1D into BatchNorm1d", "BatchNorm1d", lambda: torch.randn(3), ValueError, "expected 2D or 3D"),
    ("wrong channel count", "BatchNorm2d", lambda: torch.randn(2, 5, 4, 4), RuntimeError, "should contain 5"),
    ("one value per channel", "BatchNorm1d", lambda: torch.randn(1, 3), ValueError, "more than 1 value per channel"),
    ("one value per channel 2d", "BatchNorm2d", lambda: torch.randn(1, 3, 1, 1), ValueError, "more than 1 value"),
    ("integer input", "BatchNorm2d", lambda: torch.ones(2, 3, 4, 4, dtype=torch.long), Exception, "float"),
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: c[0])
def test_module_rejects_like_torch(case):
    _, cls_name, make_input, exc, words = case
    torch_bn, fast_bn = module_pair(cls_name)
    x = make_input()
    with pytest.raises(Exception):
        torch_bn(x)
    before = snapshot(fast_bn)
    with pytest.raises(exc, match=words):
        fast_bn(x)
    assert_unchanged(fast_bn, before)  # num_batches_tracked included: torch increments it before failing


def test_eval_one_value_per_channel_is_fine():
    """Only training needs more than one value per channel."""
    torch_bn, fast_bn = module_pair("BatchNorm1d")
    torch_bn.eval(), fast_bn.eval()
    x = torch.randn(1, 3)
    torch.testing.assert_close(fast_bn(x), torch_bn(x))


@pytest.mark.parametrize("device", DEVICES)
def test_functional_rejects_bad_vectors(device):
    x = torch.randn(4, 3, 5, 5, device=device)
    good = torch.ones(3, device=device)
    cases = [
        (dict(weight=torch.ones(4, device=device)), RuntimeError, "weight should contain 3 elements not 4"),
        (dict(bias=torch.ones(2, device=device)), RuntimeError, "bias should contain 3 elements not 2"),
        (dict(running_mean=torch.zeros(4, device=device)), RuntimeError, "running_mean should contain 3"),
        (dict(running_mean=torch.zeros(3, 1, device=device), running_var=torch.ones(3, 1, device=device)),
         RuntimeError, "must be 1-D"),
        (dict(weight=torch.ones(3, dtype=torch.float64, device=device)), RuntimeError, "weight has dtype torch.float64"),
        (dict(running_var=torch.ones(3, dtype=torch.float64, device=device)), RuntimeError,
         "running_var has dtype torch.float64"),
        (dict(running_mean=torch.zeros(3, device=device), running_var=None), ValueError, "both be None or neither"),
    ]
    if device == "cpu" and torch.cuda.is_available():
        cases.append((dict(weight=torch.ones(3, device="cuda")), RuntimeError, "weight is on cuda"))
    for overrides, exc, words in cases:
        args = dict(running_mean=torch.zeros(3, device=device), running_var=torch.ones(3, device=device),
                    weight=good, bias=good)
        args.update(overrides)
        stats = [t.clone() if t is not None else None for t in (args["running_mean"], args["running_var"])]
        with pytest.raises(exc, match=words):
            fastbn.functional.batch_norm(x, args["running_mean"], args["running_var"], args["weight"], args["bias"],
                                         True)
        for t, saved in zip((args["running_mean"], args["running_var"]), stats):
            if t is not None:
                assert torch.equal(t, saved), "a rejected call changed a running statistic"


def test_functional_rejects_like_torch():
    x = torch.randn(4, 3, 5, 5)
    for call in (lambda fn: fn(x, None, None, training=False),                      # eval without statistics
                 lambda fn: fn(torch.randn(3), None, None, training=True),          # rank 1
                 lambda fn: fn(torch.randn(1, 3), None, None, training=True)):      # one value per channel
        with pytest.raises(Exception) as theirs:
            call(F.batch_norm)
        with pytest.raises(Exception) as ours:
            call(fastbn.functional.batch_norm)
        assert str(ours.value), "the message must name the problem"
    with pytest.raises(RuntimeError, match="must be defined in evaluation mode"):
        fastbn.functional.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="eps must be positive"):
        fastbn.functional.batch_norm(x, None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        fastbn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=-1.0)
    with pytest.raises(TypeError, match="must be a Tensor"):
        fastbn.functional.batch_norm(x.numpy(), None, None, training=True)


def test_ops_check_their_arguments_without_python():
    """Calling the registered ops directly gets the C++ checks, not a crash."""
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 2"):
        torch.ops.fastbn.batch_norm_train(x, torch.ones(2), None, 1e-5)
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        torch.ops.fastbn.batch_norm_train(torch.randn(5), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="must be float32, float64, float16 or bfloat16"):
        torch.ops.fastbn.batch_norm_eval(x.int(), None, None, torch.zeros(3), torch.ones(3), 1e-5)
    with pytest.raises(RuntimeError, match="grad_output has size"):
        torch.ops.fastbn.batch_norm_backward(torch.randn(4, 3, 5, 4), x, None, None, torch.zeros(3), torch.ones(3), 1e-5,
                                             True)
    running_mean = torch.zeros(3)
    with pytest.raises(RuntimeError, match="must be 1-D of one size"):
        torch.ops.fastbn.update_running_stats(running_mean, torch.ones(3), torch.zeros(4), torch.ones(4), 0.1, 10)
    assert torch.equal(running_mean, torch.zeros(3))
    with pytest.raises(RuntimeError, match="count must be non-negative"):
        torch.ops.fastbn.update_running_stats(running_mean, torch.ones(3), torch.zeros(3), torch.ones(3), 0.1, -1)


def test_nan_input_propagates_like_torch():
    """NaN in, NaN out for that channel (not an error, not a silent number)."""
    torch_bn, fast_bn = module_pair()
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 3, 3] = float("nan")
    y_torch, y_fast = torch_bn(x), fast_bn(x)
    assert torch.equal(torch.isnan(y_fast), torch.isnan(y_torch))
    assert torch.equal(torch.isnan(fast_bn.running_mean), torch.isnan(torch_bn.running_mean))
