"""The one typed configuration and the command line generated from it (fast, in-process)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bloodcells_dist.cli import UserError, run_main
from bloodcells_dist.config import (
    RESUMABLE,
    TrainConfig,
    build_config,
    check_resume_config,
    config_overrides,
    field_docs,
)
from bloodcells_dist.train import trainer
from bloodcells_dist.train.precision import Hardware, cpu_flags, detect_hardware, resolve_precision, warn_if_emulated

from ..helpers import REPO

RECIPES = sorted((REPO / "launch" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_is_a_valid_config_of_the_reference_design(recipe):
    config = build_config(recipe)
    assert config.epochs > 0 and len(config.widths) == 4 and len(config.hidden) == 2
    assert config.mixed_precision == "auto"  # every recipe leaves precision to the hardware


def test_config_layers_and_unknown_keys(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 3\nlr: 0.2\nwidths: [4, 8, 8, 8]\n")
    config = build_config(recipe, {"lr": "0.01", "image_size": "60,80"})
    assert (config.epochs, config.lr, config.widths, config.image_size) == (3, 0.01, (4, 8, 8, 8), (60, 80))
    recipe.write_text("epochs: 3\nlearning_rate: 0.2\n")
    with pytest.raises(UserError, match="learning_rate"):
        build_config(recipe)
    with pytest.raises(UserError, match="schedule"):
        build_config(overrides={"schedule": "linear"})


def test_every_config_key_is_a_flag_with_its_type_default_and_comment(capsys):
    with pytest.raises(SystemExit):  # argparse prints the help and exits
        trainer.main(["--help"])
    text = capsys.readouterr().out
    docs = field_docs()
    assert {d.name for d in docs} == set(TrainConfig.__dataclass_fields__)  # every key, documented once
    for doc in docs:
        assert f"--{doc.name.replace('_', '-')} " in text, doc.name
        assert doc.help, f"{doc.name} has no comment in config.py"
    assert "peak learning rate, reached after warm-up (default: 0.05)" in " ".join(text.split())
    config = build_config(overrides=config_overrides(trainer_parser().parse_args(
        ["--aug_hue", "0.1", "--image-size", "32,48", "--lr", "1e-3"])))
    assert (config.aug_hue, config.image_size, config.lr) == (0.1, (32, 48), 0.001)


def trainer_parser():
    from bloodcells_dist.cli import Parser
    from bloodcells_dist.config import add_config_arguments

    parser = Parser(prog="t")
    add_config_arguments(parser)
    return parser


def test_an_unknown_flag_is_one_line(capsys):
    assert run_main(trainer.main, ["--shards", "x", "--bogus-key", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: unrecognized arguments: --bogus-key 1 (see bloodcells train --help)"


def test_docs_config_reference_is_generated_from_the_config():
    """docs/config.md is what `python scripts/render_docs.py` writes from TrainConfig: it cannot drift."""
    rendered = subprocess.run([sys.executable, "scripts/render_docs.py", "--check"], cwd=REPO, capture_output=True,
                              text=True)
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr


def test_scientific_notation_on_the_command_line_and_in_a_recipe(tmp_path):
    config = build_config(None, {"lr": "1e-3", "weight_decay": "5e-4", "epochs": "1e1"})
    assert (config.lr, config.weight_decay, config.epochs) == (0.001, 0.0005, 10)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-3\nweight_decay: 5E-4\nwidths: [8, 16, 32, 3.2e1]\n")
    assert yaml.safe_load(recipe.read_text())["lr"] == "1e-3"  # what PyYAML gives: text
    config = build_config(recipe)
    assert (config.lr, config.weight_decay, config.widths) == (0.001, 0.0005, (8, 16, 32, 32))
    for key, value in (("epochs", "3.5"), ("lr", "abc"), ("seed", "-1"), ("seed", str(2**64)), ("image_size", "32"),
                       ("aug_flip", "1")):
        with pytest.raises(UserError, match=f"{key}="):
            build_config(None, {key: value})


def test_validating_on_training_samples_needs_the_flag():
    for overrides in ({"val_split": "train"}, {"train_splits": "train,val", "val_split": "val"}):
        with pytest.raises(UserError, match="validate_on_train"):
            build_config(overrides=overrides)
        assert build_config(overrides={**overrides, "validate_on_train": "true"}).validate_on_train
    assert build_config(overrides={"train_splits": "train,val", "val_fold": "2"}).val_fold == 2  # CV: the fold validates


def test_a_resume_may_change_where_and_how_it_reports_not_what_it_trains():
    started = build_config(overrides={"epochs": "4", "image_size": "48,64"})
    check_resume_config(started, build_config(overrides={"epochs": "4", "image_size": "48,64", "workers": "0",
                                                         "tracker": "none", "shards": "elsewhere"}))
    for key, value in (("image_size", "40,40"), ("epochs", "5"), ("seed", "1"), ("lr", "0.1"), ("cell_crop", "0.5")):
        with pytest.raises(UserError, match=f"cannot resume with {key}="):
            check_resume_config(started, build_config(overrides={"epochs": "4", "image_size": "48,64", key: value}))
    assert "epochs" not in RESUMABLE and "workers" in RESUMABLE


def test_the_training_docs_say_what_a_resume_may_change_as_the_code_does():
    text = " ".join((REPO / "docs" / "training.md").read_text().split())
    listed = re.search(r"only where things are and how the run reports may change \(([^)]*)\)", text)
    assert listed and set(re.findall(r"`(\w+)`", listed.group(1))) == set(RESUMABLE) - {"output_dir"}
    assert "more `--epochs` is refused" in text and "e.g. more `--epochs`" not in text


# ---------------------------------------------------------------- precision for the hardware

AVX2 = Hardware(cuda=False, cuda_bf16=False, cpu_native_bf16=False, cpu_detail="AVX2, no AMX/AVX512-BF16")
AVX512_BF16 = Hardware(cuda=False, cuda_bf16=False, cpu_native_bf16=True, cpu_detail="AVX512, avx512_bf16")
AMPERE = Hardware(cuda=True, cuda_bf16=True, cpu_native_bf16=False, cpu_detail="AVX2, no AMX/AVX512-BF16")
TURING = Hardware(cuda=True, cuda_bf16=False, cpu_native_bf16=False, cpu_detail="AVX2, no AMX/AVX512-BF16")


def test_auto_precision_follows_the_hardware():
    # CPU capability stubbed both ways; the CUDA rows can only be checked stubbed (no GPU here).
    assert resolve_precision("auto", AVX2)[0] == "no"
    assert resolve_precision("auto", AVX512_BF16)[0] == "bf16"
    assert resolve_precision("auto", AMPERE)[0] == "bf16"
    precision, why = resolve_precision("auto", TURING)
    assert precision == "fp16" and "loss scaling" in why
    assert "no native bf16" in resolve_precision("auto", AVX2)[1]
    # The launch config's choice is honoured under auto (e.g. `--mixed_precision fp16` on 8 GPUs)...
    assert resolve_precision("auto", AMPERE, launched="fp16")[0] == "fp16"
    # ...and an explicit value in the config is kept.
    assert resolve_precision("no", AVX512_BF16, launched="bf16")[0] == "no"
    assert resolve_precision("bf16", AVX2)[0] == "bf16"


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns_once(recwarn):
    warn_if_emulated("bf16", AVX2)
    warn_if_emulated("bf16", AVX512_BF16)
    warn_if_emulated("no", AVX2)
    warn_if_emulated("bf16", AMPERE)
    assert len(recwarn) == 1 and "several times slower" in str(recwarn[0].message)


@pytest.mark.parametrize("flags, capability, native", [
    ("fpu sse avx2 avx512f avx512_bf16", "AVX512", True),  # Zen 4, Cooper Lake: native bf16
    ("fpu sse avx2 amx_bf16 amx_tile", "AVX512", True),  # Sapphire Rapids
    ("fpu sse avx2 fma", "AVX2", False),  # the AVX2-only machine of issue 11
    ("fpu avx512_bf16", "AVX2", False),  # a torch build that cannot use it
])
def test_native_bf16_is_read_from_the_cpu_flags_and_torchs_kernels(flags, capability, native, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    hardware = detect_hardware(cpuinfo=cpuinfo, capability=capability, cuda=False)
    assert hardware.cpu_native_bf16 is native and not hardware.cuda and capability in hardware.cpu_detail
    assert cpu_flags(cpuinfo) == set(flags.split()) and cpu_flags(tmp_path / "missing") == set()
    assert resolve_precision("auto", hardware)[0] == ("bf16" if native else "no")

    # Without arguments it reads this machine through exactly the three inputs stubbed above.
    machine = detect_hardware(cpuinfo=Path("/proc/cpuinfo"), capability=torch.backends.cpu.get_cpu_capability(),
                              cuda=torch.cuda.is_available())
    assert detect_hardware() == machine


def test_a_recipe_giving_a_key_twice_or_a_yaml_bomb_is_one_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 3\nlr: 0.1\nepochs: 5\n")
    with pytest.raises(UserError) as err:
        build_config(recipe)
    assert str(err.value) == f"config {recipe}: key 'epochs' given twice (lines 1 and 3)"
    recipe.write_text("epochs: 3\nlr: 0.1\nwidths: [4, 8, 8, 8]\nhidden: {a: 1, a: 2}\n")
    with pytest.raises(UserError, match="key 'a' given twice"):
        build_config(recipe)
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 values
    recipe.write_text("\n".join(["bomb:", *(f"  {line}" for line in levels), "widths: *a8", ""]))
    with pytest.raises(UserError) as err:
        build_config(recipe)
    assert "aliases expand past 10000 values" in str(err.value) and len(str(err.value)) < 300
    recipe.write_text("widths: &w [4, 8, 8, 8]\nhidden: [16, 16]\n")  # a small alias is fine
    assert build_config(recipe).widths == (4, 8, 8, 8)
    with pytest.raises(UserError) as err:
        build_config(overrides={"widths": ",".join(["4"] * 100_000)})
    assert "100000 values" in str(err.value) and len(str(err.value)) < 300


def test_an_image_size_that_cannot_fit_in_memory_is_refused_before_any_allocation():
    with pytest.raises(UserError, match=r"image_size=\[1000000000, 32\].*at most 4096"):
        build_config(overrides={"image_size": "1e9,32"})
    assert build_config(overrides={"image_size": "4096,32"}).image_size == (4096, 32)


def test_a_closed_output_pipe_is_one_line_not_a_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "bloodcells_dist", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    proc.stdout.close()  # `bloodcells --help | head` with head gone before the first write
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == "error: the output was closed before it was all written (broken pipe)\n"
