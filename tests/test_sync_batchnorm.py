"""fastbn.SyncBatchNorm across 2 and 3 processes (gloo on loopback) against one
process holding the whole batch. Every collective runs under a timeout, and the
processes are joined with one, so a hang fails the test instead of stalling CI."""
import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastbn

TIMEOUT_S = 90


def _init(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
    torch.set_num_threads(1)


def full_batch(total, channels, channels_last, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = 3 + 2 * torch.randn(total, channels, 5, 4, generator=generator)
    grad = torch.randn(total, channels, 5, 4, generator=generator)
    if channels_last:
        x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    return x, grad


def make_bn(cls, channels, activation=None):
    bn = cls(channels, momentum=0.3, activation=activation)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels))
        bn.bias.copy_(torch.linspace(-1, 1, channels))
    return bn


def _bn_worker(rank, world, init_file, out_dir, sizes, channels, channels_last, activation, residual):
    try:
        _init(rank, world, init_file)
        x, grad = full_batch(sum(sizes), channels, channels_last)
        z, _ = full_batch(sum(sizes), channels, channels_last, seed=1)
        start = sum(sizes[:rank])
        bn = make_bn(fastbn.SyncBatchNorm, channels, activation)
        results = {}
        for step in range(2):
            xi = x[start:start + sizes[rank]].clone().requires_grad_()
            zi = z[start:start + sizes[rank]].clone().requires_grad_() if residual else None
            y = bn(xi) if zi is None else bn(xi, zi)
            y.backward(grad[start:start + sizes[rank]])
            grads = torch.cat([bn.weight.grad, bn.bias.grad])
            dist.all_reduce(grads)
            results[step] = dict(y=y.detach(), dx=xi.grad, grad_weight=grads[:channels], grad_bias=grads[channels:])
            if zi is not None:
                results[step]["dz"] = zi.grad
            bn.weight.grad = bn.bias.grad = None
        results["state"] = {k: v.clone() for k, v in bn.state_dict().items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())


def run_processes(target, world, tmp_path, *args):
    ctx = mp.get_context("spawn")
    init_file = str(tmp_path / "init")
    procs = [ctx.Process(target=target, args=(rank, world, init_file, str(tmp_path), *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} process(es) hung"
    return [tmp_path / f"rank{rank}" for rank in range(world)]


def load_results(paths):
    errors = [p.with_suffix(".err").read_text() for p in paths if p.with_suffix(".err").exists()]
    assert not errors, "\n".join(errors)
    return [torch.load(p.with_suffix(".pt"), weights_only=True) for p in paths]


@pytest.mark.parametrize("sizes,channels_last,activation,residual", [
    ([3, 5], False, None, False),     # 2 processes, uneven batches
    ([2, 0, 6], True, None, False),   # 3 processes, one with an empty batch, channels_last
    ([4, 3], False, "relu", False),   # fused activation
    ([4, 3], False, "relu", True),    # relu(sync_bn(x) + residual)
], ids=str)
def test_sync_matches_single_process(sizes, channels_last, activation, residual, tmp_path):
    channels = 6
    paths = run_processes(_bn_worker, len(sizes), tmp_path, sizes, channels, channels_last, activation, residual)
    results = load_results(paths)
    x, grad = full_batch(sum(sizes), channels, channels_last)
    z, _ = full_batch(sum(sizes), channels, channels_last, seed=1)
    reference = make_bn(fastbn.BatchNorm2d, channels, activation)
    for step in range(2):
        xr = x.clone().requires_grad_()
        zr = z.clone().requires_grad_()
        y = reference(xr, zr) if residual else reference(xr)
        y.backward(grad)
        if residual:
            torch.testing.assert_close(torch.cat([r[step]["dz"] for r in results]), zr.grad, rtol=1e-5, atol=1e-6)
        y_sync = torch.cat([r[step]["y"] for r in results])
        dx_sync = torch.cat([r[step]["dx"] for r in results])
        torch.testing.assert_close(y_sync, y.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx_sync, xr.grad, rtol=1e-4, atol=1e-5)
        for r in results:
            torch.testing.assert_close(r[step]["grad_weight"], reference.weight.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(r[step]["grad_bias"], reference.bias.grad, rtol=1e-4, atol=1e-5)
        reference.weight.grad = reference.bias.grad = None
    for r in results:
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(r["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def ddp_batches(total):
    generator = torch.Generator().manual_seed(2)
    return [(torch.randn(total, 2, 7, 7, generator=generator) + 1, torch.randint(0, 3, (total,), generator=generator))
            for _ in range(3)]


def _ddp_worker(rank, world, init_file, out_dir, sizes):
    try:
        _init(rank, world, init_file)
        model = fastbn.SyncBatchNorm.convert_sync_batchnorm(SmallNet())
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        start, total = sum(sizes[:rank]), sum(sizes)
        for x, y in ddp_batches(total):
            optimizer.zero_grad()
            out = ddp(x[start:start + sizes[rank]])
            # DDP averages grads over processes: scale so that it equals the full batch's mean loss
            loss = nn.functional.cross_entropy(out, y[start:start + sizes[rank]], reduction="sum") * world / total
            loss.backward()
            optimizer.step()
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())


def test_ddp_training_matches_single_process(tmp_path):
    sizes = [5, 3]
    results = load_results(run_processes(_ddp_worker, 2, tmp_path, sizes))
    model = fastbn.convert_model(SmallNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in ddp_batches(sum(sizes)):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for r in results:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(r[key], value, rtol=1e-4, atol=1e-5, msg=key)


def _mismatch_worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    channels = 4 + rank  # the bug being tested: processes disagree on C
    bn = fastbn.SyncBatchNorm(channels)
    try:
        bn(torch.randn(3, channels, 4, 4))
        message = "no error"
    except RuntimeError as error:
        message = str(error)
    with open(os.path.join(out_dir, f"rank{rank}.msg"), "w") as f:
        f.write(message)
    assert bn.running_mean.abs().sum() == 0


def test_mismatched_channels_raise_on_every_process(tmp_path):
    paths = run_processes(_mismatch_worker, 2, tmp_path)
    for p in paths:
        assert "disagree on the number of channels" in p.with_suffix(".msg").read_text()


def test_eval_and_single_process_are_plain_batch_norm():
    sync, plain = make_bn(fastbn.SyncBatchNorm, 3), make_bn(fastbn.BatchNorm2d, 3)
    x = torch.randn(4, 3, 5, 5) + 2
    torch.testing.assert_close(sync(x), plain(x))  # no process group: plain BN
    sync.eval(), plain.eval()
    torch.testing.assert_close(sync(x), plain(x))
    assert sync.state_dict().keys() == nn.BatchNorm2d(3).state_dict().keys()
    converted = fastbn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm1d(2)))
    assert all(isinstance(m, fastbn.SyncBatchNorm) for m in converted)


def test_repr_matches_torch():
    assert repr(fastbn.SyncBatchNorm(3, momentum=None)) == repr(nn.SyncBatchNorm(3, momentum=None))


def test_opcheck_phase_ops():
    for channels_last in (False, True):
        x = (torch.randn(4, 5, 3, 3) + 2)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn_like(x)
        weight, bias = torch.randn(5), torch.randn(5)
        mean, var = torch.ops.fastbn.batch_norm_stats(x)
        torch.testing.assert_close(mean, x.mean((0, 2, 3)))
        torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False))
        torch.library.opcheck(torch.ops.fastbn.batch_norm_stats.default, (x,))
        sums = torch.ops.fastbn.batch_norm_backward_reduce(grad, x, weight, bias, mean, var, 1e-5)
        torch.library.opcheck(torch.ops.fastbn.batch_norm_backward_reduce.default,
                              (grad, x, weight, bias, mean, var, 1e-5, 1, 0.0))
        torch.library.opcheck(torch.ops.fastbn.batch_norm_backward_elemt.default,
                              (grad, x, weight, bias, mean, var, *sums, 1e-5, 36))
        # the two phases compose to the fused backward
        dx = torch.ops.fastbn.batch_norm_backward_elemt(grad, x, weight, bias, mean, var, *sums, 1e-5, 36)
        dx_fused, _, _ = torch.ops.fastbn.batch_norm_backward(grad, x, weight, bias, mean, var, 1e-5, True)
        torch.testing.assert_close(dx, dx_fused)


def _refused_batch_worker(rank, world, init_file, out_dir, case):
    _init(rank, world, init_file)
    bn = fastbn.SyncBatchNorm(3)
    if case == "one value in total":  # each process's batch is fine alone; the global one is not
        x = torch.randn(1 - rank, 3, 1, 1)
    else:  # "refused on one process": rank 1's input is an integer tensor
        x = torch.randn(2, 3, 2, 2) if rank == 0 else torch.ones(2, 3, 2, 2, dtype=torch.long)
    try:
        bn(x)
        message = "no error"
    except (RuntimeError, ValueError, TypeError) as error:
        message = f"{type(error).__name__}: {error}"
    finally:
        if rank == 1 and case != "one value in total":
            dist.destroy_process_group()  # rank 0 waits in a collective: leave it, as a failed process would
    with open(os.path.join(out_dir, f"rank{rank}.msg"), "w") as f:
        f.write(message)
    torch.save({k: v.clone() for k, v in bn.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("case", ["one value in total", "refused on one process"])
def test_refused_batch_leaves_every_process_unchanged(case, tmp_path):
    """No process counts (num_batches_tracked) or averages a batch that some process refused."""
    run_processes(_refused_batch_worker, 2, tmp_path, case)
    fresh = fastbn.SyncBatchNorm(3).state_dict()
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.msg").read_text()
        assert message != "no error", f"rank {rank} accepted the batch"
        if case == "one value in total":
            assert "more than 1 value per channel" in message
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in fresh.items():
            assert torch.equal(state[key], value), f"rank {rank}: {key} changed by a refused batch"
