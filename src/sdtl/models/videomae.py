"""VideoMAE ViT-S/16 and ViT-B/16 encoders (``videomae_vit_s``, ``videomae_vit_b``), written for sdtl.

The network is the ViT of the original VideoMAE release (MCG-NJU/VideoMAE ``modeling_finetune.py``,
``vit_small/base_patch16_224``) with attention through
:func:`torch.nn.functional.scaled_dot_product_attention`; it never imports ``transformers``:

* tubelet embedding ``Conv3d(3, D, kernel = stride = (2, 16, 16))`` over ``[B, 3, T, H, W]`` (sdtl's
  layout and the original's; Hugging Face feeds ``[B, T, 3, H, W]``); tokens in ``(T', H', W')`` order;
* a fixed 1-D sinusoid table over the flattened token index (VideoMAE's ``get_sinusoid_encoding_table``),
  computed for the token count of the input, so any ``T`` multiple of 2 and ``H``/``W`` multiples of 16
  work. It is neither a parameter nor a buffer (no ``pos_embed`` key);
* no class token; joint space-time attention over all tokens;
* pre-norm blocks (LayerNorm eps 1e-6, as the release), ``qkv`` without bias plus separate ``q_bias`` /
  ``v_bias`` (``k`` has none), GELU MLP of ratio 4, stochastic depth linear over depth;
* mean of the last tokens, then ``fc_norm`` (LayerNorm eps 1e-6): the pooled feature ``[B, D]``.

Parameter names are the release's fine-tuning model's (``patch_embed.proj``, ``blocks.{i}.norm1``,
``blocks.{i}.attn.qkv`` / ``q_bias`` / ``v_bias`` / ``proj``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1/fc2``,
``fc_norm``); the classifier ``head`` is sdtl's, not the encoder's.

Weights (:func:`adapt_checkpoint`, used by :func:`sdtl.models.checkpoints.load_encoder_weights`):

* the release's ``.pth`` files: fine-tuned (``module`` / ``model`` / bare; ``head.*`` ignored) or
  pre-trained (``model`` with ``encoder.*``; ``decoder.*``, ``encoder_to_decoder.*``, ``mask_token``
  ignored). A pre-training file has the encoder's final ``norm`` but no ``fc_norm``: as VideoMAE's own
  fine-tuning does (``use_mean_pooling``: ``norm`` becomes Identity and is dropped, ``fc_norm`` starts
  fresh), ``norm`` is ignored and ``fc_norm`` is set to LayerNorm's init (weight 1, bias 0); the load
  report lists both. (The release's ``.pth`` files also pickle an ``argparse.Namespace``, so reading them
  needs ``allow_unsafe_pickle``, or re-save the state dict.)
* a Hugging Face ``save_pretrained`` folder of ``VideoMAEModel`` / ``VideoMAEForVideoClassification`` /
  ``VideoMAEForPreTraining`` (``q_bias``/``v_bias`` as transformers saves them, or ``query.bias`` /
  ``value.bias``). Attention biases absent, or all exactly zero (what transformers 5.x's loading bug
  left in re-saved models), are an error, never zeros; so is a non-zero ``key.bias``. A folder with
  ``use_mean_pooling: false`` is refused unless it is a pre-training model (its ``layernorm`` is then the
  pre-training encoder's final norm, treated as the release's ``encoder.norm``). transformers'
  ``layer_norm_eps`` (1e-12 by default) is not copied: sdtl's blocks use the release's 1e-6.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdtl.errors import CheckpointError, ConfigError
from sdtl.models.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    FeatureTap,
    InputSpec,
    no_decay_transformer,
)

# name -> (dim, depth, heads, mlp hidden); all published sizes take tubelet 2 and patch 16
_SIZES = {"videomae_vit_s": (384, 12, 6, 1536), "videomae_vit_b": (768, 12, 12, 3072)}
_TINY = {"dim": 32, "depth": 2, "heads": 2, "mlp": 128, "patch": 8, "tubelet": 2}  # 8 x 16² clips -> 4x2x2 = 16 tokens
_PUBLISHED_DEPTH = 12
_VARIANT_HINT = "valid: '' (published size), 'tiny' (CPU tests)"


# ----------------------------------------------------------------------------------------------
# The network


@functools.lru_cache(maxsize=32)
def sinusoid_table(num_tokens: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed position table ``[num_tokens, dim]`` (float32, CPU): angle
    ``n / 10000^(2⌊j/2⌋/dim)``, sine on even channels, cosine on odd, computed in float64 as the
    release's numpy code. Row ``n`` does not depend on ``num_tokens``."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if first asked in inference mode
        pos = torch.arange(num_tokens, dtype=torch.float64, device="cpu")[:, None]
        j = torch.arange(dim, dtype=torch.float64, device="cpu")
        angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * torch.div(j, 2, rounding_mode="floor") / dim)
        table = torch.empty(num_tokens, dim, dtype=torch.float64, device="cpu")
        table[:, 0::2] = angle[:, 0::2].sin()
        table[:, 1::2] = angle[:, 1::2].cos()
        return table.float()


class PatchEmbed(nn.Module):
    """Tubelet embedding: ``Conv3d(3, dim, kernel = stride = (tubelet, patch, patch))``."""

    def __init__(self, dim: int, patch: int, tubelet: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(3, dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` has no bias, ``q_bias``/``v_bias`` are separate (k has none)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``drop_path``): zero a residual branch with probability ``p``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp: int, drop_path: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def default_tap_blocks(depth: int) -> tuple[int, ...]:
    """Blocks after which DELTA's taps sit: depth/4-1, depth/2-1, 3·depth/4-1, depth-1 (12 blocks: 2, 5,
    8, 11); fewer when blocks coincide (2 blocks: after each)."""
    return tuple(sorted({max(0, depth * k // 4 - 1) for k in range(1, 5)}))


class VideoMAEEncoder(nn.Module):
    """VideoMAE's ViT: ``forward(x[B, 3, T, H, W]) -> [B, dim]`` (mean of the last tokens, then ``fc_norm``).

    ``T`` must be a multiple of ``tubelet`` and ``H``, ``W`` multiples of ``patch``. ``drop_path`` is the
    last block's rate (block i: ``drop_path·i/(depth-1)``). ``eps`` / ``fc_norm_eps``: LayerNorm epsilons
    (the release's 1e-6; a test may match another implementation's). ``taps[j]`` is called after block
    ``tap_blocks[j]`` on a ``[B, dim, T', H', W']`` view of the tokens (see :class:`FeatureTap`).
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp: int, patch: int = 16, tubelet: int = 2,
                 drop_path: float = 0.0, eps: float = 1e-6, fc_norm_eps: float = 1e-6,
                 tap_blocks: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.feature_dim = self.dim = int(dim)
        self.depth, self.patch, self.tubelet = int(depth), int(patch), int(tubelet)
        self.patch_embed = PatchEmbed(dim, patch, tubelet)
        rates = [drop_path * i / (depth - 1) if depth > 1 else float(drop_path) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp, rates[i], eps) for i in range(depth))
        self.fc_norm = nn.LayerNorm(dim, eps=fc_norm_eps)
        self.tap_blocks = tuple(default_tap_blocks(depth) if tap_blocks is None else tap_blocks)
        if any(not 0 <= i < depth for i in self.tap_blocks):
            raise ValueError(f"tap_blocks {self.tap_blocks}: blocks are 0..{depth - 1}")
        self.taps = nn.ModuleList(FeatureTap() for _ in self.tap_blocks)
        self.grad_checkpointing = False
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # the release's VisionTransformer._init_weights (the Conv3d keeps PyTorch's default init)
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block; it acts only in training forwards with gradients."""
        self.grad_checkpointing = bool(enable)

    def _pos(self, num_tokens: int, like: torch.Tensor) -> torch.Tensor:
        key = (num_tokens, like.device, like.dtype)
        table = self._pos_cache.get(key)
        if table is None:
            with torch.inference_mode(False):
                table = sinusoid_table(num_tokens, self.dim).to(device=like.device, dtype=like.dtype)
            self._pos_cache[key] = table
        return table

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The last block's tokens ``[B, N, dim]`` and their grid ``(T', H', W')`` (N = T'·H'·W')."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"VideoMAE takes clips [B, 3, T, H, W], got shape {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        if t % self.tubelet or h % self.patch or w % self.patch:
            raise ValueError(f"VideoMAE clips need T a multiple of {self.tubelet} and H, W multiples of "
                             f"{self.patch}; got T={t}, H={h}, W={w}")
        x = self.patch_embed(x)  # [B, D, T', H', W']
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # [B, N, D], tokens in (T', H', W') order
        x = x + self._pos(x.shape[1], x)
        taps = dict(zip(self.tap_blocks, self.taps))
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
            tap = taps.get(i)
            if tap is not None:  # outside the checkpoint, so a hook fires once per forward
                x = tap(x.transpose(1, 2).unflatten(2, grid)).flatten(2).transpose(1, 2)
        return x, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature ``[B, dim]``: ``fc_norm(tokens.mean(1))``."""
        return self.fc_norm(self.forward_tokens(x)[0].mean(1))


def _check_options(variant: str, drop_path: float) -> None:
    if variant not in ("", "tiny"):
        raise ConfigError("model.variant", f"{variant!r} is not a VideoMAE variant", _VARIANT_HINT)
    if not 0.0 <= float(drop_path) < 1.0:
        raise ConfigError("model.drop_path", f"{drop_path!r} is not a rate", "use a value in [0, 1), e.g. 0.1")


def _build(name: str, variant: str, drop_path: float) -> VideoMAEEncoder:
    _check_options(variant, drop_path)
    if variant == "tiny":
        return VideoMAEEncoder(**_TINY, drop_path=float(drop_path))
    dim, depth, heads, mlp = _SIZES[name]
    return VideoMAEEncoder(dim, depth, heads, mlp, patch=16, tubelet=2, drop_path=float(drop_path))


def videomae_vit_s(variant: str = "", drop_path: float = 0.0) -> VideoMAEEncoder:
    """VideoMAE ViT-S/16 (21.9M parameters, 384-d). ``variant="tiny"``: 32-d, 2 blocks, patch 8 (CPU tests)."""
    return _build("videomae_vit_s", variant, drop_path)


def videomae_vit_b(variant: str = "", drop_path: float = 0.0) -> VideoMAEEncoder:
    """VideoMAE ViT-B/16 (86.2M parameters, 768-d). ``variant="tiny"``: 32-d, 2 blocks, patch 8 (CPU tests)."""
    return _build("videomae_vit_b", variant, drop_path)


# ----------------------------------------------------------------------------------------------
# Layer decay, weight decay, DELTA layers


def depth_of(name: str) -> int | None:
    """BEiT / VideoMAE ids: ``patch_embed`` 0, ``blocks.i`` i+1, ``fc_norm`` None (VideoMAE's "everything
    else": trained with the head at the full lr, so block i gets ``lr·d^(L−i)`` as in VideoMAE)."""
    if name.startswith("patch_embed."):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    if name.startswith("fc_norm."):
        return None
    raise ValueError(f"VideoMAE parameter {name!r}: not part of patch_embed, blocks or fc_norm")


def feature_layers(encoder: nn.Module) -> list[str]:
    """DELTA: the feature taps (after blocks ``encoder.tap_blocks``), each showing ``[B, D, T', H', W']``."""
    return [f"taps.{j}" for j in range(len(encoder.taps))]


# ----------------------------------------------------------------------------------------------
# Checkpoints: the release's .pth files and Hugging Face folders -> sdtl's keys

_FRESH_FC_NORM = "fc_norm (not in the file: fresh LayerNorm init, weight 1 / bias 0, as VideoMAE fine-tuning)"
_HF_BLOCK = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_HF_RENAMES = {
    "attention.attention.q_bias": "attn.q_bias", "attention.attention.query.bias": "attn.q_bias",
    "attention.attention.v_bias": "attn.v_bias", "attention.attention.value.bias": "attn.v_bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "mlp.fc1.weight", "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight", "output.dense.bias": "mlp.fc2.bias",
}  # fmt: skip
_QKV = ("query", "key", "value")


def _count(ignored: dict[str, int], group: str, n: int = 1) -> None:
    if n:
        ignored[group] = ignored.get(group, 0) + n


def _tensor_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        keys = list(obj)
        if all(k.startswith("module.") for k in keys):
            return {k[len("module."):]: v for k, v in obj.items()}
        return dict(obj)
    return None


def _fill_fc_norm(state: dict[str, torch.Tensor], ignored: dict[str, int]) -> None:
    proj = state.get("patch_embed.proj.weight")
    if proj is None:
        return  # the strict check names what is missing
    dim = proj.shape[0]
    state["fc_norm.weight"] = torch.ones(dim, dtype=proj.dtype)
    state["fc_norm.bias"] = torch.zeros(dim, dtype=proj.dtype)
    _count(ignored, _FRESH_FC_NORM, 2)


def _drop_pos_embed(state: dict[str, torch.Tensor], ignored: dict[str, int], source: str, key: str) -> None:
    """A ``pos_embed`` in the file must be VideoMAE's fixed sinusoid (sdtl recomputes it); a learned one
    (``use_learnable_pos_emb``) has no place in this encoder."""
    value = state.pop(key, None)
    if value is None:
        return
    rows = value.reshape(-1, value.shape[-1]) if value.dim() >= 2 else None
    if rows is None or not torch.allclose(rows.float(), sinusoid_table(*rows.shape), atol=1e-4):
        raise CheckpointError(
            f"{source}: '{key}' {tuple(value.shape)} is not VideoMAE's fixed sinusoid position table (a learned "
            "position embedding, use_learnable_pos_emb=True?); sdtl's VideoMAE uses the fixed table only, so "
            "these weights cannot load", path=source)
    _count(ignored, f"{key} (the fixed sinusoid table; sdtl recomputes it)")


def _adapt_release(obj: Any, source: str) -> tuple[str, dict, dict] | None:
    state = None
    if isinstance(obj, Mapping):
        for candidate in (obj.get("model"), obj.get("module"), obj.get("state_dict"), obj):
            state = _tensor_dict(candidate)
            if state is not None:
                break
    if not state:
        return None
    ignored: dict[str, int] = {}
    if any(k.startswith("encoder.blocks.") for k in state):
        # pre-training layout (PretrainVisionTransformer), or an sdtl VideoClassifier state dict
        # (encoder.* + head.*, with encoder.fc_norm)
        sdtl_classifier = any(k.startswith("encoder.fc_norm.") for k in state)
        fmt = "state_dict" if sdtl_classifier else "videomae-pretrain"
        out = {}
        for key, value in state.items():
            if key.startswith("encoder."):
                out[key[len("encoder."):]] = value
            elif key.startswith("head.") and sdtl_classifier:
                _count(ignored, "head.* (the classifier head)")
            elif key.startswith(("decoder.", "encoder_to_decoder.")):
                _count(ignored, key.split(".")[0] + ".* (pre-training decoder)")
            elif key in ("mask_token", "pos_embed"):  # the decoder's mask token; the decoder's fixed table
                _count(ignored, f"{key} (pre-training decoder)")
            else:
                out[key] = value  # left for the strict check to name
        state = out
        if not sdtl_classifier and "fc_norm.weight" not in state and "norm.weight" in state:
            for key in ("norm.weight", "norm.bias"):
                if state.pop(key, None) is not None:
                    _count(ignored, "encoder.norm.* (pre-training encoder's final norm; VideoMAE fine-tuning drops it)")
            _fill_fc_norm(state, ignored)
    elif any(k.startswith("blocks.") for k in state) and any(k.startswith("patch_embed.") for k in state):
        fmt = "videomae-finetune"
        if "norm.weight" in state and "fc_norm.weight" not in state:
            raise CheckpointError(
                f"{source}: a VideoMAE fine-tuned model with 'norm' and no 'fc_norm': it was trained with "
                "use_mean_pooling=False (classifying from token 0; VideoMAE has no class token), which sdtl's "
                "mean pooling + fc_norm cannot reproduce; start from the pre-training checkpoint instead "
                "(encoder.* keys), or from a fine-tune trained with mean pooling", path=source)
        for key in [k for k in state if k.startswith("head.")]:
            del state[key]
            _count(ignored, "head.* (source classifier)")
    else:
        return None
    _drop_pos_embed(state, ignored, source, "pos_embed")
    return fmt, state, ignored


def _is_hf(obj: Any) -> bool:
    from sdtl.models.checkpoints import HF_CONFIG_KEY

    return isinstance(obj, Mapping) and HF_CONFIG_KEY in obj and isinstance(obj.get("state_dict"), Mapping)


def _hf_sizes_check(config: Mapping, arch: str, source: str) -> None:
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    if hidden is None or layers is None:
        return  # the strict shape check decides
    fits = [name for name, size in _SIZES.items() if (size[0], size[1]) == (hidden, layers)]
    if arch in fits or (hidden, layers) == (_TINY["dim"], _TINY["depth"]):
        return
    if fits:
        raise CheckpointError(
            f"{source}: a VideoMAE of hidden_size {hidden} and {layers} layers, which is arch {fits[0]}, not "
            f"{arch}; use model.arch={fits[0]}", path=source)
    sizes = ", ".join(f"{name} ({d}-d, {n} layers)" for name, (d, n, _, _) in _SIZES.items())
    raise CheckpointError(f"{source}: a VideoMAE of hidden_size {hidden} and {layers} layers; sdtl has {sizes} "
                          "only", path=source)


def _adapt_hf(obj: Mapping, arch: str, source: str) -> tuple[str, dict, dict]:
    from sdtl.models.checkpoints import HF_CONFIG_KEY

    config = dict(obj[HF_CONFIG_KEY] or {})
    model_type = config.get("model_type")
    if model_type not in (None, "videomae"):
        raise CheckpointError(f"{source}: a Hugging Face {model_type!r} model, not VideoMAE; {arch} takes "
                              "VideoMAE weights only", path=source)
    _hf_sizes_check(config, arch, source)
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r}; sdtl's VideoMAE uses exact GELU "
                              "('gelu') as VideoMAE", path=source)
    qv_bias = config.get("qv_bias", config.get("qkv_bias", True))
    if qv_bias is False:
        raise CheckpointError(f"{source}: config.json has qv_bias/qkv_bias false (no query/value biases); "
                              "VideoMAE and sdtl's encoder have them, so these weights cannot load", path=source)
    raw = {k.removeprefix("videomae."): v for k, v in obj["state_dict"].items()}
    pretraining = any(k.startswith(("decoder.", "encoder_to_decoder.")) for k in raw) or \
        "VideoMAEForPreTraining" in (config.get("architectures") or [])
    mean_pooling = config.get("use_mean_pooling", True)
    if mean_pooling is False and not pretraining:
        raise CheckpointError(
            f"{source}: config.json has \"use_mean_pooling\": false: this model pools token 0 (a patch token; "
            "VideoMAE has no class token) after its final 'layernorm', whereas sdtl (and the VideoMAE paper) "
            "pool the mean of all tokens then fc_norm. To use its weights as a pre-trained backbone (what "
            "MCG-NJU/videomae-base is: a pre-training model, whose hub config says false), set "
            "\"use_mean_pooling\": true in config.json: sdtl then drops 'layernorm' and starts fc_norm fresh, "
            "as VideoMAE's own fine-tuning does; a classifier fine-tuned with token-0 pooling cannot be "
            "reproduced by sdtl", path=source)
    ignored: dict[str, int] = {}
    state: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    key_bias: list[tuple[str, torch.Tensor]] = []
    final_norm: dict[str, torch.Tensor] = {}  # VideoMAEModel's layernorm (only without mean pooling)
    for key, value in raw.items():
        if key.startswith("embeddings.patch_embeddings.projection."):
            state["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key == "embeddings.position_embeddings":
            state["pos_embed"] = value
        elif key.startswith("fc_norm."):
            state[key] = value
        elif key.startswith("classifier."):
            _count(ignored, "classifier.* (source classifier)")
        elif key.startswith(("decoder.", "encoder_to_decoder.")) or key == "mask_token":
            _count(ignored, (key.split(".")[0] + ".*" if "." in key else key) + " (pre-training decoder)")
        elif key.startswith("layernorm."):
            final_norm[key] = value
        else:
            m = _HF_BLOCK.fullmatch(key)
            rest = m.group(2) if m else ""
            if m and rest in _HF_RENAMES:
                state[f"blocks.{m.group(1)}.{_HF_RENAMES[rest]}"] = value
            elif m and rest.startswith("attention.attention.") and rest.endswith(".weight") and \
                    rest.split(".")[2] in _QKV:
                qkv.setdefault(int(m.group(1)), {})[rest.split(".")[2]] = value
            elif m and rest == "attention.attention.key.bias":
                key_bias.append((key, value))
            else:
                state[key] = value  # left for the strict check to name
    for key, value in key_bias:
        if value.abs().max().item() != 0:
            raise CheckpointError(f"{source}: '{key}' is non-zero, but VideoMAE's key projection has no bias "
                                  "(only q_bias and v_bias); these are not VideoMAE weights", path=source)
        _count(ignored, "encoder.layer.*.attention.attention.key.bias (all zero; VideoMAE has no k bias)")
    for index, parts in sorted(qkv.items()):
        if set(parts) != set(_QKV):
            for name in _QKV:  # an incomplete q/k/v is left under its own name for the strict check to list
                if name in parts:
                    state[f"encoder.layer.{index}.attention.attention.{name}.weight"] = parts[name]
            continue
        state[f"blocks.{index}.attn.qkv.weight"] = torch.cat([parts[name] for name in _QKV], dim=0)
    # The attention biases: absent or all zero is transformers 5.x's loading bug (MODERN_ENCODERS P2), never
    # loaded as zeros.
    depth = max([i + 1 for i in qkv] + [0])
    wanted = [f"blocks.{i}.attn.{b}" for i in range(depth) for b in ("q_bias", "v_bias")]
    missing = [k for k in wanted if k not in state]
    if missing:
        names = [f"videomae.encoder.layer.{k.split('.')[1]}.attention.attention.{k.rsplit('.', 1)[1]}"
                 for k in missing]
        shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
        raise CheckpointError(
            f"{source}: {len(missing)} attention bias tensor(s) missing: {shown} (q_bias / v_bias, or query.bias "
            "/ value.bias). VideoMAE has query and value biases; a folder without them was typically saved by "
            "transformers 5.x after loading an old-layout checkpoint, which silently dropped q_bias/v_bias "
            "(transformers PR #48675). Re-export from the original checkpoint (the release .pth or the hub "
            "folder) with a fixed transformers, or load that original directly", path=source)
    present = [state[k] for k in wanted]
    if present and all(t.abs().max().item() == 0 for t in present):
        raise CheckpointError(
            f"{source}: all {len(present)} attention biases (q_bias / v_bias of every layer) are exactly zero: "
            "the signature of transformers 5.x's VideoMAE loading bug (q_bias/v_bias dropped and re-initialised "
            "to zeros, transformers PR #48675) in a model re-saved after it. Re-export from the original "
            "checkpoint with a fixed transformers; an untrained model needs no loading (sdtl's init is random)",
            path=source)
    if "fc_norm.weight" not in state:
        _count(ignored, "videomae.layernorm.* (final norm without mean pooling; VideoMAE fine-tuning drops it)",
               len(final_norm))
        _fill_fc_norm(state, ignored)
    else:
        state.update({"videomae." + k: v for k, v in final_norm.items()})  # for the strict check to name
    _drop_pos_embed(state, ignored, source, "pos_embed")
    return "hf-videomae", state, ignored


def adapt_checkpoint(obj: Any, arch: str = "videomae_vit_b", source: str = "checkpoint") -> tuple[str, dict, dict] | None:
    """``(format, sdtl state dict, {ignored group: count})`` of a VideoMAE release file or Hugging Face
    folder (as :func:`sdtl.models.checkpoints.safe_load` reads it), None for another layout. Formats:
    ``videomae-finetune`` (also sdtl's own exports), ``videomae-pretrain``, ``hf-videomae``, ``state_dict`` (an
    sdtl VideoClassifier state dict). Keys are not checked against the encoder here (the caller loads
    strictly); a file that cannot be right raises :class:`~sdtl.errors.CheckpointError` naming the keys."""
    if _is_hf(obj):
        return _adapt_hf(obj, arch, source)
    return _adapt_release(obj, source)


# ----------------------------------------------------------------------------------------------
# Specs


def _spec(name: str, build, params: str, dim: int, acc: str) -> EncoderSpec:
    return EncoderSpec(
        name=name, build=build,
        description=f"VideoMAE {params} params, {dim}-d; 16x224² clips, tubelet 2 x patch 16, mean pool + "
                    "fc_norm; options variant, drop_path",
        input=InputSpec(frames=16, size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, frame_multiple=2,
                        size_multiple=16, min_frames=2, min_size=16),
        variants={"tiny": InputSpec(frames=8, size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, frame_multiple=2,
                                    size_multiple=8, min_frames=2, min_size=8)},
        depth_of=depth_of, feature_layers=feature_layers, no_weight_decay=no_decay_transformer,
        source_classifier=("head.",), adapt_checkpoint=functools.partial(adapt_checkpoint, arch=name),
        feature_dim=dim,
        weights="VideoMAE release .pth (MCG-NJU/VideoMAE MODEL_ZOO) or a Hugging Face save_pretrained folder",
        kinetics_acc1=f"{acc} (VideoMAE MODEL_ZOO, 1600-ep pre-training, 16x5x3)",
    )


vit_s_spec = _spec("videomae_vit_s", videomae_vit_s, "ViT-S/16 (21.9M", 384, "ViT-S 79.0")
vit_b_spec = _spec("videomae_vit_b", videomae_vit_b, "ViT-B/16 (86.2M", 768, "ViT-B 81.5")

SPECS = (vit_s_spec, vit_b_spec)
