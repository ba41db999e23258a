"""Erasure quality on a glyph world: no edit, refinement only, full MACE, UCE, SPEED and RECE, tuned
on one set of concepts and reported on another.

    python benchmarks/bench_erasure_quality.py --world world-large     # 1, 5, 10, 100 erased
    python benchmarks/bench_erasure_quality.py --world world --sizes 1,5,10,100
    python benchmarks/bench_erasure_quality.py --sizes 1 --methods none,uce --grid 1   # quick look

Protocol. A fixed random order of the world's concepts is cut into an erase pool, a tuning kept
set (--tuning-kept) and a report kept set (--report-kept). At size n the reported erasure
removes the first n concepts of the erase pool and is scored on the report kept set; the
tuning erasure removes the last n of the erase pool (disjoint from the reported ones whenever
2n fits in the pool; the JSON says when it does not) and is scored on the tuning kept set.
Concepts that the shipped configs name (configs/*.yaml, whose settings were chosen looking at
them) are never in a report set.

Search, the same for every method: each method's preservation scale, the knob that trades
erasure against specificity (SPEED: its null-space threshold, the eigenvalue below which a
direction of the kept concepts' embeddings may change), takes --grid values spaced by a factor 3
around the method's default, and the grid grows by a factor 3 beyond an edge while the best value lies on that
edge (at most --extend more values); the value with the best tuning H_o (ties: higher Acc_s,
then higher Acc_e, the gentler edit) is the one reported. The JSON is rewritten after every
tuning trial and reported row, and a rerun with the same --out resumes: it reuses the trials and
rows measured under the same settings (world weights and classifier, concept split, images,
steps, grid, MACE options, attacks), adds those of new sizes or methods to the same file, and
refuses a file measured under other settings (--fresh replaces it). The other
hyperparameters (lambda 0.1, the LoRA's learning rate and steps) are those of
configs/world_erase.yaml for every method, fixed before this protocol and never chosen on a
report set, except MACE's use_pooler: false (--mace-option), chosen on the tuning sets
(bench_specificity_diagnosis.py). SPEED and RECE keep their papers' other defaults (mace.methods.speed,
mace.methods.rece; RECE with lambda 0.1 as above). Preservation: MACE and refinement through a domain cache
of prompts naming every concept that is not erased; UCE and RECE through those names' embeddings;
SPEED through their last word pieces (its prior set).

Evaluation: mace.world.evaluate (fixed seeds, held-out templates). Robustness (--attacks): on
each reported model, mace.attacks attacks the first --attack-concepts erased concepts (the
same ones for every method) with the text-only search and the soft-prompt attack at their
default budgets; ASR is the share of them the classifier finds again (plain: before any attack),
the mean over --attack-seeds seeds (the per-seed values are in the JSON). Control, on an
identity world: its held-out identities, never named or drawn in the model's training, are
attacked the same way on the unedited model. The soft attack fits embeddings to images of the
concept, so it can teach the model a concept it never knew; its ASR on them is the floor that
an erased concept's ASR is read against. Attacks play no part in choosing a scale. Prints a
table, writes JSON, and with --plot a PNG of H_o and Acc_s against the number of erased concepts.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _results import RESULTS, command_line

from mace.utils.atomic import write_json_atomically

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("none", "refine", "mace", "uce", "speed", "rece")
PRESERVE_TEMPLATES = 5  # MACE's preservation prompts per kept concept (its first object templates)
# Raised when a change to this script or to the methods changes what a trial or row measures; a
# resume then refuses older results. (The package's commit is not part of the settings, so that a
# run of several hours may go on across commits that do not change the numbers.)
PROTOCOL = 2  # 2: every method runs through mace.methods.registry; SPEED draws its augmentation from the config's seed
ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "world_erase.yaml"


def _default_scales() -> dict[str, float]:
    from mace.methods.registry import METHODS as REGISTRY

    return {name: m.default_scale for name, m in REGISTRY.items()}


# The centre of each method's search: its knob's default in the registry of methods (the
# preservation scale; SPEED: the null-space threshold; 0.1 for UCE, SPEED and RECE is their papers').
DEFAULT_SCALE = _default_scales()


def concept_order(seed: int = 0, world=None) -> list[int]:
    from mace.world import WORLD

    order = list(range((world or WORLD).num_concepts))
    random.Random(seed).shuffle(order)
    return order


def configured_concepts(world) -> set[int]:
    """Concepts the shipped configs name (their settings were chosen looking at them)."""
    text = " ".join(p.read_text() for p in (ROOT / "configs").glob("*.y*ml"))
    return {c.index for c in world.concepts if re.search(rf"\b({re.escape(c.name)}|{re.escape(c.alias)})\b", text)}


@dataclass
class Split:
    erase_pool: list[int]
    tuning_kept: list[int]
    report_kept: list[int]

    def erased(self, n: int, role: str) -> list[int]:
        return self.erase_pool[:n] if role == "report" else self.erase_pool[-n:]

    def disjoint(self, n: int) -> bool:
        return 2 * n <= len(self.erase_pool)


def split_concepts(world, tuning_kept: int, report_kept: int, seed: int = 0) -> Split:
    """The protocol's concept sets (see the module docstring); configured concepts go to tuning."""
    order = concept_order(seed, world)
    if tuning_kept + report_kept >= len(order):
        raise SystemExit(f"{tuning_kept} + {report_kept} kept concepts leave none to erase in {world.model}")
    avoid = configured_concepts(world)
    kept = order[len(order) - tuning_kept - report_kept:]
    report = [c for c in kept if c not in avoid][:report_kept]
    tuning = [c for c in kept if c not in report]
    pool = order[:len(order) - tuning_kept - report_kept]
    pool = [c for c in pool if c not in avoid] + [c for c in pool if c in avoid]  # reported erasures avoid them too
    return Split(pool, tuning, report)


def default_kept(world) -> tuple[int, int]:
    """The protocol's (tuning, report) kept set sizes: 100 and 200 on the worlds of more than
    200 concepts, 10 and 10 on builtin:world and the identity pilot."""
    return (100, 200) if world.num_concepts > 200 else (10, 10)


ONE_SETTING_SIZE = 10  # the number erased at which the protocol chooses its one setting


def count_law_scale(centre: float, n: int, exponent: float) -> float:
    """--count-exponent's scale at n erased: the one setting (chosen at ONE_SETTING_SIZE erased)
    times (ONE_SETTING_SIZE / n) ** exponent."""
    return round(centre * (ONE_SETTING_SIZE / n) ** exponent, 6)


def _rank(trial: dict) -> tuple[float, float, float]:
    """Best tuning H_o; ties: higher Acc_s, then higher Acc_e (the gentler edit)."""
    return trial["h_o"], trial["acc_s"], trial["acc_e"]


def scale_grid(method: str, points: int, centres: dict[str, float] | None = None) -> list[float]:
    centre = (centres or {}).get(method, DEFAULT_SCALE[method])
    return [round(centre * 3.0 ** (k - (points - 1) // 2), 6) for k in range(points)]


def protocol_config():
    """The MACE config the benchmarks start from: configs/world_erase.yaml with its count law
    switched off (preserve_count_exponent 0), so that a scale here is a per-token scale at the
    size it is used at, whatever the shipped config counts; --mace-option or --count-exponent
    set a law explicitly."""
    from mace.config import load_config

    config = load_config(CONFIG, check_paths=False)
    config.preserve_count_exponent = 0.0
    return config


def erase_with(method: str, world, names: list[str], preserved: list[str], work: Path, scale: float, overrides: dict,
               data_dir: Path):
    """The edited pipeline for one method (run through mace.methods.registry, as `mace erase` runs it), and
    the seconds the edit took (preservation included)."""
    import mace
    from mace.config import config_from_dict
    from mace.methods.registry import run_erasure
    from mace.stages.prompts import OBJECT_TEMPLATES
    from mace.world import GENERIC_CONCEPT

    start = time.perf_counter()
    if method == "none":
        return mace.load_pipeline(world.model), 0.0
    values = protocol_config().to_dict()  # its model and preservation cache are replaced below
    values.update(multi_concept=[[n, "object"] for n in names], mapping_concept=[GENERIC_CONCEPT] * len(names),
                  pretrained_model_name_or_path=world.model, output_dir=str(work), input_data_dir=str(data_dir),
                  final_save_path=str(work / "final"), domain_preservation_cache_path=None,
                  train_preserve_scale=0.0, fuse_preserve_scale=0.0, report_prompts=[], erasure_method=method)
    if method in ("uce", "speed", "rece"):  # they preserve the kept names' embeddings
        values.update(preserve_concepts=list(preserved), method_scale=scale)
        stages = ("edit",)
    else:
        values.update(**overrides)
        if preserved:  # MACE's domain preservation: a cache of prompts naming the concepts to keep
            cache = work / "domain.safetensors"
            prompts = [t.format(n) for n in preserved for t in OBJECT_TEMPLATES[:PRESERVE_TEMPLATES]]
            mace.build_preservation_cache(mace.load_pipeline(world.model), prompts, cache, model_id=world.model,
                                          progress=False)
            values.update(domain_preservation_cache_path=str(cache), preserve_weight=1.0,
                          train_preserve_scale=scale, fuse_preserve_scale=scale)
        stages = ("refine",) if method == "refine" else ("prepare", "refine", "train", "fuse")
    summary = run_erasure(config_from_dict(values), stages, progress=False)
    return mace.load_pipeline(summary.final_model), time.perf_counter() - start


def measurement_settings(world, args, overrides: dict, attacks: list, split: Split) -> dict:
    """Everything a measured trial or row depends on besides its size and method: a resume reuses
    results only when all of it is equal."""
    from mace.world import weights_fingerprint
    from mace.world.model import classifier_digest

    names = [c.name for c in world.concepts]
    return {
        "protocol": PROTOCOL, "world": world.key,
        "weights": weights_fingerprint(world), "classifier": classifier_digest(world=world),
        "erase_pool": [names[c] for c in split.erase_pool], "tuning_kept": [names[c] for c in split.tuning_kept],
        "report_kept": [names[c] for c in split.report_kept], "images_per_concept": args.images_per_concept,
        "tuning_images_per_concept": args.tuning_images_per_concept, "steps": args.steps,
        "background_images": args.background_images, "grid": args.grid, "extend": args.extend,
        "mace_options": overrides, "attacks": [[a.name, a.budget] for a in attacks],
        "attack_concepts": args.attack_concepts if attacks else None,
        "attack_images": args.attack_images if attacks else None,
        # absent for one seed, so that files measured before seeds were counted still resume
        **({"attack_seeds": args.attack_seeds} if attacks and args.attack_seeds != 1 else {}),
    }


def attack_scores(pipe, world, judge, concepts: list[str], attacks: list, args) -> dict:
    """ASR of each attack (and plain) on ``concepts``: the mean over ``--attack-seeds`` seeds,
    with the per-seed values beside it."""
    from mace.attacks import attack_success_rate, rendered_targets
    from mace.world.concepts import EVAL_TEMPLATES

    per_seed: dict[str, list[float]] = {}
    seconds = 0.0
    for seed in range(args.attack_seeds):
        reports = attack_success_rate(pipe, concepts, judge, attacks, targets=rendered_targets(world),
                                      template=EVAL_TEMPLATES[0], images_per_concept=args.attack_images,
                                      steps=args.steps, seed=seed, progress=False)
        per_seed.setdefault("asr_plain", []).append(next(iter(reports.values())).plain_asr)
        for name, report in reports.items():
            per_seed.setdefault(f"asr_{name}", []).append(report.asr)
        seconds += sum(r.seconds for r in reports.values())
    scores: dict = {k: round(sum(v) / len(v), 4) for k, v in per_seed.items()}
    if args.attack_seeds > 1:
        scores.update({f"{k}_seeds": [round(x, 4) for x in v] for k, v in per_seed.items()})
    return {**scores, "attacked": len(concepts), "attack_seconds": round(seconds, 1)}


def asr_line(scores: dict) -> str:
    """The mean ASRs of attack_scores, for the log."""
    return "  ".join(f"{k} {v:.2f}" for k, v in scores.items() if k.startswith("asr_") and not k.endswith("_seeds"))


def resume_from(out: Path, settings: dict) -> tuple[dict, dict, float, dict | None, list[str]]:
    """The tuning trials and reported rows already in ``out``, keyed by (size, method, scale) and
    (size, method), the seconds they took, the attacks' control and the commands that wrote them;
    none when ``out`` does not exist. A file measured under other settings is refused with a
    one-line error, never mixed in."""
    import json

    if not out.exists():
        return {}, {}, 0.0, None, []
    try:
        data = json.loads(out.read_text())
        old = data.get("settings")
        trials = {(t["concepts"], t["method"], t["scale"]): t for t in data["tuning"]}
        rows = {(r["concepts"], r["method"]): r for r in data["rows"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"error: cannot resume from {out}: not a results file of this benchmark ({error}); "
                         f"pass --fresh to replace it or choose another --out") from None
    if old != settings:
        key = next((k for k in settings if not isinstance(old, dict) or old.get(k) != settings[k]), "settings")
        raise SystemExit(f"error: {out} holds results measured under other settings ({key} differs); "
                         f"pass --fresh to replace them or choose another --out")
    print(f"resuming from {out}: {len(trials)} tuning trials and {len(rows)} rows measured under these settings")
    return trials, rows, float(data.get("seconds", 0.0)), data.get("attack_control"), list(data.get("commands", []))


def with_command(commands: list[str], command: str) -> list[str]:
    """The commands that made a results file once ``command`` has run on it: a file gathers sizes
    and methods over several runs, and the results document prints each, in the order they last
    ran (a rerun of the same command moves it last rather than repeating it)."""
    return [c for c in commands if c != command] + [command]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mace.utils.atomic import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "h_o", "H_o (report set)"), (axes[1], "acc_s", "Acc_s (report set)")):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r["concepts"], r[key]) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("erased concepts")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="world", help="world (120 concepts) or world-large (540)")
    parser.add_argument("--sizes", default="1,5,10,100")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tuning-kept", type=int, default=None, help="default: 10 (world), 100 (world-large)")
    parser.add_argument("--report-kept", type=int, default=None, help="default: 10 (world), 200 (world-large)")
    parser.add_argument("--grid", type=int, default=3, help="preservation scales tried per method (factor 3 apart)")
    parser.add_argument("--extend", type=int, default=2, help="extra scales at most, tried while the best is on an edge")
    parser.add_argument("--images-per-concept", type=int, default=3, help="report runs")
    parser.add_argument("--tuning-images-per-concept", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--background-images", type=int, default=8, help="per background and template (shift score)")
    parser.add_argument("--lora-steps", type=int, default=None, help="MACE: max_train_steps (default: the config's)")
    parser.add_argument("--mace-option", action="append", default=["use_pooler=false"], metavar="KEY=VALUE",
                        help="MACE and refinement: a config key to change (default: use_pooler=false, chosen on the "
                             "tuning sets with bench_specificity_diagnosis.py)")
    parser.add_argument("--centre", action="append", default=[], metavar="METHOD=SCALE",
                        help="the centre of a method's scale search (default: DEFAULT_SCALE); with --grid 1 the "
                             "one scale used at every size, chosen beforehand on a tuning set")
    parser.add_argument("--count-exponent", type=float, default=None, metavar="GAMMA",
                        help="with --grid 1: at n erased use the centre times (10 / n) ** GAMMA (a count law for "
                             "the one setting chosen at 10 erased; 0: the same scale at every size)")
    parser.add_argument("--attacks", default="text,soft", help="attacks on each reported model ('' for none)")
    parser.add_argument("--attack-concepts", type=int, default=10, help="erased concepts attacked per reported model")
    parser.add_argument("--attack-images", type=int, default=4, help="images per attacked concept")
    parser.add_argument("--attack-seeds", type=int, default=3, help="seeds each attack runs with (ASR: their mean)")
    parser.add_argument("--text-budget", type=int, default=None, help="text attack: prompt evaluations (default: its own)")
    parser.add_argument("--soft-budget", type=int, default=None, help="soft attack: gradient steps (default: its own)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of H_o and Acc_s against the number erased")
    parser.add_argument("--fresh", action="store_true", help="replace the results in --out instead of resuming them")
    parser.add_argument("--replot", type=Path, nargs="+", default=None, metavar="JSON",
                        help="only draw --plot from these results (a later file's row replaces an earlier one's)")
    args = parser.parse_args(argv)
    if args.replot:
        import json

        if not args.plot:
            parser.error("--replot needs --plot")
        merged: dict = {}
        for path in args.replot:
            data = json.loads(path.read_text())
            merged.update({(r["concepts"], r["method"]): r for r in data["rows"]})
        plot(sorted(merged.values(), key=lambda r: r["concepts"]), args.plot,
             f"{data['model']}: report set, scales tuned on a disjoint set")
        print(f"wrote {args.plot}")
        return 0
    if args.count_exponent is not None and args.grid != 1:
        parser.error("--count-exponent needs --grid 1 (it sets each size's one scale)")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")

    import torch

    import mace
    from mace.world import get_world, load_classifier
    from mace.world.evaluate import background_images_of, evaluate_world

    world = get_world(args.world)
    tuning_kept, report_kept = default_kept(world)
    split = split_concepts(world, args.tuning_kept or tuning_kept, args.report_kept or report_kept)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if max(sizes) > len(split.erase_pool):
        parser.error(f"at most {len(split.erase_pool)} concepts can be erased with these kept sets")
    import yaml

    overrides = {}
    for option in args.mace_option:
        key, _, value = option.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    if args.lora_steps is not None:
        overrides["max_train_steps"] = args.lora_steps
    centres = {}
    for option in args.centre:
        method, _, value = option.partition("=")
        if method.strip() not in DEFAULT_SCALE:
            parser.error(f"--centre {option}: unknown method; choose from {sorted(DEFAULT_SCALE)}")
        centres[method.strip()] = float(value)
    classifier = load_classifier(world)
    from mace.attacks import WorldJudge, make_attacks
    from mace.world.concepts import EVAL_TEMPLATES

    attacks = make_attacks(args.attacks, text_budget=args.text_budget, soft_budget=args.soft_budget) if args.attacks else []
    judge = WorldJudge(world, classifier)
    names = [c.name for c in world.concepts]
    out = args.out or RESULTS / f"erasure_quality-{world.key}-cpu-{os.cpu_count()}cores.json"
    settings = measurement_settings(world, args, overrides, attacks, split)
    if centres:  # older results files, measured at the default centres, say nothing of them
        settings["centres"] = centres
    if args.count_exponent is not None:
        settings["count_exponent"] = args.count_exponent
    done_trials, done_rows, seconds_before, control, commands = (({}, {}, 0.0, None, []) if args.fresh
                                                                 else resume_from(out, settings))
    commands = with_command(commands, command_line(__file__, argv))
    original = mace.load_pipeline(world.model)
    original_background = background_images_of(original, background_images=args.background_images, steps=args.steps,
                                               progress=False)
    start_all = time.perf_counter()

    def write(final: bool = False) -> None:
        order = {m: i for i, m in enumerate(METHODS)}
        write_json_atomically(out, {
            "model": world.model, "complete": final, "settings": settings, "commands": commands,
            "images_per_concept": args.images_per_concept,
            "tuning_images_per_concept": args.tuning_images_per_concept, "steps": args.steps, "grid": args.grid,
            "extend": args.extend, "mace_options": overrides,
            "attacks": {"settings": [{"name": a.name, "budget": a.budget} for a in attacks],
                        "concepts_per_model": args.attack_concepts, "images_per_concept": args.attack_images,
                        "template": EVAL_TEMPLATES[0]} if attacks else None,
            "erase_sets_disjoint": {str(n): split.disjoint(n) for n in sorted({*sizes, *(k[0] for k in done_rows)})},
            "tuning_kept": [names[c] for c in split.tuning_kept], "report_kept": [names[c] for c in split.report_kept],
            "tuning": sorted(done_trials.values(), key=lambda t: (t["concepts"], order[t["method"]])),
            "rows": sorted(done_rows.values(), key=lambda r: (r["concepts"], order[r["method"]])),
            **({"attack_control": control} if control else {}),
            "seconds": round(seconds_before + time.perf_counter() - start_all, 1),
        })
        if final:
            print(f"wrote {out}")

    if attacks and world.held_out and control is None:  # the floor: identities the model never learned
        never_learned = [c.name for c in world.held_out[:args.attack_concepts]]
        control = {"model": "unedited", **attack_scores(original, world, judge, never_learned, attacks, args)}
        write()
    if control:
        print("control (held-out identities, unedited model): " + asr_line(control))

    def tuning_trial(n: int, method: str, scale: float, data_dir: Path) -> dict:
        erased = split.erased(n, "tuning")
        preserved = [names[c] for c in range(world.num_concepts) if c not in set(erased)]
        work = Path(tempfile.mkdtemp(prefix=f"mace-quality-{method}-{n}-"))
        try:
            torch.manual_seed(0)
            pipe, _ = erase_with(method, world, [names[c] for c in erased], preserved, work, scale, overrides, data_dir)
            scores = evaluate_world(pipe, erased, split.tuning_kept, classifier=classifier,
                                    images_per_concept=args.tuning_images_per_concept, background_images=0,
                                    steps=args.steps, progress=False, world=world)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"  tuning {n:4d} {method:7s} scale {scale:<8g} {scores.line()}", flush=True)
        return {"concepts": n, "method": method, "scale": scale,
                **{k: round(getattr(scores, k), 4) for k in ("acc_e", "acc_g", "acc_s", "h_o")}}

    for n in sizes:
        data_dirs = {role: Path(tempfile.mkdtemp(prefix=f"mace-quality-data-{role}-{n}-")) for role in ("tuning", "report")}
        try:
            for method in methods:
                grid = [None] if method == "none" else scale_grid(method, args.grid, centres)
                if args.count_exponent is not None and method != "none":
                    grid = [count_law_scale(grid[0], n, args.count_exponent)]
                best = None
                tried: list[float] = []
                while len(grid) > 1:  # the grid, extended while its best value lies on an edge
                    todo = [g for g in grid if g not in tried]
                    if not todo:
                        break
                    scale = todo[0]
                    tried.append(scale)
                    trial = done_trials.get((n, method, scale))
                    if trial is None:
                        trial = tuning_trial(n, method, scale, data_dirs["tuning"])
                        done_trials[(n, method, scale)] = trial
                        write()
                    else:
                        print(f"  tuning {n:4d} {method:7s} scale {scale:<8g} (resumed) H_o {trial['h_o']:.3f}", flush=True)
                    if best is None or _rank(trial) > _rank(best):
                        best = trial
                    if not [g for g in grid if g not in tried] and len(grid) < args.grid + args.extend:
                        if best["scale"] == grid[0]:
                            grid.insert(0, round(grid[0] / 3, 6))
                        elif best["scale"] == grid[-1]:
                            grid.append(round(grid[-1] * 3, 6))
                scale = best["scale"] if best else grid[0]
                if (n, method) in done_rows:
                    print(f"{n:4d} {method:7s} (resumed) H_o {done_rows[(n, method)]['h_o']:.3f}", flush=True)
                    continue
                erased = split.erased(n, "report")
                preserved = [names[c] for c in range(world.num_concepts) if c not in set(erased)]
                work = Path(tempfile.mkdtemp(prefix=f"mace-quality-{method}-{n}-"))
                try:
                    torch.manual_seed(0)
                    pipe, seconds = erase_with(method, world, [names[c] for c in erased], preserved, work, scale or 0.0,
                                               overrides, data_dirs["report"])
                    scores = evaluate_world(pipe, erased, split.report_kept, classifier=classifier,
                                            original_background=original_background, images_per_concept=args.images_per_concept,
                                            background_images=args.background_images, steps=args.steps, progress=False,
                                            world=world)
                    robustness = {}
                    if attacks:
                        attacked = [names[c] for c in erased[:args.attack_concepts]]
                        robustness = attack_scores(pipe, world, judge, attacked, attacks, args)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                row = {"concepts": n, "method": method, "scale": scale, "edit_seconds": round(seconds, 1),
                       "eval_seconds": round(scores.seconds, 1), "tuning_h_o": best["h_o"] if best else None,
                       **{k: round(getattr(scores, k), 4) for k in ("acc_e", "acc_g", "acc_s", "h_o", "h_g", "shift")},
                       **robustness}
                done_rows[(n, method)] = row
                write()
                asr = asr_line(robustness)
                print(f"{n:4d} {method:7s} scale {scale if scale is not None else '-'!s:8s} {scores.line()}  edit {seconds:.0f} s"
                      f"  {asr}", flush=True)
        finally:
            for d in data_dirs.values():
                shutil.rmtree(d, ignore_errors=True)

    print(f"\nErasure quality on {world.model}: report set of {len(split.report_kept)} kept concepts, scales chosen on a "
          f"disjoint tuning set of {len(split.tuning_kept)} ({args.images_per_concept} images per concept and prompt kind, "
          f"{args.steps} steps), CPU threads {torch.get_num_threads()}")
    asr_keys = [k for k in ("asr_plain", *(f"asr_{a.name}" for a in attacks)) if attacks]
    print("| concepts | method | scale | Acc_e | Acc_g | Acc_s | H_o | H_g | shift | edit time (s) |"
          + "".join(f" {k.replace('asr_', 'ASR ')} |" for k in asr_keys))
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(asr_keys))
    for r in sorted(done_rows.values(), key=lambda r: (r["concepts"], METHODS.index(r["method"]))):
        scale = "-" if r["scale"] is None else f"{r['scale']:g}"
        print(f"| {r['concepts']} | {r['method']} | {scale} | {r['acc_e']:.3f} | {r['acc_g']:.3f} | {r['acc_s']:.3f} | "
              f"{r['h_o']:.3f} | {r['h_g']:.3f} | {r['shift']:.3f} | {r['edit_seconds']:.1f} |"
              + "".join(f" {r[k]:.2f} |" if k in r else " - |" for k in asr_keys))
    write(final=True)
    if args.plot:
        plot(list(done_rows.values()), args.plot, f"{world.model}: report set, scales tuned on a disjoint set")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
