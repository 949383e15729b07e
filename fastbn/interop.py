"""fastbn's modules in torch's model tools: torch.fx, torch.ao fusion, TorchScript, ONNX export.

Each tool recognizes torch's batch norm by name or by exact type, so each gets
what it knows: an fx leaf, torch's fuser methods, a torch module, torch ops.

- torch.fx (symbolic_trace and every fx-based tool) keeps a module as one
  ``call_module`` node (a leaf) when ``module.__module__`` starts with
  "torch.nn"; fastbn's modules set FX_LEAF_MODULE on the instance (the class
  keeps its own ``__module__``, which pickling uses), so train()/eval() and the
  running statistics behave in a traced GraphModule as in the model.
- torch.ao.quantization.fuse_modules[_qat]: FUSER_METHOD_MAPPING, passed as
  ``fuse_custom_config_dict={"additional_fuser_method_mapping": fastbn.FUSER_METHOD_MAPPING}``.
- torch.jit.script: ``__prepare_scriptable__`` returns scriptable_module(bn).
- torch.onnx.export (both exporters): batch_norm_torch_ops() computes with
  standard torch ops while exporting, which the exporters translate to
  BatchNormalization, Add and the activation's ONNX op.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

# Starts with "torch.nn" (what torch.fx's Tracer.is_leaf_module and torch.ao's
# QuantizationTracer test) without a dot after it: torch._dynamo treats modules
# whose __module__ starts with "torch.nn." as torch's own (specialized differently).
FX_LEAF_MODULE = "torch.nn"


# ---------------------------------------------------------------- ONNX export


def onnx_exporting() -> bool:
    """Whether torch.onnx.export is tracing the model (either exporter).

    The legacy exporter traces with torch.jit and the torch.export-based one
    runs torch.export (where torch.compiler.is_compiling() is True); both calls
    are cheap, and only inside them is torch.onnx asked (it costs ~1 us).
    Under torch.compile, torch._dynamo takes is_in_onnx_export() as False."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()) and torch.onnx.is_in_onnx_export()


def batch_norm_torch_ops(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
                         eps: float, activation: int = 0, activation_param: float = 0.0,
                         residual: Optional[Tensor] = None) -> Tensor:
    """act(batch_norm(...) [+ residual]) with torch's ops (functional.batch_norm_unchecked's
    arguments): what the exporters and TorchScript see. Out of place even for inplace=True."""
    output = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        output = output + residual
    return ops.activation_forward(output, activation, activation_param)


# ---------------------------------------------------------------- torch modules sharing fastbn's state


def _torch_bn_class(bn: nn.Module) -> type:
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if isinstance(bn, cls):
            return cls
    raise NotImplementedError(f"fastbn: {type(bn).__name__} has no torch equivalent here (it syncs statistics "
                              "across processes); convert it to fastbn.BatchNorm1d/2d/3d first")


def _sharing_state(bn: nn.Module, cls: type, hooks: bool) -> nn.Module:
    """An instance of `cls` with bn's settings, mode, the same parameter and buffer tensors and,
    with `hooks`, its hooks."""
    twin = cls.__new__(cls)
    for key, value in vars(bn).items():
        if isinstance(value, (dict, set)):  # own containers, the same tensors (or hooks) in them
            value = type(value)(value if hooks or "hook" not in key else ())
        twin.__dict__[key] = value
    twin.__dict__.pop("__module__", None)  # a torch class is an fx leaf by its own __module__
    return twin


# ---------------------------------------------------------------- TorchScript


class _ScriptableForward:
    """forward of torch's BatchNorm (torch's kernels and semantics: a training batch is
    counted before it is normalized), then fastbn's residual add and activation."""

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        momentum = self.momentum
        factor = 0.0 if momentum is None else momentum
        num_batches_tracked = self.num_batches_tracked
        if self.training and self.track_running_stats and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average
                factor = 1.0 / float(num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        return batch_norm_torch_ops(input, self.running_mean if pass_buffers else None,
                                    self.running_var if pass_buffers else None, self.weight, self.bias,
                                    use_batch_stats, factor, self.eps, self._activation_code,
                                    self._activation_param, residual)


class ScriptableBatchNorm1d(_ScriptableForward, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d with fastbn's residual and activation, for torch.jit.script."""


class ScriptableBatchNorm2d(_ScriptableForward, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d with fastbn's residual and activation, for torch.jit.script."""


class ScriptableBatchNorm3d(_ScriptableForward, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d with fastbn's residual and activation, for torch.jit.script."""


_SCRIPTABLE = {nn.BatchNorm1d: ScriptableBatchNorm1d, nn.BatchNorm2d: ScriptableBatchNorm2d,
               nn.BatchNorm3d: ScriptableBatchNorm3d}


def scriptable_module(bn: nn.Module) -> nn.Module:
    """What torch.jit.script compiles for a fastbn module: a subclass of torch's BatchNorm*d
    sharing its parameters and buffers (same state_dict keys), on torch's kernels."""
    twin = _sharing_state(bn, _SCRIPTABLE[_torch_bn_class(bn)], hooks=True)
    twin._activation_code = int(bn._activation_code)  # TorchScript would type an IntEnum attribute as an enum
    return twin


# ---------------------------------------------------------------- torch.ao.quantization.fuse_modules


def _fastbn_fuser_method(torch_types: tuple, bn_index: int):
    """torch's fuser method for `torch_types`, given fastbn's module at `bn_index`: torch's
    BatchNorm sharing its state goes to torch's method (QAT's intrinsic modules check exact
    types); a fused activation becomes torch's (..., ReLU) fusion or follows the fused module."""

    def fuser_method(is_qat, *modules):
        from torch.ao.quantization.fuser_method_mappings import get_fuser_method

        from .convert import _activation_module  # (convert imports modules, which imports this file)

        bn = modules[bn_index]
        code = bn._activation_code
        activation = _activation_module(code, bn._activation_param) if code else None
        if activation is not None and len(modules) > bn_index + 1:
            raise ValueError(f"fastbn: cannot fuse {bn} with the {type(modules[-1]).__name__} after it: its "
                             f"activation ({bn.activation!r}) is already fused; fuse without the "
                             f"{type(modules[-1]).__name__}")
        modules = list(modules)
        # without bn's hooks: fuse_modules moves them to the fused module (this one may live inside it)
        modules[bn_index] = _sharing_state(bn, _torch_bn_class(bn), hooks=False)
        if isinstance(activation, nn.ReLU):
            try:  # torch's intrinsic conv + bn + relu (ConvReLU2d in eval, ConvBnReLU2d for QAT)
                method = get_fuser_method(torch_types + (nn.ReLU,))
            except AssertionError:
                method = None
            if method is not None:
                activation.training = bn.training
                return method(is_qat, *modules, activation)
        fused = get_fuser_method(torch_types)(is_qat, *modules)
        return fused if activation is None else nn.Sequential(fused, activation).train(bn.training)

    return fuser_method


def fuser_method_mapping() -> dict:
    """{(types...): fuser method} for torch.ao.quantization.fuse_modules[_qat], the patterns of torch's
    table with fastbn's BatchNorm1d/2d/3d (fastbn.FUSER_METHOD_MAPPING is one made at import)."""
    from . import modules as fast
    mapping = {}
    fast_bn = {nn.BatchNorm1d: fast.BatchNorm1d, nn.BatchNorm2d: fast.BatchNorm2d, nn.BatchNorm3d: fast.BatchNorm3d}
    patterns = [(nn.Linear, nn.BatchNorm1d), (nn.BatchNorm2d, nn.ReLU), (nn.BatchNorm3d, nn.ReLU)]
    for conv, transpose, bn in ((nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
                                (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
                                (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d)):
        patterns += [(conv, bn), (conv, bn, nn.ReLU), (transpose, bn)]
    for torch_types in patterns:
        bn_index = next(i for i, t in enumerate(torch_types) if t in fast_bn)
        fast_types = tuple(fast_bn.get(t, t) for t in torch_types)
        mapping[fast_types] = _fastbn_fuser_method(torch_types, bn_index)
    return mapping
