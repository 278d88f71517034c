"""The regularizer family (sd, fixed_teacher, ema_sd, l2sp, delta, bss) against the papers' formulas.

Every expected value here is computed independently from the formula (REGULARIZERS.md), never with
the classes' own helpers. Also: no gradient into frozen references, checkpoint-state round trips,
``build_regularizer``, config validation, layer-wise lr decay and the LP-FT schedule.
All tensors and modules are tiny: each test runs in well under a second or two on CPU.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from sdtl.engine.config import (
    OptimConfig,
    RegularizerConfig,
    load_config,
    validate_ranges,
)
from sdtl.engine.optim import build_optimizer, lr_factor
from sdtl.errors import UserError
from sdtl.regularizers import (
    BSS,
    DELTA,
    L2SP,
    EMASelfDistillation,
    FixedTeacherDistillation,
    SelfDistillation,
    build_regularizer,
)
from sdtl.regularizers.delta import default_layers

# ----------------------------------------------------------------------------------------- helpers


class TinyEncoder(nn.Module):
    """Two conv stages with named layers; maps ``[B, 3, 4, 8, 8]`` to ``[B, 5]``.

    The stages differ in channels (4, 5) and in map size (N = 4·8·8 vs 4·4·4), so a wrong C_j or
    N_j in DELTA shows up in the value.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv3d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm3d(4)
        self.conv_b = nn.Conv3d(4, 5, 3, padding=1, stride=(1, 2, 2))
        self.bn_b = nn.BatchNorm3d(5)
        self.pool = nn.AdaptiveAvgPool3d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.conv_a(x)))
        x = torch.relu(self.bn_b(self.conv_b(x)))
        return self.pool(x).flatten(1)


LAYERS = ["conv_a", "conv_b"]


def tiny_encoder(seed: int = 0) -> TinyEncoder:
    torch.manual_seed(seed)
    return TinyEncoder()


def tiny_head(seed: int = 3, features: int = 5, classes: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(features, classes)


def clips(seed: int = 1, n: int = 3, shape=(3, 4, 8, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g)


@torch.no_grad()
def perturb(encoder: nn.Module, seed: int = 7, scale: float = 0.05) -> None:
    """Move every parameter of the student by a small random amount (as training would)."""
    g = torch.Generator().manual_seed(seed)
    for p in encoder.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def same_params(module: nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    own = dict(module.named_parameters())
    return own.keys() == expected.keys() and all(torch.equal(own[n], expected[n]) for n in own)


def capture(module: nn.Module, names: list[str], x: torch.Tensor):
    """Forward ``x`` through ``module`` and return (output, {name: detached feature map}).

    The hooks are removed afterwards, so no deep copy made later inherits them.
    """
    modules = dict(module.named_modules())
    maps: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: maps.__setitem__(n, o.detach().clone()))
               for n in names]
    try:
        out = module(x)
    finally:
        for h in handles:
            h.remove()
    return out, maps


def head_l2(head: nn.Linear) -> torch.Tensor:
    return head.weight.detach().double().pow(2).sum() + head.bias.detach().double().pow(2).sum()


def expected_delta(student_maps, teacher_maps, layers, attention, alpha, beta, head) -> torch.Tensor:
    """Σ_j Σ_b Σ_c ½·C_j·w_jc·‖FM_jc(θ)−FM_jc(θ⁰)‖²/N_j × α + β/2‖h‖², in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for j, name in enumerate(layers):
        s, t = student_maps[name].double(), teacher_maps[name].double()
        b, c = s.shape[:2]
        n = math.prod(s.shape[2:])  # N_j = T·H·W
        cw = torch.ones(c, dtype=torch.float64) if attention is None else c * attention[j].double()
        for bi in range(b):
            for ci in range(c):
                total += 0.5 * cw[ci] * (s[bi, ci] - t[bi, ci]).pow(2).sum() / n
    return alpha * total + 0.5 * beta * head_l2(head)


def delta_reference(encoder: nn.Module) -> nn.Module:
    """θ⁰ as DELTA's default teacher sees it: a copy normalising with batch statistics (train-mode BN)."""
    ref = copy.deepcopy(encoder)
    ref.train()
    return ref


# ------------------------------------------------------------------------------------------- L2-SP


def test_l2sp_value_matches_formula():
    enc, head = tiny_encoder(), tiny_head()
    alpha, beta = 0.3, 0.07
    reg = L2SP(enc, head, weight=alpha, head_weight=beta)
    with torch.no_grad():
        enc.conv_b.weight.add_(0.1)
    numel = enc.conv_b.weight.numel()
    expected = alpha / 2 * 0.01 * numel + beta / 2 * head_l2(head).item()
    got = reg(clips(), torch.zeros(3, 5))
    assert got.item() == pytest.approx(expected, rel=1e-5)

    # a second perturbation elsewhere (a BN affine parameter is anchored too) adds up
    with torch.no_grad():
        enc.bn_a.bias.sub_(0.5)
    expected += alpha / 2 * 0.25 * enc.bn_a.bias.numel()
    assert reg(clips(), torch.zeros(3, 5)).item() == pytest.approx(expected, rel=1e-5)


def test_l2sp_anchor_is_a_detached_copy_and_gradient_is_analytic():
    enc, head = tiny_encoder(), tiny_head()
    alpha, beta = 0.3, 0.07
    reg = L2SP(enc, head, weight=alpha, head_weight=beta)
    own = dict(enc.named_parameters())
    assert reg.reference.keys() == own.keys()
    for name, ref in reg.reference.items():
        assert ref.data_ptr() != own[name].data_ptr(), f"anchor {name} shares storage with the encoder"
        assert not ref.requires_grad
    theta0 = params_of(enc)
    perturb(enc)
    reg(clips(), torch.zeros(3, 5)).backward()  # the penalty alone
    for name, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, alpha * (p.detach() - theta0[name]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.weight.grad, beta * head.weight.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.bias.grad, beta * head.bias.detach(), rtol=1e-5, atol=1e-7)
    # the anchor did not move and received nothing
    for name, ref in reg.reference.items():
        assert ref.grad is None and not ref.requires_grad
        assert torch.equal(ref, theta0[name])


# ------------------------------------------------------------------------------------------- DELTA


@pytest.mark.parametrize("attention", ["uniform", "hand_set"])
def test_delta_value_matches_formula(attention):
    enc, head = tiny_encoder(), tiny_head()
    reference = delta_reference(enc)  # before DELTA exists: no DELTA hook is copied into it
    alpha, beta = 0.2, 0.05
    reg = DELTA(enc, head, weight=alpha, head_weight=beta, layers=LAYERS)
    weights = None
    if attention == "hand_set":
        weights = [torch.softmax(torch.tensor([0.0, 1.0, -2.0, 0.5]), 0),
                   torch.softmax(torch.tensor([3.0, -1.0, 0.0, 0.2, 1.5]), 0)]
        reg.attention = weights
    perturb(enc, scale=0.1)  # conv_a moves, so both layers' maps differ from θ⁰'s
    x = clips()
    features, student_maps = capture(enc, LAYERS, x)  # this forward also feeds DELTA's own hooks
    with torch.no_grad():
        _, teacher_maps = capture(reference, LAYERS, x)
    got = reg.loss(reg.prepare(x), features)
    expected = expected_delta(student_maps, teacher_maps, LAYERS, weights, alpha, beta, head)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() > 0.5 * beta * head_l2(head).item() * 1.01  # the feature term is not negligible


def test_delta_attention_changes_value_and_is_zero_at_start():
    enc, head = tiny_encoder(), tiny_head()
    reg = DELTA(enc, head, weight=1.0, head_weight=0.0, layers=LAYERS)
    x = clips()
    assert reg(x, enc(x)).item() == 0.0  # batch-statistics teacher: Ω = 0 before the weights move
    perturb(enc)
    uniform = reg(x, enc(x))
    reg.attention = [torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.full((5,), 0.2)]
    weighted = reg(x, enc(x))
    assert uniform.item() > 0 and weighted.item() > 0
    assert not torch.isclose(uniform, weighted)


@pytest.mark.parametrize("arch", ["c3d", "r2plus1d_vcop"])
def test_delta_default_layers_on_sdtl_encoders(arch):
    from sdtl.models import build_encoder

    torch.manual_seed(0)
    enc = build_encoder(arch, width=0.125)
    names = default_layers(enc)
    modules = dict(enc.named_modules())
    assert len(names) == 4 and len(set(names)) == 4
    for n in names:
        assert n in modules, f"default layer {n} is not a module of {arch}"
        assert isinstance(modules[n], nn.Conv3d) or type(modules[n]).__name__ in ("SpatioTemporalConv",
                                                                                 "Conv2Plus1D")
    head = nn.Linear(enc.feature_dim, 3)
    reference = delta_reference(enc)
    reg = DELTA(enc, head, weight=0.5, head_weight=0.01)
    assert reg.layers == names
    x = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(4))
    perturb(enc, scale=0.02)
    features, student_maps = capture(enc, names, x)
    with torch.no_grad():
        _, teacher_maps = capture(reference, names, x)
    penalty = reg.loss(reg.prepare(x), features)
    expected = expected_delta(student_maps, teacher_maps, names, None, 0.5, 0.01, head)
    assert torch.isfinite(penalty) and penalty.item() > 0
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-4)
    penalty.backward()
    assert all(p.grad is None for p in reg.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_delta_unknown_layer_raises_naming_it():
    enc, head = tiny_encoder(), tiny_head()
    with pytest.raises(ValueError, match="no_such_conv"):
        DELTA(enc, head, layers=["conv_a", "no_such_conv"])


def test_delta_compute_attention_is_a_deterministic_distribution_per_layer():
    enc, head = tiny_encoder(), tiny_head()
    reg = DELTA(enc, head, weight=1.0, layers=LAYERS)
    teacher_before = params_of(reg.teacher)
    x = clips(seed=5, n=8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    weights = reg.compute_attention(x, labels, num_classes=3, batch_size=4, seed=0)
    assert reg.attention is weights
    assert [w.shape for w in weights] == [torch.Size([4]), torch.Size([5])]  # length C_j per layer
    for w in weights:
        assert torch.all(w > 0)
        assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    # same seed, same weights (also from a fresh regularizer on the same θ⁰)
    again = reg.compute_attention(x, labels, num_classes=3, batch_size=4, seed=0)
    fresh = DELTA(copy.deepcopy(enc), head, weight=1.0, layers=LAYERS).compute_attention(
        x, labels, num_classes=3, batch_size=4, seed=0)
    for a, b, c in zip(weights, again, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)
    # computing attention leaves θ⁰ alone and un-zeroes every channel: Ω is still exactly 0
    assert same_params(reg.teacher, teacher_before)
    y = clips()
    assert reg(y, enc(y)).item() == pytest.approx(0.5 * 0.01 * head_l2(head).item(), rel=1e-6)


# --------------------------------------------------------------------------------------------- BSS


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("b,d", [(4, 7), (7, 4)])
def test_bss_value_matches_svd(k, b, d):
    feats = torch.randn(b, d, generator=torch.Generator().manual_seed(10 * b + d))
    eta = 0.37
    sigma = np.linalg.svd(feats.double().numpy(), compute_uv=False)  # descending, min(b, d) values
    assert len(sigma) == min(b, d)
    expected = eta * np.sum(np.sort(sigma)[:k] ** 2)
    got = BSS(weight=eta, k=k)(None, feats)
    assert got.item() == pytest.approx(expected, rel=1e-4)
    # and it is *not* the largest ones
    assert got.item() < eta * np.sum(np.sort(sigma)[-k:] ** 2)


def test_bss_k_larger_than_rank_raises():
    with pytest.raises(ValueError, match="k=5"):
        BSS(weight=1.0, k=5)(None, torch.randn(4, 7))
    with pytest.raises(ValueError, match="k=5"):
        BSS(weight=1.0, k=5)(None, torch.randn(7, 4))
    with pytest.raises(ValueError):
        BSS(weight=1.0, k=0)


# ------------------------------------------------------------------------------- SD-family teachers


def bump(encoder: nn.Module, amount: float) -> None:
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(amount)


def test_sd_snapshot_every_refreshes_exactly_every_n_steps_within_an_epoch():
    enc = tiny_encoder()
    sd = SelfDistillation(enc, weight=1.0, snapshot_every=3)
    step = 0
    for epoch, steps in enumerate([7, 5]):  # 7 % 3 != 0: the count must restart at the epoch boundary
        sd.epoch_start()
        assert same_params(sd.teacher, params_of(enc)), f"epoch {epoch}: no snapshot at epoch_start"
        last_refresh = params_of(enc)
        for i in range(1, steps + 1):
            step += 1
            bump(enc, 0.01 * step)
            sd.step_end()
            if i % 3 == 0:
                last_refresh = params_of(enc)
                assert same_params(sd.teacher, last_refresh), f"epoch {epoch} step {i}: expected a refresh"
            else:
                assert same_params(sd.teacher, last_refresh), f"epoch {epoch} step {i}: refreshed in between"
                assert not same_params(sd.teacher, params_of(enc))


def test_sd_without_snapshot_every_refreshes_only_at_epoch_start():
    enc = tiny_encoder()
    sd = SelfDistillation(enc, weight=1.0)
    sd.epoch_start()
    start = params_of(enc)
    for i in range(4):
        bump(enc, 0.1)
        sd.step_end()
        assert same_params(sd.teacher, start)
    sd.epoch_start()
    assert same_params(sd.teacher, params_of(enc))


@pytest.mark.parametrize("teacher_bn", ["batch", "eval"])
def test_fixed_teacher_is_the_encoder_at_construction_and_never_changes(teacher_bn):
    enc = tiny_encoder()
    with torch.no_grad():  # move running statistics off their init so the buffers matter too
        enc(clips(9) * 2 + 1)
    start = {k: v.clone() for k, v in enc.state_dict().items()}
    reg = FixedTeacherDistillation(enc, weight=1.0, teacher_bn=teacher_bn)
    for k, v in reg.teacher.state_dict().items():
        assert torch.equal(v, start[k]), k
    x = clips()
    at_start = reg.teacher_features(x).clone()
    for epoch in range(2):
        reg.epoch_start()
        for _ in range(3):
            perturb(enc, seed=epoch)
            enc(x)  # a training-mode forward also moves the student's BN buffers
            reg.step_end()
    assert not torch.equal(enc.conv_a.weight, start["conv_a.weight"])
    for k, v in reg.teacher.state_dict().items():
        assert torch.equal(v, start[k]), f"teacher {k} changed"
    assert torch.equal(reg.teacher_features(x), at_start)


@pytest.mark.parametrize("teacher_bn", ["batch", "eval"])
@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_ema_teacher_update_is_exact_average(decay, teacher_bn):
    enc = tiny_encoder()
    reg = EMASelfDistillation(enc, weight=1.0, decay=decay, teacher_bn=teacher_bn)
    assert same_params(reg.teacher, params_of(enc))
    for step in range(3):
        t_old = {k: v.clone() for k, v in reg.teacher.state_dict().items()}
        perturb(enc, seed=step, scale=0.3)
        enc(clips(step))  # updates the student's BN running statistics
        reg.epoch_start()  # must not touch an EMA teacher
        assert all(torch.equal(v, t_old[k]) for k, v in reg.teacher.state_dict().items())
        reg.step_end()
        s = enc.state_dict()
        for name, t in reg.teacher.state_dict().items():
            if t.is_floating_point():
                expected = decay * t_old[name] + (1 - decay) * s[name]
                torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7, msg=f"teacher {name}")
            else:  # num_batches_tracked (teacher_bn="eval" only)
                assert torch.equal(t, s[name])
    if teacher_bn == "eval":  # running statistics are averaged too
        assert "bn_a.running_mean" in reg.teacher.state_dict()


# ------------------------------------------------------------------------ no gradient into references

REG_NAMES = ["sd", "fixed_teacher", "ema_sd", "l2sp", "delta", "bss"]


def make_reg(name: str, enc: nn.Module, head: nn.Module):
    if name == "sd":
        reg = SelfDistillation(enc, weight=1.0)
        reg.epoch_start()
        return reg
    if name == "fixed_teacher":
        return FixedTeacherDistillation(enc, weight=1.0)
    if name == "ema_sd":
        return EMASelfDistillation(enc, weight=1.0, decay=0.9)
    if name == "l2sp":
        return L2SP(enc, head, weight=0.1, head_weight=0.01)
    if name == "delta":
        return DELTA(enc, head, weight=0.1, head_weight=0.01, layers=LAYERS)
    return BSS(enc, weight=0.1, k=1)


@pytest.mark.parametrize("name", REG_NAMES)
def test_no_gradient_reaches_frozen_references(name):
    enc, head = tiny_encoder(), tiny_head()
    reg = make_reg(name, enc, head)
    perturb(enc)  # the student moves away from every reference
    x = clips()
    penalty = reg(x, enc(x))
    assert penalty.item() > 0
    penalty.backward()  # the penalty alone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters()), \
        f"{name}: the penalty gives the student no gradient"
    teacher = getattr(reg, "teacher", None)
    if name in ("sd", "fixed_teacher", "ema_sd", "delta"):
        assert teacher is not None
        for n, p in teacher.named_parameters():
            assert not p.requires_grad and p.grad is None, f"{name}: teacher {n} takes gradients"
    if name == "l2sp":
        for n, t in reg.reference.items():
            assert not t.requires_grad and t.grad is None, f"l2sp: anchor {n} takes gradients"
    # the student is not owned by the regularizer (not in its parameters, no shared storage)
    student_ptrs = {p.data_ptr() for p in enc.parameters()}
    assert all(p.data_ptr() not in student_ptrs for p in reg.parameters())


# ------------------------------------------------------------------------ checkpoint state round trip


def _roundtrip_setup(name: str, enc: nn.Module, head: nn.Module):
    reg = make_reg(name, enc, head)
    if name == "ema_sd":  # an averaged teacher that differs from both θ⁰ and the student
        for step in range(2):
            perturb(enc, seed=20 + step)
            reg.step_end()
    if name == "delta":
        reg.attention = [torch.softmax(torch.arange(4.0), 0), torch.softmax(-torch.arange(5.0), 0)]
    perturb(enc, seed=30)
    return reg


def _penalty(name: str, reg, enc: nn.Module, x: torch.Tensor, student_features: torch.Tensor):
    if name in ("l2sp", "delta"):  # these read the student encoder itself
        return reg(x, enc(x))
    return reg(x, student_features)


@pytest.mark.parametrize("name", ["fixed_teacher", "ema_sd", "l2sp", "delta"])
def test_checkpoint_state_roundtrip_is_bit_exact(name):
    enc_a, head = tiny_encoder(0), tiny_head()
    reg_a = _roundtrip_setup(name, enc_a, head)
    x = clips()
    student_features = torch.randn(3, 5, generator=torch.Generator().manual_seed(8))
    want = _penalty(name, reg_a, enc_a, x, student_features).detach()  # grad on: DELTA's hooks need it
    state = reg_a.checkpoint_state()
    assert state is not None
    mid = reg_a.checkpoint_state(mid_epoch=True)  # the same state: theirs never depends on the epoch
    assert mid.keys() == state.keys()

    enc_b = tiny_encoder(1)  # a different (re-seeded) encoder: its own reference is different
    reg_b = make_reg(name, enc_b, head)
    enc_b.load_state_dict(enc_a.state_dict())  # the resumed model = the same student
    before = _penalty(name, reg_b, enc_b, x, student_features).detach()
    assert not torch.equal(before, want), "test is vacuous: the fresh regularizer already agrees"
    reg_b.load_checkpoint_state(state)
    got = _penalty(name, reg_b, enc_b, x, student_features).detach()
    assert torch.equal(got, want)

    with pytest.raises(ValueError):
        make_reg(name, tiny_encoder(2), head).load_checkpoint_state(None)


def test_delta_checkpoint_with_other_layers_is_refused():
    enc, head = tiny_encoder(), tiny_head()
    state = DELTA(enc, head, layers=LAYERS).checkpoint_state()
    with pytest.raises(ValueError, match="layers"):
        DELTA(tiny_encoder(1), head, layers=["conv_a"]).load_checkpoint_state(state)


def test_plain_sd_and_bss_keep_no_checkpoint_state():
    sd = SelfDistillation(tiny_encoder(), weight=1.0, snapshot_every=2)
    sd.epoch_start()
    assert sd.checkpoint_state() is None  # at an epoch boundary (mid-epoch: test_self_distillation)
    sd.load_checkpoint_state(None)  # fine: nothing to restore
    with pytest.raises(ValueError):
        sd.load_checkpoint_state({"teacher": {}})
    with pytest.raises(ValueError):
        sd.load_checkpoint_state({"teacher": {}, "steps": 1})  # a teacher that is not this encoder's
    assert sd.checkpoint_state(mid_epoch=True)["steps"] == 0
    bss = BSS(weight=1.0)
    assert bss.checkpoint_state() is None and bss.checkpoint_state(mid_epoch=True) is None
    bss.load_checkpoint_state(None)


# ------------------------------------------------------------------------------- build_regularizer


@pytest.mark.parametrize("name,cls", [("sd", SelfDistillation), ("fixed_teacher", FixedTeacherDistillation),
                                      ("ema_sd", EMASelfDistillation), ("l2sp", L2SP), ("delta", DELTA),
                                      ("bss", BSS)])
def test_build_regularizer_returns_the_named_class(name, cls):
    enc, head = tiny_encoder(), tiny_head()
    cfg = RegularizerConfig(name=name, weight=0.25, snapshot_every=4 if name == "sd" else 0,
                            ema_decay=0.8 if name == "ema_sd" else 0.999, head_weight=0.03,
                            layers=list(LAYERS) if name == "delta" else [], k=2 if name == "bss" else 1)
    reg = build_regularizer(cfg, enc, head)
    assert type(reg) is cls
    assert reg.weight == 0.25
    if name == "sd":
        assert reg.snapshot_every == 4
    if name == "ema_sd":
        assert reg.decay == 0.8
    if name in ("l2sp", "delta"):
        assert reg.head_weight == 0.03
    if name == "delta":
        assert reg.layers == LAYERS
    if name == "bss":
        assert reg.k == 2
    # weight 0 = plain fine-tuning: nothing is built
    assert build_regularizer(RegularizerConfig(name=name, weight=0.0, layers=list(LAYERS)), enc, head) is None


def test_build_regularizer_none():
    assert build_regularizer(RegularizerConfig(name="none", weight=1.0), tiny_encoder(), tiny_head()) is None


# ---------------------------------------------------------------------------------- config checks


def tiny_config(*overrides: str):
    return load_config("synthetic_tiny", ["data.root=/tmp", *overrides])


def test_config_defaults_validate():
    validate_ranges(tiny_config())
    validate_ranges(tiny_config("optim.lp_epochs=1", "optim.layer_decay=0.75"))
    validate_ranges(tiny_config("regularizer.name=bss", "regularizer.k=2"))


def test_config_unknown_regularizer_lists_valid_names():
    with pytest.raises(UserError) as err:
        validate_ranges(tiny_config("regularizer.name=foo"))
    msg = str(err.value)
    assert "regularizer.name" in msg and "foo" in msg
    for valid in ("none", "sd", "fixed_teacher", "ema_sd", "l2sp", "delta", "bss"):
        assert valid in msg


def test_config_key_of_another_regularizer_is_refused():
    with pytest.raises(UserError, match=r"regularizer\.k.*used only by regularizer\.name=bss"):
        validate_ranges(tiny_config("regularizer.name=sd", "regularizer.k=2"))


def test_config_unknown_regularizer_key():
    with pytest.raises(UserError, match=r"regularizer\.frobnicate: unknown key"):
        validate_ranges(tiny_config("regularizer.frobnicate=1"))


@pytest.mark.parametrize("override,key", [("optim.lp_epochs=2", "optim.lp_epochs"),  # recipe: epochs 2
                                          ("optim.lp_epochs=5", "optim.lp_epochs"),
                                          ("optim.layer_decay=0", "optim.layer_decay"),
                                          ("optim.layer_decay=1.5", "optim.layer_decay")])
def test_config_range_errors(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate_ranges(tiny_config(override))


# ------------------------------------------------------------------- layer-wise lr decay and LP-FT


def expected_stage(arch: str, param_name: str) -> int:
    """Stem 0, stages 1..4, from the encoders' published layer names (independent of stage_of)."""
    top = param_name.split(".")[0]
    if arch == "r2plus1d_vcop":
        return {"conv1": 0, "bn1": 0, "conv2": 1, "conv3": 2, "conv4": 3, "conv5": 4}[top]
    return {"conv1": 0, "bn1": 0, "conv2": 1, "bn2": 1, "conv3a": 2, "conv3b": 2, "bn3a": 2, "bn3b": 2,
            "conv4a": 3, "conv4b": 3, "bn4a": 3, "bn4b": 3, "conv5a": 4, "conv5b": 4, "bn5a": 4, "bn5b": 4}[top]


@pytest.mark.parametrize("arch", ["r2plus1d_vcop", "c3d"])
def test_layer_decay_groups(arch):
    from sdtl.models import build_encoder

    enc = build_encoder(arch, width=0.125)
    head = nn.Linear(enc.feature_dim, 4)
    opt = build_optimizer(OptimConfig(lr=1.0, layer_decay=0.5), enc, head)
    lr_of: dict[int, float] = {}
    count: dict[int, int] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = group["lr"]
            count[id(p)] = count.get(id(p), 0) + 1
    assert all(c == 1 for c in count.values()), "a parameter is in two groups"
    all_params = list(enc.parameters()) + list(head.parameters())
    assert set(count) == {id(p) for p in all_params}
    for name, p in enc.named_parameters():
        stage = expected_stage(arch, name)
        assert lr_of[id(p)] == pytest.approx(0.5 ** (5 - stage)), name
    for p in head.parameters():
        assert lr_of[id(p)] == 1.0
    assert {expected_stage(arch, n) for n, _ in enc.named_parameters()} == {0, 1, 2, 3, 4}


def test_lr_factor_with_lp_epochs_then_cosine():
    lo = 0.01
    cfg = OptimConfig(epochs=6, lp_epochs=2, schedule="cosine", min_lr_ratio=lo, warmup_epochs=0)
    got = [lr_factor(cfg, e) for e in range(6)]
    cosine = [lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * i / 3)) for i in range(4)]
    assert got[:2] == [1.0, 1.0]
    assert got[2] == pytest.approx(1.0)
    assert got[5] == pytest.approx(lo)
    assert got[2:] == pytest.approx(cosine)


def test_delta_hooks_ignore_later_copies_of_the_encoder():
    """A deep copy of the student made after DELTA (e.g. an SD teacher) inherits the forward hooks;
    running it must not overwrite DELTA's recorded student maps."""
    from sdtl.models import build_encoder

    enc = build_encoder("r2plus1d_vcop", width=0.125)
    enc.train()
    reg = DELTA(enc, None, weight=1.0, head_weight=0.0)
    x = torch.randn(2, 3, 8, 32, 32)
    ctx = reg.prepare(x)
    feats = enc(x)
    copy_of_student = copy.deepcopy(enc)
    with torch.no_grad():
        for p in copy_of_student.parameters():
            p.add_(1.0)
    copy_of_student.train()
    copy_of_student(torch.randn(2, 3, 8, 32, 32))  # with grad, in training mode: the hook fires
    assert torch.equal(reg.loss(ctx, feats), torch.zeros(()))  # still the student's own maps (= θ⁰'s)
