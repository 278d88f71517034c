"""``sdtl inspect CKPT``: what a checkpoint file holds and whether it loads into an arch.

Registered into the ``sdtl`` entry point by :mod:`sdtl.cli` via :func:`register`. Exit status: 0 when
the file was read (and, with ``--arch``, loads into that arch), 1 when ``--arch`` was given and the
weights do not fit it, 2 (UserError) when the file cannot be read at all.
"""
from __future__ import annotations

import argparse
import json
import warnings

from sdtl.models import ARCH_NAMES


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand to ``subparsers`` (an ``argparse`` sub-parser action)."""
    parser = subparsers.add_parser(
        "inspect",
        help="show a checkpoint's format, arch, tensors and metadata",
        description="Show what a checkpoint holds (RSPNet, torchvision, sdtl or plain state dict): detected "
        "format, arch guess, number of tensors and parameters, epoch and other metadata, and with --arch "
        "whether its encoder weights load strictly into that arch. Loads with torch.load(weights_only=True).",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint file (.pth, .pth.tar, .pt, .safetensors)")
    parser.add_argument("--arch", choices=sorted(ARCH_NAMES), help="check that the encoder weights load into this arch")
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="load a file that needs full unpickling (runs any code it contains: trusted files only)",
    )
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.set_defaults(func=run)
    return parser


def _millions(count: int) -> str:
    return f"{count:,} ({count / 1e6:.2f}M)"


def format_description(info: dict) -> str:
    """Human-readable text for :func:`describe_checkpoint`'s dict."""
    lines = [f"checkpoint:     {info['path']} ({info['file_bytes']:,} bytes)", f"format:         {info['format']}"]
    guess = info.get("arch_guess")
    if guess:
        options = ", ".join(f"{k}={v}" for k, v in guess["options"].items())
        lines.append(f"arch guess:     {guess['arch']}" + (f" ({options})" if options else ""))
    else:
        lines.append("arch guess:     none of the known archs matches the keys and shapes")
    backbone = info.get("backbone", {})
    if "error" in backbone:
        lines.append(f"encoder:        {backbone['error']}")
    else:
        lines.append(f"encoder:        {backbone['num_tensors']} tensors, {_millions(backbone['num_parameters'])} parameters")
        for name, count in backbone.get("ignored", {}).items():
            lines.append(f"  ignored:      {name} ({count} tensors)")
    lines.append(f"tensors in file: {info['file_tensors']}")
    for key, value in info.get("metadata", {}).items():
        if key == "class_names" and isinstance(value, list):
            shown = ", ".join(map(str, value[:5])) + (", ..." if len(value) > 5 else "")
            value = f"{len(value)} classes: {shown}"
        lines.append(f"{key + ':':<16}{value}")
    keys, total = info.get("top_level_keys", []), info.get("num_top_level_keys", 0)
    shown = ", ".join(keys[:10]) + (f", ... ({total - 10} more)" if total > 10 else "")
    lines.append(f"top-level keys: {shown}")
    result = info.get("loads_into")
    if result is not None:
        options = ", ".join(f"{k}={v}" for k, v in result["options"].items())
        target = result["arch"] + (f" ({options})" if options else "")
        if result["ok"]:
            lines.append(f"loads into {target}: yes, {result['num_tensors']} tensors, strict")
        else:
            lines.append(f"loads into {target}: NO - {result['error']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from sdtl.models.checkpoints import UnsafePickleWarning, describe_checkpoint

    """Print the description; 1 if ``--arch`` was given and the weights do not fit it."""
    with warnings.catch_warnings():
        # The warning must be seen every time the flag is used, not once per process.
        warnings.simplefilter("always", UnsafePickleWarning)
        info = describe_checkpoint(args.checkpoint, arch=args.arch, allow_unsafe_pickle=args.allow_unsafe_pickle)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    result = info.get("loads_into")
    return 1 if result is not None and not result["ok"] else 0
