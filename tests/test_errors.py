"""Bad inputs: rejected as torch rejects them, with a message naming the problem,
and without touching running statistics or num_batches_tracked."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbn
from conftest import DEVICES, random_input


def module_pair(cls_name="BatchNorm2d", channels=3, activation=None, **kwargs):
    torch_bn = getattr(nn, cls_name)(channels, **kwargs)
    fast_bn = getattr(fastbn, cls_name)(channels, activation=activation, **kwargs)
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


# ---------------------------------------------------------------- issue 14: accepted where torch accepts


@pytest.mark.parametrize("expanded", ["running_mean", "running_var"])
def test_expanded_running_stat_updates_like_torch(expanded):
    """torch accepts a running statistic expanded from one value (stride 0) and updates it
    channel after channel (with one thread; with more its result depends on the timing)."""
    x = random_input((4, 3, 5, 5))
    stats = {"running_mean": lambda: torch.zeros(3), "running_var": lambda: torch.ones(3)}
    start = {"running_mean": 0.5, "running_var": 2.0}[expanded]
    pairs = []
    for fn in (F.batch_norm, fastbn.functional.batch_norm):
        buffers = {name: make() for name, make in stats.items()}
        buffers[expanded] = torch.full((1,), start).expand(3)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            y = fn(x, buffers["running_mean"], buffers["running_var"], training=True, momentum=0.3)
        finally:
            torch.set_num_threads(threads)
        pairs.append((y, buffers))
    (y_torch, theirs), (y_fast, ours) = pairs
    torch.testing.assert_close(y_fast, y_torch)
    for name in stats:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    assert ours[expanded].stride() == (0,)


# ---------------------------------------------------------------- issue 14: non-finite values as torch


def _torch_bn_act(bn, activation, param):
    act = {None: nn.Identity(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(param or 0.01)}[activation]
    return nn.Sequential(bn, act)


def _grads_of(model, x, grad, params):
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(grad)
    return [y.detach(), x.grad] + [p.grad.clone() for p in params]


def _assert_same_nonfinite(ours, theirs, what):
    """Same NaN/inf pattern and equal infinities; finite values close."""
    for a, b, name in zip(ours, theirs, ("output", "grad_input", "grad_weight", "grad_bias")):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what} {name}: NaN where torch has none or vice versa"
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True, msg=f"{what} {name}")


@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
def test_eval_backward_with_nonfinite_input_matches_torch(activation):
    """Evaluation mode: grad_input = dy * act' * w * invstd even where x is NaN or inf."""
    torch_bn, fast_bn = module_pair(activation=activation)
    torch_bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    fast_bn.load_state_dict(torch_bn.state_dict())
    torch_bn.eval(), fast_bn.eval()
    x = random_input((4, 3, 5, 5))
    x[0, 0, 1, 1], x[1, 1, 2, 3], x[2, 2, 0, 0], x[3, 0, 4, 4] = float("nan"), float("inf"), -float("inf"), 1e38
    grad = torch.randn_like(x)
    ours = _grads_of(fast_bn, x, grad, [fast_bn.weight, fast_bn.bias])
    theirs = _grads_of(_torch_bn_act(torch_bn, activation, None), x, grad, [torch_bn.weight, torch_bn.bias])
    _assert_same_nonfinite(ours, theirs, f"eval {activation}")
    if activation is None:
        assert torch.isfinite(ours[1]).all(), "grad_input is dy * w * invstd: finite for finite dy"
    # the op itself, channels_last too
    for layout in (torch.contiguous_format, torch.channels_last):
        xl, gl = x.contiguous(memory_format=layout), grad.contiguous(memory_format=layout)
        dx, _, _ = torch.ops.fastbn.batch_norm_backward(gl, xl, fast_bn.weight.detach(), None, fast_bn.running_mean,
                                                        fast_bn.running_var, 1e-5, False)
        expected = gl * (fast_bn.weight.detach() * torch.rsqrt(fast_bn.running_var + 1e-5)).view(1, 3, 1, 1)
        torch.testing.assert_close(dx, expected)


@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_infinite_mean_gives_infinities_like_torch(activation, training):
    """An infinite running_mean (eval) or an infinite input value (train, so an infinite
    batch mean): the output is +-inf or NaN where torch's is, and the fused activations'
    parameter grads match torch's, not finite stand-ins."""
    torch_bn, fast_bn = module_pair(activation=activation)
    x = random_input((4, 3, 5, 5))
    if training:
        x[0, 0, 0, 0], x[1, 1, 1, 1] = float("inf"), -float("inf")
    else:
        torch_bn.running_mean.copy_(torch.tensor([float("inf"), -float("inf"), 0.5]))
        fast_bn.load_state_dict(torch_bn.state_dict())
        torch_bn.eval(), fast_bn.eval()
    grad = torch.randn_like(x)
    ours = _grads_of(fast_bn, x, grad, [fast_bn.weight, fast_bn.bias])
    theirs = _grads_of(_torch_bn_act(torch_bn, activation, None), x, grad, [torch_bn.weight, torch_bn.bias])
    _assert_same_nonfinite(ours, theirs, f"{activation} training={training}")
    if not training and activation != "relu":
        assert torch.isinf(ours[0][:, :2]).all(), "(x - inf) * scale is an infinity, not NaN"


# ---------------------------------------------------------------- issue 14: direct ops, devices and arguments


def _op_calls(x, device_of):
    """Every op with valid arguments; device_of(name) gives each tensor argument's device."""
    C = x.shape[1]

    def vec(name, value=1.0):
        return torch.full((C,), value, device=device_of(name))

    def like(name):
        return torch.randn(x.shape, device=device_of(name))

    ops = torch.ops.fastbn
    return {
        "batch_norm_train": lambda: ops.batch_norm_train(x, vec("weight"), vec("bias"), 1e-5, 0, 0.0, like("residual")),
        "batch_norm_eval": lambda: ops.batch_norm_eval(x, vec("weight"), vec("bias"), vec("running_mean", 0.),
                                                       vec("running_var"), 1e-5, 0, 0.0, like("residual")),
        "batch_norm_train_": lambda: ops.batch_norm_train_(x, vec("weight"), vec("bias"), 1e-5),
        "batch_norm_eval_": lambda: ops.batch_norm_eval_(x, vec("weight"), vec("bias"), vec("running_mean", 0.),
                                                         vec("running_var"), 1e-5),
        "batch_norm_backward": lambda: ops.batch_norm_backward(like("grad_output"), x, vec("weight"), vec("bias"),
                                                               vec("mean", 0.), vec("var"), 1e-5, True),
        "batch_norm_add_act_backward": lambda: ops.batch_norm_add_act_backward(
            like("grad_output"), x, like("residual"), vec("weight"), vec("bias"), vec("mean", 0.), vec("var"), 1e-5,
            True, 1, 0.0),
        "batch_norm_invert_output": lambda: ops.batch_norm_invert_output(
            like("grad_output"), x, vec("weight"), vec("bias"), vec("var"), 1e-5, 0, 0.0),
        "batch_norm_backward_reduce": lambda: ops.batch_norm_backward_reduce(
            like("grad_output"), x, vec("weight"), vec("bias"), vec("mean", 0.), vec("var"), 1e-5),
        "batch_norm_backward_elemt": lambda: ops.batch_norm_backward_elemt(
            like("grad_output"), x, vec("weight"), vec("bias"), vec("mean", 0.), vec("var"), vec("sum_dy"),
            vec("sum_dy_xmu"), 1e-5, x.numel() // C),
        "update_running_stats": lambda: ops.update_running_stats(
            vec("running_mean", 0.), vec("running_var"), vec("mean", 0.), vec("var"), 0.1, 10),
    }


OP_TENSOR_ARGS = {
    "batch_norm_train": ["weight", "bias", "residual"],
    "batch_norm_eval": ["weight", "bias", "running_mean", "running_var", "residual"],
    "batch_norm_train_": ["weight", "bias"],
    "batch_norm_eval_": ["weight", "bias", "running_mean", "running_var"],
    "batch_norm_backward": ["grad_output", "weight", "bias", "mean", "var"],
    "batch_norm_add_act_backward": ["grad_output", "residual", "weight", "bias", "mean", "var"],
    "batch_norm_invert_output": ["grad_output", "weight", "bias", "var"],
    "batch_norm_backward_reduce": ["grad_output", "weight", "bias", "mean", "var"],
    "batch_norm_backward_elemt": ["grad_output", "weight", "bias", "mean", "var", "sum_dy", "sum_dy_xmu"],
    "update_running_stats": ["running_mean", "running_var", "mean", "var"],
}


@pytest.mark.parametrize("op,arg", [(op, arg) for op, args in OP_TENSOR_ARGS.items() for arg in args])
@pytest.mark.parametrize("input_device", ["cpu", "meta"])
def test_ops_reject_mixed_meta_and_cpu(op, arg, input_device):
    """One argument on meta and the rest on CPU (or the reverse) is an error, as in torch,
    not uninitialized CPU tensors from the shape-only kernel."""
    other = "meta" if input_device == "cpu" else "cpu"
    x = torch.randn(4, 3, 5, 5, device=input_device)
    if op == "update_running_stats":  # no input: mean's device is the reference
        call = _op_calls(x, lambda name: other if name == arg else input_device)[op]
        if arg == "mean":
            call = _op_calls(x, lambda name: input_device if name == arg else other)[op]
    else:
        call = _op_calls(x, lambda name: other if name == arg else input_device)[op]
    with pytest.raises(RuntimeError, match=rf"fastbn\.{op}: \w+ is on (meta|cpu)|not on the expected device"):
        call()


def test_ops_same_device_meta_calls_still_work():
    x = torch.randn(4, 3, 5, 5, device="meta")
    for op, call in _op_calls(x, lambda name: "meta").items():
        call()  # shapes only, no error


def test_update_running_stats_rejects_bad_buffers_without_writing():
    ops = torch.ops.fastbn
    mean, var = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.0, 2.0])
    # float8: floating for at::isFloatingType, but no kernel takes it (running_mean was written before it failed)
    for dtype in (torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8, torch.float8_e4m3fn,
                  torch.float8_e5m2):
        running_mean, running_var = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
        for name, args in (("running_mean", (running_mean, torch.ones(3))), ("running_var", (torch.zeros(3), running_var))):
            saved = [a.clone() for a in args]
            with pytest.raises(RuntimeError, match=rf"fastbn\.update_running_stats: {name} must be a floating"):
                ops.update_running_stats(*args, mean, var, 0.1, 10)
            assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(args, saved))
    shared = torch.tensor([0.0, 1.0, 2.0])
    for running_mean, running_var in ((shared, shared), (shared, shared[:]), (shared[:3], shared.view(3))):
        with pytest.raises(RuntimeError, match="fastbn.update_running_stats: running_mean and running_var share memory"):
            ops.update_running_stats(running_mean, running_var, mean, var, 0.1, 10)
        assert torch.equal(shared, torch.tensor([0.0, 1.0, 2.0]))
    buffer = torch.zeros(6)  # interleaved halves of one buffer do not overlap: fine
    ops.update_running_stats(buffer[0::2], buffer[1::2], mean, var, 1.0, 2)
    torch.testing.assert_close(buffer, torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 4.0]))
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"fastbn.update_running_stats: count must be 0 .* or more than 1 .*, got 1"):
        ops.update_running_stats(running_mean, running_var, mean, var, 0.1, 1)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))
    for name, args in (("running_mean", (None, running_var, mean, var)), ("running_var", (running_mean, None, mean, var)),
                       ("mean", (running_mean, running_var, None, var)), ("var", (running_mean, running_var, mean, None))):
        with pytest.raises(RuntimeError, match=rf"fastbn\.update_running_stats: {name} is required"):
            ops.update_running_stats(*args, 0.1, 10)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


def test_functional_rejects_aliased_running_stats_before_writing():
    """torch updates one buffer passed as both statistics twice, in an order of its kernels';
    fastbn refuses it (in-place input included) instead of picking an order."""
    shared = torch.zeros(3)
    x = random_input((4, 3, 5, 5))
    before = x.clone()
    with pytest.raises(ValueError, match="running_mean and running_var share memory"):
        fastbn.functional.batch_norm_act(x, shared, shared, training=True, activation="leaky_relu", inplace=True)
    assert torch.equal(shared, torch.zeros(3)) and torch.equal(x, before)


def test_phase_and_backward_ops_reject_bad_arguments():
    ops = torch.ops.fastbn
    x = random_input((4, 3, 5, 5))
    dy, w, b, mean, var = torch.randn_like(x), torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)
    sums = ops.batch_norm_backward_reduce(dy, x, w, b, mean, var, 1e-5)
    with pytest.raises(RuntimeError, match=r"fastbn\.batch_norm_backward_elemt: count .* at least .* got 0"):
        ops.batch_norm_backward_elemt(dy, x, w, b, mean, var, *sums, 1e-5, 0)
    with pytest.raises(RuntimeError, match=r"fastbn\.batch_norm_backward_elemt: count .* at least .*100, got 99"):
        ops.batch_norm_backward_elemt(dy, x, w, b, mean, var, *sums, 1e-5, 99)
    ops.batch_norm_backward_elemt(dy[:0], x[:0], w, b, mean, var, *sums, 1e-5, 0)  # no values here: any count
    with pytest.raises(RuntimeError, match=r"fastbn\.batch_norm_invert_output: weight .* 0 .*channel 1"):
        ops.batch_norm_invert_output(dy, x, torch.tensor([1.0, 0.0, 2.0]), b, var, 1e-5, 2, 0.1)
    with pytest.raises(RuntimeError, match=r"fastbn\.batch_norm_add_act_backward: residual is required"):
        ops.batch_norm_add_act_backward(dy, x, None, w, b, mean, var, 1e-5, True, 1, 0.0)
    for op, call in (
            ("batch_norm_backward", lambda m, v: ops.batch_norm_backward(dy, x, w, b, m, v, 1e-5, True)),
            ("batch_norm_add_act_backward",
             lambda m, v: ops.batch_norm_add_act_backward(dy, x, x, w, b, m, v, 1e-5, True, 1, 0.0)),
            ("batch_norm_backward_reduce", lambda m, v: ops.batch_norm_backward_reduce(dy, x, w, b, m, v, 1e-5)),
            ("batch_norm_backward_elemt",
             lambda m, v: ops.batch_norm_backward_elemt(dy, x, w, b, m, v, *sums, 1e-5, 100))):
        with pytest.raises(RuntimeError, match=rf"fastbn\.{op}: mean is required"):
            call(None, var)
        with pytest.raises(RuntimeError, match=rf"fastbn\.{op}: var is required"):
            call(mean, None)
    with pytest.raises(RuntimeError, match=r"fastbn\.batch_norm_invert_output: var is required"):
        ops.batch_norm_invert_output(dy, x, w, b, None, 1e-5, 0, 0.0)
    for name in ("sum_dy", "sum_dy_xmu"):
        args = {"sum_dy": sums[0], "sum_dy_xmu": sums[1], name: None}
        with pytest.raises(RuntimeError, match=rf"fastbn\.batch_norm_backward_elemt: {name} is required"):
            ops.batch_norm_backward_elemt(dy, x, w, b, mean, var, args["sum_dy"], args["sum_dy_xmu"], 1e-5, 100)
    with pytest.raises(RuntimeError, match=r"fastbn\.batch_norm_backward: grad_output is required"):
        ops.batch_norm_backward(None, x, w, b, mean, var, 1e-5, True)


@pytest.mark.parametrize("layout", ["planar", "channels_last", "2d"])
@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_infinite_value_gives_infinite_batch_mean_like_torch(position, layout):
    """One +-inf in a channel makes its batch mean +-inf (torch: sum / n), not NaN from
    inf - inf in the shifted sums or merges; its variance is NaN as torch's."""
    shape = (40, 3) if layout == "2d" else (6, 3, 20, 20)
    for value in (float("inf"), -float("inf")):
        x = random_input(shape)
        flat_channel0 = x.transpose(0, 1)[0].reshape(-1)  # a copy: channel 0's values in order
        index = {"first": 0, "middle": flat_channel0.numel() // 2, "last": flat_channel0.numel() - 1}[position]
        sample, rest = divmod(index, flat_channel0.numel() // shape[0])
        x[(sample, 0) + tuple(torch.unravel_index(torch.tensor(rest), shape[2:])) if len(shape) > 2 else (sample, 0)] = value
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        mean, var = torch.ops.fastbn.batch_norm_stats(x)
        dims = [0] + list(range(2, x.dim()))
        torch.testing.assert_close(mean, x.mean(dims), equal_nan=True)
        assert torch.isnan(var[0]) and torch.isfinite(var[1:]).all()
        torch_bn, fast_bn = module_pair("BatchNorm1d" if layout == "2d" else "BatchNorm2d")
        torch_bn(x), fast_bn(x)
        torch.testing.assert_close(fast_bn.running_mean, torch_bn.running_mean, equal_nan=True)
        torch.testing.assert_close(fast_bn.running_var, torch_bn.running_var, equal_nan=True)


@pytest.mark.parametrize("param", [float("inf"), -float("inf"), float("nan")])
def test_non_finite_activation_param_is_refused(param):
    """A slope or alpha of inf/NaN: refused by name (on CPU its padding lanes would turn the
    backward sums into NaN where torch's are +-inf)."""
    x = random_input((2, 3, 5, 5))
    with pytest.raises(ValueError, match="activation_param must be a finite number"):
        fastbn.BatchNorm2d(3, activation="leaky_relu", activation_param=param)
    ops = torch.ops.fastbn
    w, b, m, v = torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)
    for op, call in (("batch_norm_train", lambda: ops.batch_norm_train(x, w, b, 1e-5, 2, param)),
                     ("batch_norm_eval", lambda: ops.batch_norm_eval(x, w, b, m, v, 1e-5, 3, param)),
                     ("batch_norm_backward", lambda: ops.batch_norm_backward(x, x, w, b, m, v, 1e-5, False, 2, param)),
                     ("batch_norm_add_act_backward",
                      lambda: ops.batch_norm_add_act_backward(x, x, x, w, b, m, v, 1e-5, True, 2, param)),
                     ("batch_norm_backward_reduce", lambda: ops.batch_norm_backward_reduce(x, x, w, b, m, v, 1e-5, 2, param)),
                     ("batch_norm_invert_output", lambda: ops.batch_norm_invert_output(x, x, w, b, v, 1e-5, 2, param))):
        with pytest.raises(RuntimeError, match=rf"fastbn\.{op}: activation_param must be a finite number"):
            call()
