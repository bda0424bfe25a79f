"""The reference design: 4 x (Conv -> BatchNorm -> ReLU -> MaxPool), flatten, FC1 -> FC2 -> FC3."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from safetensors.torch import save
from torch import nn

from ..files import write_atomic
from .rundir import HubDir


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

    Hugging Face shaped (huggingface_hub.PyTorchModelHubMixin): `BloodCellCNN.from_pretrained(dir_or_repo)` builds
    the network from config.json's keys below and keeps the whole config (the ModelSpec: classes, preprocessing,
    recipe, provenance) and the model card, so that `save_pretrained(dir)` and `push_to_hub(repo_id)` write them
    back; `bloodcells predict` reads the result. A network from `ModelSpec.build()` carries its spec the same way.
    What an image must go through first is the ModelSpec's (train/spec.py).

    `library_name` stays this package's own: the Hub knows no library that can build this network from the
    repo alone (timm's `create_model("hf-hub:...")` only builds timm's registered architectures, transformers
    its own), so a known name would show a usage snippet that fails. The card carries the snippet that works.
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
        config: dict | None = None,  # the whole ModelSpec as JSON: not needed to build, kept by the mixin
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

    def weights_digest(self) -> str:
        """sha256 of the weights (names and bytes): whether they changed since they were loaded."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         **model_kwargs) -> BloodCellCNN:
        """The mixin's load (config.json's whole content reaches __init__ as `config`), strict unless told
        otherwise (the config names every weight), keeping the folder's or repo's model card with the weights it
        describes."""
        model_kwargs.setdefault("strict", True)
        model = super()._from_pretrained(model_id=model_id, revision=revision, cache_dir=cache_dir,
                                         force_download=force_download, local_files_only=local_files_only,
                                         token=token, **model_kwargs)
        card: Path | None = HubDir(model_id).card
        if not Path(model_id).is_dir():
            try:
                card = Path(hf_hub_download(model_id, HubDir.CARD, revision=revision, cache_dir=cache_dir,
                                            force_download=force_download, local_files_only=local_files_only,
                                            token=token))
            except (EntryNotFoundError, HfHubHTTPError, OSError):  # no card there (or offline): one from the spec
                card = None
        if card is not None and card.is_file():
            model._hub_card = (card.read_text(encoding="utf-8"), model.weights_digest())
        return model

    def _save_pretrained(self, save_directory: Path) -> None:
        """model.safetensors, written atomically and readable as any other file here (umask, not 0600)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_atomic(Path(save_directory) / HubDir.WEIGHTS, save(state, metadata={"format": "pt"}))

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The card loaded with these weights while they are unchanged; else the project's card of the spec this
        model carries (nothing measured on the new weights; the loaded card's licence); else the mixin's generic one."""
        card = getattr(self, "_hub_card", None)
        if card is not None and card[1] == self.weights_digest():
            return ModelCard(card[0])
        license_id = (ModelCard(card[0]).data.get("license") if card is not None else None) or "mit"
        from .card import model_card  # spec imports this module: imported here, when a card is written
        from .spec import ModelSpec

        try:
            spec = ModelSpec.from_json(self._hub_mixin_config)
        except ValueError:  # a config without the spec (built by hand): the mixin's generic card
            return super().generate_model_card(*args, **kwargs)
        return ModelCard(model_card(spec, [], license_id=license_id))


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
