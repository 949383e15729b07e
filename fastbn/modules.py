"""Drop-in batch-norm modules running fastbn's kernels.

Each class subclasses torch's own (same constructor, parameters, buffers,
state_dict keys, repr, train/eval and running-statistics semantics) and only
replaces ``forward`` (and takes an optional fused ``activation``). Unlike torch,
the input is checked before ``num_batches_tracked`` is incremented, so a
rejected batch changes nothing.
"""
from typing import Optional

from torch import Tensor, nn

from . import functional, ops
from . import inplace as _inplace
from . import interop


class _FastBatchNorm:
    """forward() of torch's _BatchNorm, on fastbn.functional, with an optional
    fused activation (``activation=None`` keeps the exact drop-in).

    ``forward(input, residual=None)``: with a residual, ``act(bn(input) + residual)``
    in one fused kernel (the end of a ResNet block).
    ``inplace=True``: in-place activated BN (see fastbn.inplace), the output
    written over the input and backward keeping only it; invertible activations only.
    """

    def __init__(self, *args, activation: Optional[str] = None, activation_param: Optional[float] = None,
                 inplace: bool = False, **kwargs) -> None:
        # Everything else goes to torch's constructor as it is, whatever its version takes.
        super().__init__(*args, **kwargs)
        self._activation_code, self._activation_param = functional.activation_arguments(activation, activation_param)
        if inplace:
            _inplace.check_invertible(self._activation_code, self._activation_param)
        self.activation = activation
        self.activation_param = (self._activation_param if self._activation_code in ops.PARAMETRIZED_ACTIVATIONS
                                 else None)
        self.inplace = bool(inplace)
        self.__module__ = interop.FX_LEAF_MODULE  # on the instance: a torch.fx leaf, like torch's (fastbn/interop.py)

    def __prepare_scriptable__(self):
        """torch.jit.script compiles a torch module sharing the parameters and buffers (fastbn/interop.py)."""
        return interop.scriptable_module(self)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self._activation_code:
            text += f", activation={self.activation!r}"
            if self.activation_param is not None:
                text += f", activation_param={self.activation_param}"
        if self.inplace:
            text += ", inplace=True"
        return text

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        if residual is not None and self.inplace:
            raise ValueError("fastbn: a residual cannot be added with inplace=True (the input it would be "
                             "recovered from is overwritten); use inplace=False")
        functional.check_residual(input, residual)
        # Buffers are used for normalization outside training (when they exist) and
        # are updated only in training mode when tracked: the same rule as torch's.
        # Parameters and buffers are read from the module's dicts once: through nn.Module.__getattr__
        # each read costs ~0.6 us (3 us of a small layer's forward). A name missing from its dict
        # (a parametrization; torch.func.functional_call's swapped-in tensors) is read as an attribute.
        params, buffers = self._parameters, self._buffers
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        running_mean = buffers["running_mean"] if "running_mean" in buffers else self.running_mean
        running_var = buffers["running_var"] if "running_var" in buffers else self.running_var
        num_batches_tracked = (buffers["num_batches_tracked"] if "num_batches_tracked" in buffers
                               else self.num_batches_tracked)
        training, momentum = self.training, self.momentum
        use_batch_stats = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        functional.check_batch_norm_args(input, running_mean, running_var, weight, bias, use_batch_stats, self.eps)
        if self.inplace:
            _inplace.check_inplace_call(input, weight, bias)

        counts_batch = training and self.track_running_stats and num_batches_tracked is not None
        factor = 0.0 if momentum is None else momentum
        if counts_batch and momentum is None:  # cumulative moving average, this batch included
            factor = 1.0 / float(num_batches_tracked + 1)
        output = functional.batch_norm_unchecked(input, running_mean, running_var, weight, bias, use_batch_stats,
                                                 factor, self.eps, self._activation_code, self._activation_param,
                                                 residual, self.inplace)
        if counts_batch:  # counted once the batch went through (torch counts it before, even if it then fails)
            num_batches_tracked.add_(1)
        return output


class BatchNorm1d(_FastBatchNorm, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on fastbn's kernels: input (N, C) or (N, C, L)."""


class BatchNorm2d(_FastBatchNorm, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on fastbn's kernels: input (N, C, H, W), NCHW or channels_last."""


class BatchNorm3d(_FastBatchNorm, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on fastbn's kernels: input (N, C, D, H, W), NCDHW or channels_last_3d."""
