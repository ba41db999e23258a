"""docs/results.md and the README's headline block are generated from benchmarks/results/*.json
(benchmarks/make_results_doc.py): the committed documents must be what the committed results
generate, a changed number must change them, and a result no renderer reads must be listed."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("make_results_doc", ROOT / "benchmarks" / "make_results_doc.py")
make_results_doc = importlib.util.module_from_spec(SPEC)
sys.modules["make_results_doc"] = make_results_doc  # dataclasses look their module up there
SPEC.loader.exec_module(make_results_doc)

# What the generator reads and writes, relative to the repository root.
INPUTS = ["benchmarks/results", "mace/world", "docs/results.md", "README.md"]


def tracked_files() -> list[str] | None:
    """The files git tracks under INPUTS (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *INPUTS], cwd=ROOT, capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return [f for f in out.stdout.decode().split("\0") if f]


def test_committed_documents_are_what_the_committed_results_generate(tmp_path):
    # Only tracked files count, so a result still being measured (untracked) does not fail the suite
    # before it is committed; on a fresh clone (CI) this is exactly `make_results_doc.py --check`.
    files = tracked_files()
    if files is None:
        assert make_results_doc.main(["--check"]) == 0, "run python benchmarks/make_results_doc.py"
        return
    for name in files:
        if (ROOT / name).is_file() and (name.endswith((".json", ".png", ".md")) or name == "README.md"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, tmp_path / name)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (tmp_path / "mace" / "world").mkdir(parents=True, exist_ok=True)
    args = ["--results", str(tmp_path / "benchmarks" / "results"), "--doc", str(tmp_path / "docs" / "results.md"),
            "--readme", str(tmp_path / "README.md"), "--worlds", str(tmp_path / "mace" / "world"), "--check"]
    assert make_results_doc.main(args) == 0, "docs/results.md or README.md is stale: run python benchmarks/make_results_doc.py"


LORA_TRAINING = {"model": "builtin:tiny", "concepts": 8, "steps": 10, "speedup": 1.25,
                 "results": {"batched": {"seconds": 9.9, "concept_steps_per_s": 8.06},
                             "one at a time": {"seconds": 11.2, "concept_steps_per_s": 7.16}}}


def generate(tmp_path: Path, results: dict[str, dict]) -> tuple[str, str]:
    folder = tmp_path / "results"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name, data in results.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{make_results_doc.BEGIN}\nold\n{make_results_doc.END}\n\nrest\n")
    outputs = make_results_doc.generate(folder, tmp_path / "docs" / "results.md", readme, tmp_path / "no-worlds")
    return outputs[tmp_path / "docs" / "results.md"], outputs[readme]


def test_a_changed_number_changes_the_document(tmp_path):
    doc, readme = generate(tmp_path, {"lora_training-cpu-2cores": LORA_TRAINING})
    assert "| batched | 9.9 | 8.06 |" in doc and "1.25x" in doc
    assert readme.startswith("# x\n\n") and readme.endswith("\n\nrest\n") and "\nold\n" not in readme
    changed = json.loads(json.dumps(LORA_TRAINING))
    changed["results"]["batched"]["seconds"] = 4.2
    doc2, _ = generate(tmp_path, {"lora_training-cpu-2cores": changed})
    assert doc2 != doc and "| batched | 4.2 | 8.06 |" in doc2


def test_a_file_made_by_several_runs_shows_each_command_in_order(tmp_path):
    runs = ["python benchmarks/bench_lora_training.py --concepts 8", "python benchmarks/bench_lora_training.py --steps 10"]
    doc, _ = generate(tmp_path, {"lora_training-cpu-2cores": {**LORA_TRAINING, "commands": runs}})
    assert f"    {runs[0]}\n    {runs[1]}\n\nJSON:" in doc
    doc, _ = generate(tmp_path, {"lora_training-cpu-2cores": {**LORA_TRAINING, "command": runs[1]}})
    assert f"    {runs[1]}\n\nJSON:" in doc and runs[0] not in doc


def test_results_without_a_renderer_are_listed_by_name(tmp_path, capsys):
    doc, _ = generate(tmp_path, {"lora_training-cpu-2cores": LORA_TRAINING, "brand_new_bench-cpu": {"x": 1},
                                 "lora_training-odd-layout": {"rows": []}})
    listed = doc[doc.index("## Results without a renderer"):]
    assert "[brand_new_bench-cpu.json](../results/brand_new_bench-cpu.json)" in listed
    # a file of a known family in a layout its renderer does not read is listed too, never dropped
    assert "[lora_training-odd-layout.json](../results/lora_training-odd-layout.json): a layout" in doc
    err = capsys.readouterr().err
    assert "brand_new_bench-cpu.json" in err and "lora_training-odd-layout.json" in err


def test_check_names_the_stale_file(tmp_path, capsys):
    generate(tmp_path, {"lora_training-cpu-2cores": LORA_TRAINING})
    args = ["--results", str(tmp_path / "results"), "--doc", str(tmp_path / "docs" / "results.md"),
            "--readme", str(tmp_path / "README.md"), "--worlds", str(tmp_path / "no-worlds")]
    assert make_results_doc.main(args) == 0
    assert make_results_doc.main([*args, "--check"]) == 0
    (tmp_path / "docs" / "results.md").write_text("edited by hand\n")
    assert make_results_doc.main([*args, "--check"]) == 1
    assert "results.md is stale" in capsys.readouterr().err


@pytest.mark.parametrize("readme", ["# no markers\n", None])
def test_a_readme_without_the_block_is_an_error(tmp_path, readme):
    path = tmp_path / "README.md"
    if readme is not None:
        path.write_text(readme)
    with pytest.raises(SystemExit, match="README.md"):
        make_results_doc.generate(tmp_path, tmp_path / "results.md", path, tmp_path)


def test_the_attacks_control_is_rendered_beside_the_attacked_rows(tmp_path):
    row = {"concepts": 10, "method": "mace", "scale": 10.0, "edit_seconds": 30.0, "tuning_h_o": 0.9, "acc_e": 0.95,
           "acc_g": 0.05, "acc_s": 0.9, "h_o": 0.92, "h_g": 0.9, "shift": 0.1, "asr_plain": 0.0, "asr_text": 0.1,
           "asr_soft": 0.6}
    data = {"model": "builtin:world-identity", "complete": True, "settings": {"attack_seeds": 3},
            "images_per_concept": 3, "tuning_images_per_concept": 2, "steps": 20, "grid": 3, "extend": 2,
            "mace_options": {}, "attacks": {"settings": [{"name": "text", "budget": 64}, {"name": "soft", "budget": 40}],
                                            "concepts_per_model": 10, "images_per_concept": 4, "template": "a photo of {}"},
            "erase_sets_disjoint": {"10": True}, "tuning_kept": ["a"] * 10, "report_kept": ["b"] * 10,
            "tuning": [{"concepts": 10, "method": "mace", "scale": s, "acc_e": 1, "acc_g": 0, "acc_s": 0.9, "h_o": h}
                       for s, h in ((3.0, 0.8), (10.0, 0.9), (30.0, 0.85))],
            "rows": [row], "attack_control": {"model": "unedited", "asr_plain": 0.0, "asr_text": 0.0, "asr_soft": 0.4,
                                              "asr_soft_seeds": [0.3, 0.5, 0.4], "attacked": 10}}
    doc, readme = generate(tmp_path, {"erasure_quality-world-identity-pilot-attacks-cpu-2cores": data})
    assert "ASR is the mean over 3 seeds" in doc
    assert "Control: 10 held-out identities" in doc and "ASR plain 0.00, ASR text 0.00, ASR soft 0.40." in doc
    assert "10 erased, ASR text / soft: mace 0.10 / 0.60; on identities the model never learned" in readme
    assert "0.00 / 0.40." in readme


def test_the_quality_headline_shows_the_paper_count_beside_the_largest():
    rows = [{"concepts": n, "method": m, "h_o": h + n / 1000} for n in (10, 100, 300) for m, h in (("none", 0.1), ("mace", 0.5))]
    line = make_results_doc.headline_quality({"model": "builtin:w", "rows": rows, "report_kept": ["a"] * 7})
    assert "H_o at 100 erased: mace 0.600; at 300 erased: mace 0.800 (the paper: 0.898" in line and "none" not in line
    line = make_results_doc.headline_quality({"model": "builtin:w", "rows": rows[:2], "report_kept": ["a"] * 7})
    assert "H_o at 10 erased: mace 0.510 (the paper's bar" in line


def test_a_worlds_peek_readings_are_tabled_from_its_training_record(tmp_path):
    weights = tmp_path / "worlds" / "weights_identity"
    weights.mkdir(parents=True)
    (weights / "quality.json").write_text(json.dumps({"images": 10, "name_accuracy": 0.9, "alias_accuracy": 0.8}))
    readings = [{"step": s, "every": 12, "settings": {}, "concepts": 55, "name_accuracy": a, "alias_accuracy": a / 2,
                 "binding_gap": {"t300": gap, "t600": gap / 3}} for s, a, gap in ((8000, 0.0182, 0.425), (12000, 0.1091, 1.482))]
    (weights / "training-ldm.json").write_text(json.dumps({"steps": {"ldm": 13000}, "ldm_cycles": 3, "threads": 1,
                                                           "seconds": {"ldm": 600.0}, "peeks": readings}))
    (tmp_path / "results").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(f"{make_results_doc.BEGIN}\n{make_results_doc.END}\n")
    doc = make_results_doc.generate(tmp_path / "results", tmp_path / "docs" / "results.md", readme, tmp_path / "worlds")[
        tmp_path / "docs" / "results.md"]
    assert "| builtin:world-identity | ldm | 13,000 x 3 cycles | 1 | 10.0 |" in doc
    assert "| builtin:world-identity | 8,000 | 55 | 1.8% | 0.9% | +0.425 | +0.142 |" in doc
    assert "| builtin:world-identity | 12,000 | 55 | 10.9% | 5.5% | +1.482 | +0.494 |" in doc
