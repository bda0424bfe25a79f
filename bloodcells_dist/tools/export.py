"""Export a trained model to torch.export, ONNX or TorchScript, with its ModelSpec (classes, preprocessing) inside.

    bloodcells export --model RUN_OR_FILE --format export|onnx|torchscript --out FILE

The exported model maps normalised float images (N, 3, H, W) to logits (N, classes); any batch size.
`export` writes a `torch.export` ExportedProgram (.pt2): PyTorch's recommended format now that TorchScript is
deprecated; TorchScript (.pt) stays while torch ships it. `bloodcells predict --model FILE`
reads every format back (the suffix, .pt2, .onnx or .pt, says which).
"""

from __future__ import annotations

import io
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..cli import Parser, UserError, output_file, run_main
from ..files import write_atomic
from ..output import say
from ..train.spec import ModelSpec, load_model

META_KEY = "meta.json"  # TorchScript extra file / ONNX metadata_props key holding the ModelSpec's JSON
SUFFIXES = {"export": ".pt2", "onnx": ".onnx", "torchscript": ".pt"}


class OnnxModel:
    """An ONNX Runtime session called like a module: float images (N, 3, H, W) -> logits, on the CPU."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.meta = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for one batch (flipped TTA views are strided: ONNX Runtime wants contiguous memory)."""
        return torch.from_numpy(self.session.run(None, {self.input: images.cpu().contiguous().numpy()})[0])


def require_onnx() -> None:
    """ONNX export and inference need the optional packages; a UserError naming the extra if they are missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise UserError(f"ONNX needs the optional packages onnx and onnxruntime ({err.name} is missing): "
                        "pip install 'bloodcells_dist[export]'") from None


def load_exported(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], ModelSpec]:
    """A file written by this module, as a callable model and its spec."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no model at {path}")
    if path.suffix == SUFFIXES["onnx"]:
        require_onnx()
    model: Callable[[torch.Tensor], torch.Tensor]
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream, but still what we load here
            warnings.simplefilter("ignore", FutureWarning)
            if path.suffix == SUFFIXES["onnx"]:
                model = OnnxModel(path)
                raw = model.meta
            elif path.suffix == SUFFIXES["export"]:
                extra = {META_KEY: ""}
                model = torch.export.load(str(path), extra_files=extra).module()  # a GraphModule, eval mode as saved
                raw = extra[META_KEY] or None
            else:
                extra = {META_KEY: ""}
                model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
                raw = extra[META_KEY] or None
    except Exception as err:  # torch and ONNX Runtime raise many types for a file that is not a model
        raise UserError(f"{path} is not a readable model ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if raw is None:
        raise UserError(f"{path} has no {META_KEY}: not written by bloodcells_dist export")
    try:
        return model, ModelSpec.from_json(json.loads(raw))
    except ValueError as err:  # an edited or foreign file: refused before the first image
        raise UserError(f"{path}: its {META_KEY} is not usable ({err})") from None


def export(model: torch.nn.Module, spec: ModelSpec, fmt: str, out: Path) -> None:
    """Write the eval-mode model as `fmt`, atomically, with the spec's JSON embedded."""
    info = json.dumps(spec.to_json())
    example = torch.zeros(2, 3, *spec.preprocess.image_size)
    # Written to memory first: .pt2 and .pt are zip archives whose inner folder torch names after the file it
    # writes, so this way it is torch's own "archive", never the temporary file's name.
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():  # the tracer's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if fmt == "export":
            # The batch axis stays free (any size from 1); eval-mode BatchNorm and Dropout are baked in.
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}}, strict=False)
            torch.export.save(program, buffer, extra_files={META_KEY: info})
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, example), buffer, _extra_files={META_KEY: info})
        else:
            import onnx

            # The TorchScript-based exporter runs offline with no extra packages; the batch axis stays free. It
            # writes to a file object too, which its type hints do not say.
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=17,  # type: ignore[arg-type]
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
            proto = onnx.load_from_string(buffer.getvalue())
            onnx.helper.set_model_props(proto, {META_KEY: info})
            buffer = io.BytesIO(proto.SerializeToString())
    write_atomic(out, buffer.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    """Command line."""
    parser = Parser(prog="bloodcells export", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True,
                        help="run folder (uses best.safetensors), Hub model folder or .safetensors file")
    parser.add_argument("--format", choices=sorted(SUFFIXES), required=True)
    parser.add_argument("--out", type=Path, required=True,
                        help="file to write: .pt2 for export, .onnx for onnx, .pt for torchscript")
    args = parser.parse_args(argv)
    if args.out.suffix != SUFFIXES[args.format]:
        raise UserError(f"--out {args.out}: {args.format} files end in {SUFFIXES[args.format]} "
                        "(predict tells the format from the suffix)")
    if args.model.suffix in SUFFIXES.values():
        raise UserError(f"--model {args.model} is already exported: give the run folder or its .safetensors file")

    if args.format == "onnx":
        require_onnx()
    output_file(args.out, "--out")
    model, spec = load_model(args.model)
    export(model, spec, args.format, args.out)
    # Read the file back and compare with PyTorch on an odd batch size, which also proves the batch axis is free.
    exported, _ = load_exported(args.out)
    images = torch.randn(3, 3, *spec.preprocess.image_size)
    with torch.no_grad():
        diff = (exported(images) - model(images)).abs().max().item()
    say(f"wrote {args.out} ({args.format}, {args.out.stat().st_size / 1e6:.2f} MB); "
          f"max |logit difference| from PyTorch {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
