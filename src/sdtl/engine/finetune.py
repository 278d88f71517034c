"""Fine-tuning with self-distillation (the paper's Algorithm 1), end to end.

The story of a run (``sdtl finetune --config RECIPE --out DIR``):

1. Everything the user gave is checked before anything is written: config keys and values, the
   dataset lists and files, the architecture and the pre-trained checkpoint.
2. The training list is split into train and a stratified validation part (``data.val_fraction``);
   model selection uses validation only — never the test list.
3. Each epoch ``t``: with the paper's regularizer (``regularizer.name: sd``, λ > 0),
   :meth:`SelfDistillation.epoch_start` freezes a copy of the encoder as the teacher (at epoch 1, the
   pre-trained encoder); every batch minimises ``CE(g(f(x)), y) + λ·‖f(x) − f'(x)‖²`` on the same
   augmented clips. With λ = 0 no teacher exists. Other regularizers (:mod:`sdtl.regularizers`) plug
   into the same three calls (``epoch_start``, ``prepare``/``loss``, ``step_end``). LP-FT epochs
   (``optim.lp_epochs``) train the head alone on the frozen encoder first. Then validation,
   forgetting diagnostics, ``metrics.jsonl`` / TensorBoard / ``curves.png``, and an atomic checkpoint
   (``checkpoints/last.pt``, ``best.pt`` when validation improves).
4. At the end, the selected (best) and the last checkpoints are both tested with the multi-clip
   protocol; ``results.json`` and ``confusion.png`` are written.

Checkpoints are written at epoch boundaries and hold model, optimizer, scheduler, scaler, RNG
states, history, and whatever state the regularizer needs (SD's teacher needs none: at an epoch
boundary it *is* the model, so a resumed run re-snapshots it from the restored weights; a fixed or
averaged teacher, L2-SP's anchor and DELTA's reference and attention are stored). With
``run.deterministic`` on CPU, a run killed at any moment and resumed (``--resume auto``) ends bit-identical to an uninterrupted one,
because every random choice of the data pipeline is seeded by (seed, epoch, sample index).

The same code runs under ``torchrun --nproc_per_node=N`` (DDP, one teacher per rank, rank 0 writes).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdtl.atomic import atomic_copy
from sdtl.data.video_io import decoder_identity
from sdtl.engine import config as cfgmod
from sdtl.engine import distributed as dist_utils
from sdtl.engine.diagnostics import ForgettingProbe, RetentionProbe
from sdtl.engine.evaluate import evaluate, make_eval_loader
from sdtl.engine.reporting import REG_PARTS, RunLog
from sdtl.engine.build import (_probe_clips, build_classifier, build_datasets, build_run_regularizer,
                               describe_method)
from sdtl.engine.evaluate import final_test
from sdtl.engine.optim import build_fast_optimizer, build_scheduler, make_scaler, optimizer_step, restore_scaler
from sdtl.engine.rundir import record_config_changes, run_in_process_group, start_run
from sdtl.engine.runtime import (EpochMeter, amp_dtype, capture_rng, check_finite, make_train_loader, maybe_compile,
                                 prepare_model, progress, restore_rng, runtime_settings, seed_everything,
                                 to_memory_format)
from sdtl.models.classifier import FeaturesAndLogits, model_options
from sdtl.errors import UserError
from sdtl.regularizers import Regularizer

log = logging.getLogger("sdtl.finetune")

CHECKPOINT_VERSION = 1




# ----------------------------------------------------------------------------------- building










# ------------------------------------------------------------------------------------ training
def train_one_epoch(model_ddp, model, reg: Regularizer | None, loader, optimizer, scaler, cfg,
                    info, epoch: int, tracker, last_good: str, channels_last: bool = False) -> dict:
    """One pass over the training set; returns the epoch's train metrics.

    In an LP-FT linear-probe epoch (``epoch <= optim.lp_epochs``) the encoder runs frozen (eval mode,
    no gradient), only the head learns, and no regularizer applies.
    """
    device = info.device
    dtype = amp_dtype(cfg.optim.amp, device)
    linear_probe = epoch <= cfg.optim.lp_epochs
    model.train()
    if linear_probe:
        model.encoder.eval()  # frozen: BatchNorm statistics do not move either
        reg = None
    meter = EpochMeter()
    lr = max(g["lr"] for g in optimizer.param_groups)  # the base lr (layer-wise decay lowers the others)
    bar = progress(len(loader), f"epoch {epoch}/{cfg.optim.epochs}", info.is_main and cfg.run.progress)
    failed_epoch = 0
    for step, batch in enumerate(loader, start=1):
        meter.data_ready()
        if batch.get("failed"):
            failed_epoch += len(batch["failed"])
        tracker.update(batch.get("failed", []), num_samples=len(batch["label"]))
        clips = to_memory_format(batch["video"].to(device, non_blocking=True), channels_last)
        labels = torch.as_tensor(batch["label"]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            # Teacher first: its transient activations are freed before the student's are saved,
            # so self-distillation adds no activation memory to the step's peak.
            ctx = reg.prepare(clips) if reg is not None else None
            if linear_probe:
                with torch.no_grad():
                    features = model.encoder(clips)
                logits = model.head(model.dropout(features))  # outside DDP: head grads are averaged below
            else:
                logits, features = model_ddp(clips)
            ce = F.cross_entropy(logits.float(), labels)
            parts = {"ce": ce}
            if reg is not None:
                parts[reg.part] = reg.loss(ctx, features)
            loss = sum(parts.values())
        parts_check = dict(parts)
        if info.enabled:
            # A NaN on one rank must stop every rank at the same step, not hang the others.
            flag = torch.tensor([float(torch.isfinite(loss).all())], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            if flag.item() < 1:
                parts_check["loss (on another rank)"] = torch.tensor(float("nan"))
        check_finite(parts_check, epoch, step, last_good)
        average_head = ((lambda: dist_utils.average_gradients(info, model.head.parameters()))
                        if linear_probe and info.enabled else None)
        optimizer_step(loss, optimizer, scaler, model.parameters(), cfg.optim.grad_clip, before_step=average_head)
        if reg is not None:
            reg.step_end()
        values = {"loss": loss.item()}
        values.update({k: v.item() for k, v in parts.items()})
        meter.step_done(values, clips.shape[0] * info.world_size)
        bar.update(1)
        if step % 5 == 0 or step == len(loader):
            bar.set_postfix(meter.postfix(lr), refresh=False)
    bar.close()
    means = meter.means()
    means = dict(zip(means, dist_utils.all_reduce_sum(info, list(means.values()))))
    out = {f"train_{k}": v / info.world_size for k, v in means.items()}
    out.update(meter.summary())
    out.update(lr=lr, steps=meter.steps, world_size=info.world_size, corrupt_skipped=failed_epoch)
    return out


def _checkpoint_payload(cfg, model, optimizer, scheduler, scaler, epoch, classes, history, best, probe,
                        reg: Regularizer | None) -> dict:
    return {
        "sdtl_format": "finetune", "version": CHECKPOINT_VERSION,
        "arch": cfg.model.arch, "arch_options": model_options(cfg),
        "num_classes": len(classes), "class_names": list(classes),
        "config": cfgmod.to_dict(cfg), "epoch": epoch,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "rng": capture_rng(), "history": history, "best": best,
        # SD's next teacher is a snapshot of "model"; other regularizers store what they need.
        "teacher": {"source": "model", "weight": cfg.regularizer.weight},
        "regularizer_state": reg.checkpoint_state() if reg is not None else None,
        "probe_prev_features": None if probe is None else probe.prev_features,
        "decoder": decoder_identity(cfg.data.backend),
    }


def _better(select: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if select == "val_loss" else value > best


def run_finetune(cfg: cfgmod.FinetuneConfig, out_dir: str | Path, resume: str | None = None) -> dict | None:
    """Run a whole fine-tuning job; returns the results dict on rank 0 (None on other ranks)."""
    return run_in_process_group(cfg, _run, out_dir, resume)


def _run(cfg, out_dir: Path, resume, info) -> dict | None:
    from sdtl.data.corrupt import CorruptVideoTracker, check_failures
    from sdtl.data.video_io import ProbeCache
    from sdtl.models.checkpoints import save_checkpoint

    resume_path, state = start_run(cfg, out_dir, resume, info, "finetune")

    seed_everything(cfg.run.seed)
    train_ds, val_ds, test_ds, classes = build_datasets(cfg)
    model, load_report = build_classifier(cfg, len(classes), load_pretrained=state is None)
    channels_last = prepare_model(model, cfg, info.device)
    seed_everything(cfg.run.seed + info.rank)

    reg = build_run_regularizer(cfg, model, train_ds, classes, state, info)
    weight_decay = 0.0 if reg is not None and reg.replaces_weight_decay else None
    if weight_decay == 0.0 and cfg.optim.weight_decay and info.is_main:
        log.info("optimizer weight decay off (was %g): the %s penalty regularizes the weights instead",
                 cfg.optim.weight_decay, cfg.regularizer.name)
    optimizer = build_fast_optimizer(cfg, model.encoder, model.head, info.device, weight_decay=weight_decay)
    scheduler = build_scheduler(cfg.optim, optimizer)
    scaler = make_scaler(amp_dtype(cfg.optim.amp, info.device), info.device)
    history: list[dict] = []
    best = {"metric": cfg.eval.select, "value": None, "epoch": None}
    start_epoch = 1
    if state is not None:
        trained_with = state.get("decoder")
        if info.is_main and trained_with and trained_with != decoder_identity(cfg.data.backend):
            log.warning("resuming %s: its epochs were trained on frames decoded by %s, this run decodes with %s; "
                        "to match, pass --set data.backend=%s", resume_path, trained_with,
                        decoder_identity(cfg.data.backend), trained_with.split()[0])
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise UserError(f"--resume {resume_path}: its weights do not fit the configured model "
                            f"({cfg.model.arch}, {model_options(cfg)}); resume with the run's own config "
                            f"(leave --config out) [{str(exc).splitlines()[0]}]") from None
        record_config_changes(cfg, state, out_dir, resume_path, info, log)  # a refused resume changed nothing
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_scaler(scaler, state.get("scaler"), log)
        history, best = list(state["history"]), dict(state["best"])
        start_epoch = state["epoch"] + 1

    ckpt_dir = out_dir / "checkpoints"
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        rt = runtime_settings(cfg, info.device, optimizer)
        cfgmod.dump_config(cfg, out_dir / "config.yaml", "finetune", decoder_identity(cfg.data.backend), rt)
        log.info("runtime on %s: precision %s%s, channels_last %s, cuDNN autotune %s, fused optimizer %s, compile %s",
                 rt["device"], rt["amp"], " + loss scaling" if rt["grad_scaler"] else "", rt["channels_last"],
                 rt["cudnn_benchmark"], rt["fused_optimizer"], rt["compile"] or "off")
    dist_utils.barrier(info)
    probe_index = ProbeCache(out_dir / "video_index.jsonl")  # each video probed once per run, by any worker
    for ds in (train_ds, val_ds, test_ds):
        if ds is not None:
            ds.probe_cache = probe_index

    # Forgetting probe: reference features of the encoder fine-tuning starts from (+ retention probe).
    probe_path = out_dir / "probe.pt"
    probe = None
    retention = RetentionProbe.load(cfg.eval.retention) if cfg.eval.retention else None
    initial = None
    if cfg.eval.probe_videos > 0 or retention is not None:
        if state is not None and probe_path.exists():
            probe = ForgettingProbe.load(probe_path, state.get("probe_prev_features"), retention)
        elif state is None:
            clips = _probe_clips(cfg, train_ds, classes)[0] if cfg.eval.probe_videos > 0 else torch.empty(0)
            probe = ForgettingProbe.build(model.encoder, clips, info.device, retention)
            if info.is_main:
                probe.save(probe_path)
            # Epoch 0: where fine-tuning starts (drift 0; retention = the pre-trained skill).
            initial = {"epoch": 0, **probe.measure(model.encoder, info.device, advance=False)}

    model_ddp = FeaturesAndLogits(model)
    if info.enabled:
        model_ddp = nn.parallel.DistributedDataParallel(
            model_ddp, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    model_ddp = maybe_compile(model_ddp, cfg.run, log)

    sampler, loader = make_train_loader(train_ds, cfg.data, info, cfg.run.seed)
    eval_bs = cfg.eval.batch_size or cfg.data.batch_size
    val_loader = make_eval_loader(val_ds, eval_bs, info, cfg.data.workers) if val_ds is not None else None
    tracker = CorruptVideoTracker(out_dir / "quarantine.txt" if info.is_main else None,
                                  max_fraction=cfg.data.max_corrupt_fraction)
    run_log = RunLog(out_dir, info.is_main, cfg.run.tensorboard, history)
    if initial is not None:
        run_log.log_epoch(initial)
    if info.is_main:
        _describe_start(cfg, out_dir, train_ds, val_ds, test_ds, classes, load_report, resume_path, info)

    if state is not None:
        restore_rng(state["rng"])
        if info.rank:
            seed_everything(cfg.run.seed + info.rank + 1000003 * state["epoch"])
    last_path = ckpt_dir / "last.pt"
    dtype = amp_dtype(cfg.optim.amp, info.device)
    run_clock = time.perf_counter()
    for epoch in range(start_epoch, cfg.optim.epochs + 1):
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        if reg is not None:
            reg.epoch_start()
        tracker.reset_epoch()
        record = {"epoch": epoch}
        record.update(train_one_epoch(model_ddp, model, reg, loader, optimizer, scaler, cfg, info, epoch,
                                      tracker, str(last_path) if last_path.exists() else "none yet", channels_last))
        tracker.check(force=True)  # judge the corrupt share on small datasets too
        scheduler.step()
        is_last = epoch == cfg.optim.epochs
        if val_loader is not None and (epoch % cfg.eval.every == 0 or is_last):
            val = evaluate(model, val_loader, len(classes), info, eval_bs, dtype,
                           desc=f"validation {epoch}" if cfg.run.progress else None)
            record.update({f"val_{k}": v for k, v in val.metrics.items() if k != "per_class_acc"})
        if probe is not None:
            record.update(probe.measure(model.encoder, info.device))
        select_value = record.get(cfg.eval.select) if cfg.eval.select != "last" else epoch
        improved = select_value is not None and _better(cfg.eval.select, select_value, best["value"])
        if improved:
            best = {"metric": cfg.eval.select, "value": select_value, "epoch": epoch}
        record["best_epoch"] = best["epoch"]
        run_log.log_epoch(record)
        if info.is_main:
            payload = _checkpoint_payload(cfg, model, optimizer, scheduler, scaler, epoch, classes,
                                          run_log.history, best, probe, reg)
            save_checkpoint(payload, last_path)
            if improved:
                atomic_copy(last_path, ckpt_dir / "best.pt")
            done = epoch - start_epoch + 1  # epochs of this process, validation and probes included
            _log_epoch_line(record, cfg, eta_s=(time.perf_counter() - run_clock) / done * (cfg.optim.epochs - epoch))
        dist_utils.barrier(info)
    run_log.close()

    if state is not None and start_epoch > cfg.optim.epochs and info.is_main:
        log.info("training already finished at epoch %d; running the final test only", state["epoch"])
    counts = {"num_train_videos": len(train_ds), "num_val_videos": len(val_ds) if val_ds is not None else 0}
    results = final_test(cfg, model, test_ds, classes, out_dir, info, best, counts)
    if info.is_main and results is not None:
        check_failures(results.pop("_failed"), skip=cfg.eval.skip_corrupt)
    return results if info.is_main else None










def _describe_start(cfg, out_dir, train_ds, val_ds, test_ds, classes, load_report, resume_path, info) -> None:
    method = describe_method(cfg)
    init = cfg.model.pretrained or "random init (from scratch)"
    log.info("sdtl finetune → %s | %s | %s at %s, %d classes: %d train / %d val / %d test videos | arch %s %s | "
             "init: %s%s | %d process(es) on %s%s",
             Path(out_dir).resolve(), method, cfg.data.dataset, cfg.data.root, len(classes), len(train_ds), len(val_ds) if val_ds else 0,
             len(test_ds), cfg.model.arch, model_options(cfg), init,
             f" ({load_report})" if load_report is not None else "", info.world_size, info.device,
             f" | resumed from {resume_path}" if resume_path else "")


def _log_epoch_line(record: dict, cfg, eta_s: float | None = None) -> None:
    keys = ["train_loss", "train_ce", *REG_PARTS, "val_video_acc1", "feat_drift", "retention_acc", "clips_per_s",
            "data_wait"]
    parts = [f"{k}={record[k]:.4g}" for k in keys if isinstance(record.get(k), (int, float))]
    if eta_s is not None:  # the final test is not included
        parts.append(f"eta={int(eta_s // 60)}m{int(eta_s % 60):02d}s")
    log.info("epoch %d/%d %s", record["epoch"], cfg.optim.epochs, " ".join(parts))


# ------------------------------------------------------------------------------------- evaluate








