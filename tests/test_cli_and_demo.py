"""The command line, the README's drop-in example, and the demo orchestration."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdtl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- drop-in example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its drop-in example block"
    return match.group(1)


def test_readme_drop_in_example_runs_and_distils():
    code = readme_example()
    assert len(code.strip().splitlines()) <= 10
    from sdtl.models import build_model

    torch.manual_seed(0)
    model = build_model("r2plus1d_vcop", num_classes=3, width=0.0625)
    batches = [(torch.randn(4, 3, 8, 16, 16), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    with torch.no_grad():  # like a pre-trained encoder: BN running statistics match the data
        for _ in range(30):
            model.encoder(batches[0][0])
    snapshots = []

    class Loader(list):
        def __iter__(self):  # record the encoder at the start of every epoch
            snapshots.append({k: v.clone() for k, v in model.encoder.state_dict().items()})
            return super().__iter__()

    scope = {"model": model, "loader": Loader(batches), "epochs": 3,
             "optimizer": torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
             "F": torch.nn.functional}
    exec(code, scope)
    sd = scope["sd"]
    assert sd.weight == 100.0
    # the teacher of the last epoch is the encoder as it was when that epoch began
    for key, value in sd.teacher.state_dict().items():
        assert torch.equal(value, snapshots[-1][key]), key
    assert not torch.equal(snapshots[0]["conv1.spatial_conv.weight"], model.encoder.conv1.spatial_conv.weight)
    assert torch.isfinite(scope["loss"])


def test_recipes_show_prints_only_a_loadable_yaml(capsys, tmp_path):
    import yaml

    from sdtl.engine.config import load_config

    assert main(["recipes", "--show", "synthetic_small"]) == 0
    out = capsys.readouterr().out
    assert "ucf101_c3d_sd" not in out  # not the recipe list: `--show NAME > my.yaml` gives a config
    (tmp_path / "my.yaml").write_text(out)
    assert yaml.safe_load(out)["kind"] == "finetune"
    assert load_config(str(tmp_path / "my.yaml"), kind="finetune").optim.name == "sgd"


def test_recipes_lists_the_paper_setups(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("ucf101_c3d_sd", "ucf101_r21d_sd", "hmdb51_c3d_sd", "hmdb51_r21d_sd", "ucf101_c3d_rspnet",
                 "hmdb51_c3d_rspnet", "synthetic_tiny", "synthetic_small", "synthetic_pretrain"):
        assert name in out


@pytest.mark.parametrize("recipe", ["ucf101_c3d_sd", "ucf101_r21d_sd", "hmdb51_c3d_sd", "hmdb51_r21d_sd"])
def test_paper_recipes_match_the_paper(recipe):
    from sdtl.engine.config import load_config

    cfg = load_config(recipe)
    assert cfg.optim.epochs == 100 and cfg.regularizer.weight == 100.0
    assert cfg.optim.lr == (0.005 if "c3d" in recipe else 0.1)
    assert cfg.model.arch == ("c3d" if "c3d" in recipe else "r2plus1d_vcop")
    assert cfg.data.clip_len == 16 and cfg.data.size == 112 and cfg.eval.num_clips == 10
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4


def test_python_dash_m_and_help():
    proc = subprocess.run([sys.executable, "-m", "sdtl", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for cmd in ("finetune", "evaluate", "pretrain", "synth", "demo", "recipes", "data", "inspect"):
        assert cmd in proc.stdout


def test_missing_config_without_resume_is_a_clear_error(tmp_path, capsys):
    assert main(["finetune", "--out", str(tmp_path / "x")]) == 2
    assert "--config is required" in capsys.readouterr().err


def test_demo_refuses_a_foreign_output_dir(tmp_path):
    from sdtl.studies.demo import run_demo
    from sdtl.errors import UserError

    (tmp_path / "thesis.tex").write_text("important")
    with pytest.raises(UserError, match="not an sdtl demo folder"):
        run_demo(tmp_path, quick=True)
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_encoder_roundtrip(tiny_encoder, tmp_path, suffix):
    from sdtl.models import build_encoder, load_encoder_weights

    out = tmp_path / f"enc{suffix}"
    assert main(["export", str(tiny_encoder), "--out", str(out)]) == 0
    source = torch.load(tiny_encoder, map_location="cpu", weights_only=True)
    enc = build_encoder("r2plus1d_vcop", **source["arch_options"])
    load_encoder_weights(enc, out, "r2plus1d_vcop")
    for key, value in enc.state_dict().items():
        assert torch.equal(value, source["encoder"][key]), key


def test_export_never_overwrites_an_existing_file(tiny_encoder, tmp_path, capsys):
    target = tmp_path / "thesis.pt"
    target.write_bytes(b"not sdtl's")
    assert main(["export", str(tiny_encoder), "--out", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err and target.read_bytes() == b"not sdtl's"


def test_finetune_hints_name_options_that_finetune_has(tmp_path, capsys):
    """`finetune` said "check --root", an option it does not have."""
    code = main(["finetune", "--config", "synthetic_tiny", "--out", str(tmp_path / "run"),
                 "--set", f"data.root={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert code == 2 and "--set data.root=" in err


@pytest.mark.parametrize("cmd", ["finetune", "pretrain", "evaluate"])
def test_run_commands_have_a_description_and_their_own_example(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert f"example: sdtl {cmd}" in out or (cmd == "pretrain" and "sdtl pretrain --config" in out)
    if cmd == "pretrain":
        assert "regularizer.weight" not in out  # no fine-tuning example in pre-training's help


def test_help_and_argument_errors_do_not_import_torch():
    """`sdtl --help` took 4-5 s: every command imported torch just to build its parser."""
    code = ("import sys\nfrom sdtl.cli import main\n"
            "for argv in (['--help'], ['finetune', '--help'], ['data', 'check', '--help'], ['inspect', '--help'],\n"
            "             ['finetune', '--no-such-flag']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'av', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_light_name_lists_match_the_real_registries():
    from sdtl.data import DATASET_NAMES
    from sdtl.data.datasets import BUILDERS
    from sdtl.models import ARCH_NAMES, list_archs

    assert sorted(DATASET_NAMES) == sorted(BUILDERS) and sorted(ARCH_NAMES) == sorted(list_archs())
