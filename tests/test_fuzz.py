"""Hostile direct calls of every torch.ops.fastbn op (issue 14).

Each example builds a valid call of one op on small tensors, then changes one
argument (sometimes two) the way a hostile or careless caller would: a wrong
dtype (integer, bool, complex, another float), a wrong shape, the meta device,
None, a non-contiguous, expanded or aliased tensor, NaN/inf values, a bad eps,
activation code or parameter, a count of 0, 1 or less. The op must then either
raise a clear error (RuntimeError/ValueError/TypeError/IndexError whose message
names the op and the changed argument) having written nothing, or give the
float64 answer (and write only what it declares it writes).

hypothesis draws the cases with a fixed seed (derandomize=True), so CI runs the
same calls every time; HOSTILE_CALLS counts them per op.
"""
import collections
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbn import ops

# FASTBN_FUZZ_EXAMPLES=2000 for a deeper run than CI's
EXAMPLES_PER_OP = int(os.environ.get("FASTBN_FUZZ_EXAMPLES", "150"))
HOSTILE_CALLS = collections.Counter()
OUTCOMES = collections.Counter()  # (op, "rejected" | "answered" | "shapes only")
ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Generous tolerances (relative to the reference's largest magnitude): the fuzz looks for
# garbage and wrong semantics; the parity tests hold the kernels to torch's error budget.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# Argument names in schema order, their kinds, and the ones the op writes.
SCHEMAS = {
    "batch_norm_train": "input:x weight:vec? bias:vec? eps:eps activation:act activation_param:param residual:x?",
    "batch_norm_eval": "input:x weight:vec? bias:vec? running_mean:vec running_var:pos eps:eps activation:act "
                       "activation_param:param residual:x?",
    "batch_norm_train_": "input:x! weight:vec? bias:vec? eps:eps activation:iact activation_param:iparam",
    "batch_norm_eval_": "input:x! weight:vec? bias:vec? running_mean:vec running_var:pos eps:eps activation:iact "
                        "activation_param:iparam",
    "batch_norm_backward": "grad_output:x input:x weight:vec? bias:vec? mean:stat var:statpos eps:eps train:train "
                           "activation:act activation_param:param",
    "batch_norm_add_act_backward": "grad_output:x input:x residual:x weight:vec? bias:vec? mean:stat var:statpos "
                                   "eps:eps train:train activation:act activation_param:param",
    "batch_norm_invert_output": "grad_output:x output:x weight:nonzero? bias:vec? var:statpos eps:eps "
                                "activation:iact activation_param:iparam",
    "batch_norm_stats": "input:x",
    "batch_norm_backward_reduce": "grad_output:x input:x weight:vec? bias:vec? mean:stat var:statpos eps:eps "
                                  "activation:act activation_param:param",
    "batch_norm_backward_elemt": "grad_output:x input:x weight:vec? bias:vec? mean:stat var:statpos sum_dy:stat "
                                 "sum_dy_xmu:stat eps:eps count:count activation:act activation_param:param",
    "update_running_stats": "running_mean:rvec! running_var:rpos! mean:stat var:statpos factor:factor count:count",
}


def parse(schema):
    args = []
    for item in schema.split():
        name, kind = item.split(":")
        args.append((name, kind.rstrip("?!"), kind.endswith("?"), kind.endswith("!")))
    return args


# ------------------------------------------------------------------ valid calls


def valid_call(op, draw):
    """(args dict in schema order, accumulation dtype, x-like template) for a valid call of `op`."""
    dtype = draw(st.sampled_from(FLOATS))
    acc = ops.accumulate_dtype(dtype)
    n = draw(st.sampled_from([0, 1, 2, 3, 4]))
    c = draw(st.sampled_from([0, 1, 2, 3, 5]))
    spatial = draw(st.sampled_from([(), (3,), (2, 3), (1, 1)]))
    shape = (n, c, *spatial)
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    vec_dtype = draw(st.sampled_from([dtype, torch.float32])) if dtype in (torch.float16, torch.bfloat16) else dtype
    activation = draw(st.sampled_from([0, 1, 2, 3, 4]))
    invertible = draw(st.sampled_from([0, 2, 3]))
    param = draw(st.sampled_from([0.01, 0.2, 1.0]))

    def x_like(mean=3.0, std=2.0):
        t = (mean + std * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
        if layout == "channels_last" and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        elif layout == "strided" and t.numel():
            t = torch.cat([t, t], dim=1)[:, ::2]  # every other channel of a wider tensor
        return t

    def vector(low, high, dt=None):
        return (low + (high - low) * torch.rand(c, generator=g, dtype=torch.float64)).to(dt or vec_dtype)

    x = x_like()
    x64 = x.double()
    dims = [0] + list(range(2, x.dim()))
    values = n * math.prod(spatial)
    batch_mean = x64.mean(dims) if x.numel() else torch.zeros(c, dtype=torch.float64)
    batch_var = x64.var(dims, unbiased=False) if x.numel() else torch.ones(c, dtype=torch.float64)
    args = {}
    for name, kind, optional, _ in parse(SCHEMAS[op]):
        if optional and draw(st.booleans()) and kind != "x":
            args[name] = None
            continue
        if kind == "x":
            if name == "input" or (op == "batch_norm_invert_output" and name == "output"):
                args[name] = x
            elif name == "residual" and optional and draw(st.booleans()):
                args[name] = None
            else:
                args[name] = x_like(0.0, 1.0)
        elif kind == "vec":
            args[name] = vector(-1.0, 1.0) if name != "weight" else vector(0.5, 1.5)
        elif kind == "nonzero":
            args[name] = vector(0.5, 1.5) * (1 - 2 * (torch.rand(c, generator=g) < 0.3)).to(vec_dtype)
        elif kind == "pos":
            args[name] = vector(0.5, 2.0)
        elif kind == "rvec":
            args[name] = vector(-1.0, 1.0, draw(st.sampled_from(FLOATS)))
        elif kind == "rpos":
            args[name] = vector(0.5, 2.0, args["running_mean"].dtype)
        elif kind == "stat":
            stat_dtype = acc if op != "update_running_stats" else draw(st.sampled_from([torch.float32, torch.float64]))
            if name == "mean":
                args[name] = batch_mean.to(stat_dtype)
            else:
                args[name] = torch.randn(c, generator=g, dtype=torch.float64).to(acc)
        elif kind == "statpos":
            args[name] = batch_var.to(args["mean"].dtype if "mean" in args else acc)
        elif kind == "eps":
            args[name] = draw(st.sampled_from([1e-5, 1e-3]))
        elif kind == "act":
            args[name] = activation
        elif kind == "iact":
            args[name] = invertible
        elif kind in ("param", "iparam"):
            args[name] = param
        elif kind == "train":
            args[name] = draw(st.booleans())
        elif kind == "count":
            args[name] = max(values, 2) + draw(st.sampled_from([0, 0, 7]))
        elif kind == "factor":
            args[name] = draw(st.sampled_from([0.1, 1.0, 0.0]))
    if op == "batch_norm_invert_output":
        # a real output y = act(bn(x)): what in-place ABN hands over
        w = args["weight"].double() if args["weight"] is not None else torch.ones(c, dtype=torch.float64)
        b = args["bias"].double() if args["bias"] is not None else torch.zeros(c, dtype=torch.float64)
        z = (x64 - view(batch_mean, x)) * view(torch.rsqrt(batch_var + args["eps"]) * w, x) + view(b, x)
        args["output"] = ops.activation_forward(z, invertible, param).to(dtype).contiguous(
            memory_format=ops.output_memory_format(x))
    return args, acc, x


def view(vec, like):
    return vec.view([1, -1] + [1] * (like.dim() - 2))


# ------------------------------------------------------------------ hostile changes


def hostile_change(op, args, template, draw):
    """Change one argument of a valid call; returns its name."""
    names = [name for name, *_ in parse(SCHEMAS[op])]
    kinds = {name: kind for name, kind, *_ in parse(SCHEMAS[op])}
    name = draw(st.sampled_from(names))
    value, kind = args[name], kinds[name]
    if kind == "eps":
        args[name] = draw(st.sampled_from([0.0, -10.0, float("nan"), float("inf"), -0.0]))
    elif kind in ("act", "iact"):
        args[name] = draw(st.sampled_from([-1, 5, 1, 4, 2**40, -(2**40)]))
    elif kind in ("param", "iparam"):
        args[name] = draw(st.sampled_from([float("nan"), -1.0, 0.0, float("inf"), 1e-40, -0.0]))
    elif kind == "count":
        args[name] = draw(st.sampled_from([0, 1, -1, -(2**40), max(value - 1, 0), 2**40]))
    elif kind == "factor":
        args[name] = draw(st.sampled_from([float("nan"), -1.0, 2.0, float("inf")]))
    elif kind == "train":
        args[name] = not value
    else:
        args[name] = hostile_tensor(args, name, value, template, draw)
    return name


def hostile_tensor(args, name, value, template, draw):
    change = draw(st.sampled_from(["dtype", "shape", "meta", "none", "strided", "expanded", "alias", "nonfinite",
                                   "empty"]))
    if value is None:  # an absent optional tensor: change a plausible one instead
        value = torch.ones_like(template) if name == "residual" else torch.ones(template.shape[1])
    if change == "dtype":
        value = value.real if value.is_complex() else value  # an earlier change made it complex
        dtype = draw(st.sampled_from([torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8,
                                      *[f for f in FLOATS if f != value.dtype]]))
        return value.to(dtype) if dtype != torch.complex64 else value.to(torch.float32).to(dtype)
    if value.dim() == 0:  # an earlier change made it a scalar
        return value.reshape(1, 1) if change == "shape" else value
    if change == "shape":
        if value.dim() == 1:
            return draw(st.sampled_from([torch.ones(value.numel() + 1, dtype=value.dtype),
                                         value.unsqueeze(1), value.sum()]))
        return draw(st.sampled_from([value[..., :0] if value.dim() > 2 else value[:, :0],
                                     value.flatten(2) if value.dim() > 3 else value.unsqueeze(-1),
                                     value.sum(1)]))
    if change == "meta":
        return value.to("meta")
    if change == "none":
        return None
    if change == "strided":
        return torch.stack([value, value], -1)[..., 0]  # the same values, strides doubled
    if change == "expanded":
        if value.numel() == 0:
            return value
        first = value.reshape(-1)[:1]
        return first.view([1] * value.dim()).expand(value.shape)
    if change == "alias":
        partner = {"running_var": "running_mean", "running_mean": "running_var", "var": "mean", "mean": "var",
                   "residual": "input", "grad_output": "input", "input": "grad_output", "bias": "weight",
                   "weight": "bias", "sum_dy_xmu": "sum_dy", "sum_dy": "sum_dy_xmu", "output": "grad_output"}
        other = args.get(partner.get(name))
        return other if other is not None else value
    if change == "nonfinite":
        if value.numel() == 0 or not value.is_floating_point():
            return value
        changed = value.clone()
        index = torch.unravel_index(torch.tensor(draw(st.integers(0, value.numel() - 1))), value.shape)
        changed[tuple(index)] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        return changed
    # "empty": no values (a batch of 0, or no channels for a vector)
    return value[:0]


# ------------------------------------------------------------------ float64 answers


def f64(t):
    return None if t is None else t.double()


def bn_parts(args, x, mean, var):
    """(xhat, z without residual, scale = weight * invstd) in float64, per-channel views."""
    invstd = torch.rsqrt(f64(var) + args["eps"])
    w = f64(args.get("weight"))
    b = f64(args.get("bias"))
    xhat = (f64(x) - view(f64(mean), x)) * view(invstd, x)
    z = xhat * (view(w, x) if w is not None else 1.0) + (view(b, x) if b is not None else 0.0)
    scale = invstd * (w if w is not None else 1.0)
    return xhat, z, scale


def batch_stats(x):
    dims = [0] + list(range(2, x.dim()))
    if x.numel() == 0:
        nan = torch.full((x.shape[1],), float("nan"), dtype=torch.float64)
        return nan, nan.clone()
    return f64(x).mean(dims), f64(x).var(dims, unbiased=False)


# Training-mode grad_input is computed as dy * k + (x - mean) * k' + k'' with per-channel
# coefficients; where weight * invstd is infinite (an infinite weight, or var + eps = 0) that
# gives NaN in places where the grouped float64 formula gives +-inf. Accepted: both say the
# channel's gradient is not a number one can use. LOOSE records those places per call.
LOOSE = {}
GRAD_INPUT_OPS = ("batch_norm_backward", "batch_norm_add_act_backward", "batch_norm_backward_elemt")


def grads(args, x, dy, mean, var, train, count, sums=None):
    """(dx, grad_weight, grad_bias, g, sum(g * (x - mean))) of act(bn(x) [+ residual]) in float64."""
    xhat, z, scale = bn_parts(args, x, mean, var)
    if args.get("residual") is not None:
        z = z + f64(args["residual"])
    g = f64(dy) * ops.activation_grad(z, args["activation"], args["activation_param"])
    dims = [0] + list(range(2, x.dim()))
    sum_g, sum_g_xmu = (g.sum(dims), (g * (f64(x) - view(f64(mean), x))).sum(dims)) if sums is None else sums
    invstd = torch.rsqrt(f64(var) + args["eps"])
    grad_weight = (g * xhat).sum(dims)  # 0 for an empty batch, as torch gives
    if train:
        LOOSE["dx"] = view(~torch.isfinite(scale) | ~torch.isfinite(invstd), x).expand(x.shape)
        dx = view(scale, x) * (g - view(sum_g / count, x) - (f64(x) - view(f64(mean), x)) * view(
            invstd * invstd * sum_g_xmu / count, x))
    else:
        dx = g * view(scale, x)
    return dx, grad_weight, sum_g, g, sum_g_xmu


def reference(op, a, shared=()):
    """The float64 answer: (outputs, {written argument: its expected value}) from the
    arguments' values before the call; `shared`: the arguments expanded from one value."""
    act = (a.get("activation"), a.get("activation_param"))
    if op in ("batch_norm_train", "batch_norm_train_", "batch_norm_eval", "batch_norm_eval_"):
        x = a["input"]
        mean, var = batch_stats(x) if "train" in op else (a["running_mean"], a["running_var"])
        _, z, _ = bn_parts(a, x, mean, var)
        if a.get("residual") is not None:
            z = z + f64(a["residual"])
        y = ops.activation_forward(z, *act)
        if op == "batch_norm_train":
            return (y, mean, var), {}
        if op == "batch_norm_eval":
            return (y,), {}
        return ((mean, var) if op == "batch_norm_train_" else ()), {"input": y}
    if op == "batch_norm_stats":
        return batch_stats(a["input"]), {}
    if op == "update_running_stats":
        f, count = a["factor"], a["count"]
        if count == 0:
            return (), {}
        unbiased = f64(a["var"]) * count / (count - 1)
        return (), {"running_mean": running_update(a["running_mean"], f64(a["mean"]), f, "running_mean" in shared),
                    "running_var": running_update(a["running_var"], unbiased, f, "running_var" in shared)}
    x = a.get("input")
    count = x.numel() // x.shape[1] if x is not None and x.shape[1] else 0
    if op == "batch_norm_backward":
        dx, gw, gb, *_ = grads(a, x, a["grad_output"], a["mean"], a["var"], a["train"], count)
        return (dx, gw, gb), {}
    if op == "batch_norm_add_act_backward":
        dx, gw, gb, g, _ = grads(a, x, a["grad_output"], a["mean"], a["var"], a["train"], count)
        return (dx, g, gw, gb), {}
    if op == "batch_norm_backward_reduce":
        *_, sum_g, _, sum_g_xmu = grads(a, x, a["grad_output"], a["mean"], a["var"], True, count)
        return (sum_g, sum_g_xmu), {}
    if op == "batch_norm_backward_elemt":
        dx, *_ = grads(a, x, a["grad_output"], a["mean"], a["var"], True, a["count"],
                       sums=(f64(a["sum_dy"]), f64(a["sum_dy_xmu"])))
        return (dx,), {}
    # batch_norm_invert_output
    y, code, param = f64(a["output"]), a["activation"], a["activation_param"]
    floor = math.log(torch.finfo(a["output"].dtype).eps / 4)
    if code == 2:
        z, slope = torch.where(y > 0, y, y / param), torch.where(y > 0, torch.ones_like(y), torch.full_like(y, param))
    elif code == 3:
        z = torch.where(y > 0, y, torch.log1p((y / param).clamp(min=-1.0)).clamp(min=floor))
        slope = torch.where(y > 0, 1.0, (y + param).clamp(min=0.0))
    else:
        z, slope = y, torch.ones_like(y)
    _, _, scale = bn_parts(a, a["output"], torch.zeros_like(f64(a["var"])), a["var"])
    b = f64(a["bias"]) if a["bias"] is not None else torch.zeros_like(scale)
    return (f64(a["grad_output"]) * slope, (z - view(b, y)) / view(scale, y)), {}


def running_update(running, batch, factor, shared):
    """torch's update; an expanded (shared) buffer takes the channels' updates in turn."""
    old = f64(running)
    if shared:
        value = old[0]
        for c in range(running.numel()):
            value = (1 - factor) * value + factor * batch[c]
        return value.expand(running.shape)
    return (1 - factor) * old + factor * batch


# ------------------------------------------------------------------ the oracle


def snapshot(args):
    return {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        ((a == b) | (torch.isnan(a) & torch.isnan(b))).all() if a.numel() else True)


def assert_answer(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    tol = TOLERANCE[dtype] * scale
    torch.testing.assert_close(actual.double(), expected, rtol=TOLERANCE[dtype], atol=tol, equal_nan=True, msg=what)


def check_call(op, args, changed, acc):
    HOSTILE_CALLS[op] += 1
    before = snapshot(args)
    written = {name for name, _, _, w in parse(SCHEMAS[op]) if w}
    try:
        result = getattr(torch.ops.fastbn, op)(*args.values())
    except ERRORS as error:
        message = str(error)
        assert f"fastbn.{op}" in message or f"fastbn::{op}" in message, f"{op}: the error names no op: {message}"
        assert any(name in message for name in changed), f"{op}: the error names none of {changed}: {message}"
        for name, value in before.items():
            assert same_bits(args[name], value), f"{op}: rejected ({message}) but {name} was written"
        return "rejected"
    if any(isinstance(v, torch.Tensor) and v.device.type == "meta" for v in args.values()):
        return "shapes only"  # every tensor on meta: nothing to compute
    outputs = result if isinstance(result, tuple) else (() if result is None else (result,))
    LOOSE.clear()
    shared = {k for k, v in args.items() if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() > 1
              and v.stride(0) == 0}
    expected, expected_written = reference(op, {k: (before.get(k, v)) for k, v in args.items()}, shared)
    dtype = next(v.dtype for k, v in args.items() if k in ("input", "output", "running_mean"))
    dtype = acc if op == "update_running_stats" else dtype
    assert len(outputs) == len(expected), f"{op}: {len(outputs)} outputs, expected {len(expected)}"
    for i, (out, exp) in enumerate(zip(outputs, expected)):
        out_dtype = dtype if out.dtype in (torch.float16, torch.bfloat16) else out.dtype
        exp = exp.to(out.dtype).double()  # the float64 answer rounded as the output must be (overflow: inf)
        if i == 0 and op in GRAD_INPUT_OPS and "dx" in LOOSE and LOOSE["dx"].shape == exp.shape:
            exp = torch.where(LOOSE["dx"] & torch.isinf(exp) & torch.isnan(out), float("nan"), exp)
        assert_answer(out, exp, out_dtype, f"{op} output {i} (changed {changed})")
    for name, value in before.items():
        if name in expected_written:
            target = args[name]
            assert_answer(target, expected_written[name], target.dtype if target.dtype in TOLERANCE else acc,
                          f"{op} {name} written (changed {changed})")
        else:
            assert same_bits(args[name], value), f"{op}: {name} changed but the op does not write it"
    return "answered"


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print("\nhostile calls per op:", dict(sorted(HOSTILE_CALLS.items())), "total", sum(HOSTILE_CALLS.values()))
    for op in sorted(HOSTILE_CALLS):
        print(f"  {op}: " + ", ".join(f"{what} {OUTCOMES[op, what]}" for what in ("rejected", "answered", "shapes only")))


@pytest.mark.parametrize("op", list(SCHEMAS))
@settings(max_examples=EXAMPLES_PER_OP, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hostile_direct_calls(op, data):
    torch.manual_seed(0)
    args, acc, template = valid_call(op, data.draw)
    changed = [hostile_change(op, args, template, data.draw)]
    if data.draw(st.integers(0, 3)) == 0:  # now and then a second change
        changed.append(hostile_change(op, args, template, data.draw))
    try:
        OUTCOMES[op, check_call(op, args, changed, acc)] += 1
    except AssertionError as failure:
        failure.add_note("arguments: " + ", ".join(f"{k}={describe(v)}" for k, v in args.items()))
        raise


def describe(value):
    if not isinstance(value, torch.Tensor):
        return repr(value)
    text = f"{value.dtype} {tuple(value.shape)} stride {value.stride()} on {value.device}"
    return text + (f" {value.flatten()[:12].tolist()}" if value.device.type != "meta" else "")

