"""fastbn-mnist's reports: per-epoch metrics (CSV and JSON) and PNG plots, each
written atomically (a temporary file renamed into place), and the table of results."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, List

from . import data as mnist_data


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    mnist_data._atomic_write(path, lambda f: f.write(data))


METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                 "train_seconds", "epoch_seconds")


def write_metrics(out: Path, history: List[dict], config: dict, extra: dict) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in METRIC_FIELDS})
    _atomic_write_bytes(out / "metrics.csv", text.getvalue().encode())
    doc = {"config": config, **extra, "epochs": history, "final": history[-1] if history else None}
    _atomic_write_bytes(out / "metrics.json", (json.dumps(doc, indent=2) + "\n").encode())


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _atomic_write_bytes(path, buffer.getvalue())


def plot_history(history: List[dict], path: Path, title: str) -> None:
    """Train and validation accuracy (and loss) per epoch for one variant."""
    # matplotlib's object API without pyplot: no global backend switch, no
    # display needed.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for ax, metric in ((acc_ax, "acc"), (loss_ax, "loss")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_overlay(histories: Dict[str, List[dict]], path: Path, title: str) -> None:
    """Train (dashed) and validation (solid) accuracy of all variants on one plot."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for i, (variant, history) in enumerate(histories.items()):
        # torch and fastbn curves nearly coincide: later variants get thinner
        # lines and smaller, different markers so the earlier ones show through.
        style = {"color": f"C{i}", "linewidth": 3.0 - i, "markersize": 9 - 2.5 * i}
        marker = "os^D"[i % 4]
        epochs = [r["epoch"] for r in history]
        ax.plot(epochs, [r["train_acc"] for r in history], "--", label=f"{variant} train", **style)
        ax.plot(epochs, [r["val_acc"] for r in history], marker + "-", label=f"{variant} validation", **style)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


def format_table(rows: Dict[str, dict]) -> str:
    header = f"{'bn':<8}{'epochs':>7}{'val_acc':>9}{'val_loss':>10}{'test_acc':>10}{'test_loss':>11}{'s/epoch':>9}"
    lines = [header, "-" * len(header)]
    for variant, s in rows.items():
        lines.append(f"{variant:<8}{s['epochs']:>7}{s['val_acc']:>9.4f}{s['val_loss']:>10.4f}"
                     f"{s['test_acc']:>10.4f}{s['test_loss']:>11.4f}{s['seconds_per_epoch']:>9.1f}")
    return "\n".join(lines)
