"""SyncBatchNorm over torch.distributed, on CPU (gloo) and CUDA (NCCL).

Training forward: each process computes its channels' local count, mean and
biased variance with fastbn's kernels; one all_gather brings every process's
(count, mean, M2) and each merges them (Chan's formula, in float64), so uneven
batches and empty batches count exactly. Backward: one all_reduce of the packed
per-channel (sum(dy), sum(dy * (x - mean))). Weight and bias gradients stay
local, as in torch's SyncBatchNorm (DistributedDataParallel reduces them).
Evaluation, or a world of one process, is plain fastbn batch norm.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional, modules, ops


def _merge_moments(count: Tensor, mean: Tensor, var: Tensor):
    """Merge per-process moments: count (P,), mean and var (P, C), all float64 -> (total, mean, var)."""
    total = count.sum()
    weights = count.unsqueeze(1)
    merged_mean = (weights * mean).sum(0) / total
    m2 = (weights * var).sum(0) + (weights * (mean - merged_mean) ** 2).sum(0)
    return total, merged_mean, m2 / total


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, factor, process_group, world_size,
                activation, activation_param):
        channels = input.shape[1]
        local_count = input.numel() // channels if channels else 0
        mean, var = ops.batch_norm_stats_raw(input)
        packed = torch.cat([torch.tensor([float(channels), float(local_count)], device=input.device),
                            mean.double(), var.double()]).double()
        if local_count == 0:  # no values here: contributes nothing (its mean/var are NaN)
            packed[2:] = 0
        # Channel counts first: a mismatch must raise on every process, not hang a collective.
        sizes = [torch.zeros(1, dtype=torch.long, device=input.device) for _ in range(world_size)]
        dist.all_gather(sizes, torch.tensor([packed.numel()], device=input.device), group=process_group)
        if any(int(s.item()) != packed.numel() for s in sizes):
            raise RuntimeError(f"fastbn.SyncBatchNorm: processes disagree on the number of channels "
                               f"(packed stats sizes {[int(s.item()) for s in sizes]}, this process has {channels})")
        gathered = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(gathered, packed, group=process_group)
        stacked = torch.stack(gathered)
        total, global_mean, global_var = _merge_moments(stacked[:, 1], stacked[:, 2:2 + channels],
                                                        stacked[:, 2 + channels:])
        total = int(total.item())
        if total == 1:
            raise ValueError("Expected more than 1 value per channel when training, got 1 over all processes")
        acc = ops.accumulate_dtype(input.dtype)
        mean, var = global_mean.to(acc), global_var.to(acc)
        if running_mean is not None and total > 0:
            ops.update_running_stats(running_mean, running_var, mean, var, factor, total)
        ctx.save_for_backward(input, weight, bias, mean, var)
        ctx.eps, ctx.count, ctx.activation, ctx.activation_param = eps, total, activation, activation_param
        ctx.process_group = process_group
        if input.numel() == 0:
            return input.clone()
        return torch.ops.fastbn.batch_norm_eval(input, weight, bias, mean, var, eps, activation, activation_param)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, mean, var = ctx.saved_tensors
        act = (ctx.activation, ctx.activation_param)
        grad_output = grad_output.contiguous(memory_format=ops.output_memory_format(input))
        sum_dy, sum_dy_xmu = torch.ops.fastbn.batch_norm_backward_reduce(
            grad_output, input, weight, bias, mean, var, ctx.eps, *act)
        # The parameter grads are this process's (DDP all-reduces them); dx needs the global sums.
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * torch.rsqrt(var + ctx.eps)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(bias.dtype)
        packed = torch.cat([sum_dy, sum_dy_xmu]).double()
        dist.all_reduce(packed, group=ctx.process_group)
        packed = packed.to(sum_dy.dtype)
        channels = input.shape[1]
        grad_input = torch.ops.fastbn.batch_norm_backward_elemt(
            grad_output, input, weight, bias, mean, var, packed[:channels], packed[channels:], ctx.eps, ctx.count, *act)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None


class SyncBatchNorm(modules._FastBatchNorm, nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm on fastbn's kernels, for any torch.distributed backend
    (gloo on CPU tensors, NCCL on CUDA tensors). Same constructor (plus fastbn's
    optional fused ``activation``), state_dict and semantics as torch's.

    Not a subclass of torch.nn.SyncBatchNorm: DistributedDataParallel refuses
    those outside CUDA."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, **kwargs) -> None:
        if kwargs.get("inplace"):
            raise ValueError("fastbn.SyncBatchNorm does not support inplace=True (in-place activated BN); "
                             "use fastbn.BatchNorm*d(..., inplace=True) or inplace=False")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """act(sync_bn(input) [+ residual]); the residual add is not fused across processes."""
        self._check_input_dim(input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        need_sync = use_batch_stats and self.training and dist.is_available() and dist.is_initialized()
        group = (self.process_group or dist.group.WORLD) if need_sync else None
        world_size = dist.get_world_size(group) if need_sync else 1
        if world_size == 1:
            return super().forward(input, residual)  # plain (fastbn) batch norm
        pass_buffers = self.track_running_stats
        running_mean = self.running_mean if pass_buffers else None
        running_var = self.running_var if pass_buffers else None
        # The one-value-per-channel rule applies to the global batch (checked after the gather).
        functional.check_batch_norm_args(input, running_mean, running_var, self.weight, self.bias, False, self.eps)
        functional.check_residual(input, residual)
        # With a residual the activation comes after the add, outside the synced op.
        code, param = ((ops.Activation.IDENTITY, 0.0) if residual is not None
                       else (self._activation_code, self._activation_param))
        counts_batch = self.track_running_stats and self.num_batches_tracked is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if counts_batch and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)
        if input.is_cuda and not ops.use_cuda_kernels():
            # fastbn's CUDA kernels are not validated on a GPU yet (fastbn.ops.CUDA_KERNELS_VALIDATED):
            # torch's own CUDA SyncBatchNorm function, then the activation.
            from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNormFunction
            output = TorchSyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var,
                                                      self.eps, factor, group, world_size)
            code, param = ops.Activation.IDENTITY, 0.0
        else:
            output = _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                                  factor, group, world_size, code, param)
        # Counted only once every process got through the gathered checks, so that a batch one
        # process refused (or one value in total) leaves every process's count as it was.
        if counts_batch:
            self.num_batches_tracked.add_(1)
        if residual is not None:
            output = output + residual
        if code != self._activation_code:
            output = ops.activation_forward(output, self._activation_code, self._activation_param)
        return output

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every batch norm (torch's or fastbn's, 1d/2d/3d) in `module` by
        fastbn.SyncBatchNorm sharing its parameters and buffers, like torch's converter."""
        output = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
            output = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                         process_group, activation=getattr(module, "activation", None),
                         activation_param=getattr(module, "activation_param", None))
            output._parameters.update(module._parameters)
            output._buffers.update(module._buffers)
            output.train(module.training)
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return output
