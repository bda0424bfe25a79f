"""Classification metrics from a confusion matrix (rows: true class, columns: predicted class)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; entry [t, p] counts true class t predicted as p."""
    flat = labels.long().cpu() * num_classes + preds.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(cm: torch.Tensor, classes: Sequence[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 / support, macro F1, the matrix itself and the sample count.
    Macro F1 is the mean over the classes present in truth or prediction (as scikit-learn averages): a class
    absent from both has no F1 to count, and `absent_classes` names it."""
    cm = cm.double()
    tp = cm.diag()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    total = int(cm.sum().item())
    present = (cm.sum(0) + cm.sum(1)) > 0
    return {
        "samples": total,
        "accuracy": tp.sum().item() / max(total, 1),
        "macro_f1": f1[present].mean().item() if present.any() else 0.0,
        "absent_classes": [c for i, c in enumerate(classes) if not present[i]],
        "per_class": {
            c: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
                "support": int(cm[i].sum().item())}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.long().tolist(),
    }


def format_metrics(metrics: dict, classes: Sequence[str]) -> str:
    """A human-readable table: accuracy, macro F1, per-class scores and the confusion matrix."""
    width = max(len(c) for c in classes)
    absent = metrics.get("absent_classes") or []
    lines = [f"samples {metrics['samples']}  accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['macro_f1']:.4f}"
             + (f" (over {len(classes) - len(absent)} classes: {', '.join(absent)} absent)" if absent else ""),
             f"{'class':<{width}}  precision  recall     f1  support"]
    for c in classes:
        m = metrics["per_class"][c]
        lines.append(f"{c:<{width}}  {m['precision']:9.4f} {m['recall']:7.4f} {m['f1']:6.4f} {m['support']:8d}")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * (width + 2) + " ".join(f"{c[:6]:>6}" for c in classes))
    for c, row in zip(classes, metrics["confusion_matrix"]):
        lines.append(f"{c:<{width}}  " + " ".join(f"{v:>6d}" for v in row))
    return "\n".join(lines)
