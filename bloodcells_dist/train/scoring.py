"""Scoring a model: the one library function that training, evaluate, predict, report and cv share.

`score` turns batches into metrics (every sample of every rank counted once); `logits` is the model's
output with optional test-time augmentation; the file names and the confusion-matrix plot live here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..files import atomic_path
from .metrics import classification_metrics, confusion_matrix


def logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Logits, or with tta the mean logits over the identity, both flips and the 180-degree rotation."""
    if not tta:
        return model(images)
    views = (images, images.flip(-1), images.flip(-2), images.flip(-1, -2))
    return torch.stack([model(v).float() for v in views]).mean(0)


@torch.no_grad()
def score(model: torch.nn.Module, batches: Iterable, accelerator: Accelerator, classes: list[str],
          tta: bool = False, samples: list | None = None) -> dict:
    """Metrics over every sample of every rank's (images, labels, ...) batches, each counted once, and how many
    had inf/nan logits (nonfinite_outputs). Collective: one all-reduce. With `samples`, batches of (images,
    labels, keys) also append each sample's (key, label, class probabilities) to it, every rank's (gathered on
    all ranks)."""
    model.eval()
    n = len(classes)
    counts = torch.zeros(n * n + 1, dtype=torch.long)  # the confusion matrix, then the samples with inf/nan logits
    kept: list = []
    for images, labels, *rest in batches:
        with accelerator.autocast():
            out = logits(model, images.to(accelerator.device, non_blocking=True), tta)
        counts[:-1] += confusion_matrix(labels.cpu(), out.argmax(1).cpu(), n).flatten()
        counts[-1] += int((~out.isfinite().all(1)).sum())
        if samples is not None:
            kept.extend(zip(list(rest[0]), labels.tolist(), out.float().softmax(1).cpu().tolist()))
    counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    if samples is not None:
        samples.extend(gather_object(kept) if accelerator.num_processes > 1 else kept)
    return {**classification_metrics(counts[:-1].reshape(n, n), classes), "nonfinite_outputs": int(counts[-1])}


def eval_stem(split: str, fold: int, tta: bool) -> str:
    """File name stem of an evaluation's outputs, e.g. eval-test-tta or eval-train+val-fold2."""
    return f"eval-{split.replace(',', '+')}{f'-fold{fold}' if fold >= 0 else ''}{'-tta' if tta else ''}"


def save_confusion_png(matrix: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    """The confusion matrix as an annotated heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")  # as the data spells them
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:  # replaces a link at path, never writes through it
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
