import pytest
import torch

import mace
import mace.cache as cache_mod
from mace.cli import main as mace_main

PROMPTS = [f"a photo of a {w} number {i}" for i in range(23) for w in ("cat",)]


def test_cache_equals_direct_statistic(tiny_pipe, tmp_path):
    cache = mace.build_preservation_cache(tiny_pipe, PROMPTS, tmp_path / "c.safetensors", batch_size=5, progress=False)
    emb = mace.encode_prompts(tiny_pipe, PROMPTS).reshape(-1, 64).double()
    torch.testing.assert_close(cache.cov, emb.T @ emb, rtol=1e-5, atol=1e-3)
    assert cache.tokens == 23 * 77 and cache.prompts == 23
    loaded = mace.load_preservation_cache(tmp_path / "c.safetensors", pipe=tiny_pipe)
    assert torch.equal(loaded.cov, cache.cov)


def test_interrupted_build_resumes_from_partial(tiny_pipe, tmp_path, monkeypatch):
    out = tmp_path / "c.safetensors"
    real = cache_mod.encode_prompts
    calls = []

    def flaky(pipe, prompts, batch_size=64):
        calls.append(len(prompts))
        if len(calls) == 4:
            raise KeyboardInterrupt  # the user stops the run mid-way
        return real(pipe, prompts, batch_size)

    monkeypatch.setattr(cache_mod, "encode_prompts", flaky)
    with pytest.raises(KeyboardInterrupt):
        mace.build_preservation_cache(tiny_pipe, PROMPTS, out, batch_size=5, checkpoint_every=1, progress=False)
    assert not out.exists() and out.with_name(out.name + ".partial").exists()
    calls.clear()
    monkeypatch.setattr(cache_mod, "encode_prompts", real)
    resumed = mace.build_preservation_cache(tiny_pipe, PROMPTS, out, batch_size=5, checkpoint_every=1, progress=False)
    fresh = mace.build_preservation_cache(tiny_pipe, PROMPTS, tmp_path / "fresh.safetensors", batch_size=5, progress=False)
    torch.testing.assert_close(resumed.cov, fresh.cov, rtol=1e-12, atol=1e-9)
    assert resumed.tokens == fresh.tokens
    assert not out.with_name(out.name + ".partial").exists()


def test_cache_from_another_text_encoder_is_refused(tiny_pipe, tmp_path):
    mace.build_preservation_cache(tiny_pipe, PROMPTS[:4], tmp_path / "c.safetensors", progress=False)
    with torch.no_grad():
        for p in tiny_pipe.text_encoder.parameters():  # e.g. a fine-tuned text encoder
            p.mul_(1.01)
    with pytest.raises(mace.CacheMismatchError, match="another text encoder"):
        mace.load_preservation_cache(tmp_path / "c.safetensors", pipe=tiny_pipe)


def test_fingerprint_survives_a_save_and_reload(tiny_pipe, tmp_path):
    from mace.models import text_encoder_fingerprint

    tiny_pipe.save_pretrained(tmp_path / "copy")
    assert text_encoder_fingerprint(mace.load_pipeline(tmp_path / "copy")) == text_encoder_fingerprint(tiny_pipe)


def test_pickles_are_never_loaded(tmp_path):
    with pytest.raises(mace.CacheMismatchError, match="pickled"):
        mace.load_preservation_cache(tmp_path / "cache_coco.pt")


def test_cli_cache_command(tmp_path, capsys):
    prompts = tmp_path / "coco.csv"
    prompts.write_text("prompt,evaluation_seed\n" + "".join(f"a dog on a beach {i},{i}\n" for i in range(7)))
    out = tmp_path / "coco.safetensors"
    assert mace_main(["cache", "--model", "builtin:tiny", "--prompts", str(prompts), "--out", str(out)]) == 0
    assert "7 prompts, 539 tokens" in capsys.readouterr().out
    assert mace.load_preservation_cache(out).prompts == 7
    assert mace_main(["cache", "--model", "builtin:tiny", "--prompts", str(tmp_path / "missing.txt"),
                      "--out", str(out)]) == 2
    assert "prompt file" in capsys.readouterr().err


def test_preservation_matrix_combines_weights(tiny_pipe, tmp_path):
    a = mace.build_preservation_cache(tiny_pipe, PROMPTS[:3], tmp_path / "a.safetensors", progress=False)
    b = mace.build_preservation_cache(tiny_pipe, PROMPTS[3:6], tmp_path / "b.safetensors", progress=False)
    torch.testing.assert_close(mace.preservation_matrix([(a, 1.0), (b, 8e4)]), a.cov + 8e4 * b.cov)
    assert mace.preservation_matrix([(None, 1.0)]) is None
