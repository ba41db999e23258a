import pytest
import torch

import mace
import mace.stages.cache as cache_mod
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
    # Three batches of five finished (and were checkpointed) before the fourth was interrupted.
    partial = mace.load_preservation_cache(out.with_name(out.name + ".partial"), allow_partial=True)
    assert (partial.prompts, partial.tokens) == (15, 15 * 77)
    calls.clear()

    def counting(pipe, prompts, batch_size=64):
        calls.append(len(prompts))
        return real(pipe, prompts, batch_size)

    monkeypatch.setattr(cache_mod, "encode_prompts", counting)
    resumed = mace.build_preservation_cache(tiny_pipe, PROMPTS, out, batch_size=5, checkpoint_every=1, progress=False)
    assert calls == [5, 3]  # only the 8 prompts after the checkpoint are encoded again
    monkeypatch.setattr(cache_mod, "encode_prompts", real)
    fresh = mace.build_preservation_cache(tiny_pipe, PROMPTS, tmp_path / "fresh.safetensors", batch_size=5, progress=False)
    torch.testing.assert_close(resumed.cov, fresh.cov, rtol=1e-12, atol=1e-9)
    assert resumed.tokens == fresh.tokens
    assert not out.with_name(out.name + ".partial").exists()


def test_cache_from_another_text_encoder_is_refused(tiny_pipe, tmp_path):
    mace.build_preservation_cache(tiny_pipe, PROMPTS[:4], tmp_path / "c.safetensors", progress=False)
    assert mace.load_preservation_cache(tmp_path / "c.safetensors", pipe=tiny_pipe).prompts == 4  # its own encoder: fine
    with torch.no_grad():
        for p in tiny_pipe.text_encoder.parameters():  # e.g. a fine-tuned text encoder
            p.mul_(1.01)
    with pytest.raises(mace.CacheMismatchError, match="another text encoder"):
        mace.load_preservation_cache(tmp_path / "c.safetensors", pipe=tiny_pipe)


def test_fingerprint_survives_a_save_and_reload(tiny_pipe, tmp_path):
    from mace.pipelines.components import text_encoder_fingerprint

    tiny_pipe.save_pretrained(tmp_path / "copy")
    copy = mace.load_pipeline(tmp_path / "copy")
    assert text_encoder_fingerprint(copy) == text_encoder_fingerprint(tiny_pipe)
    # ... and it does tell text encoders apart: one changed weight of the copy changes it.
    with torch.no_grad():
        copy.text_encoder.get_input_embeddings().weight[0, 0] += 1.0
    assert text_encoder_fingerprint(copy) != text_encoder_fingerprint(tiny_pipe)


def test_pickles_are_never_loaded(tmp_path):
    with pytest.raises(mace.CacheMismatchError, match="pickled"):
        mace.load_preservation_cache(tmp_path / "cache_coco.pt")


def test_cli_cache_command(tmp_path, capsys):
    prompts = tmp_path / "coco.csv"
    prompts.write_text("prompt,evaluation_seed\n" + "".join(f"a dog on a beach {i},{i}\n" for i in range(7)))
    out = tmp_path / "coco.safetensors"
    assert mace_main(["cache", "--model", "builtin:tiny", "--prompts", str(prompts), "--out", str(out)]) == 0
    assert "7 prompts, 539 tokens" in capsys.readouterr().out
    loaded = mace.load_preservation_cache(out)
    assert loaded.prompts == 7 and loaded.tokens == 7 * 77
    # The statistic of the CSV's prompt column, computed directly from the text encoder.
    pipe = mace.load_pipeline("builtin:tiny")
    assert mace.load_preservation_cache(out, pipe=pipe).prompts == 7
    emb = mace.encode_prompts(pipe, [f"a dog on a beach {i}" for i in range(7)]).reshape(-1, 64).double()
    torch.testing.assert_close(loaded.cov, emb.T @ emb, rtol=1e-5, atol=1e-3)
    assert mace_main(["cache", "--model", "builtin:tiny", "--prompts", str(tmp_path / "missing.txt"),
                      "--out", str(out)]) == 2
    assert "prompt file" in capsys.readouterr().err


def test_preservation_matrix_combines_weights(tiny_pipe, tmp_path):
    a = mace.build_preservation_cache(tiny_pipe, PROMPTS[:3], tmp_path / "a.safetensors", progress=False)
    b = mace.build_preservation_cache(tiny_pipe, PROMPTS[3:6], tmp_path / "b.safetensors", progress=False)
    torch.testing.assert_close(mace.preservation_matrix([(a, 1.0), (b, 8e4)]), a.cov + 8e4 * b.cov)
    assert mace.preservation_matrix([(None, 1.0)]) is None
    # Raw tensors count like caches, absent caches are skipped, float32 is widened to float64.
    mixed = mace.preservation_matrix([(None, 5.0), (a.cov.float(), 2.0), (b, 0.5)])
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, 2.0 * a.cov.float().double() + 0.5 * b.cov)


def test_cache_streams_odd_batches_and_equals_all_at_once(tiny_pipe, tmp_path, monkeypatch):
    """Batches of 3 over 10 prompts (3 + 3 + 3 + 1): the encoder never sees more than one batch,
    and the statistic equals the one of all prompts encoded at once."""
    prompts = PROMPTS[:10]
    real = cache_mod.encode_prompts
    calls = []

    def counting(pipe, texts, batch_size=64):
        calls.append(list(texts))
        return real(pipe, texts, batch_size)

    monkeypatch.setattr(cache_mod, "encode_prompts", counting)
    cache = mace.build_preservation_cache(tiny_pipe, prompts, tmp_path / "c.safetensors", batch_size=3, progress=False)
    assert [len(c) for c in calls] == [3, 3, 3, 1] and [p for c in calls for p in c] == prompts
    emb = real(tiny_pipe, prompts, batch_size=64).reshape(-1, 64).double()
    torch.testing.assert_close(cache.cov, emb.T @ emb, rtol=1e-5, atol=1e-3)
    assert (cache.tokens, cache.prompts) == (10 * 77, 10)
