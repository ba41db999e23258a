"""`mace cache` and `mace erase` over two processes (torchrun, gloo): the same results as one
process, and a run killed on one rank resumes where it stopped."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mace
from mace import distributed
from mace.closed_form import LoraStack, fuse_weights_streamed, refine_weights_streamed
from mace.config import load_config
from mace.erase import erase
from mace.stages.lora_training import FINGERPRINT_FILE, lora_dir

# Four glyph-world concepts: two per rank. The preservation cache names two others.
CONCEPTS = ["Qedark Draerba", "Syrdy Salsterk", "Wathdas Zyrkpi", "Sirkly Klanklilfy"]
KEPT = ["Rimzhyl Drixprethdryx", "Klisqe Gralbrothdael"]
KEEP_PROMPTS = [f"a {kind} of {name}" for name in KEPT for kind in ("photo", "drawing", "picture")]
STAGES = "prepare,refine,train,fuse"
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"

# Two `mace` commands, separated by "--", in each process torchrun starts (one start-up for both).
TWO_COMMANDS = """
import sys
from mace.cli import main
at = sys.argv.index("--")
sys.exit(main(sys.argv[1:at]) or main(sys.argv[at + 1:]))
"""

# `mace erase` whose rank 1 is killed (SIGKILL) right after it saved its first concept's LoRA.
KILLED_ON_RANK_1 = """
import os, signal, sys
import mace.stages.lora_training as training
from mace.cli import main

write = training.write_json_atomically

def write_then_die(path, payload):
    write(path, payload)
    if os.environ["RANK"] == "1":  # the fingerprint is written last: this concept is complete
        os.kill(os.getpid(), signal.SIGKILL)

training.write_json_atomically = write_then_die
sys.exit(main(sys.argv[1:]))
"""


def _config(path, root, **changes):
    body = {
        "multi_concept": [[[name, "object"] for name in CONCEPTS]], "mapping_concept": ["a glyph"] * len(CONCEPTS),
        "pretrained_model_name_or_path": "builtin:world", "lamb": 0.1, "domain_preservation_cache_path": None,
        "preserve_weight": 1.0, "train_preserve_scale": 2.0, "fuse_preserve_scale": 2.0, "aug_length": 3, "prompt_len": 30,
        "rank": 1, "learning_rate": 1e-2, "max_train_steps": 2, "train_batch_size": 1, "concepts_per_batch": 2,
        "num_images_per_concept": 2, "generation_steps": 2, "guidance_scale": 4.0, "sample_batch_size": 2,
        "input_data_dir": str(root / "data"), "output_dir": str(root), "final_save_path": str(root / "final"), "seed": 0,
    }
    body.update(changes)
    path.write_text(yaml.safe_dump({"MACE": body}))
    return path


def _torchrun(tmp_path, *args) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node 2`` (standalone: a free port) on 2 CPU processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def _close(got: dict, want: dict, rel: float = 1e-3) -> None:
    """Every tensor within ``rel`` of its reference, in Frobenius norm: the ranks sum the
    statistics in another order and run the UNet on other batches, so the results differ by
    rounding only (amplified by LoRA training, see LORA_REL)."""
    assert got.keys() == want.keys()
    for key in want:
        error, size = float((got[key].double() - want[key].double()).norm()), float(want[key].double().norm())
        assert error <= rel * size, f"{key}: relative difference {error / size if size else error:.2e} > {rel:.0e}"


# AdamW divides each update by the gradient's own magnitude, so a LoRA element whose gradient
# is near zero turns rounding differences into larger ones. How large depends on the CPU: the
# UNet's float32 kernels round differently for a batch of one concept and of two (oneDNN and
# BLAS pick their blocking by shape and instruction set), and the ranks batch other concepts
# together than one process does. Measured in norm: LoRAs up to 5e-5 on one machine and
# 2.7e-3 on another, the fused model 2e-6 and 1.7e-4; the refined model 1e-9 on both.
LORA_REL = 1e-2


def _lora(root, name):
    return load_file(str(lora_dir(root, name) / LORA_FILE))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process (no torchrun): the cache, then prepare, refine, train and fuse."""
    root = tmp_path_factory.mktemp("one")
    keep = root / "keep.txt"
    keep.write_text("\n".join(KEEP_PROMPTS) + "\n")
    cache = mace.build_preservation_cache(mace.load_pipeline("builtin:world"), KEEP_PROMPTS, root / "keep.safetensors",
                                          batch_size=2, progress=False)
    config = _config(root / "erase.yaml", root / "out", domain_preservation_cache_path=str(root / "keep.safetensors"))
    # One thread, as each torchrun rank has (OMP_NUM_THREADS=1): the images are then compared byte for byte.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = erase(load_config(config), tuple(STAGES.split(",")), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert not torch.distributed.is_initialized()  # a single process never starts torch.distributed
    return root, cache, summary


def test_two_processes_give_the_weights_of_one(reference, tmp_path):
    one, cache, single = reference
    script = tmp_path / "two_commands.py"
    script.write_text(TWO_COMMANDS)
    two = tmp_path / "two"
    # The erasure preserves with the reference's cache file: its bytes enter every fingerprint.
    config = _config(tmp_path / "erase.yaml", two, domain_preservation_cache_path=str(one / "keep.safetensors"))
    run = _torchrun(tmp_path, script, "cache", "--model", "builtin:world", "--prompts", one / "keep.txt",
                    "--out", tmp_path / "keep.safetensors", "--batch-size", "2", "--",
                    "erase", config, "--stages", STAGES, "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]

    # mace cache: each rank summed its share of the prompts, rank 0 wrote the sum.
    built = mace.load_preservation_cache(tmp_path / "keep.safetensors")
    assert (built.prompts, built.tokens, built.prompts_sha256) == (cache.prompts, cache.tokens, cache.prompts_sha256)
    torch.testing.assert_close(built.cov, cache.cov, rtol=1e-6, atol=1e-6 * float(cache.cov.abs().max()))
    assert not list(tmp_path.glob("keep.safetensors*.partial"))  # the ranks' partial files are gone

    # mace erase: each rank generated two concepts' images, the same as one process.
    images = sorted(p.relative_to(one / "out" / "data") for p in (one / "out" / "data").rglob("*.png"))
    assert len(images) == 2 * 2 * len(CONCEPTS)  # 2 images and 2 masks a concept
    assert all((two / "data" / p).read_bytes() == (one / "out" / "data" / p).read_bytes() for p in images)
    # The refined model (statistics summed over ranks), each rank's LoRAs and the fused model.
    _close(load_file(str(two / "refined" / UNET_FILE)), load_file(str(one / "out" / "refined" / UNET_FILE)), 1e-6)
    _close(load_file(str(two / "final" / UNET_FILE)), load_file(str(one / "out" / "final" / UNET_FILE)))
    for name in CONCEPTS:
        _close(_lora(two, name), _lora(one / "out", name), LORA_REL)
    # The fusion moved the weights far more than the tolerance (the comparison is not vacuous).
    refined, final = load_file(str(one / "out" / "refined" / UNET_FILE)), load_file(str(one / "out" / "final" / UNET_FILE))
    moved = max(float((final[k] - refined[k]).norm() / refined[k].norm()) for k in final if refined[k].norm() > 0)
    assert moved > 100 * 1e-3, moved  # measured 0.39

    # Rank 0 alone printed each command's summary, which covers every rank's work.
    assert len([line for line in run.stdout.splitlines() if line.startswith("cache ")]) == 1, run.stdout
    lines = [line for line in run.stdout.splitlines() if line.startswith("erased 4 concept(s)")]
    assert len(lines) == 1 and "8 image(s)" in lines[0] and "4 LoRA(s)" in lines[0] and "final model" in lines[0], run.stdout
    # One process finds everything done: same fingerprints, the state file complete.
    again = erase(load_config(config), tuple(STAGES.split(",")), progress=False)
    assert again.skipped == ["prepare", "refine", "train", "fuse"] and again.trained == {}


def test_a_rank_killed_after_its_first_lora_resumes_there(reference, tmp_path):
    one, _, _ = reference
    out = tmp_path / "out"
    # One concept per batch, so that rank 1 saves its first LoRA before the second; the
    # images are the reference's (prepare finds them complete).
    config = _config(tmp_path / "erase.yaml", out, concepts_per_batch=1, input_data_dir=str(one / "out" / "data"),
                     domain_preservation_cache_path=str(one / "keep.safetensors"))
    script = tmp_path / "killed.py"
    script.write_text(KILLED_ON_RANK_1)
    killed = _torchrun(tmp_path, script, "erase", config, "--stages", STAGES, "--quiet")
    assert killed.returncode != 0, killed.stdout
    complete = {name for name in CONCEPTS if (lora_dir(out, name) / FINGERPRINT_FILE).exists()}
    # Rank 1 (concepts 3 and 4) finished its first concept only; rank 0 was stopped anywhere in its two.
    assert CONCEPTS[2] in complete and CONCEPTS[3] not in complete, complete
    assert not (out / "final").exists()
    stamps = {name: os.stat(lora_dir(out, name) / LORA_FILE).st_mtime_ns for name in complete}
    refined_stamp = os.stat(out / "refined" / UNET_FILE).st_mtime_ns

    resumed = _torchrun(tmp_path, "-m", "mace", "erase", config, "--stages", STAGES, "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    line = resumed.stdout.splitlines()[0]
    assert "already done: prepare, refine" in line and f"{len(CONCEPTS) - len(complete)} LoRA(s)" in line, line
    # Nothing finished was redone: the refined model and the complete LoRAs are the same files.
    assert os.stat(out / "refined" / UNET_FILE).st_mtime_ns == refined_stamp
    assert {name: os.stat(lora_dir(out, name) / LORA_FILE).st_mtime_ns for name in complete} == stamps
    # And the result is the uninterrupted one-process run's.
    _close(load_file(str(out / "final" / UNET_FILE)), load_file(str(one / "out" / "final" / UNET_FILE)))
    for name in CONCEPTS:
        _close(_lora(out, name), _lora(one / "out", name), LORA_REL)


# ----------------------------------------------------------------------------- helpers, in one process


def test_shards_cover_every_item_once_in_order(monkeypatch):
    items = list(range(11))
    assert distributed.shard(items) == items  # a single process: everything
    shards = []
    for size in (2, 3, 4, 16):
        monkeypatch.setattr(distributed, "is_distributed", lambda: True)
        monkeypatch.setattr(distributed, "world_size", lambda size=size: size)
        shards = []
        for r in range(size):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            shards.append(distributed.shard(items))
        assert [x for part in shards for x in part] == items
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def _as_two_ranks(solve, batches_0, batches_1):
    """``solve(batches, combine)`` as two ranks: rank 1 hands its sums over (as all_reduce
    would) and does not solve; rank 0 adds them to its own and solves."""
    handed = []

    def combine_1(stats):
        stats.reduce_sums(lambda t: handed.append(t.clone()) or t)
        return False

    def combine_0(stats):
        received = iter(handed)
        stats.reduce_sums(lambda t: t + next(received).to(t.dtype))
        return True

    weights_1, _ = solve(batches_1, combine_1)
    new, report = solve(batches_0, combine_0)
    return new, report, weights_1


@pytest.mark.parametrize("method", ["fast", "reference"])
@pytest.mark.parametrize("split", ["halves", "rank 1 has nothing", "rank 0 has nothing"])
def test_statistics_summed_over_ranks_equal_one_process(method, split):
    g = torch.Generator().manual_seed(7)
    d, outs = 24, [16, 40, 8]
    weights = [torch.randn(o, d, generator=g, dtype=torch.float64) / d**0.5 for o in outs]
    P = torch.randn(100, d, generator=g, dtype=torch.float64)
    P = P.T @ P
    kw = dict(lam=0.1, preserve=P, preserve_scale=0.5, method=method)
    # Refinement: aligned token batches.
    pairs = [(torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64))
             for n in (30, 7, 50, 12)]
    # Fusion: (concept, tokens) batches of three concepts.
    loras = LoraStack([torch.randn(3, 2, d, generator=g, dtype=torch.float64) for _ in outs],
                      [torch.randn(3, o, 2, generator=g, dtype=torch.float64) / 4 for o in outs])
    units = [(i, torch.randn(n, d, generator=g, dtype=torch.float64)) for i, n in ((0, 40), (1, 9), (2, 25), (0, 6), (2, 3))]
    cut = {"halves": slice(0, 2), "rank 1 has nothing": slice(0, None), "rank 0 has nothing": slice(0, 0)}[split]
    rest = {"halves": slice(2, None), "rank 1 has nothing": slice(0, 0), "rank 0 has nothing": slice(0, None)}[split]

    def refine(batches, combine=None):
        return refine_weights_streamed(weights, batches, combine=combine, **kw)

    def fuse(batches, combine=None):
        return fuse_weights_streamed(weights, loras, batches, original=[w * 0.9 for w in weights], combine=combine, **kw)

    for solve, batches in ((refine, pairs), (fuse, units)):
        want, want_report = solve(batches)
        got, report, untouched = _as_two_ranks(solve, batches[cut], batches[rest])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert report.tokens == want_report.tokens
        assert all(torch.equal(a, b) for a, b in zip(untouched, weights, strict=True))  # the rank that does not solve


def test_a_cache_rank_checkpoints_and_resumes_its_own_share(tiny_pipe, tmp_path, monkeypatch):
    """Rank 1 of 2 (simulated in this process): it encodes the second half of the prompts,
    checkpoints them to a partial file of its own and resumes from it after an interruption."""
    import mace.stages.cache as cache_mod

    prompts = [f"a photo of a cat number {i}" for i in range(14)]
    for name, value in (("is_distributed", lambda: True), ("rank", lambda: 1), ("world_size", lambda: 2),
                        ("all_reduce_sum", lambda t: t), ("sum_over_ranks", lambda n: n), ("on_main", lambda fn: None)):
        monkeypatch.setattr(distributed, name, value)
    real, calls = cache_mod.encode_prompts, []

    def interrupted(pipe, batch, batch_size=64):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(pipe, batch, batch_size)

    out = tmp_path / "c.safetensors"
    monkeypatch.setattr(cache_mod, "encode_prompts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mace.build_preservation_cache(tiny_pipe, prompts, out, batch_size=2, checkpoint_every=1, progress=False)
    partial = tmp_path / "c.safetensors.rank1-of-2.partial"
    assert mace.load_preservation_cache(partial, allow_partial=True).prompts == 4  # 2 of its 4 batches
    calls.clear()
    monkeypatch.setattr(cache_mod, "encode_prompts", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    share = mace.build_preservation_cache(tiny_pipe, prompts, out, batch_size=2, checkpoint_every=1, progress=False)
    assert calls == [2, 1]  # only the prompts after its checkpoint
    emb = real(tiny_pipe, prompts[7:]).reshape(-1, 64).double()  # rank 1's share: the last 7 prompts
    torch.testing.assert_close(share.cov, emb.T @ emb, rtol=1e-5, atol=1e-3)
    # All prompts counted; the tokens are rank 1's own here (the sum over ranks is simulated as identity).
    assert (share.prompts, share.tokens) == (len(prompts), 7 * 77)
    assert not partial.exists() and not out.exists()  # rank 0 writes the cache
