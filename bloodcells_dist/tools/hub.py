"""A trained model as a Hugging Face Hub model folder: config.json, model.safetensors and a model card.

    bloodcells hub save --model RUN_OR_FILE --out DIR [--license mit] [--overwrite]
    bloodcells hub push DIR --repo-id USER/NAME [--private]      # needs `hf auth login` or HF_TOKEN

The folder is what `BloodCellCNN.save_pretrained(DIR)` writes (huggingface_hub's PyTorchModelHubMixin; the
network carries its ModelSpec, written whole as config.json), with our card and what was measured on the weights.
`BloodCellCNN.from_pretrained(DIR or "USER/NAME")` rebuilds the network from config.json and keeps the spec and
the card, so its own save_pretrained writes an equal folder; `load_model(DIR)` (train/spec.py), and so predict,
evaluate and export, also read the classes and the preprocessing from it. File names: rundir.HubDir.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli import Parser, UserError, output_folder, run_main
from ..files import write_atomic
from ..output import say
from ..train.card import model_card
from ..train.rundir import HubDir, RunDir
from ..train.spec import ModelSpec, load_model


def measured_metrics(model_path: Path, spec: ModelSpec) -> list[dict]:
    """What was measured on these weights, each with its split: the run's validation at the kept epoch
    (final.json) and every `evaluate` result written beside them (eval-*.json) on the same weights."""
    weights = RunDir(model_path).weights() if model_path.is_dir() else model_path
    run = RunDir(weights.parent)

    def entry(split: str, source: str, record: dict) -> dict:
        return {"split": split, "source": source, "samples": record.get("samples"), "accuracy": record["accuracy"],
                "macro_f1": record.get("macro_f1"), "per_class": record.get("per_class", {})}

    found = []
    recipe = spec.recipe
    summary = run.summary()
    if summary and recipe.get("val_split"):
        record = (summary.get("best") if weights == run.best else summary.get("last_validation")) or {}
        fold = recipe.get("val_fold", -1)
        if "accuracy" in record:
            warning = " (on samples it also trained on)" if summary.get("validated_on_training_data") else ""
            found.append(entry(recipe["val_split"] + (f" (fold {fold})" if fold is not None and fold >= 0 else ""),
                               "validation during training" + warning + (
                                   f", epoch {record['epoch']} (chose these weights: optimistic)"
                                   if "epoch" in record else ""), record))
    for path in run.evaluations():
        record = json.loads(path.read_text())
        if not isinstance(record.get("model", ""), str) or "accuracy" not in record:
            continue  # an ensemble's score (a list of models) is not this model's
        scored = record.get("weights") or Path(record.get("model", "")).name  # the file scored (older: as typed)
        if scored != weights.name and not (scored == run.path.name and weights == run.weights()):
            continue  # an evaluation of other weights (e.g. last.safetensors)
        fold = record.get("fold")
        found.append(entry(record.get("split", "?") + (f" (fold {fold})" if fold is not None else ""),
                           f"`evaluate`{' with TTA' if record.get('tta') else ''} ({path.name})", record))
    return found


def save_pretrained(model_path: Path, out: Path, *, overwrite: bool = False, license_id: str = "mit") -> Path:
    """Write the Hub folder of a run folder's model (or a weights file) into `out`."""
    model_path, out = Path(model_path), Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    model, spec = load_model(model_path)
    hub = HubDir(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty; pass --overwrite to replace it")
        for path in hub.files():
            path.unlink()
    output_folder(out, "--out")
    write_atomic(hub.card, model_card(spec, measured_metrics(model_path, spec), license_id=license_id))
    model.save_pretrained(out)  # the mixin: model.safetensors and config.json (the model's spec); keeps our card
    return out


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload a saved Hub folder to `repo_id` (created if needed) in one commit; return the commit URL."""
    if not HubDir(folder).holds_model():
        raise UserError(f"{folder} is not a saved Hub model folder (run `bloodcells hub save` first)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                             allow_patterns=list(HubDir.NAMES),
                             commit_message="Upload bloodcells_dist model")
    return str(getattr(info, "commit_url", info))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `save` a run as a Hub folder, `push` a Hub folder."""
    parser = Parser(prog="bloodcells hub", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="write config.json, model.safetensors and README.md for a trained model")
    save.add_argument("--model", type=Path, required=True, help="run folder or .safetensors file")
    save.add_argument("--out", type=Path, required=True, help="folder to write")
    save.add_argument("--license", default="mit", help="the card's license id (default: mit, the project's)")
    save.add_argument("--overwrite", action="store_true", help="replace the files of an earlier save in --out")
    push = sub.add_parser("push", help="upload a saved folder to the Hugging Face Hub (needs `hf auth login` or HF_TOKEN)")
    push.add_argument("dir", type=Path)
    push.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME")
    push.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "save":
        out = save_pretrained(args.model, args.out, overwrite=args.overwrite, license_id=args.license)
        hub = HubDir(out)
        say(f"wrote {hub.config}, {hub.weights} and {hub.card}; "
              f"push it with: bloodcells hub push {out} --repo-id USER/NAME")
        return 0
    try:
        url = push_to_hub(args.dir, args.repo_id, private=args.private)
    except UserError:
        raise
    except Exception as err:  # no login, no network, no permission: huggingface_hub's many error types
        raise UserError(f"push to {args.repo_id} failed ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    say(f"pushed {args.dir} to https://huggingface.co/{args.repo_id} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
