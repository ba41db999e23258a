"""Why one per-token preservation scale does not carry across concept counts on some worlds.

    python benchmarks/bench_preservation_balance.py --tuned WORLD=FILE   # FILE: a per-token erasure_quality JSON

MACE's refinement (stage 1) is a closed-form map of the text embedding, T, shared by every key
and value projection (W' = W T). Under preserve_scale_mode: per_token it minimises
    sum_erased ||T e_o - e_n||^2 + scale * N_e * mean_preserved ||T e_p - e_p||^2 + lamb ||T - I||^2,
so the scale weighs one preserved token against one erased token whatever the number of
concepts. What the scale does not hold fixed is how much of the erasure T achieves: each erased
concept adds its own directions, and in a direction only its own concept uses, its erasure
is pulled by that concept's tokens alone while the preservation grows with N_e.

For each world and number of erased concepts (the protocol's reported erase sets of
bench_erasure_quality.py, preserving its report kept set with the same cache MACE gets there),
this script solves the refinement with the project's own solve (on identity weights, so the
result is T itself) at a grid of per-token scales and prints
  erased  the fraction of the erased prompts' change the map makes,
          1 - sum ||T e_o - e_n||^2 / sum ||e_o - e_n||^2 over their aligned tokens;
  kept    the kept concepts' change as a fraction of their own distance to the generic prompt,
          sum ||T k_o - k_o||^2 / sum ||k_o - k_n||^2 over held-out templates of the kept set.
With --tuned WORLD=FILE (a bench_erasure_quality.py JSON measured per token) it marks the scale
the full benchmark chose at each size and reads `erased` there: where the tuned optimum keeps
`erased` level across sizes while a fixed scale lets it fall, one scale cannot carry. Each size
also gets a calibrated scale: the one at which its erase set has the share that the one setting
(the scale tuned at 10 erased) gives on the tuning sets at 10 erased. This is
a diagnostic of stage 1 alone (LoRA training and fusion follow it), in the text embedding's
space (the projections W are left out). Prints a table, writes JSON (and a plot with --plot).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from _results import RESULTS, command_line
from bench_erasure_quality import PRESERVE_TEMPLATES, default_kept, protocol_config, split_concepts

from mace.utils.atomic import write_json_atomically

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KEPT_TEMPLATES = slice(5, 10)  # object templates the preservation cache does not use


def erase_pairs(names: list[str], base) -> list[tuple[str, str]]:
    """The refinement's (erased prompt, generic prompt) pairs, as `mace erase` builds them from
    ``base`` (the erasure benchmark's MACE config) with ``names`` erased."""
    from mace.config import config_from_dict
    from mace.erase import concept_pairs
    from mace.world import GENERIC_CONCEPT

    config = config_from_dict({**base.to_dict(), "multi_concept": [[n, "object"] for n in names],
                               "mapping_concept": [GENERIC_CONCEPT] * len(names)}, check_paths=False)
    return [(p.old, p.new) for pairs in concept_pairs(config).values() for p in pairs]


class RefinementProbe:
    """The per-token refinement of one erase set against one kept set, solved at any scale."""

    def __init__(self, pipe, erased: list[str], kept: list[str], base, cache: Path):
        import mace
        from mace.stages.cache import PreservationSettings
        from mace.stages.prompts import OBJECT_TEMPLATES
        from mace.stages.refinement import aligned_pair_tokens
        from mace.world import GENERIC_CONCEPT

        if not cache.exists():  # the cache MACE gets in bench_erasure_quality.py: the kept names' prompts
            mace.build_preservation_cache(pipe, [t.format(n) for n in kept for t in OBJECT_TEMPLATES[:PRESERVE_TEMPLATES]],
                                          cache, progress=False)
        self.preserve = PreservationSettings(domain_cache=str(cache), preserve_weight=1.0, per_token=True).matrix(pipe)
        self.lam = base.lamb
        self.e_o, self.e_n = (t.double() for t in aligned_pair_tokens(pipe, erase_pairs(erased, base)))
        self.k_o, k_n = (t.double() for t in aligned_pair_tokens(
            pipe, [(t.format(n), t.format(GENERIC_CONCEPT)) for n in kept for t in OBJECT_TEMPLATES[KEPT_TEMPLATES]]))
        self.change = ((self.e_o - self.e_n) ** 2).sum()
        self.kept_distance = ((self.k_o - k_n) ** 2).sum()

    def at(self, scale: float) -> dict:
        """`erased` and `kept` (module docstring) at one per-token scale."""
        from mace.closed_form import refine_weights

        identity = torch.eye(self.e_o.shape[1], dtype=torch.float64)
        (T,), _ = refine_weights([identity], self.e_o, self.e_n, lam=self.lam, preserve=self.preserve,
                                 preserve_scale=scale * self.e_o.shape[0])
        return {"scale": scale, "erased": float(1 - ((self.e_o @ T.T - self.e_n) ** 2).sum() / self.change),
                "kept": float(((self.k_o @ T.T - self.k_o) ** 2).sum() / self.kept_distance)}

    def scale_for(self, share: float, low: float = 1e-3, high: float = 1e4, steps: int = 40) -> float:
        """The per-token scale at which the erased share is ``share`` (bisection in log scale;
        the share falls as the scale grows), clamped to [low, high]."""
        for _ in range(steps):
            mid = (low * high) ** 0.5
            low, high = (mid, high) if self.at(mid)["erased"] > share else (low, mid)
        return (low * high) ** 0.5


def tuned_scales(path: Path) -> dict[int, float]:
    """Size -> the MACE scale a per-token bench_erasure_quality.py run reported there."""
    data = json.loads(path.read_text())
    if data.get("mace_options", {}).get("preserve_scale_mode") != "per_token":
        raise SystemExit(f"{path}: not a per-token run (mace_options has no preserve_scale_mode=per_token)")
    return {r["concepts"]: r["scale"] for r in data["rows"] if r["method"] == "mace"}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, (world, entry) in enumerate(results.items()):
        colour = f"C{k}"
        sizes = [s["concepts"] for s in entry["sizes"]]
        fixed = entry["one_setting"]
        ax.plot(sizes, [next(r["erased"] for r in s["rows"] if r["scale"] == fixed) for s in entry["sizes"]],
                "--", color=colour, marker="o", label=f"{world}: {fixed:g} (tuned at 10) at every size")
        tuned = [(s["concepts"], s["erased_at_tuned"]) for s in entry["sizes"] if s.get("erased_at_tuned") is not None]
        if tuned:
            ax.plot(*zip(*tuned, strict=True), "-", color=colour, marker="s", label=f"{world}: tuned per size")
    ax.set_xscale("log")
    ax.set_xlabel("erased concepts")
    ax.set_ylabel("share of the erased prompts' change made by stage 1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Refinement's erasure at a fixed and at the tuned per-token scale", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="world,world-large,world-identity-pilot")
    parser.add_argument("--sizes", default="3,10,30,100", help="numbers of erased concepts (capped by each pool)")
    parser.add_argument("--scales", default="1,3.333333,10,30,100", help="per-token preservation scales")
    parser.add_argument("--one-setting", type=float, default=10.0,
                        help="the fixed scale the plot follows where --tuned gives no scale tuned at 10 erased")
    parser.add_argument("--tuned", action="append", default=[], metavar="WORLD=FILE",
                        help="a per-token bench_erasure_quality.py JSON of that world (its tuned scales)")
    parser.add_argument("--out", type=Path, default=RESULTS / "preservation_balance-cpu.json")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)

    import mace
    from mace.world import get_world

    base = protocol_config()
    grid = [float(s) for s in args.scales.split(",")]
    tuned_files = dict(t.split("=", 1) for t in args.tuned)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.worlds.split(","):
            world = get_world(key)
            split = split_concepts(world, *default_kept(world))
            tuned = tuned_scales(Path(tuned_files[key])) if key in tuned_files else {}
            pipe = mace.load_pipeline(world.model)
            names = [c.name for c in world.concepts]
            kept = [names[c] for c in split.report_kept]
            one_setting = tuned.get(10, args.one_setting)  # the protocol's one setting: the scale tuned at 10
            scales = grid + ([one_setting] if one_setting not in grid else [])
            # The calibration's target: the erased share of the one setting on the tuning sets at 10
            # erased (where it was chosen); every size then gets the scale that makes that share.
            tuning = RefinementProbe(pipe, [names[c] for c in split.erased(10, "tuning")],
                                     [names[c] for c in split.tuning_kept], base, Path(tmp) / f"{key}-tuning.safetensors")
            target = tuning.at(one_setting)["erased"]
            entry = {"model": world.model, "one_setting": one_setting, "tuned_from": tuned_files.get(key),
                     "report_kept": len(kept), "target_share": target, "sizes": []}
            for n in [int(s) for s in args.sizes.split(",")]:
                if n > len(split.erase_pool):
                    print(f"{key}: {n} erased does not fit its erase pool of {len(split.erase_pool)}; left out")
                    continue
                size_scales = scales + ([tuned[n]] if n in tuned and tuned[n] not in scales else [])
                probe = RefinementProbe(pipe, [names[c] for c in split.erased(n, "report")], kept, base,
                                        Path(tmp) / f"{key}.safetensors")
                rows = [probe.at(scale) for scale in size_scales]
                size = {"concepts": n, "rows": rows, "calibrated_scale": probe.scale_for(target)}
                if n in tuned:
                    at = next(r for r in rows if r["scale"] == tuned[n])
                    size.update(tuned_scale=tuned[n], erased_at_tuned=at["erased"], kept_at_tuned=at["kept"])
                entry["sizes"].append(size)
                cells = "  ".join(f"{r['scale']:g}: {r['erased']:.2f}/{r['kept']:.3f}" for r in rows)
                mark = (f"  tuned {tuned[n]:g}: {size['erased_at_tuned']:.2f}/{size['kept_at_tuned']:.3f}"
                        if n in tuned else "")
                print(f"{key:22s} {n:4d} erased  scale: erased/kept  {cells}{mark}  "
                      f"calibrated to {target:.2f}: {size['calibrated_scale']:.3g}", flush=True)
            results[key] = entry
    write_json_atomically(args.out, {"command": command_line(__file__, argv), "seed": base.seed, "lamb": base.lamb,
                                     "aug_length": base.aug_length, "prompt_len": base.prompt_len, "scales": grid,
                                     "worlds": results})
    if args.plot:
        plot(results, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
