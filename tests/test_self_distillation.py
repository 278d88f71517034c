"""The regularizer of Algorithm 1: exact values, snapshot semantics, no gradient into the teacher."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from sdtl import SelfDistillation


def small_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 6))


def clips(seed: int = 1, n: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 8, 8, generator=g)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_penalty_exact_value(reduction):
    enc = small_encoder()
    sd = SelfDistillation(enc, weight=3.5, reduction=reduction)
    sd.snapshot()
    x = clips()
    with torch.no_grad():
        teacher = sd.teacher(x)
    student = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    diff2 = (student - teacher) ** 2
    expected = diff2.mean() if reduction == "mean" else diff2.sum(dim=1).mean()
    got = sd(x, student)
    assert torch.allclose(got, 3.5 * expected, rtol=1e-6, atol=1e-7)
    # 'sum' is exactly D times 'mean' for the same inputs (D = 6 features).
    other = SelfDistillation(enc, weight=3.5, reduction="mean" if reduction == "sum" else "sum")
    other.teacher = sd.teacher
    ratio = got / other(x, student)
    assert torch.allclose(ratio, torch.tensor(1 / 6 if reduction == "mean" else 6.0), rtol=1e-5)


def test_zero_penalty_after_snapshot_with_batch_statistics():
    enc = small_encoder()
    with torch.no_grad():  # move running stats away from their init so "eval" mode differs
        enc(clips(9) * 3 + 1)
    enc.train()
    sd = SelfDistillation(enc, weight=10.0, teacher_bn="batch")
    sd.snapshot()
    running_before = enc[1].running_mean.clone()
    x = clips()
    penalty = sd(x, enc(x))
    assert penalty.item() == 0.0
    # the student's own BN update happened once; the teacher updated nothing of the student's
    assert not torch.equal(enc[1].running_mean, running_before)
    assert sd.teacher[1].running_mean is None  # batch statistics, no buffers to update

    sd_eval = SelfDistillation(enc, weight=10.0, teacher_bn="eval")
    sd_eval.snapshot()
    assert sd_eval(x, enc(x)).item() > 0  # running stats differ from batch stats


def test_teacher_is_frozen_deep_copy_and_gets_no_gradient():
    enc = small_encoder()
    sd = SelfDistillation(enc, weight=1.0)
    sd.snapshot()
    t_params = dict(sd.teacher.named_parameters())
    for name, p in enc.named_parameters():
        assert p.data_ptr() != t_params[name].data_ptr(), f"{name} shared with the teacher"
        assert not t_params[name].requires_grad
    with torch.no_grad():  # the student moves away from the snapshot, as during an epoch
        enc[0].weight.add_(0.1)
    x = clips()
    loss = sd(x, enc(x))
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in sd.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    # the regularizer does not own the student: it must not appear in its parameters or state dict
    assert {id(p) for p in sd.parameters()}.isdisjoint({id(p) for p in enc.parameters()})


def test_teacher_at_epoch_t_equals_student_at_end_of_epoch_t_minus_1():
    enc = small_encoder()
    head = nn.Linear(6, 3)
    opt = torch.optim.SGD(list(enc.parameters()) + list(head.parameters()), lr=0.5)
    sd = SelfDistillation(enc, weight=1.0)
    y = torch.tensor([0, 1, 2, 0, 1])
    end_of_epoch = None
    for epoch in range(3):
        sd.snapshot()
        if end_of_epoch is not None:
            for k, v in sd.teacher.state_dict().items():
                assert torch.equal(v, end_of_epoch[k]), f"teacher {k} != student at end of epoch {epoch - 1}"
        for step in range(2):
            x = clips(10 * epoch + step)
            f = enc(x)
            loss = nn.functional.cross_entropy(head(f), y) + sd(x, f)
            opt.zero_grad()
            loss.backward()
            opt.step()
        end_of_epoch = {k: v.clone() for k, v in enc.state_dict().items()}
        # training moved the student but not the teacher
        assert not torch.equal(enc[0].weight, sd.teacher[0].weight)


def test_teacher_runs_in_inference_mode_and_keeps_no_graph():
    enc = small_encoder()
    sd = SelfDistillation(enc, weight=1.0)
    sd.snapshot()
    out = sd.teacher_features(clips())
    assert out.is_inference() and out.grad_fn is None


def test_invalid_arguments():
    enc = small_encoder()
    with pytest.raises(ValueError, match="lambda"):
        SelfDistillation(enc, weight=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        SelfDistillation(enc, reduction="max")
    with pytest.raises(ValueError, match="teacher_bn"):
        SelfDistillation(enc, teacher_bn="train")
    with pytest.raises(RuntimeError, match="snapshot"):
        SelfDistillation(enc)(clips(), torch.zeros(5, 6))


@pytest.mark.parametrize("teacher_bn", ["eval", "batch"])
def test_resnapshot_and_teacher_state_roundtrip(teacher_bn):
    enc = small_encoder()
    sd = SelfDistillation(enc, weight=1.0, teacher_bn=teacher_bn)
    sd.snapshot()
    first = sd.teacher
    with torch.no_grad():
        enc[0].weight.add_(1.0)
    sd.snapshot()  # second snapshot reuses the teacher's storage and copies the new weights
    assert sd.teacher is first and torch.equal(sd.teacher[0].weight, enc[0].weight)
    saved = sd.teacher_state_dict()
    other = SelfDistillation(small_encoder(), weight=1.0, teacher_bn=teacher_bn)
    other.load_teacher_state_dict(saved)
    x = clips()
    assert torch.equal(other.teacher_features(x), sd.teacher_features(x))


def _train_step(enc: nn.Module, sd: SelfDistillation, i: int) -> torch.Tensor:
    """One deterministic "optimizer step" of step number ``i``: the penalty on a batch, then the
    student moves (by an amount fixed by ``i``, not by the object) and the step ends."""
    x = clips(100 + i)
    penalty = sd(x, enc(x)).detach()  # a training-mode forward also moves the student's BN buffers
    g = torch.Generator().manual_seed(1000 + i)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    sd.step_end()
    return penalty


@pytest.mark.parametrize("teacher_bn", ["batch", "eval"])
def test_mid_epoch_state_resumes_bit_exactly(teacher_bn):
    enc = small_encoder()
    sd = SelfDistillation(enc, weight=2.0, teacher_bn=teacher_bn, snapshot_every=3)
    sd.epoch_start()
    for i in range(4):  # refreshed after step 3; the teacher is now neither the start nor the model
        _train_step(enc, sd, i)
    assert sd.checkpoint_state() is None  # an epoch boundary: the next teacher is the model
    buffer = io.BytesIO()
    torch.save({"model": enc.state_dict(), "reg": sd.checkpoint_state(mid_epoch=True)}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert saved["reg"]["steps"] == 4
    want = [_train_step(enc, sd, i) for i in range(4, 11)]  # uninterrupted: refreshes after steps 6 and 9

    def resumed(state) -> SelfDistillation:
        torch.manual_seed(123)  # another encoder: nothing of the original object is reused
        other = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                              nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 6))
        again = SelfDistillation(other, weight=2.0, teacher_bn=teacher_bn, snapshot_every=3)
        other.load_state_dict(saved["model"])  # the loop restores the model
        again.load_checkpoint_state(state)
        return again

    again = resumed(saved["reg"])
    assert again.resumed_mid_epoch  # the loop does not call epoch_start for this epoch
    got = [_train_step(again.__dict__["student"], again, i) for i in range(4, 11)]
    assert all(torch.equal(a, b) for a, b in zip(got, want)), (got, want)
    assert sum(p.item() > 0 for p in got) >= 4  # (with teacher_bn="batch", 0 right after a refresh)
    again.epoch_start()
    assert not again.resumed_mid_epoch

    # not vacuous: the teacher and the step count each matter
    wrong_count = resumed({**saved["reg"], "steps": 0})
    assert [_train_step(wrong_count.__dict__["student"], wrong_count, i) for i in range(4, 11)] != want
    boundary = resumed(None)  # what an epoch-boundary resume does: snapshot the model
    boundary.epoch_start()
    assert not torch.equal(_train_step(boundary.__dict__["student"], boundary, 4), want[0])


def test_mid_epoch_state_must_hold_teacher_and_count():
    sd = SelfDistillation(small_encoder(), weight=1.0)
    sd.epoch_start()
    state = sd.checkpoint_state(mid_epoch=True)
    with pytest.raises(ValueError, match="mid-epoch"):
        SelfDistillation(small_encoder(), weight=1.0).load_checkpoint_state({"teacher": state["teacher"]})
