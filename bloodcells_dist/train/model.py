"""The reference design: 4 x (Conv -> BatchNorm -> ReLU -> MaxPool), flatten, FC1 -> FC2 -> FC3."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn


def conv_block(c_in: int, c_out: int, bias: bool = False) -> nn.Sequential:
    """3x3 conv (no bias by default: BatchNorm has one) -> BN -> ReLU -> 2x2 max-pool, halving height and width."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=bias),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class BloodCellCNN(nn.Module, PyTorchModelHubMixin, library_name="bloodcells_dist", license="mit",
                   pipeline_tag="image-classification", tags=["image-classification", "white-blood-cells"],
                   repo_url="https://github.com/bloodcells-dist/bloodcells_dist"):
    """Feature extractor of 4 conv blocks, then three fully connected layers to the class logits.

    Hugging Face shaped (huggingface_hub.PyTorchModelHubMixin): `save_pretrained(dir, config=spec.to_json())`,
    `BloodCellCNN.from_pretrained(dir_or_repo)` (the network from config.json's keys below, nothing to guess) and
    `push_to_hub(repo_id)`. What an image must go through first is the ModelSpec's (train/spec.py).
    """

    def __init__(
        self,
        *,
        num_classes: int = 4,
        image_size: Sequence[int] = (240, 320),
        widths: Sequence[int] = (32, 64, 128, 256),
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        conv_bias: bool = False,
    ) -> None:
        super().__init__()
        channels = [3, *widths]
        self.features = nn.Sequential(*(conv_block(a, b, conv_bias) for a, b in zip(channels, channels[1:])))
        height, width = image_size
        for _ in widths:  # each max-pool floors the size by 2
            height, width = height // 2, width // 2
        flat = widths[-1] * height * width
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden[0]),  # FC1
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden[0], hidden[1]),  # FC2
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden[1], num_classes),  # FC3: logits
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W), normalised -> logits (N, num_classes)."""
        return self.classifier(self.features(images))


class Ensemble(nn.Module):
    """Several trained models as one (e.g. the fold models of a cross-validation): the log of their mean
    class probabilities, so that argmax and softmax read it as one model's logits."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W), normalised -> log of the mean softmax (N, num_classes)."""
        logs = torch.stack([m(images).float().log_softmax(1) for m in self.members])
        return logs.logsumexp(0) - math.log(len(self.members))
