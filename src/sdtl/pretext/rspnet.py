"""RSPNet pre-training: relative speed perception + appearance-focused video instance discrimination
(Chen et al., "RSPNet: Relative Speed Perception for Unsupervised Video Representation Learning",
AAAI 2021), as the authors' code does it (``shared/RSPNET_PRETRAINING.md`` §0-§4; sdtl's own code).

One training step (:meth:`RSPNet.step`; the engine's :class:`sdtl.engine.pretrain.RSPNetTask` runs it
on the one training loop):

1. **Input**: two clips of one video, ``clip_q`` and ``clip_k`` ``[B, 3, 2T, S, S]``: independent
   windows of 2T consecutive frames, each with its own augmentation
   (:class:`sdtl.data.sampling.TwoClipColourSampler`: crop, greyscale *then* colour jitter, flip).
2. **Momentum update** of the key network before any forward: ``θ_k ← m·θ_k + (1 − m)·θ_q`` for every
   parameter (backbone and both heads); BatchNorm buffers are not averaged (:func:`momentum_update`).
3. **Speeds** (:func:`split_speeds`): a random ``floor(B/2)`` of the batch at 1× (the first T frames
   of the window), the rest at 2× (every other frame of all 2T). The query and the positive key are at
   the same speed; the negative key is the *same* key clip at the other speed.
4. **Encoders**: the key network (no gradients, shuffle-BN across ranks: :meth:`RSPNet.key_forward`)
   on the negative, then on the positive key; the query network (the DDP-wrapped one, the only call
   with gradients) on the query. Each network is the encoder (globally pooled feature) and two heads,
   Linear(D → 128) + L2 normalisation each: **A-VID** (appearance) and **RSP** (speed)
   (:class:`RSPNetModel`).
5. **Loss** (:func:`rspnet_loss`), with τ = 0.07 and the queue Q of earlier keys::

       A-VID = CE([q_a·k_a  | q_a·Q] / τ, 0) + CE([q_a·kn_a | q_a·Q] / τ, 0)
       RSP   = mean max(0, margin − (q_m·k_m − q_m·kn_m) / τ)          (margin 2.0)
       loss  = avid_weight · A-VID + rsp_weight · RSP

6. **Enqueue** the negative (different-speed) key's A-embeddings ``kn_a``, gathered from every rank.

Where the reference does something surprising, sdtl follows it (✓) or differs (✗), and says why:

* ✓ The queue receives ``k_neg_A``, the *different-speed* key's appearance embedding, not the
  same-speed ``k_A``, as the reference enqueues (both are the same video's key clip, so either is a
  valid negative for later queries; the reference's choice is kept).
* ✓ In each A-VID cross-entropy the other key is neither a positive nor a negative: exactly one
  positive and the K queue negatives.
* ✓ The margin 2.0 acts on the τ-scaled similarities: 0.14 in cosine units, weighted 1/τ ≈ 14.3.
* ✓ The momentum update covers both heads, and the key network's BatchNorm runs in training mode
  (batch statistics); its running buffers are its own (each rank's, kept per rank in checkpoints).
* ✓ The queue starts as random unit vectors (from ``run.seed``: the same on every rank) and its size
  K is trimmed to a multiple of the global batch (``K // (B·W) · (B·W)``); K smaller than one global
  batch is refused (:func:`trimmed_queue_size`).
* ✓ Speeds 1× / 2× only (the reference's only coherent ``diff_speed: [2]``), half the batch each.
* ✗ One process: no shuffle-BN. The reference refuses to run on fewer than 2 GPUs; shuffling one
  process's batch is invisible to BatchNorm (its statistics are permutation-invariant), so sdtl runs
  it without; the key network's batch statistics then come from the same videos as the query's (the
  leak shuffle-BN exists to prevent). Use several processes for runs that matter.
* ✗ Randomness: the augmentations draw from each item's generator (sdtl's data rule), the step's
  permutations from torch's global RNG (checkpointed per rank: resumes are exact); the reference
  uses Python's ``random`` and torch's RNG.
* ✗ "Best" checkpoint: the reference keeps ``model_best`` = the epoch with the lowest training loss
  (whose losses against a refreshing queue are not comparable across epochs); sdtl's pre-training
  keeps no best: ``encoder.pt`` is the query backbone after the last epoch, as for every pretext task.
* ✗ No retention probe: the forgetting diagnostics' retention probe (``eval.retention``) is the frozen
  speed-classification head on speed clips; RSPNet has no classifier head to freeze.
* ✗ The learning rate is what ``optim.lr`` says: sdtl does not multiply it by the number of processes
  (the reference's ``lr · W · B / 64``); the recipes state the lr for a stated global batch. sdtl's
  cosine reaches ``lr · min_lr_ratio`` at the last epoch (the reference's per-epoch
  ``CosineAnnealingLR(T_max=epochs)`` stops one step short of its minimum).
* ✗ Precision: ``optim.amp: auto`` runs the networks in bf16 on a GPU (the reference runs fp32); the
  embeddings, logits, losses and queue are fp32 whatever the AMP.
* ✗ The clips are resized with sdtl's antialiased resize on the uint8 frames, as every sdtl training
  clip (the reference: bilinear ``F.interpolate`` of the float clip, no antialiasing).
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

#: the two playback speeds (frame strides) RSPNet compares
SPEEDS = (1, 2)


# ----------------------------------------------------------------------------------- the networks
class RSPNetHeads(nn.Module):
    """The two projection heads on the encoder's pooled feature: ``avid`` (appearance) and ``rsp``
    (speed), each Linear(feature_dim → embed_dim), outputs L2-normalised (in fp32)."""

    def __init__(self, feature_dim: int, embed_dim: int = 128) -> None:
        super().__init__()
        self.avid = nn.Linear(feature_dim, embed_dim)
        self.rsp = nn.Linear(feature_dim, embed_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.avid(features).float(), dim=1), F.normalize(self.rsp(features).float(), dim=1)


class RSPNetModel(nn.Module):
    """Encoder + :class:`RSPNetHeads`: ``forward(x) -> (a, m)``, unit vectors ``[B, embed_dim]`` each.

    ``encoder`` and ``head`` are the names every sdtl pre-training checkpoint uses: ``encoder.pt``
    holds the query network's encoder (what ``finetune`` loads) and its heads (which it ignores)."""

    def __init__(self, encoder: nn.Module, embed_dim: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = RSPNetHeads(encoder.feature_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.encoder(x))


# ------------------------------------------------------------------------------ the pure pieces
def speed_frame_indices(clip_len: int) -> tuple[list[int], list[int]]:
    """Which of the ``2 * clip_len`` loaded frames make the 1× and the 2× clip: ``[0 .. T-1]`` and
    ``[0, 2, .., 2T-2]`` (both start on the window's first frame)."""
    return list(range(clip_len)), list(range(0, 2 * clip_len, 2))


def split_speeds(clip_q: torch.Tensor, clip_k: torch.Tensor, perm: torch.Tensor):
    """``(q, k_pos, k_neg, slow)`` from two batches of ``2T``-frame clips ``[B, 3, 2T, S, S]``.

    ``perm``: a permutation of the batch; its first ``B // 2`` samples (``slow[i]`` True) are at 1×, the
    others at 2× (:func:`speed_frame_indices`). ``q`` and ``k_pos`` share each sample's speed; ``k_neg``
    is ``clip_k`` at the other speed. Each is ``[B, 3, T, S, S]``."""
    b, frames = clip_q.shape[0], clip_q.shape[2]
    if frames % 2:
        raise ValueError(f"RSPNet clips hold 2 x clip_len frames; got {frames}")
    t = frames // 2
    slow = torch.zeros(b, dtype=torch.bool, device=clip_q.device)
    slow[perm[: b // 2].to(clip_q.device)] = True
    at_slow = slow.view(b, 1, 1, 1, 1)

    def one_x(x):  # the first T frames
        return x[:, :, :t]

    def two_x(x):  # every other frame of all 2T
        return x[:, :, 0:frames:2]

    q = torch.where(at_slow, one_x(clip_q), two_x(clip_q))
    k_pos = torch.where(at_slow, one_x(clip_k), two_x(clip_k))
    k_neg = torch.where(at_slow, two_x(clip_k), one_x(clip_k))
    return q, k_pos, k_neg, slow


def rspnet_loss(q_a: torch.Tensor, q_m: torch.Tensor, k_a: torch.Tensor, k_m: torch.Tensor, kn_a: torch.Tensor,
                kn_m: torch.Tensor, queue: torch.Tensor, temperature: float = 0.07, margin: float = 2.0,
                avid_weight: float = 1.0, rsp_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """RSPNet's objective on unit embeddings (``[N, D]`` each; ``queue`` ``[K, D]``, before this step's
    enqueue). Gradients flow through ``q_a`` and ``q_m`` only.

    Returns ``loss``, ``avid`` (the sum of the two cross-entropies), ``rsp`` (the margin ranking loss)
    and the batch's ``avid_correct`` (the same-speed key ranks first among [k_pos | queue]) and
    ``rsp_correct`` (the same-speed pair is the more similar one) counts."""
    k_a, k_m, kn_a, kn_m, queue = (t.detach().float() for t in (k_a, k_m, kn_a, kn_m, queue))
    q_a, q_m = q_a.float(), q_m.float()
    l_neg = q_a @ queue.t() / temperature  # [N, K]
    logits_same = torch.cat([(q_a * k_a).sum(1, keepdim=True) / temperature, l_neg], dim=1)
    logits_diff = torch.cat([(q_a * kn_a).sum(1, keepdim=True) / temperature, l_neg], dim=1)
    first = torch.zeros(q_a.shape[0], dtype=torch.long, device=q_a.device)
    avid = F.cross_entropy(logits_same, first) + F.cross_entropy(logits_diff, first)
    pos_m = (q_m * k_m).sum(1) / temperature
    neg_m = (q_m * kn_m).sum(1) / temperature
    rsp = F.margin_ranking_loss(pos_m, neg_m, torch.ones_like(pos_m), margin=margin)
    return {"loss": avid_weight * avid + rsp_weight * rsp, "avid": avid, "rsp": rsp,
            "avid_correct": (logits_same.argmax(1) == 0).sum().detach(),
            "rsp_correct": (pos_m > neg_m).sum().detach()}


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, momentum: float) -> None:
    """``θ_k ← θ_k·m + θ_q·(1 − m)`` for every parameter (buffers untouched), in that order of operations."""
    key_params = list(key.parameters())
    query_params = [p.detach() for p in query.parameters()]
    if len(key_params) != len(query_params):
        raise RuntimeError("the key and query networks differ")
    torch._foreach_mul_(key_params, momentum)
    torch._foreach_add_(key_params, torch._foreach_mul(query_params, 1.0 - momentum))


def trimmed_queue_size(queue_size: int, global_batch: int) -> int:
    """The queue length: ``queue_size`` rounded down to a multiple of the global batch (each step
    enqueues one global batch; the pointer then never straddles the end). Fewer than one global batch
    is a ``ValueError``."""
    trimmed = queue_size // global_batch * global_batch
    if trimmed < 1:
        raise ValueError(f"a queue of {queue_size} keys holds less than one global batch of {global_batch} "
                         f"(data.batch_size x processes)")
    return trimmed


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def gather_from_ranks(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order (no gradient); ``x`` itself in one process."""
    world, _ = _world()
    if world == 1:
        return x
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    return torch.cat(out)


# ------------------------------------------------------------------------------ the objective
class RSPNet:
    """RSPNet's state besides the query network and one training step (see the module docstring).

    ``model`` is the query network (:class:`RSPNetModel`, on its device); the key network is a copy
    of it made here. ``global_batch`` = ``data.batch_size`` x processes (the queue trimming).
    ``seed``: the initial queue's (the same on every rank). ``channels_last``: the memory format the
    networks were put in (clips are converted after the speed split).
    """

    def __init__(self, model: RSPNetModel, queue_size: int = 16384, global_batch: int = 1,
                 key_momentum: float = 0.999, temperature: float = 0.07, margin: float = 2.0,
                 avid_weight: float = 1.0, rsp_weight: float = 1.0, seed: int = 0, channels_last: bool = False) -> None:
        self.model = model
        self.key_model = copy.deepcopy(model).requires_grad_(False)
        self.key_momentum, self.temperature, self.margin = key_momentum, temperature, margin
        self.avid_weight, self.rsp_weight = avid_weight, rsp_weight
        self.channels_last = channels_last
        size = trimmed_queue_size(queue_size, global_batch)
        embed_dim = model.head.avid.out_features
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(int(seed))
        self.queue = F.normalize(torch.randn(size, embed_dim, generator=generator), dim=1).to(device)
        self.ptr = 0

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def step(self, net: nn.Module, clip_q: torch.Tensor, clip_k: torch.Tensor,
             perm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One step's losses (:func:`rspnet_loss`'s dict, plus ``k_neg_a``: this rank's enqueued keys).

        ``net``: the query network as the loop calls it (DDP / compiled wrapper of ``self.model``).
        ``perm``: the speed split's permutation (default: ``torch.randperm(B)`` from the global RNG).
        Updates the key network (before the forwards) and the queue (after the loss)."""
        momentum_update(self.key_model, self.model, self.key_momentum)
        if perm is None:
            perm = torch.randperm(clip_q.shape[0])
        q_in, k_pos_in, k_neg_in, _ = split_speeds(clip_q, clip_k, perm)
        with torch.no_grad():
            kn_a, kn_m = self.key_forward(k_neg_in)
            k_a, k_m = self.key_forward(k_pos_in)
        q_a, q_m = net(self._input(q_in))
        with torch.autocast(q_a.device.type, enabled=False):  # the logits in fp32 whatever the AMP
            # A copy of the queue: backward needs the keys as they were, and the enqueue below writes in place.
            out = rspnet_loss(q_a, q_m, k_a, k_m, kn_a, kn_m, self.queue.clone(), self.temperature, self.margin,
                              self.avid_weight, self.rsp_weight)
        self.enqueue(kn_a)
        out["k_neg_a"] = kn_a.detach()
        return out

    @torch.no_grad()
    def key_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key network on ``x`` with shuffle-BN across ranks: the global batch is gathered, shuffled by
        one permutation (rank 0's, broadcast), each rank encodes its slice of the shuffled batch (so its
        BatchNorm statistics mix videos of every rank), and the outputs are gathered and unshuffled back
        to this rank's own samples. One process: the key network on ``x``."""
        world, rank = _world()
        if world == 1:
            return self.key_model(self._input(x))
        b = x.shape[0]
        x_all = gather_from_ranks(x)
        shuffle = torch.randperm(b * world).to(x.device)
        dist.broadcast(shuffle, src=0)
        a, m = self.key_model(self._input(x_all[shuffle.view(world, b)[rank]]))
        back = torch.argsort(shuffle).view(world, b)[rank]
        return gather_from_ranks(a)[back], gather_from_ranks(m)[back]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Every rank's ``keys`` (rank order) into the queue at the pointer; the pointer moves on (mod K)."""
        keys = gather_from_ranks(keys.float())
        size, n = self.queue.shape[0], keys.shape[0]
        if size % n:
            raise RuntimeError(f"{n} keys per step do not divide the queue of {size}: the global batch changed")
        self.queue[self.ptr:self.ptr + n] = keys
        self.ptr = (self.ptr + n) % size

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The key network, the queue and its pointer (the same on every rank, bar the key network's
        BatchNorm buffers: :meth:`rank_buffers`)."""
        return {"key_model": self.key_model.state_dict(), "queue": self.queue, "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> str | None:
        """Restore :meth:`state_dict`'s output. A queue of another length (a resume with another global
        batch) keeps its newest keys, oldest first from slot 0; returns a line saying so (else None)."""
        self.key_model.load_state_dict(state["key_model"])
        queue, ptr = state["queue"].to(self.queue), int(state["ptr"])
        if queue.shape == self.queue.shape:
            self.queue.copy_(queue)
            self.ptr = ptr
            return None
        if queue.shape[1] != self.queue.shape[1]:
            raise ValueError(f"the checkpoint's queue holds {queue.shape[1]}-d keys, this run's {self.queue.shape[1]}-d")
        oldest_first = torch.cat([queue[ptr:], queue[:ptr]])
        size, saved = self.queue.shape[0], queue.shape[0]
        kept = oldest_first[-size:]
        self.queue[size - len(kept):] = kept  # any slots before them keep their random start keys
        self.ptr = 0  # the next step overwrites the oldest
        return (f"the checkpoint's queue holds {saved} keys, this run's {size} (another global batch): "
                f"kept the newest {len(kept)}")

    def rank_buffers(self) -> dict:
        """This rank's key-network buffers (BatchNorm statistics; each rank's own), on the CPU."""
        return {name: b.detach().cpu().clone() for name, b in self.key_model.named_buffers()}

    def load_rank_buffers(self, buffers: dict) -> None:
        own = dict(self.key_model.named_buffers())
        for name, value in buffers.items():
            own[name].copy_(value)
