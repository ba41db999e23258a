"""The ``mace`` command (also ``python -m mace``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _cmd_cache(args) -> int:
    from .cache import build_preservation_cache, read_prompt_file
    from .models import load_pipeline

    prompts = read_prompt_file(args.prompts)
    start = time.perf_counter()
    pipe = load_pipeline(args.model, device=args.device)
    cache = build_preservation_cache(pipe, prompts, args.out, model_id=args.model, batch_size=args.batch_size)
    print(f"cache {args.out}: {cache.prompts} prompts, {cache.tokens} tokens, d = {cache.cov.shape[0]}, "
          f"text encoder {cache.fingerprint}, {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mace", description="MACE: mass concept erasure in diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)
    cache = sub.add_parser("cache", help="build a preservation cache (d x d token statistics) from a prompt file")
    cache.add_argument("--model", required=True, help="diffusers folder, hub id or builtin:tiny")
    cache.add_argument("--prompts", required=True, help="text file (one prompt per line) or CSV with a 'prompt' column")
    cache.add_argument("--out", required=True, help="output .safetensors (resumes from OUT.partial)")
    cache.add_argument("--batch-size", type=int, default=64)
    cache.add_argument("--device", default=None)
    cache.set_defaults(func=_cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"mace {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
