import pytest
import torch

import mace
from mace.utils.tokenizer import clip_tokenizer


def test_clip_tokenizer_is_the_real_one():
    tok = clip_tokenizer()
    assert tok("a photo of Emma Stone").input_ids == [49406, 320, 1125, 539, 7445, 2441, 49407]
    assert len(tok) == 49408
    assert tok.decode(tok("naïve café").input_ids, skip_special_tokens=True).strip() == "naïve café"


def test_builtin_tiny_is_an_ordinary_diffusers_folder(tiny_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_path)
    names = [n for n, _ in mace.cross_attention_projections(pipe.unet)]
    assert len(names) == 14 and names[0].endswith("attn2.to_k") and names[1].endswith("attn2.to_v")
    again = mace.load_pipeline("builtin:tiny")
    assert [n for n, _ in mace.cross_attention_projections(again.unet)] == names
    for (_, a), (_, b) in zip(mace.cross_attention_projections(pipe.unet), mace.cross_attention_projections(again.unet), strict=True):
        assert torch.equal(a.weight, b.weight)
    emb = mace.encode_prompts(pipe, ["a photo of Emma Stone", "x"])
    assert emb.shape == (2, 77, 64)
    # SD 1.x: the text encoder's last hidden state over the 77 padded positions.
    ids = pipe.tokenizer(["a photo of Emma Stone", "x"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = pipe.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(emb, direct.float())
    # Batching does not change a prompt's embedding.
    torch.testing.assert_close(mace.encode_prompts(pipe, ["a photo of Emma Stone", "x"], batch_size=1), emb)


def test_builtin_sdxl_concatenates_both_text_encoders():
    pipe = mace.load_pipeline("builtin:tiny-sdxl")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    proj = mace.cross_attention_projections(pipe.unet)
    assert all(lin.in_features == 64 for _, lin in proj)
    emb = mace.encode_prompts(pipe, ["a photo of a ship"])
    ids = pipe.tokenizer(["a photo of a ship"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(emb[..., :32], first.float())
    # ... and the second encoder's penultimate hidden state fills the other half.
    assert emb.shape == (1, 77, 64)
    ids2 = pipe.tokenizer_2(["a photo of a ship"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    second = pipe.text_encoder_2(ids2, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(emb[..., 32:], second.float())


def test_model_without_cross_attention_is_refused():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(mace.NoCrossAttentionError, match="no cross-attention"):
        mace.cross_attention_projections(unet)


def test_unknown_builtin_and_missing_folder():
    with pytest.raises(ValueError, match="unknown builtin model 'builtin:huge'"):
        mace.load_pipeline("builtin:huge")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mace.load_pipeline("./no/such/model")


def _hub_cache(root, repo_id: str, folder) -> None:
    """A Hugging Face cache entry for ``repo_id`` holding ``folder`` at its main revision."""
    import shutil

    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_id_loads_from_the_hugging_face_cache(tmp_path, tiny_path, tiny_clip_path, monkeypatch):
    """A hub id ("owner/model": the original configs' CompVis/stable-diffusion-v1-4, the docs'
    --clip openai/clip-vit-large-patch14) is read from the hub's local cache when offline; one
    that is not there is a one-line error naming it; a relative path is still a missing folder."""
    import huggingface_hub.constants

    from mace.evaluation.metrics import load_clip

    _hub_cache(tmp_path, "someone/tiny-sd", tiny_path)
    _hub_cache(tmp_path, "someone/tiny-clip", tiny_clip_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    pipe = mace.load_pipeline("someone/tiny-sd")
    for (_, a), (_, b) in zip(mace.cross_attention_projections(pipe.unet),
                              mace.cross_attention_projections(mace.load_pipeline(tiny_path).unet), strict=True):
        assert torch.equal(a.weight, b.weight)
    clip = load_clip("someone/tiny-clip")
    assert torch.equal(clip.model.text_projection.weight, load_clip(tiny_clip_path).model.text_projection.weight)
    with pytest.raises(FileNotFoundError, match="model someone/not-cached: cannot read its model_index.json from a local"):
        mace.load_pipeline("someone/not-cached")
    with pytest.raises(FileNotFoundError, match="model folder ./someone/tiny-sd does not exist"):
        mace.load_pipeline("./someone/tiny-sd")
    with pytest.raises(FileNotFoundError, match="CLIP model folder ./someone/tiny-clip does not exist"):
        load_clip("./someone/tiny-clip")
