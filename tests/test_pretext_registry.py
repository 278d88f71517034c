"""The pretext tasks are declared once (sdtl.pretext.registry.PRETEXT): the config's ``task`` section,
its key ownership, the ``task.name`` choices, range checks and the run's description come from there."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from sdtl.engine import config as cfgmod
from sdtl.engine.config import load_config, validate_ranges
from sdtl.errors import ConfigError
from sdtl.pretext import registry
from sdtl.pretext.options import PretextOptions, need

#: the task section as config.yaml files of existing runs spell it (written before the registry)
FORMER_SECTION = {"name": "speed", "strides": [1, 2, 4, 8], "queue_size": 16384, "key_momentum": 0.999,
                  "temperature": 0.07, "embed_dim": 128, "margin": 2.0, "avid_weight": 1.0, "rsp_weight": 1.0}


def test_the_section_equals_the_former_hand_written_one():
    cfg = load_config("synthetic_tiny_pretrain", ["data.root=/tmp"], kind="pretrain")
    section = cfgmod.to_dict(cfg)["task"]
    assert section == FORMER_SECTION and list(section) == list(FORMER_SECTION)  # same keys, order, defaults
    assert registry.task_keys() == {"strides": ("speed",), **{k: ("rspnet",) for k in list(FORMER_SECTION)[2:]}}
    assert cfgmod.choices_for("task.name") == ("speed", "rspnet")


def test_every_task_has_a_builder_in_the_engine():
    from sdtl.engine.pretrain import TASK_BUILDERS

    assert list(TASK_BUILDERS) == list(registry.PRETEXT)


@pytest.mark.parametrize(("sets", "message"), [
    (["task.strides=[1,1]"], "task.strides: must be distinct integers >= 1"),
    (["task.name=rspnet", "task.temperature=0"], "task.temperature: must be > 0; RSPNet uses 0.07 (got 0"),
    (["task.name=rspnet", "task.avid_weight=0", "task.rsp_weight=0"], "task.rsp_weight: task.avid_weight and"),
    (["task.queue_size=8"], "task.queue_size: used only by task.name=rspnet, not 'speed'"),
    (["task.name=pace"], "task.name: 'pace' is not one of speed, rspnet"),
])
def test_options_check_themselves_naming_the_key(sets, message):
    with pytest.raises(ConfigError) as err:
        validate_ranges(load_config("synthetic_tiny_pretrain", ["data.root=/tmp", *sets], kind="pretrain"))
    assert message in str(err.value)


def test_each_task_describes_itself():
    speed = load_config("synthetic_tiny_pretrain", ["data.root=/tmp", "task.strides=[1,3]"], kind="pretrain")
    assert registry.options_of(speed.task).describe() == "speed [1, 3]"
    rsp = load_config("synthetic_tiny_rspnet_pretrain", ["data.root=/tmp"], kind="pretrain")
    assert registry.options_of(rsp.task).describe(queue=24, clip_len=8) == (
        "rspnet (queue 24, momentum 0.999, τ 0.07, margin 2.0, weights A-VID 1.0 / RSP 1.0; "
        "16-frame windows -> 8-frame clips at 1x / 2x)")


@dataclass
class ToyOptions(PretextOptions):
    toy_level: int = 3

    def check(self) -> None:
        need(self.toy_level > 0, "toy_level", "must be > 0", self.toy_level)

    def describe(self) -> str:
        return f"toy level {self.toy_level}"


def test_a_task_registered_in_one_line_gets_its_keys_choice_and_checks(monkeypatch):
    monkeypatch.setitem(registry.PRETEXT, "toy", registry.PretextSpec(ToyOptions, "a toy task"))
    section = registry.section_class("tests")
    names = [f.name for f in dataclasses.fields(section)]
    assert names == ["name", *list(FORMER_SECTION)[1:], "toy_level"]
    assert registry.task_keys()["toy_level"] == ("toy",) and cfgmod.choices_for("task.name")[-1] == "toy"
    assert registry.options_of(section(name="toy", toy_level=5)).describe() == "toy level 5"
    with pytest.raises(ConfigError, match=r"task.toy_level: must be > 0 \(got 0\)"):
        registry.options_of(section(name="toy", toy_level=0))
    assert "`toy`: a toy task" in section.__doc__


def test_a_key_declared_differently_by_two_tasks_is_refused(monkeypatch):
    @dataclass
    class Clash(PretextOptions):
        strides: list[int] = dataclasses.field(default_factory=lambda: [1, 2])

    monkeypatch.setitem(registry.PRETEXT, "clash", registry.PretextSpec(Clash, "clash"))
    with pytest.raises(TypeError, match="task.strides is declared differently by speed and clash"):
        registry.task_keys()
