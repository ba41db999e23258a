"""The benchmark scripts run (tiny shapes) and write the JSON their tables come from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, tmp_path):
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600,
                   env={**os.environ, "TRITON_INTERPRET": "0"})
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_erasure_quality_resumes_only_under_the_same_settings(tmp_path):
    out = tmp_path / "result.json"
    quick = ["--sizes", "1", "--methods", "none,uce", "--images-per-concept", "1", "--tuning-images-per-concept", "1",
             "--grid", "2", "--extend", "0", "--background-images", "1", "--steps", "3", "--attacks", "", "--out", str(out)]

    def bench(*extra):
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_erasure_quality.py"), *quick, *extra],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})

    first = bench()
    assert first.returncode == 0, first.stderr
    measured = json.loads(out.read_text())
    assert [r["method"] for r in measured["rows"]] == ["none", "uce"] and len(measured["tuning"]) == 2
    # The same settings: every trial and row is reused as measured (timings included), nothing re-run.
    again = bench()
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout and "(resumed)" in again.stdout
    resumed = json.loads(out.read_text())
    assert resumed["rows"] == measured["rows"] and resumed["tuning"] == measured["tuning"]
    assert resumed["settings"] == measured["settings"] and resumed["complete"] is True
    # The file names the command that made it, once however often it was rerun (with_command).
    assert resumed["commands"] == measured["commands"] and len(measured["commands"]) == 1
    assert measured["commands"][0].startswith("python benchmarks/bench_erasure_quality.py --sizes 1 --methods none,uce")
    # Other settings: a one-line error naming the file and the setting; the results stay as they were.
    other = bench("--steps", "4")
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert other.stderr.strip().count("\n") == 0 and str(out) in other.stderr and "steps differs" in other.stderr
    assert json.loads(out.read_text()) == resumed


def test_a_results_file_lists_each_command_that_ran_on_it_once():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_erasure_quality import with_command
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert with_command([], "a") == ["a"]
    assert with_command(["a", "b"], "c") == ["a", "b", "c"]
    assert with_command(["a", "b", "c"], "a") == ["b", "c", "a"]


@pytest.mark.slow
def test_bench_kernels_smoke(tmp_path):
    data = _run("bench_kernels.py", "--smoke", "--repeats", "1", "--budget", "0", tmp_path=tmp_path)
    ops = {row["op"] for row in data["rows"]}
    assert ops == {"token_covariance", "spd_solve", "closed_form_edit", "fuse_loras", "lora_apply fwd", "lora_apply fwd+bwd"}
    assert {row["backend"] for row in data["rows"]} == {"torch", "cpp"}
    # Each row's speedup is the torch reference's time on the same problem and dtype over its own.
    reference = {(r["op"], r["problem"], r["dtype"]): r["ms"] for r in data["rows"] if r["backend"] == "torch"}
    for row in data["rows"]:
        assert row["ms"] > 0
        assert row["speedup"] == pytest.approx(reference[row["op"], row["problem"], row["dtype"]] / row["ms"], rel=1e-6)


@pytest.mark.slow
def test_bench_closed_form_smoke(tmp_path):
    data = _run("bench_closed_form.py", "--smoke", "--concepts", "3", tmp_path=tmp_path)
    fast_vs_ref = [r for r in data["rows"] if r["dtype"] == "float32"]
    assert [(r["stage"], r["concepts"]) for r in fast_vs_ref] == [("refine", 3), ("fuse", 3)]
    for r in fast_vs_ref:  # the speedup is the reference's time over the fast path's
        assert r["speedup"] == pytest.approx(r["reference"]["seconds"] / r["fast"]["seconds"], rel=1e-6)
    assert all(r["fast"]["peak_rss_mb"] > 0 for r in data["rows"])


@pytest.mark.slow
def test_bench_erasure_quality_smoke(tmp_path):
    data = _run("bench_erasure_quality.py", "--sizes", "1", "--methods", "none,uce,mace,speed,rece", "--images-per-concept", "1",
                "--tuning-images-per-concept", "1", "--grid", "2", "--extend", "0", "--background-images", "1", "--steps", "4",
                "--lora-steps", "2", "--plot", str(tmp_path / "quality.png"), "--attacks", "text,soft", "--text-budget", "3",
                "--soft-budget", "2", "--attack-images", "1", "--attack-seeds", "2", tmp_path=tmp_path)
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"none", "uce", "mace", "speed", "rece"}
    # Every reported model is attacked with the stated budgets; a concept its plain prompt already
    # shows counts as found by every attack.
    assert [(a["name"], a["budget"]) for a in data["attacks"]["settings"]] == [("text", 3), ("soft", 2)]
    for r in rows.values():
        assert r["attacked"] == 1 and 0 <= r["asr_plain"] <= min(r["asr_text"], r["asr_soft"]) <= 1, r
        for key in ("asr_plain", "asr_text", "asr_soft"):  # the mean over the seeds, each listed
            assert len(r[f"{key}_seeds"]) == 2 and r[key] == pytest.approx(sum(r[f"{key}_seeds"]) / 2, abs=1e-4)
    assert data["settings"]["attack_seeds"] == 2 and "attack_control" not in data  # no held-out identities here
    assert len(data["tuning_kept"]) == 10 and len(data["report_kept"]) == 10
    assert set(data["tuning_kept"]).isdisjoint(data["report_kept"]) and data["erase_sets_disjoint"] == {"1": True}
    # The same search for each edited method: two scales tried on the tuning sets, the best one reported.
    for method in ("uce", "mace", "speed", "rece"):
        trials = [t for t in data["tuning"] if t["method"] == method]
        assert len(trials) == 2 and rows[method]["scale"] == max(trials, key=lambda t: (t["h_o"], t["acc_s"], t["acc_e"]))["scale"]
    # Each method's grid: factor-3 steps around its default (SPEED: the null-space threshold).
    assert sorted(t["scale"] for t in data["tuning"] if t["method"] == "speed") == [0.1, 0.3]
    assert sorted(t["scale"] for t in data["tuning"] if t["method"] == "rece") == [0.1, 0.3]
    assert data["complete"] is True
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rows["none"]["shift"] == pytest.approx(0.0, abs=1e-6)  # the unedited model against itself
    assert rows["uce"]["shift"] > 0 and rows["mace"]["edit_seconds"] > 0
    assert rows["speed"]["shift"] > 0 and rows["rece"]["shift"] > 0  # both edit the model
    assert all(0 <= r[k] <= 1 for r in rows.values() for k in ("acc_e", "acc_g", "acc_s", "h_o"))


def test_concept_geometry_fit_finds_an_additive_code_and_only_that():
    """bench_concept_geometry's fit: an erased concept whose embedding is the sum of its shape's and
    its colouring's parts is predicted from the other concepts (R^2 near 1), the prediction is a
    combination of kept rows only, and embeddings with no such code get R^2 near or below 0."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_concept_geometry import additive_prediction, additive_r2
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    g = torch.Generator().manual_seed(0)
    shapes, colours = [f"s{i % 7}" for i in range(70)], [f"c{i // 7}" for i in range(70)]
    part_s, part_c = torch.randn(7, 16, generator=g, dtype=torch.float64), torch.randn(10, 16, generator=g, dtype=torch.float64)
    noise = 0.05 * torch.randn(70, 16, generator=g, dtype=torch.float64)
    additive = torch.stack([part_s[i % 7] + part_c[i // 7] for i in range(70)]) + noise
    erased = [3, 18, 40, 66]
    assert additive_r2(additive, [shapes, colours], erased) > 0.99
    unrelated = torch.randn(70, 16, generator=g, dtype=torch.float64)
    assert additive_r2(unrelated, [shapes, colours], erased) < 0.1
    # Changing the erased rows changes nothing in their prediction: it is made of kept rows only.
    changed = additive.clone()
    changed[erased] += 100.0
    assert torch.allclose(additive_prediction(changed, [shapes, colours], erased),
                          additive_prediction(additive, [shapes, colours], erased))
    # (N, positions, d) tensors are predicted position by position.
    stacked = torch.stack([additive, unrelated], dim=1)
    assert torch.allclose(additive_prediction(stacked, [shapes, colours], erased)[:, 0],
                          additive_prediction(additive, [shapes, colours], erased))


def test_concept_geometry_counts_the_fit_parts_and_shuffles_attributes_together():
    """The fit has one column for mu and one per attribute level (so the small world at 100 erased,
    20 kept for 23 parts, is underdetermined and skipped), and the control permutes a concept's
    attributes together, keeping every level's count."""
    import random

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_concept_geometry import fit_parts, shuffled
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from mace.world import get_world

    world = get_world("world")
    factors = [[c.shape for c in world.concepts], [c.colour for c in world.concepts]]
    assert fit_parts(factors) == 1 + 12 + 10 == 23
    assert world.num_concepts - 100 < fit_parts(factors) < world.num_concepts - 10
    control = shuffled(factors, random.Random(0))
    assert control != factors and all(sorted(a) == sorted(b) for a, b in zip(control, factors, strict=True))
    pairs = set(zip(*factors, strict=True))
    assert set(zip(*control, strict=True)) <= pairs and len(set(zip(*control, strict=True))) == len(pairs)


def test_concept_geometry_reproduces_the_committed_fits_and_names_its_command(tmp_path):
    """The bench run end to end on builtin:world at 10 erased gives the R^2 of its committed
    results file (the fit is deterministic), and the file names the command that made it."""
    data = _run("bench_concept_geometry.py", "--worlds", "world", "--sizes", "10", "--shuffles", "1", tmp_path=tmp_path)
    committed = json.loads((ROOT / "benchmarks" / "results" / "concept_geometry-world.json").read_text())
    key = ("world", "erased", "template", "position", "factors")
    reference = {tuple(r[k] for k in key): r["r2"] for r in committed["rows"]}
    assert len(data["rows"]) == 4 and all(r["r2"] > 0.8 > 0 > r["r2_shuffled"] for r in data["rows"])
    assert all(abs(r["r2"] - reference[tuple(r[k] for k in key)]) < 2e-3 for r in data["rows"])
    assert data["command"].startswith("python benchmarks/bench_concept_geometry.py --worlds world --sizes 10")


@pytest.mark.slow
def test_bench_erasure_quality_attacks_never_learned_identities_as_a_control(tmp_path):
    from mace.world import IDENTITY_PILOT

    data = _run("bench_erasure_quality.py", "--world", "world-identity-pilot", "--sizes", "1", "--methods", "none",
                "--images-per-concept", "1", "--tuning-images-per-concept", "1", "--background-images", "1", "--steps", "4",
                "--attacks", "text,soft", "--text-budget", "2", "--soft-budget", "2", "--attack-images", "1",
                "--attack-concepts", "3", "--attack-seeds", "1", tmp_path=tmp_path)
    control = data["attack_control"]
    # The first held-out identities, attacked on the unedited model; one seed: no per-seed lists.
    assert control["model"] == "unedited" and control["attacked"] == 3 and "asr_text_seeds" not in control
    assert 0 <= control["asr_plain"] <= min(control["asr_text"], control["asr_soft"]) <= 1
    assert len(IDENTITY_PILOT.held_out) >= 3 and "attack_seeds" not in data["settings"]


def test_preservation_balance_trades_the_erased_share_against_the_kept_change(tmp_path):
    """bench_preservation_balance on builtin:world: stronger per-token preservation makes the
    refinement carry out less of the erased prompts' change and move the kept concepts less, and
    without preservation it carries out most of it; more erased concepts at one scale lower the
    share (what the benchmark documents). A run measured under absolute scales is refused."""
    import mace
    from mace.world import WORLD

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_erasure_quality import default_kept, protocol_config, split_concepts
        from bench_preservation_balance import RefinementProbe, tuned_scales
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    pipe = mace.load_pipeline(WORLD.model)
    split = split_concepts(WORLD, *default_kept(WORLD))
    names = [c.name for c in WORLD.concepts]
    kept = [names[c] for c in split.report_kept]
    cache = tmp_path / "keep.safetensors"
    base = protocol_config()
    probe = RefinementProbe(pipe, [names[c] for c in split.erased(3, "report")], kept, base, cache)
    rows = [probe.at(scale) for scale in (0.0, 1.0, 10.0, 100.0)]
    erased, moved = [r["erased"] for r in rows], [r["kept"] for r in rows]
    assert erased[0] > 0.6 and all(a > b for a, b in zip(erased, erased[1:], strict=False))
    assert all(a > b for a, b in zip(moved, moved[1:], strict=False)) and moved[-1] < 0.01
    more = RefinementProbe(pipe, [names[c] for c in split.erased(30, "report")], kept, base, cache)
    assert more.at(10.0)["erased"] < rows[2]["erased"] - 0.05
    # Calibration finds the scale that gives the larger set the smaller set's share at 10.
    scale = more.scale_for(rows[2]["erased"])
    assert scale < 10.0 and more.at(scale)["erased"] == pytest.approx(rows[2]["erased"], abs=1e-3)
    absolute = tmp_path / "absolute.json"
    absolute.write_text(json.dumps({"mace_options": {"use_pooler": False}, "rows": []}))
    with pytest.raises(SystemExit, match="not a per-token run"):
        tuned_scales(absolute)


def test_count_exponent_scales_the_one_setting_by_the_count_and_needs_one_grid_point():
    """--count-exponent: the centre at 10 erased, times (10 / n) ** exponent elsewhere (the values
    the committed count-law rows used), and refused with a scale search."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_erasure_quality import count_law_scale, main
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert count_law_scale(10.0, 10, 0.5) == 10.0
    assert count_law_scale(10.0, 100, 0.5) == pytest.approx(3.162278)
    assert count_law_scale(30.0, 50, 0.5) == pytest.approx(13.416408)
    assert count_law_scale(10.0, 3, 0.0) == 10.0
    with pytest.raises(SystemExit) as stop:
        main(["--world", "world", "--sizes", "3", "--count-exponent", "0.5"])
    assert stop.value.code == 2


def test_the_benchmarks_start_from_the_shipped_config_without_its_count_law():
    """The protocol's scales are per-token scales at the size they are used at: the benchmarks'
    base config is configs/world_erase.yaml with preserve_count_exponent 0, so the shipped
    config's count law never divides a scale the benchmark chose."""
    from mace.config import load_config

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_erasure_quality import CONFIG, protocol_config
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    shipped, base = load_config(CONFIG, check_paths=False), protocol_config()
    assert shipped.preserve_count_exponent == 0.5 and shipped.preserve_count_factor < 1
    assert base.preserve_count_exponent == 0.0 and base.preserve_count_factor == 1.0
    assert base.preserve_per_token and base.train_preserve_scale == shipped.train_preserve_scale
