"""The ``mace`` command (also ``python -m mace``).

Each command imports what it needs when it runs: importing the diffusers pipelines takes
seconds, and ``mace --help`` or a config error should not wait for them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _cmd_cache(args) -> int:
    from mace import distributed
    from mace.pipelines.loading import load_pipeline
    from mace.stages.cache import build_preservation_cache, read_prompt_file

    _at_least(args.batch_size, "--batch-size")
    prompts = read_prompt_file(args.prompts)
    start = time.perf_counter()
    pipe = load_pipeline(args.model, device=distributed.local_device(args.device))  # torchrun: this rank's GPU
    cache = build_preservation_cache(pipe, prompts, args.out, model_id=args.model, batch_size=args.batch_size)
    distributed.print_summary(f"cache {args.out}: {cache.prompts} prompts, {cache.tokens} tokens, d = {cache.cov.shape[0]}, "
          f"text encoder {cache.fingerprint}, {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_erase(args, stages=None) -> int:
    from mace import distributed
    from mace.config import load_config
    from mace.methods.registry import run_erasure

    config = load_config(args.config, args.set)
    chosen = tuple(stages or (args.stages.split(",") if args.stages else ()))
    summary = run_erasure(config, chosen, progress=not args.quiet)
    distributed.print_summary(summary.line())  # under torchrun: once, by rank 0
    return 0


def _cmd_prepare(args) -> int:
    return _cmd_erase(args, stages=("prepare",))


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed


def _at_least(value: int, flag: str, low: int = 1) -> None:
    if value < low:
        raise ValueError(f"{flag} must be at least {low}, got {value}")


def _finite(value: float, flag: str) -> None:
    if not math.isfinite(value):  # a NaN guidance scale draws NaN images without a word
        raise ValueError(f"{flag} must be a finite number, got {value}")


def _seed_of(text: str, where: str) -> int:
    """A seed from a CSV cell: an integer in [0, 2**63)."""
    try:
        seed = int(text.strip())
    except ValueError:
        raise ValueError(f"{where}: evaluation_seed {text[:40]!r} is not an integer") from None
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{where}: evaluation_seed {text[:40]!r} is outside 0..{MAX_SEED}")
    return seed


def _sample_rows(path: str, default_seed: int) -> list[tuple[str, int]]:
    """(prompt, seed) of each row of a ``mace sample --csv`` file; a bad file or row is one line naming it."""
    import csv

    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise ValueError(f"{path}: needs a 'prompt' column (and optionally 'evaluation_seed')")
            for row in reader:
                where = f"{path} line {reader.line_num}"
                prompt = (row.get("prompt") or "").strip()
                if not prompt:
                    raise ValueError(f"{where}: the prompt is empty")
                seed = row.get("evaluation_seed")
                rows.append((prompt, _seed_of(seed, where) if seed and seed.strip() else default_seed))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {err.start})") from None
    except csv.Error as err:
        raise ValueError(f"{path}: not a readable CSV file ({err})") from None
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def _cmd_sample(args) -> int:
    from pathlib import Path

    import torch

    from mace.pipelines.loading import load_pipeline
    from mace.utils.atomic import save_image_atomically

    if bool(args.prompt) == bool(args.csv):
        raise ValueError("give exactly one of --prompt or --csv")
    _at_least(args.num_images, "--num-images")
    _at_least(args.steps, "--steps")
    _finite(args.guidance, "--guidance")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must lie in 0..{MAX_SEED}, got {args.seed}")
    # Image files are named by row and image number, never by a prompt: the CSV's text is data.
    rows = [(args.prompt, args.seed)] if args.prompt else _sample_rows(args.csv, args.seed)
    total = len(rows) * args.num_images

    def jobs():
        for row_index, (prompt, seed) in enumerate(rows):
            for i in range(args.num_images):
                yield prompt, (seed + i) % (MAX_SEED + 1), f"{i}" if args.prompt else f"{row_index}_{i}"

    pipe = load_pipeline(args.model, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    made = 0
    for prompt, seed, name in tqdm(jobs(), total=total, desc="sampling", unit="img"):
        target = out / f"{name}.png"
        if target.exists():
            continue
        image = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                     generator=torch.Generator().manual_seed(seed)).images[0]
        save_image_atomically(image, target)
        made += 1
    print(f"sampled {made} image(s) ({total - made} already there) into {out}")
    return 0


def _attack_options(p: argparse.ArgumentParser) -> None:
    """Options shared by mace attack and mace eval --attack (budgets are checked by mace.attacks)."""
    p.add_argument("--text-budget", default=None, help="text attack: text-encoder prompt evaluations per concept (default 320)")
    p.add_argument("--soft-budget", default=None, help="soft-prompt attack: gradient steps per concept (default 40)")
    p.add_argument("--attack-images", type=int, default=4, help="images judged per concept and prompt")
    p.add_argument("--success-share", type=float, default=0.5, help="share of those images that must show the concept")
    p.add_argument("--template", default=None, help="the plain prompt around the concept (default: glyph world "
                   "'a rendering showing {}', else 'a photo of {}')")
    p.add_argument("--seed", type=int, default=0)


def _split(names: str | None) -> list[str]:
    return [n.strip() for n in (names or "").split(",") if n.strip()]


def _models_and_concepts(args, what: str = "evaluated") -> tuple[str, str | None, list[str]]:
    """The edited model, the original (or None) and the erased concepts, from the flags or --config
    (whose ``device`` also becomes ``args.device`` when --device is not given)."""
    model, original, erased = args.model, args.original, _split(args.erased)
    if args.config:
        from mace.config import load_config

        config = load_config(args.config, args.set)
        model = model or config.final_save_path
        original = original or config.pretrained_model_name_or_path
        erased = erased or [name for name, _ in config.concepts]
        if getattr(args, "device", None) is None:
            args.device = config.device
    if not model:
        raise ValueError(f"give --model (or --config, whose final_save_path is {what})")
    return model, original, erased


def _judging_world(args, model: str, original: str | None, names: list[str]):
    """The glyph world whose classifier judges: --world, else the one whose builtin model the
    original (or the evaluated model) is, else builtin:world, assumed. Every name is looked up
    before a model loads; an unknown one under the assumed world says why that world."""
    from mace.world import WORLD, get_world, world_of

    world = get_world(args.world) if args.world else (world_of(str(original)) or world_of(str(model)))
    for name in names:
        try:
            (world or WORLD).concept_by_name(name)
        except KeyError as err:
            if world is not None:
                raise
            raise ValueError(f"{err.args[0]}; builtin:world was assumed, as neither --model nor --original is a builtin "
                             "world: pass --world or --original (or --config), or --clip for a real model") from None
    return world or WORLD


def _attack_reports(args, pipe, before, erased: list[str], world=None, clip=None) -> dict:
    """Run the attacks of --attack(s) on ``pipe``; the glyph world's classifier judges, or CLIP
    zero-shot among the erased and --kept names."""
    from mace.attacks import ClipJudge, WorldJudge, attack_success_rate, generated_targets, make_attacks, rendered_targets

    attacks = make_attacks(args.attacks, text_budget=args.text_budget, soft_budget=args.soft_budget)
    if not erased:
        raise ValueError("no erased concepts to attack: give --erased (or --config)")
    if clip is not None:
        template = args.template or "a photo of {}"
        judge = ClipJudge(clip, erased + _split(args.kept))
        targets = generated_targets(before, template, steps=args.steps, guidance_scale=args.guidance) if before else None
        if targets is None and any(a.name == "soft" for a in attacks):
            raise ValueError("the soft-prompt attack on a real model needs --original (its images of each concept are the targets)")
    else:
        from .world.concepts import EVAL_TEMPLATES

        template = args.template or EVAL_TEMPLATES[0]
        judge, targets = WorldJudge(world), rendered_targets(world)
    return attack_success_rate(pipe, erased, judge, attacks, targets=targets, template=template,
                               images_per_concept=args.attack_images, success_share=args.success_share, steps=args.steps,
                               guidance_scale=args.guidance, seed=args.seed, progress=not args.quiet)


def _check_attack_flags(args) -> None:
    """Bad budgets and attack names fail before any model is loaded."""
    from mace.attacks import make_attacks

    make_attacks(args.attacks, text_budget=args.text_budget, soft_budget=args.soft_budget)
    _at_least(args.steps, "--steps")
    _finite(args.guidance, "--guidance")
    if args.attack_images < 1:
        raise ValueError(f"--attack-images must be at least 1, got {args.attack_images}")
    if not 0 < args.success_share <= 1:
        raise ValueError(f"--success-share must lie in (0, 1], got {args.success_share}")
    if args.template is not None and args.template.count("{}") != 1:
        raise ValueError(f"--template needs exactly one {{}} for the concept, got {args.template!r}")


def _cmd_attack(args) -> int:
    from pathlib import Path

    from mace.attacks import summary_line
    from mace.pipelines.loading import load_pipeline
    from mace.utils.atomic import write_json_atomically

    _check_attack_flags(args)
    model, original, erased = _models_and_concepts(args, "attacked")
    if not erased:
        raise ValueError("give --erased (comma-separated concept names) or --config")
    clip = world = None
    if args.clip:
        from mace.evaluation.metrics import load_clip

        if not original and "soft" in _split(args.attacks):
            raise ValueError("the soft-prompt attack on a real model needs --original (its images of each concept are the targets)")
        clip = load_clip(args.clip)
    else:
        world = _judging_world(args, model, original, erased)
    pipe = load_pipeline(model, device=args.device)
    before = load_pipeline(original, device=args.device) if (original and args.clip) else None
    reports = _attack_reports(args, pipe, before, erased, world=world, clip=clip)
    line = summary_line(reports)
    out = Path(args.out) / "attack.json"
    write_json_atomically(out, {"model": str(model), "original": str(original) if original else None, "erased": erased,
                                "summary": line, "attacks": {k: r.to_dict() for k, r in reports.items()}})
    print(f"{line}\nattack: {out}")
    return 0


def _cmd_eval(args) -> int:
    from pathlib import Path

    from mace.pipelines.loading import load_pipeline
    from mace.utils.atomic import write_json_atomically

    if args.attacks:
        _check_attack_flags(args)
    _at_least(args.images_per_concept, "--images-per-concept")
    _at_least(args.background_images, "--background-images", 0)
    _at_least(args.steps, "--steps")
    _finite(args.guidance, "--guidance")
    model, original, erased = _models_and_concepts(args)
    if not erased:
        raise ValueError("give --erased (comma-separated concept names) or --config")
    world = None if args.clip else _judging_world(args, model, original, erased + _split(args.kept))
    out = Path(args.out)
    pipe = load_pipeline(model, device=args.device)
    before = load_pipeline(original, device=args.device) if original else None
    clip = None
    if args.clip:
        from mace.evaluation.clip_eval import clip_evaluation
        from mace.evaluation.metrics import load_clip

        clip = load_clip(args.clip)
        result = clip_evaluation(pipe, erased, _split(args.kept), clip, original=before,
                                 images_per_concept=args.images_per_concept, steps=args.steps,
                                 guidance_scale=args.guidance, progress=not args.quiet)
        line = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
    else:
        from .world.evaluate import evaluate_world

        scores = evaluate_world(pipe, erased, _split(args.kept) or None, original=before,
                                images_per_concept=args.images_per_concept, background_images=args.background_images,
                                steps=args.steps, guidance_scale=args.guidance, csv_path=out / "prompts.csv",
                                progress=not args.quiet, world=world)
        result, line = scores.to_dict(), scores.line()
    if args.attacks:
        from mace.attacks import summary_line

        # The attack-success column: per erased concept, the share of its attacked images that show it.
        reports = _attack_reports(args, pipe, before, erased, world=world, clip=clip)
        for name, report in reports.items():
            result[f"asr_{name}"] = report.asr
            for row in report.concepts:
                result.setdefault("per_concept", {}).setdefault(row.concept, {})[f"attack_{name}"] = row.hits / row.images
        result["attack"] = {k: r.to_dict() for k, r in reports.items()}
        line += "\n" + summary_line(reports)
    result.update(model=str(model), original=str(original) if original else None)
    write_json_atomically(out / "scores.json", result)
    print(f"{line}\nscores: {out / 'scores.json'}" + ("" if args.clip else f", prompts and seeds: {out / 'prompts.csv'}"))
    return 0


def _erasure_options(p: argparse.ArgumentParser, *, original: str, kept: str, clip: str) -> None:
    """Which erasure a command looks at (mace eval, mace attack): the models, the concepts, the judge."""
    p.add_argument("--model", default=None, help="the edited pipeline (default: the config's final_save_path)")
    p.add_argument("--config", default=None, help="a MACE config: its model, original and erased concepts")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--original", default=None, help=original)
    p.add_argument("--erased", default=None, help="comma-separated erased concept names")
    p.add_argument("--kept", default=None, help=kept)
    # The keys of mace.world.WORLDS, written out so that the parser imports no model code.
    p.add_argument("--world", default=None, choices=["world", "world-large", "world-identity", "world-identity-pilot"],
                   help="the glyph world of the concepts (default: that of --original or --model, else world)")
    p.add_argument("--clip", default=None, help=clip)


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

    for name, func, text in (("erase", _cmd_erase, "run an erasure end to end (the config's erasure_method, default "
                                                    "MACE: prepare, refine, train, fuse, report)"),
                             ("prepare", _cmd_prepare, "generate the concepts' images and masks")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="MACE YAML config (the original erase_*.yaml files work)")
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
        if name == "erase":
            p.add_argument("--stages", default=None, help="comma-separated subset of the method's stages (MACE: "
                           "prepare,refine,train,fuse,report; refine: refine,report; uce, speed, rece: edit,report)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)

    ev = sub.add_parser("eval", help="measure an erasure: Acc_e/Acc_g/Acc_s/H_o on the glyph world, or CLIP metrics")
    _erasure_options(ev, original="the unedited pipeline (for the shift score / FID)",
                     kept="comma-separated kept concepts (glyph world default: all others)",
                     clip="CLIP model folder or hub id: CLIP metrics for real models")
    ev.add_argument("--images-per-concept", type=int, default=5)
    ev.add_argument("--background-images", type=int, default=16, help="per background and template (shift score)")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance", type=float, default=4.0)
    ev.add_argument("--out", required=True, help="folder for scores.json (and prompts.csv)")
    ev.add_argument("--device", default=None)
    ev.add_argument("--quiet", action="store_true")
    ev.add_argument("--attack", dest="attacks", default=None, metavar="text,soft",
                    help="also attack each erased concept (mace attack) and add the attack success rate")
    _attack_options(ev)
    ev.set_defaults(func=_cmd_eval)

    at = sub.add_parser("attack", help="search prompts that bring erased concepts back; attack success rate (ASR)")
    _erasure_options(at, original="the unedited pipeline (with --clip: the soft attack's target images)",
                     kept="with --clip: more candidate names for the CLIP judge",
                     clip="CLIP model folder or hub id: judge real models by CLIP zero-shot")
    at.add_argument("--attacks", default="text,soft", help="comma-separated: text (Ring-A-Bell-style), soft (UnlearnDiffAtk-style)")
    _attack_options(at)
    at.add_argument("--steps", type=int, default=20)
    at.add_argument("--guidance", type=float, default=4.0)
    at.add_argument("--out", required=True, help="folder for attack.json")
    at.add_argument("--device", default=None)
    at.add_argument("--quiet", action="store_true")
    at.set_defaults(func=_cmd_attack)

    sample = sub.add_parser("sample", help="generate images from a prompt or a CSV of prompts and seeds")
    sample.add_argument("--model", required=True)
    sample.add_argument("--prompt", default=None)
    sample.add_argument("--csv", default=None, help="CSV with columns prompt, evaluation_seed (others ignored)")
    sample.add_argument("--out", required=True)
    sample.add_argument("--num-images", type=int, default=1)
    sample.add_argument("--steps", type=int, default=30)
    sample.add_argument("--guidance", type=float, default=7.5)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default=None)
    sample.set_defaults(func=_cmd_sample)
    return parser


def _one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or type(exc).__name__


def _quiet_loading() -> None:
    """No progress bars for loading and saving model files: the commands show their own progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"mace {args.command}: warning: {_one_line(message) if isinstance(message, Warning) else message}",
              file=sys.stderr)

    shown = warnings.showwarning
    warnings.showwarning = one_line_warning
    try:
        _quiet_loading()
        return args.func(args)
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as exc:
        print(f"mace {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
