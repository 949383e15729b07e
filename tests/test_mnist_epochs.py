"""Tests of bench/mnist_epochs.py (paired epoch timing of fastbn-mnist's model) on a tiny
synthetic data set: the structure of its results and what each timed epoch trained,
never the timings themselves."""
import json
import statistics

import pytest
import torch

import fastbn
from bench import mnist_epochs
from conftest import CUDA_EMULATED
from fastbn import mnist
from test_mnist import write_tiny_dataset

# As test_mnist.py under emulation (conftest): batch-250 MNIST steps take minutes of emulated kernel time.
pytestmark = pytest.mark.skipif(CUDA_EMULATED, reason="under emulation MNIST training takes minutes of "
                                                      "emulated kernel time per step")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # the tool sets torch's process-wide thread count
    yield
    torch.set_num_threads(threads)


def variant_of(model) -> str:
    if any(isinstance(m, fastbn.BatchNorm2d) for m in model.modules()):
        return "fastbn"
    return "torch" if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) else "none"


def test_rounds_alternate_and_train_the_same_batches_from_the_same_state(tmp_path, monkeypatch, capsys):
    write_tiny_dataset(tmp_path / "data" / "MNIST" / "raw", n_train=600)  # 480 to train on: batches of 250, 230
    calls = []  # (variant, its batches' inputs, its state at the start, whether Adam was fresh)
    train_epoch = mnist.train_epoch

    def recording_train_epoch(model, optimizer, x, y, *args, **kwargs):
        batches = []
        hook = model.register_forward_pre_hook(lambda module, inputs: batches.append(inputs[0].clone()))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        fresh_optimizer = not optimizer.state
        try:
            return train_epoch(model, optimizer, x, y, *args, **kwargs)
        finally:
            hook.remove()
            calls.append((variant_of(model), batches, state, fresh_optimizer))

    monkeypatch.setattr(mnist, "train_epoch", recording_train_epoch)
    out = tmp_path / "epochs.json"
    assert mnist_epochs.main(["--data-dir", str(tmp_path / "data"), "--rounds", "3", "--no-bn", "--threads", "1",
                              "--warmup-batches", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())

    assert record["variants"] == ["torch", "fastbn", "none"]
    assert record["threads"] == 1 and record["batch_size"] == 250 and record["train_images"] == 480
    rounds = record["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["order"] for r in rounds] == [["torch", "fastbn", "none"], ["none", "fastbn", "torch"],
                                            ["torch", "fastbn", "none"]]
    for r in rounds:
        seconds = {bn: r["epochs"][bn]["seconds"] for bn in record["variants"]}
        assert all(s > 0 for s in seconds.values())
        assert r["ratios"] == {"fastbn/torch": seconds["fastbn"] / seconds["torch"],
                               "none/torch": seconds["none"] / seconds["torch"]}
        assert isinstance(r["busy"], bool) and r["attempts"] == 1  # no --wait-idle: never retimed
    for name in ("fastbn/torch", "none/torch"):
        assert record["median_ratios"][name] == statistics.median(r["ratios"][name] for r in rounds)

    # One warm-up epoch of one batch per variant, then the timed epochs in the rounds' order.
    warmups, timed = calls[:3], calls[3:]
    assert [c[0] for c in warmups] == ["torch", "fastbn", "none"] and all(len(c[1]) == 1 for c in warmups)
    assert [c[0] for c in timed] == [bn for r in rounds for bn in r["order"]]
    first_batches = timed[0][1]
    assert [len(b) for b in first_batches] == [250, 230]
    for variant, batches, state, fresh_optimizer in timed:
        # The same batches in the same order for every variant and round ...
        assert len(batches) == 2 and all(torch.equal(a, b) for a, b in zip(batches, first_batches))
        # ... from the variant's initial weights (the CLI's, by seed) and a fresh Adam.
        initial = mnist.make_model(variant, 0).state_dict()
        assert state.keys() == initial.keys() and all(torch.equal(state[k], initial[k]) for k in state)
        assert fresh_optimizer
    # The same computation every round: each variant's training loss repeats exactly (one thread).
    for bn in record["variants"]:
        assert len({r["epochs"][bn]["train_loss"] for r in rounds}) == 1
    # torch's and fastbn's batch norm trained the same batches from the same weights.
    losses = rounds[0]["epochs"]
    assert losses["fastbn"]["train_loss"] == pytest.approx(losses["torch"]["train_loss"], rel=1e-4)

    table = capsys.readouterr().out
    assert "| median |" in table and f"{record['median_ratios']['fastbn/torch']:.3f}" in table
