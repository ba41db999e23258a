"""UCE against a paper-literal per-layer solve, and the CLIP/FID metrics against direct formulas."""

import numpy as np
import pytest
import scipy.linalg
import torch

import mace
from mace.methods.uce import uce, uce_tokens


def test_uce_tokens_align_from_the_last_word_piece(tiny_pipe):
    tok = tiny_pipe.tokenizer
    old, new = uce_tokens(tiny_pipe, ["Emma Stone", "Vincent van Gogh"], ["a person", "a person"])
    n_emma = 77 - (len(tok("Emma Stone").input_ids) - 2)  # from 'stone' to the end
    n_van = 77 - (len(tok("Vincent van Gogh").input_ids) - 2)
    assert old.shape == new.shape == (n_emma + n_van, 64)
    emb = mace.encode_prompts(tiny_pipe, ["Emma Stone", "a person"])
    last = len(tok("Emma Stone").input_ids) - 2
    torch.testing.assert_close(old[0], emb[0, last])  # 'stone' ...
    torch.testing.assert_close(new[0], emb[1, len(tok("a person").input_ids) - 2])  # ... maps onto 'person'
    torch.testing.assert_close(old[1], emb[0, last + 1])  # end-of-text onto end-of-text
    # Every row: each text's run from its last word piece, the guide's run from its own last
    # word piece, as long as the later-starting of the two allows.
    g = mace.encode_prompts(tiny_pipe, ["Vincent van Gogh", "a person"])
    lo, lg = len(tok("Vincent van Gogh").input_ids) - 2, len(tok("a person").input_ids) - 2
    assert lo > lg  # the guide's run is cut short at its end, not the concept's
    torch.testing.assert_close(old, torch.cat([emb[0, last:], g[0, lo:]]))
    torch.testing.assert_close(new, torch.cat([emb[1, lg:], g[1, lg:lg + n_van]]))
    # Without guides: each text's tokens from its last word piece to the end.
    kept, none = uce_tokens(tiny_pipe, ["Vincent van Gogh", "Emma Stone"])
    assert none is None
    torch.testing.assert_close(kept, torch.cat([g[0, lo:], emb[0, last:]]))


def _tail(pipe, text):
    """A text's embeddings from its last word piece to position 77 (computed here, not by uce_tokens)."""
    return mace.encode_prompts(pipe, [text])[0, len(pipe.tokenizer(text).input_ids) - 2:]


def _uce_reference(pipe, erase, guide, preserve, lam, preserve_scale, erase_scale=1.0):
    """UCE as its paper writes it, layer by layer, with a dense float64 solve."""
    pairs = []
    for text in erase:
        c, g = _tail(pipe, text), _tail(pipe, guide)
        n = min(len(c), len(g))  # aligned from the last word piece
        pairs.append((c[:n], g[:n]))
    old = torch.cat([c for c, _ in pairs]).double()
    new = torch.cat([g for _, g in pairs]).double()
    kept = torch.cat([_tail(pipe, text) for text in preserve]).double()
    out = []
    for _, lin in mace.cross_attention_projections(pipe.unet):
        W = lin.weight.detach().double()
        mat1 = lam * W + erase_scale * (new @ W.T).T @ old + preserve_scale * (kept @ W.T).T @ kept
        mat2 = (lam * torch.eye(W.shape[1], dtype=torch.float64) + erase_scale * old.T @ old
                + preserve_scale * kept.T @ kept)
        out.append(mat1 @ torch.linalg.inv(mat2))
    return out


@pytest.mark.parametrize("erase_scale", [1.0, 3.0])
def test_uce_matches_the_per_layer_formula(tiny_pipe, erase_scale):
    erase, preserve = ["Emma Stone", "Brad Pitt"], ["Tom Hanks", "a dog"]
    before = [lin.weight.detach().clone() for _, lin in mace.cross_attention_projections(tiny_pipe.unet)]
    expected = _uce_reference(tiny_pipe, erase, "a person", preserve, lam=0.1, preserve_scale=0.5, erase_scale=erase_scale)
    report = uce(tiny_pipe, erase, "a person", preserve, lam=0.1, preserve_scale=0.5, erase_scale=erase_scale)
    assert report.extra == {"erased": 2, "preserved": 2}
    assert len(expected) == len(before) == 14
    for (_, lin), W, W0 in zip(mace.cross_attention_projections(tiny_pipe.unet), expected, before, strict=True):
        torch.testing.assert_close(lin.weight.detach().double(), W, rtol=1e-4, atol=1e-5)
        # The edit is far larger than the tolerance: the comparison can tell edited from unedited.
        assert float((W - W0.double()).abs().max()) > 1e-2


def test_uce_maps_the_concept_onto_its_guide(tiny_pipe):
    """With a tiny lam and nothing preserved, W' c = W c* holds on the edited tokens."""
    old, new = uce_tokens(tiny_pipe, ["Emma Stone"], ["a person"])
    before = [lin.weight.detach().clone() for _, lin in mace.cross_attention_projections(tiny_pipe.unet)]
    uce(tiny_pipe, ["Emma Stone"], "a person", lam=1e-4)
    assert len(before) == 14
    for W0, (_, lin) in zip(before, mace.cross_attention_projections(tiny_pipe.unet), strict=True):
        # 73 tokens in a 64-dim space: least squares, so compare the residual with the unedited one.
        after = (old @ lin.weight.detach().T - new @ W0.T).norm()
        unedited = (old @ W0.T - new @ W0.T).norm()
        assert after < 0.35 * unedited


def test_uce_rejects_bad_input(tiny_pipe):
    with pytest.raises(ValueError, match="no concepts"):
        uce(tiny_pipe, [], "a person")
    with pytest.raises(ValueError, match="guides"):
        uce_tokens(tiny_pipe, ["a", "b"], ["c"])


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_path):
    from mace.evaluation.metrics import load_clip

    return load_clip(tiny_clip_path)


def _text_features(clip, texts):
    t = clip.processor(text=texts, return_tensors="pt", padding=True)
    f = clip.model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    return torch.nn.functional.normalize(getattr(f, "pooler_output", f).float(), dim=-1)


def test_clip_score_and_zero_shot_accuracy_match_direct_computation(tiny_clip):
    from mace.evaluation.metrics import clip_image_features, clip_score, clip_zero_shot_accuracy

    images = torch.rand(6, 3, 32, 32) * 2 - 1
    prompts = ["a red disc", "a blue star", "a photo", "a dog", "a cat", "a glyph"]
    with torch.no_grad():
        img = clip_image_features(images, tiny_clip)
        txt = _text_features(tiny_clip, prompts)
    expected = max(float((100 * (img * txt).sum(-1)).mean()), 0.0)  # torchmetrics floors the mean at 0
    assert clip_score(images, prompts, tiny_clip) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # Image by image (torchmetrics embeds the images itself): clip_image_features keeps each
    # image's own embedding, in order, so the zero-shot check below can rely on it.
    per_image = (100 * (img * txt).sum(-1)).tolist()
    assert max(per_image) - min(per_image) > 1.0  # the scores differ: a mix-up would show
    for i, value in enumerate(per_image):
        assert clip_score(images[i:i + 1], prompts[i:i + 1], tiny_clip) == pytest.approx(max(value, 0.0), rel=1e-4, abs=1e-4)

    names = ["disc", "star", "ring"]
    with torch.no_grad():
        predicted = (img @ _text_features(tiny_clip, [f"a photo of {n}" for n in names]).T).argmax(-1)
    labels = [0, 1, 2, 0, 1, 2]
    expected_acc = float((predicted == torch.tensor(labels)).float().mean())
    assert clip_zero_shot_accuracy(images, labels, names, tiny_clip) == pytest.approx(expected_acc)
    assert clip_zero_shot_accuracy(images, predicted.tolist(), names, tiny_clip) == 1.0


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_fid_on_clip_features_matches_the_frechet_formula(tiny_clip):
    from mace.evaluation.metrics import clip_image_features, fid

    g = torch.Generator().manual_seed(1)
    a = torch.rand(24, 3, 32, 32, generator=g) * 2 - 1
    b = (torch.rand(24, 3, 32, 32, generator=g) * 1.5 - 1).clamp(-1, 1)
    with torch.no_grad():
        # fid() sees the images after rounding to 8 bits, as torchmetrics wants them.
        fa = clip_image_features(((a + 1) * 127.5).round() / 127.5 - 1, tiny_clip).double().numpy()
        fb = clip_image_features(((b + 1) * 127.5).round() / 127.5 - 1, tiny_clip).double().numpy()
    value = fid(a, b, clip=tiny_clip)
    assert value == pytest.approx(_frechet(fa, fb), rel=1e-3, abs=1e-6)
    assert value > 0
    assert fid(a, a, clip=tiny_clip) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least two"):
        fid(a[:1], b, clip=tiny_clip)
    with pytest.raises(ValueError, match="CLIP model"):
        fid(a, b)
