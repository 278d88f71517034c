"""Forgetting diagnostics: drift is 0 at the start, finite from a random init, grows with the weights'
change, never touches the model; the retention probe scores the pretext skill of its own encoder."""
from __future__ import annotations

import math

import pytest
import torch

from sdtl.engine.diagnostics import ForgettingProbe, RetentionProbe, batch_statistics, encode, make_retention_probe
from sdtl.models import build_encoder

CPU = torch.device("cpu")


def _encoder(seed: int = 0):
    torch.manual_seed(seed)
    return build_encoder("r2plus1d_vcop", width=0.0625)


def _clips(n: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 16, 16, generator=g)


def test_drift_is_exactly_zero_at_the_start_and_finite_from_random_init():
    enc = _encoder()
    probe = ForgettingProbe.build(enc, _clips(), CPU)
    start = probe.measure(enc, CPU, advance=False)
    assert start["feat_drift"] == 0.0 and start["epoch_drift"] == 0.0 and start["param_drift"] == 0.0
    assert start["feat_cos"] == pytest.approx(1.0) and start["feat_cka"] == pytest.approx(1.0)
    # A random-init encoder's running statistics are meaningless (mean 0, var 1): in eval mode the
    # drift reached 1e20. With batch statistics every number is finite and of order 1 or less.
    for value in start.values():
        assert math.isfinite(value)


def test_drift_grows_with_the_size_of_a_weight_perturbation():
    enc = _encoder()
    probe = ForgettingProbe.build(enc, _clips(), CPU)
    reference = {k: v.clone() for k, v in enc.state_dict().items()}
    drifts, params = [], []
    for scale in (0.01, 0.05, 0.2):
        enc.load_state_dict(reference)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
        m = probe.measure(enc, CPU, advance=False)
        drifts.append(m["feat_drift"])
        params.append(m["param_drift"])
    assert 0 < drifts[0] < drifts[1] < drifts[2] and all(math.isfinite(d) for d in drifts)
    assert 0 < params[0] < params[1] < params[2]


def test_epoch_drift_measures_from_the_previous_measurement():
    enc = _encoder()
    probe = ForgettingProbe.build(enc, _clips(), CPU)
    with torch.no_grad():
        next(enc.parameters()).mul_(1.5)
    first = probe.measure(enc, CPU)  # advances the anchor to these weights
    again = probe.measure(enc, CPU)
    assert first["epoch_drift"] > 0 and first["epoch_drift"] == pytest.approx(first["feat_drift"])
    assert again["epoch_drift"] == 0.0 and again["feat_drift"] == pytest.approx(first["feat_drift"])


def test_measuring_leaves_the_model_bit_identical_and_in_its_mode():
    enc = _encoder()
    enc.train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    encode(enc, _clips(), CPU)
    assert enc.training
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k  # running_mean/var and num_batches_tracked untouched
    enc.eval()
    with batch_statistics(enc):
        pass
    assert not enc.training


def test_probe_save_load_roundtrip(tmp_path):
    enc = _encoder()
    probe = ForgettingProbe.build(enc, _clips(), CPU)
    probe.save(tmp_path / "probe.pt")
    loaded = ForgettingProbe.load(tmp_path / "probe.pt")
    assert torch.equal(loaded.ref_features, probe.ref_features)
    assert loaded.measure(enc, CPU)["feat_drift"] == 0.0


def test_retention_probe_scores_its_own_encoder_high_and_a_random_one_near_chance(tmp_path):
    """The shipped demo encoder was pre-trained on the synthetic pool by playback-speed prediction;
    the tiny preset's pool videos are the first videos of that pool."""
    from sdtl.assets import demo_encoder
    from sdtl.data.synthetic import generate_synthetic
    from sdtl.data.videos import find_videos
    from sdtl.models.checkpoints import safe_load

    data = generate_synthetic(tmp_path / "pool", preset="tiny", seed=0, pool_size=12)
    shipped = demo_encoder()
    probe = make_retention_probe(shipped, find_videos(str(data), None), size=32, backend="pyav",
                                 crop_area=(0.6, 0.7), clips_per_class=8)
    assert sorted(probe.labels.tolist()) == sorted([0, 1, 2, 3] * 8)
    # classes are interleaved, so every fixed chunk's batch statistics see all of them
    assert probe.labels[:4].tolist() == [0, 1, 2, 3]
    state = safe_load(shipped)
    own = build_encoder(state["arch"], **state["arch_options"])
    own.load_state_dict(state["encoder"])
    assert probe.accuracy(own, CPU) >= 65.0  # 4-way task, chance 25%
    torch.manual_seed(0)
    random = build_encoder(state["arch"], **state["arch_options"])
    assert probe.accuracy(random, CPU) <= 45.0
    probe.save(tmp_path / "retention_probe.pt")
    again = RetentionProbe.load(tmp_path / "retention_probe.pt")
    assert again.accuracy(own, CPU) == probe.accuracy(own, CPU)


def test_retention_probe_file_errors_name_the_config_key(tmp_path):
    from sdtl.errors import UserError

    with pytest.raises(UserError, match="eval.retention"):
        RetentionProbe.load(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a retention probe"):
        RetentionProbe.load(tmp_path / "other.pt")


def _drawn_panels(history: list[dict], path) -> list:
    """The axes ``plot_curves`` draws for ``history`` (it writes ``path`` too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdtl.engine import reporting

    drawn, real = [], plt.subplots

    def spy(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        drawn.append(axes)
        return fig, axes

    plt.subplots = spy
    try:
        reporting.plot_curves(history, path)
    finally:
        plt.subplots = real
    return list(drawn[0][0])


def test_curves_draw_only_panels_with_data(tmp_path):
    """Pre-training has no validation or forgetting numbers: its curves.png used to show empty panels."""
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 20.0 + e, "lr": 0.1} for e in (1, 2, 3)]
    panels = _drawn_panels(history, tmp_path / "curves.png")
    titles = [ax.get_title() for ax in panels]
    assert titles == ["training loss", "pretext accuracy (%)", "learning rate"]
    assert all(ax.lines for ax in panels) and (tmp_path / "curves.png").is_file()
    assert all(ax.get_ylabel() for ax in panels)  # every panel says what its y axis is


def test_accuracy_panels_keep_the_full_0_100_range(tmp_path):
    """A retention moving 89 -> 75% must not fill the panel top to bottom, as a collapse would."""
    history = [{"epoch": e, "train_loss": 1.0, "val_video_acc1": 40.0 + e, "retention_acc": 89.0 - 7 * e,
                "feat_drift": 0.1 * e} for e in (0, 1, 2)]
    panels = {ax.get_title(): ax for ax in _drawn_panels(history, tmp_path / "curves.png")}
    assert panels["pre-trained skill kept (%)"].get_ylim() == (0, 100)
    assert panels["validation accuracy (%)"].get_ylim() == (0, 100)
    assert panels["forgetting (relative drift)"].get_ylim() != (0, 100)  # drifts keep their own scale
