"""The regularizer family is declared once (sdtl.regularizers.registry); everything else derives from it.

A toy regularizer registered here, with one registry line and nothing else edited, becomes a config
choice whose keys are typed, checked and refused for other methods, is written flat to config.yaml,
has its penalty plotted and printed, is described and built. The built-in six keep exactly the
tables, messages and description lines that were written by hand before.
"""
from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from sdtl.engine import config as cfgmod
from sdtl.engine import reporting
from sdtl.engine.build import build_run_regularizer, describe_method
from sdtl.engine.config import RegularizerConfig, load_config, validate_ranges
from sdtl.engine.rundir import check_same_config
from sdtl.errors import UserError
from sdtl.regularizers import registry
from sdtl.regularizers.base import Regularizer
from sdtl.regularizers.options.base import RegularizerOptions, choice, need
from sdtl.regularizers.registry import REGULARIZERS, RegSpec

# ------------------------------------------------------------------------------------ the toy


@dataclass
class ToyOptions(RegularizerOptions):
    toy_gain: float = 1.0
    toy_mode: str = choice("abs", ("abs", "square"))

    def check(self) -> None:
        need(self.toy_gain >= 0, "toy_gain", "must be >= 0", self.toy_gain)

    def describe(self, weight: float) -> str:
        return f"toy penalty w={weight:g} gain={self.toy_gain:g} ({self.toy_mode})"


class ToyRegularizer(Regularizer):
    part = "toy"

    def __init__(self, encoder: nn.Module, weight: float = 1.0, toy_gain: float = 1.0, toy_mode: str = "abs") -> None:
        super().__init__(weight)
        ToyOptions(toy_gain=toy_gain, toy_mode=toy_mode)
        self.toy_gain, self.toy_mode = toy_gain, toy_mode

    def loss(self, ctx, student_features: torch.Tensor) -> torch.Tensor:
        f = student_features.float()
        return self.weight * self.toy_gain * (f.abs() if self.toy_mode == "abs" else f.pow(2)).mean()


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(REGULARIZERS, "toy", RegSpec(ToyRegularizer, ToyOptions, "toy", "a toy penalty"))  # the one line
    return "toy"


def tiny(*overrides: str):
    return load_config("synthetic_tiny", ["data.root=/tmp", *overrides])


def refused(*overrides: str) -> str:
    with pytest.raises(UserError) as err:
        validate_ranges(tiny(*overrides))
    return str(err.value)


# ------------------------------------------------------------------------- a toy, registered once


def test_toy_becomes_a_valid_config_choice(toy):
    cfg = tiny("regularizer.name=toy", "regularizer.weight=0.5", "regularizer.toy_gain=2.5",
               "regularizer.toy_mode=square")
    validate_ranges(cfg)
    assert cfg.regularizer.options == ToyOptions(toy_gain=2.5, toy_mode="square")
    assert cfg.regularizer.toy_gain == 2.5  # flat access, as for the built-in keys
    assert "toy" in registry.names()
    msg = refused("regularizer.name=foo")
    assert "'foo' is not one of none, sd, fixed_teacher, ema_sd, l2sp, delta, bss, toy" in msg


def test_toy_is_not_a_choice_once_unregistered():
    assert "toy" not in registry.names() and "toy_gain" not in registry.option_keys()
    assert "is not one of" in refused("regularizer.name=toy")
    with pytest.raises(UserError, match=r"regularizer\.toy_gain: unknown key"):
        tiny("regularizer.toy_gain=1")


@pytest.mark.parametrize("overrides,message", [
    (["regularizer.name=toy", "regularizer.toy_gain=-1"], "config key regularizer.toy_gain: must be >= 0 (got -1.0)"),
    (["regularizer.name=toy", "regularizer.toy_mode=cube"],
     "config key regularizer.toy_mode: 'cube' is not one of abs, square"),
    (["regularizer.name=toy", "regularizer.toy_gain=abc"], "config key regularizer.toy_gain: expected float"),
    (["regularizer.name=sd", "regularizer.toy_gain=2"],
     "config key regularizer.toy_gain: used only by regularizer.name=toy, not 'sd'"),
    (["regularizer.name=toy", "regularizer.k=2"], "config key regularizer.k: used only by regularizer.name=bss, not 'toy'"),
    (["regularizer.name=toy", "regularizer.teacher_bn=eval"],
     "config key regularizer.teacher_bn: used only by regularizer.name=sd or fixed_teacher or ema_sd or delta"),
    (["regularizer.name=none", "regularizer.toy_gain=-1"], "config key regularizer.toy_gain: must be >= 0"),
    (["regularizer.toy_gian=1"], ("regularizer.toy_gian: unknown key; valid keys here are: attention, "
                                  "attention_samples, ema_decay, head_weight, k, layers, name, reduction, "
                                  "snapshot_every, teacher_bn, toy_gain, toy_mode, weight")),
])
def test_toy_keys_are_typed_checked_and_refused_for_other_methods(toy, overrides, message):
    assert message in refused(*overrides)


def test_toy_keys_are_written_flat_and_a_run_folder_compares_equal(toy, tmp_path):
    cfg = tiny("regularizer.name=toy", "regularizer.weight=0.5", "regularizer.toy_gain=2.5")
    section = cfgmod.to_dict(cfg)["regularizer"]
    assert section["name"] == "toy" and section["toy_gain"] == 2.5 and section["toy_mode"] == "abs"
    cfgmod.dump_config(cfg, tmp_path / "config.yaml", kind="finetune")
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert stored["regularizer"]["toy_gain"] == 2.5
    assert cfgmod.config_from_dict(stored) == cfg
    check_same_config(tmp_path, cfg, "this test")  # same settings: accepted
    other = tiny("regularizer.name=toy", "regularizer.weight=0.5", "regularizer.toy_gain=3")
    with pytest.raises(UserError, match=r"regularizer\.toy_gain: 2\.5 -> 3\.0"):
        check_same_config(tmp_path, other, "this test")


def _plotted_labels(monkeypatch, history) -> list[str]:
    figures = []
    monkeypatch.setattr(reporting, "atomic_savefig", lambda fig, path, **kw: figures.append(fig))
    reporting.plot_curves(history, reporting.Path("unused.png"))
    (fig,) = figures
    loss_panel = next(ax for ax in fig.axes if ax.get_title() == "training loss")
    return [line.get_label() for line in loss_panel.get_lines()]


def test_toy_penalty_is_plotted_and_printed(toy, monkeypatch):
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_ce": 0.9 / e, "train_toy": 0.1 / e} for e in (1, 2)]
    assert "train_toy" in _plotted_labels(monkeypatch, history)
    from sdtl.engine.finetune import epoch_line_keys

    assert "train_toy" in epoch_line_keys()  # the epoch line reads the registry at every epoch


def test_toy_is_described(toy):
    cfg = tiny("regularizer.name=toy", "regularizer.weight=0.5", "regularizer.toy_gain=2.5",
               "regularizer.toy_mode=square", "optim.lp_epochs=1")
    assert describe_method(cfg) == "toy penalty w=0.5 gain=2.5 (square) | LP-FT: head alone for 1 epoch(s)"
    assert describe_method(tiny("regularizer.name=toy", "regularizer.weight=0")) == "plain fine-tuning (no regularizer)"


def test_toy_joins_the_comparison_and_finetune_help(toy, monkeypatch):
    """The one registry line also puts the method into ``sdtl compare`` (over its weight grid, labelled
    by its help line) and names it in ``sdtl finetune --help``."""
    from sdtl.cli import build_parser
    from sdtl.studies import compare

    monkeypatch.setitem(REGULARIZERS, "toy", RegSpec(ToyRegularizer, ToyOptions, "toy", "a toy penalty", ("1", "2")))
    table = compare.method_table()
    assert table["toy"] == compare.Method("a toy penalty", ("regularizer.name=toy",), "regularizer.weight", ("1", "2"))
    for name, spec in REGULARIZERS.items():  # every regularizer over exactly the grid its RegSpec gives
        assert table[name].values == spec.weight_grid and f"regularizer.name={name}" in table[name].sets
    assert list(table)[:2] == ["scratch", "plain"] and list(table)[-2:] == ["lp_ft", "llrd"]
    finetune = build_parser()._subparsers._group_actions[0].choices["finetune"]
    assert "bss, toy;" in " ".join(finetune.description.split())


def test_toy_is_built(toy):
    cfg = tiny("regularizer.name=toy", "regularizer.weight=0.5", "regularizer.toy_gain=2.5")
    encoder, head = nn.Linear(3, 4), nn.Linear(4, 2)
    reg = registry.build_regularizer(cfg.regularizer, encoder, head)
    assert type(reg) is ToyRegularizer and reg.weight == 0.5 and reg.toy_gain == 2.5
    # through the engine's builder, fresh and resumed (the toy keeps no state)
    model, info = SimpleNamespace(encoder=encoder, head=head), SimpleNamespace(device="cpu", is_main=True)
    assert type(build_run_regularizer(cfg, model, None, [], None, info)) is ToyRegularizer
    assert type(build_run_regularizer(cfg, model, None, [], {"regularizer": None}, info)) is ToyRegularizer
    features = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    assert reg(None, features).item() == pytest.approx(0.5 * 2.5 * 2.5)


def test_a_class_whose_part_differs_from_the_registry_is_refused(monkeypatch):
    class Renamed(ToyRegularizer):
        part = "renamed"

    monkeypatch.setitem(REGULARIZERS, "toy", RegSpec(Renamed, ToyOptions, "toy", "a toy penalty"))
    cfg = RegularizerConfig(name="toy", weight=1.0)
    with pytest.raises(TypeError, match="nothing plots"):
        registry.build_regularizer(cfg, nn.Linear(3, 4), None)


def test_a_key_declared_differently_by_two_methods_is_refused(monkeypatch):
    @dataclass
    class Clash(RegularizerOptions):
        teacher_bn: str = choice("eval", ("eval", "batch"))  # sd and delta default to "batch"

    monkeypatch.setitem(REGULARIZERS, "clash", RegSpec(ToyRegularizer, Clash, "clash", "clashes"))
    with pytest.raises(TypeError, match="teacher_bn is declared differently by sd and clash"):
        registry.option_keys()


# ---------------------------------------------------------------------- the built-in six, unchanged

# What config.py, reporting.py and finetune.describe_method said by hand before the registry.
FORMER_REGULARIZER_KEYS = {
    "reduction": ("sd", "fixed_teacher", "ema_sd"),
    "teacher_bn": ("sd", "fixed_teacher", "ema_sd", "delta"),
    "snapshot_every": ("sd",),
    "ema_decay": ("ema_sd",),
    "head_weight": ("l2sp", "delta"),
    "layers": ("delta",),
    "attention": ("delta",),
    "attention_samples": ("delta",),
    "k": ("bss",),
}
FORMER_SECTION = {"name": "sd", "weight": 0.0, "reduction": "mean", "teacher_bn": "batch", "snapshot_every": 0,
                  "ema_decay": 0.999, "head_weight": 0.01, "layers": [], "attention": "channel",
                  "attention_samples": 128, "k": 1}


def test_derived_tables_equal_the_former_hand_written_ones():
    assert registry.method_keys() == FORMER_REGULARIZER_KEYS
    assert registry.choices() == {"name": ("none", "sd", "fixed_teacher", "ema_sd", "l2sp", "delta", "bss"),
                                  "reduction": ("mean", "sum"), "teacher_bn": ("eval", "batch"),
                                  "attention": ("channel", "none")}
    assert tuple(registry.metric_parts()) == ("train_sd", "train_fixed_teacher", "train_ema_sd", "train_l2sp",
                                          "train_delta", "train_bss")
    section = RegularizerConfig().to_dict()
    assert list(section.items()) == list(FORMER_SECTION.items())  # same keys, same order, same defaults


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_every_class_declares_the_registry_part(name):
    spec = REGULARIZERS[name]
    assert spec.load().part == spec.part == name
    assert spec.help and all(float(w) > 0 for w in spec.weight_grid)


@pytest.mark.parametrize("overrides,line", [
    (["regularizer.name=none", "regularizer.weight=1"], "plain fine-tuning (no regularizer)"),
    (["regularizer.name=bss", "regularizer.weight=0"], "plain fine-tuning (no regularizer)"),
    (["regularizer.name=sd", "regularizer.weight=100"], "self-distillation λ=100 (mean, teacher BN batch)"),
    (["regularizer.name=sd", "regularizer.weight=1", "regularizer.snapshot_every=50", "regularizer.reduction=sum",
      "regularizer.teacher_bn=eval"], "self-distillation λ=1 (sum, teacher BN eval, teacher refreshed every 50 steps)"),
    (["regularizer.name=fixed_teacher", "regularizer.weight=0.3"],
     "distillation from the fixed pre-trained encoder λ=0.3 (mean, teacher BN batch)"),
    (["regularizer.name=ema_sd", "regularizer.weight=3", "regularizer.ema_decay=0.9"],
     "self-distillation from an EMA teacher λ=3 (decay 0.9, mean)"),
    (["regularizer.name=l2sp", "regularizer.weight=0.01", "regularizer.head_weight=0.1"], "L2-SP α=0.01 β=0.1"),
    (["regularizer.name=delta", "regularizer.weight=0.001", "regularizer.attention=none"],
     "DELTA α=0.001 β=0.01 (attention none)"),
    (["regularizer.name=bss", "regularizer.weight=0.001", "regularizer.k=2"], "BSS η=0.001 k=2"),
    (["regularizer.name=l2sp", "regularizer.weight=0.1", "optim.lp_epochs=1", "optim.layer_decay=0.65"],
     "L2-SP α=0.1 β=0.01 | LP-FT: head alone for 1 epoch(s) | layer-wise lr decay 0.65"),
])
def test_describe_method_lines_are_unchanged(overrides, line):
    cfg = tiny(*overrides)
    validate_ranges(cfg)
    assert describe_method(cfg) == line


def test_describe_refuses_an_unknown_name_instead_of_calling_it_bss():
    cfg = tiny("regularizer.weight=1")
    cfg.regularizer.name = "foo"  # only a program can do this: the loader refuses it
    with pytest.raises(ValueError, match="'foo' is not one of none, sd"):
        describe_method(cfg)
    with pytest.raises(ValueError, match="'foo' is not one of"):
        registry.build_regularizer(cfg.regularizer, nn.Linear(3, 4), None)


@pytest.mark.parametrize("overrides,message", [
    (["regularizer.snapshot_every=-1"],
     "config key regularizer.snapshot_every: must be >= 0 (0 = once per epoch) (got -1)"),
    (["regularizer.name=ema_sd", "regularizer.ema_decay=1.5"],
     "config key regularizer.ema_decay: must be in [0, 1), e.g. 0.999 (got 1.5)"),
    (["regularizer.name=none", "regularizer.ema_decay=1.5"],  # no method reads it, still checked
     "config key regularizer.ema_decay: must be in [0, 1), e.g. 0.999 (got 1.5)"),
    (["regularizer.name=l2sp", "regularizer.head_weight=-1"], "config key regularizer.head_weight: must be >= 0 (got -1.0)"),
    (["regularizer.name=delta", "regularizer.attention_samples=1"],
     "config key regularizer.attention_samples: must be >= 2 (got 1)"),
    (["regularizer.name=bss", "regularizer.k=0"], "config key regularizer.k: must be >= 1 (got 0)"),
    (["regularizer.name=bss", "regularizer.k=4"],  # the recipe's batch is 4
     ("config key regularizer.k: must be smaller than data.batch_size (4): a batch has at most that many "
      "singular values (got 4)")),
    (["regularizer.weight=-1"], "config key regularizer.weight: must be >= 0; use 0 for plain fine-tuning (got -1.0)"),
])
def test_range_errors_keep_their_messages(overrides, message):
    assert message in refused(*overrides)


def test_choice_errors_stop_the_config_at_load():
    with pytest.raises(UserError, match=r"config key regularizer\.reduction: 'max' is not one of mean, sum"):
        tiny("regularizer.reduction=max")
    with pytest.raises(UserError, match=r"config key regularizer\.attention: 'spatial' is not one of channel, none"):
        tiny("regularizer.attention=spatial")
    with pytest.raises(UserError, match=r"config key regularizer\.layers: expected list"):
        tiny("regularizer.layers=conv2")


def test_a_key_of_another_method_is_held_until_the_name_is_known():
    """A sweep's base config (``--set regularizer.k=2`` on an sd recipe, ``--grid regularizer.name=bss``)
    is read before every point's name is set: the key is kept and refused only by validation."""
    cfg = tiny("regularizer.k=2")
    assert cfg.regularizer.k == 2 and cfgmod.to_dict(cfg)["regularizer"]["k"] == 2
    validate_ranges(tiny("regularizer.k=2", "regularizer.name=bss"))


def test_existing_run_config_yaml_reads_and_compares_equal(tmp_path):
    """A config.yaml written before the registry (every flat key) is the same config as today's."""
    cfg = tiny("regularizer.name=bss", "regularizer.weight=0.1", "regularizer.k=2")
    cfgmod.dump_config(cfg, tmp_path / "config.yaml", kind="finetune")
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert stored["regularizer"] == {**FORMER_SECTION, "name": "bss", "weight": 0.1, "k": 2}
    assert list(stored["regularizer"]) == list(FORMER_SECTION)
    check_same_config(tmp_path, cfg, "this test")
    # the identity stored in a checkpoint compares equal too (no spurious "config changed" on resume)
    from sdtl.engine.rundir import config_changes

    stored.pop("kind")
    assert config_changes(stored, cfgmod.to_dict(cfg)) == []


def test_regularizer_config_takes_flat_keyword_arguments():
    r = RegularizerConfig(name="ema_sd", weight=0.25, ema_decay=0.8)
    assert r.ema_decay == 0.8 and r.k == 1 and r.options.ema_decay == 0.8
    assert r == RegularizerConfig(name="ema_sd", weight=0.25, ema_decay=0.8) != RegularizerConfig(name="ema_sd")
    with pytest.raises(TypeError, match="unknown key 'frobnicate'"):
        RegularizerConfig(frobnicate=1)
    assert RegularizerConfig(name="none").options is None
    # copies and pickles (DDP workers, the sweep's subprocesses) keep every key
    import copy
    import pickle
    for again in (copy.deepcopy(r), pickle.loads(pickle.dumps(r))):
        assert again == r and again.ema_decay == 0.8


def test_options_validate_themselves_naming_the_config_key():
    from sdtl.regularizers.options.delta import DELTAOptions
    from sdtl.regularizers.options.self_distillation import SDOptions

    with pytest.raises(ValueError, match=r"^regularizer\.snapshot_every: must be >= 0"):
        SDOptions(snapshot_every=-2)
    with pytest.raises(ValueError, match=r"^regularizer\.teacher_bn: 'train' is not one of eval, batch"):
        DELTAOptions(teacher_bn="train")


def test_config_and_registry_import_no_torch():
    # Reading a config and the regularizer registry needs no torch; validate_ranges may (it asks the
    # encoder's spec whether the clips fit), so it runs after the check.
    code = ("import sys, sdtl.engine.config as c, sdtl.engine.reporting, sdtl.regularizers\n"
            "cfg = c.load_config('synthetic_tiny', ['data.root=/tmp', 'regularizer.name=delta'])\n"
            "print(cfg.regularizer.options.describe(1.0))\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
            "c.validate_ranges(cfg)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "DELTA α=1" in out.stdout


# ----------------------------------------------------------------------- checkpoint_state(mid_epoch)


def test_every_regularizer_accepts_mid_epoch_checkpoints():
    """Those that always store their state store the same mid-epoch; BSS stores nothing."""
    from sdtl.regularizers import (
        BSS,
        DELTA,
        L2SP,
        EMASelfDistillation,
        FixedTeacherDistillation,
    )

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                        nn.Flatten())
    head = nn.Linear(4, 2)
    for reg in (FixedTeacherDistillation(enc), EMASelfDistillation(enc, decay=0.9), L2SP(enc, head),
                DELTA(enc, head, layers=["0"]), BSS(enc)):
        at_boundary, mid = reg.checkpoint_state(), reg.checkpoint_state(mid_epoch=True)
        if at_boundary is None:
            assert mid is None
            continue
        buffer = io.BytesIO()
        torch.save(mid, buffer)
        reg.load_checkpoint_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
        assert not reg.resumed_mid_epoch  # nothing of theirs depends on epoch_start
