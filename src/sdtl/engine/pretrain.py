"""Self-supervised pre-training of an encoder on unlabelled videos (``sdtl pretrain``).

The first task is playback-speed prediction (the "Pace" baseline the paper cites, and one half of
RSPNet's objective): a clip of ``clip_len`` frames is sampled with a frame stride drawn from
``task.strides`` (default 1/2/4/8) and the encoder + a linear head classify which stride it was.
Doing so needs motion features — the same features the action classes of the downstream task need.

A pretext task is a small class with ``num_outputs``, ``sample(num_frames, generator) -> (indices,
target)`` and a loss; :data:`TASKS` maps names to them. Adding RSPNet's relative-speed perception or
its appearance-focused contrastive task means adding a class here (and its key in the config's
``task.name`` choices); the loop, checkpoints and resume stay as they are.

The result is ``OUT/checkpoints/encoder.pt`` (an ``sdtl-pretrain`` checkpoint) that
``sdtl finetune --set model.pretrained=OUT/checkpoints/encoder.pt`` loads; ``last.pt`` holds the full
training state for ``--resume``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from sdtl.engine import config as cfgmod
from sdtl.engine import distributed as dist_utils
from sdtl.engine.reporting import RunLog
from sdtl.data.videos import find_videos
from sdtl.engine.optim import build_fast_optimizer, build_scheduler, make_scaler, optimizer_step, restore_scaler
from sdtl.engine.rundir import record_config_changes, run_in_process_group, start_run
from sdtl.engine.runtime import (EpochMeter, amp_dtype, capture_rng, check_finite, make_train_loader, maybe_compile,
                                 prepare_model, progress, restore_rng, runtime_settings, seed_everything,
                                 to_memory_format)
from sdtl.models.classifier import model_options
from sdtl.pretext import PRETEXT_TASKS, PretextModel
from sdtl.pretext.dataset import PretextClipDataset
from sdtl.errors import UserError

log = logging.getLogger("sdtl.pretrain")













def run_pretrain(cfg: cfgmod.PretrainConfig, out_dir: str | Path, resume: str | None = None) -> Path | None:
    """Pre-train an encoder; returns the path of the encoder checkpoint (rank 0)."""
    return run_in_process_group(cfg, _run, out_dir, resume)


def _run(cfg, out_dir: Path, resume, info) -> Path | None:
    from sdtl.data.corrupt import CorruptVideoTracker
    from sdtl.models import build_encoder
    from sdtl.models.checkpoints import save_checkpoint

    resume_path, state = start_run(cfg, out_dir, resume, info, "pretrain")
    dtype = amp_dtype(cfg.optim.amp, info.device)
    task = PRETEXT_TASKS[cfg.task.name](cfg.task.strides, cfg.data.clip_len)
    paths = find_videos(cfg.data.root, cfg.data.list_file)
    seed_everything(cfg.run.seed)
    encoder = build_encoder(cfg.model.arch, **{k: v for k, v in model_options(cfg).items() if k != "dropout"})
    model = PretextModel(encoder, task.num_outputs)
    channels_last = prepare_model(model, cfg, info.device)
    seed_everything(cfg.run.seed + info.rank)
    optimizer = build_fast_optimizer(cfg, model.encoder, model.head, info.device)
    scheduler = build_scheduler(cfg.optim, optimizer)
    scaler = make_scaler(dtype, info.device)
    history, start_epoch = [], 1
    if state is not None:
        try:
            model.encoder.load_state_dict(state["encoder"])
            model.head.load_state_dict(state["head"])
        except RuntimeError as exc:
            raise UserError(f"--resume {resume_path}: its weights do not fit the configured model "
                            f"({cfg.model.arch}, {model_options(cfg)}, {task.num_outputs} pretext outputs); "
                            f"resume with the run's own config (leave --config out) "
                            f"[{str(exc).splitlines()[0]}]") from None
        record_config_changes(cfg, state, out_dir, resume_path, info, log)  # a refused resume changed nothing
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_scaler(scaler, state.get("scaler"), log)
        history, start_epoch = list(state["history"]), state["epoch"] + 1

    ds = PretextClipDataset(paths, task, cfg.data.size, cfg.data.backend, cfg.run.seed, tuple(cfg.data.crop_area))
    from sdtl.data.video_io import ProbeCache

    ds.probe_cache = ProbeCache(out_dir / "video_index.jsonl")
    sampler, loader = make_train_loader(ds, cfg.data, info, cfg.run.seed)
    ckpt_dir = out_dir / "checkpoints"
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        cfgmod.dump_config(cfg, out_dir / "config.yaml", "pretrain", runtime=runtime_settings(cfg, info.device, optimizer))
        log.info("sdtl pretrain → %s | task %s %s | %d videos under %s | arch %s %s | %d process(es) on %s",
                 out_dir.resolve(), cfg.task.name, cfg.task.strides, len(ds), cfg.data.root, cfg.model.arch, model_options(cfg),
                 info.world_size, info.device)
    ddp = model
    if info.enabled:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    ddp = maybe_compile(ddp, cfg.run, log)
    tracker = CorruptVideoTracker(out_dir / "quarantine.txt" if info.is_main else None,
                                  max_fraction=cfg.data.max_corrupt_fraction)
    run_log = RunLog(out_dir, info.is_main, cfg.run.tensorboard, history)
    if state is not None:
        restore_rng(state["rng"])
    last_path = ckpt_dir / "last.pt"
    for epoch in range(start_epoch, cfg.optim.epochs + 1):
        ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        tracker.reset_epoch()
        model.train()
        meter = EpochMeter()
        correct = seen = 0
        lr = optimizer.param_groups[0]["lr"]
        bar = progress(len(loader), f"pretrain {epoch}/{cfg.optim.epochs}", info.is_main and cfg.run.progress)
        for step, batch in enumerate(loader, start=1):
            meter.data_ready()
            tracker.update(batch.get("failed", []), num_samples=len(batch["label"]))
            clips = to_memory_format(batch["video"].to(info.device, non_blocking=True), channels_last)
            target = torch.as_tensor(batch["label"]).to(info.device, non_blocking=True)
            with torch.autocast(info.device.type, dtype=dtype, enabled=dtype is not None):
                logits = ddp(clips)
                loss = task.loss(logits, target)
            check_finite({task.__class__.__name__: loss}, epoch, step,
                         str(last_path) if last_path.exists() else "none yet")
            optimizer_step(loss, optimizer, scaler, model.parameters(), cfg.optim.grad_clip)
            correct += int((logits.argmax(1) == target).sum())
            seen += len(target)
            meter.step_done({"loss": loss.item()}, len(target) * info.world_size)
            bar.update(1)
            if step % 5 == 0:
                bar.set_postfix(meter.postfix(lr), refresh=False)
        bar.close()
        tracker.check(force=True)
        scheduler.step()
        loss_sum, c, s = dist_utils.all_reduce_sum(info, [meter.means()["loss"], correct, seen])
        record = {"epoch": epoch, "train_loss": loss_sum / info.world_size, "train_acc": 100.0 * c / max(1, s),
                  "lr": lr, **meter.summary()}
        run_log.log_epoch(record)
        if info.is_main:
            save_checkpoint(_payload(cfg, model, epoch, history=run_log.history, optimizer=optimizer,
                                     scheduler=scheduler, scaler=scaler), last_path)
            log.info("pretrain epoch %d/%d loss %.4f pretext acc %.1f%% clips/s %.1f", epoch, cfg.optim.epochs,
                     record["train_loss"], record["train_acc"], record["clips_per_s"])
        dist_utils.barrier(info)
    run_log.close()
    if not info.is_main:
        return None
    encoder_path = ckpt_dir / "encoder.pt"
    save_checkpoint(_payload(cfg, model, cfg.optim.epochs, history=run_log.history), encoder_path)
    write_retention_probe(encoder_path, paths, cfg, out_dir / "retention_probe.pt")
    return encoder_path


def write_retention_probe(encoder_path: Path, videos: list[Path], cfg, path: Path) -> Path:
    """Pretext clips of the pre-training videos + the frozen pretext head, for fine-tuning's
    ``eval.retention`` (how much of the pretext skill survives fine-tuning)."""
    from sdtl.engine.diagnostics import make_retention_probe

    probe = make_retention_probe(encoder_path, videos, cfg.data.size, cfg.data.backend, tuple(cfg.data.crop_area),
                                 seed=cfg.run.seed)
    probe.save(path)
    log.info("retention probe (%d pretext clips, frozen pretext head) -> %s; fine-tune with "
             "--set eval.retention=%s", len(probe.clips), path, path)
    return path


def _payload(cfg, model: PretextModel, epoch: int, history: list, optimizer=None, scheduler=None,
             scaler=None) -> dict:

    payload = {
        "sdtl_format": "pretrain", "version": 1, "arch": cfg.model.arch,
        "arch_options": {k: v for k, v in model_options(cfg).items() if k != "dropout"},
        "task": cfg.task.name, "task_options": {"strides": list(cfg.task.strides)},
        "epoch": epoch, "encoder": model.encoder.state_dict(), "head": model.head.state_dict(),
        "config": cfgmod.to_dict(cfg), "history": history,
    }
    if optimizer is not None:
        payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=capture_rng(),
                       scaler=scaler.state_dict() if scaler is not None else None)
    return payload
