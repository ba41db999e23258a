"""SPEED and RECE against their per-layer formulas written out in plain float64 torch, the
properties each method promises (SPEED: the null-space and equality constraints; RECE: the
adversarial embedding's optimality and its erasure), and both on builtin:world."""

import pytest
import torch

import mace
from mace.methods.rece import adversarial_embeddings, rece, rece_weights
from mace.methods.speed import invariant_tokens, kmeans, speed, speed_weights
from mace.methods.uce import uce
from mace.pipelines.components import projection_weights, set_projection_weights

F64 = torch.float64
D = 13
OUTS = (17, 13, 23, 29)  # every layer at least d wide: its smallest singular direction is unique


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o, D, generator=g, dtype=F64) / D**0.5 for o in OUTS]


def _tokens(n, seed, scale=1.0):
    return scale * torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------- SPEED


def _speed_reference(weights, t, a, r, K, *, tau, alpha, mu, augment, prior_filter, seed):
    """SPEED's edit layer by layer as its paper and reference code write it, with dense inverses:
    dW = W D P (I - M K (K^T P M K + mu I)^-1 K^T P) M, M = (C1 P + alpha I)^-1, the retain set
    filtered and augmented per layer, P from an SVD of its mean outer product."""
    d = t.shape[1]
    eye = torch.eye(d, dtype=F64)
    n = t.shape[0]
    C1 = t.T @ t / n
    Dm = (a.T @ t - t.T @ t) / n
    g = torch.Generator().manual_seed(seed)
    out = []
    for W in weights:
        E = W @ Dm @ torch.linalg.inv(eye + C1)
        prior = r
        if prior_filter:
            norm = (prior @ E.T).norm(dim=1)
            prior = prior[norm >= norm.mean()]
        if augment:
            v = torch.linalg.svd(W).Vh[-1]
            v = v * torch.sign(v[v.abs().argmax()])
            z = torch.randn(prior.shape[0], augment, generator=g, dtype=F64)
            moved = torch.stack([p + z[i, j] * v for i, p in enumerate(prior) for j in range(augment)])
            norm = (moved @ E.T).norm(dim=1)
            prior = torch.cat([prior, moved[norm >= norm.mean()]])
        U, S, _ = torch.linalg.svd(prior.T @ prior / prior.shape[0])
        P = U[:, S < tau] @ U[:, S < tau].T
        M = torch.linalg.inv(C1 @ P + alpha * eye)
        inner = torch.linalg.inv(K.T @ P @ M @ K + mu * torch.eye(K.shape[1], dtype=F64))
        out.append(W + W @ Dm @ P @ (eye - M @ K @ inner @ K.T @ P) @ M)
    return out


@pytest.mark.parametrize("prior_filter,augment,mu", [(False, 0, 0.0), (True, 3, 0.0), (True, 4, 0.5), (False, 2, 0.0)])
def test_speed_matches_the_per_layer_formula(prior_filter, augment, mu):
    W = _weights()
    t, a = _tokens(3, 1, 2.0), _tokens(3, 2, 2.0)
    r = _tokens(6, 3)  # 6 prior tokens in 13 dims: a 7-dim exact null space, widened by tau
    K = _tokens(4, 4).T
    kw = dict(tau=0.05, alpha=0.7, mu=mu, augment=augment, prior_filter=prior_filter, seed=5)
    expected = _speed_reference(W, t, a, r, K, **kw)
    new, report = speed_weights(W, t, a, r, K.T, threshold=0.05, retain_scale=0.7, constraint_ridge=mu, augment=augment,
                                prior_filter=prior_filter, generator=torch.Generator().manual_seed(5))
    assert len(new) == len(W) == len(report.extra["null_dim"])
    exact = D - 6 - (augment > 0)  # augmentation adds one direction per layer
    assert all(dim >= exact for dim in report.extra["null_dim"])  # at least the exact null space
    assert report.extra["constraints"] == [4] * len(W) and report.tokens == 3
    for got, want, W0 in zip(new, expected, W, strict=True):
        assert got.dtype == F64
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        assert float((want - W0).abs().max()) > 1e-2  # an edit far above the tolerance


def test_speed_keeps_the_prior_and_the_invariants_exactly():
    """The null-space constraint: the retained tokens' outputs do not move at all (fewer tokens
    than dimensions, no filtering: every one is protected); the equality constraint: the
    invariant tokens' outputs neither; and the erased tokens still move toward the anchor."""
    W = _weights(1)
    t, a = _tokens(2, 11, 2.0), _tokens(2, 12, 2.0)
    r, K = _tokens(5, 13), _tokens(3, 14)
    new, report = speed_weights(W, t, a, r, K, threshold=1e-6, retain_scale=0.1, augment=0, prior_filter=False)
    assert report.extra["null_dim"] == [D - 5] * len(W)
    for W0, W1 in zip(W, new, strict=True):
        torch.testing.assert_close(r @ W1.T, r @ W0.T, rtol=0, atol=1e-10)
        torch.testing.assert_close(K @ W1.T, K @ W0.T, rtol=0, atol=1e-10)
        before = (t @ W0.T - a @ W0.T).norm()
        assert (t @ W1.T - a @ W0.T).norm() < 0.8 * before


def test_speed_edit_lies_in_the_null_space_of_a_full_rank_prior():
    """More prior tokens than dimensions (rank saturated, as with many kept concepts): the update
    vanishes on every eigen-direction of the prior at or above the threshold, filtered and
    augmented per layer; a higher threshold widens the null space and erases more."""
    W = _weights(2)
    t = _tokens(2, 21, 2.0)
    a = _tokens(2, 22, 2.0)
    scales = torch.logspace(-2, 0.5, D, dtype=F64)
    r = _tokens(40, 23) * scales  # eigenvalues spread over two and a half decades
    residual = []
    for tau in (0.01, 0.1, 1.0):
        new, report = speed_weights(W, t, a, r, _tokens(2, 24), threshold=tau, augment=3, generator=torch.Generator().manual_seed(0))
        total = 0.0
        for W0, W1, null_dim in zip(W, new, report.extra["null_dim"], strict=True):
            assert 0 < null_dim < D
            total += float((t @ W1.T - a @ W0.T).norm() / (t @ W0.T - a @ W0.T).norm())
        residual.append(total / len(W))
    assert residual[0] > residual[1] > residual[2]
    # The retained directions of one layer, rebuilt from its own refined prior set.
    new, _ = speed_weights(W[:1], t, a, r, None, threshold=0.1, augment=0, prior_filter=False)
    evals, evecs = torch.linalg.eigh(r.T @ r / r.shape[0])
    kept = evecs[:, evals >= 0.1]
    assert kept.shape[1] >= 3
    torch.testing.assert_close((new[0] - W[0]) @ kept, torch.zeros(OUTS[0], kept.shape[1], dtype=F64), rtol=0, atol=1e-10)


def test_speed_rejects_bad_input():
    W, t = _weights(), _tokens(2, 0)
    with pytest.raises(ValueError, match="threshold"):
        speed_weights(W, t, t, t, threshold=0)
    with pytest.raises(ValueError, match="retain_scale"):
        speed_weights(W, t, t, t, retain_scale=0)
    with pytest.raises(ValueError, match="retain set is empty"):
        speed_weights(W, t, t, t[:0])
    with pytest.raises(ValueError, match="anchor"):
        speed_weights(W, t, t[:1], t)
    with pytest.raises(ValueError, match="augment"):
        speed_weights(W, t, t, t, augment=-1)
    with pytest.raises(ValueError, match=r"invariants must be \(k, 13\)"):
        speed_weights(W, t, t, t, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="k must be"):
        kmeans(t, 3)


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=F64)
    x = torch.cat([c + 0.1 * torch.randn(7, 2, generator=g, dtype=F64) for c in centres])
    found = kmeans(x, 3)
    for c, members in zip(centres, x.split(7), strict=True):
        nearest = found[torch.cdist(c[None], found).argmin()]
        torch.testing.assert_close(nearest, members.mean(0))


# ----------------------------------------------------------------------------- RECE


def _rece_reference(weights, original, c, g, kept, *, rounds, lam, s_p, s_e, rho):
    """RECE as its paper writes it, layer by layer: c' = (rho I + sum W^T W)^-1 (sum W^T W0) c, then
    W <- [lam W + s_e sum (W g) c'^T + s_p sum (W e) e^T] [lam I + s_e sum c' c'^T + s_p sum e e^T]^-1."""
    eye = torch.eye(c.shape[1], dtype=F64)
    current = list(weights)
    for _ in range(rounds):
        A = torch.linalg.inv(rho * eye + sum(W.T @ W for W in current)) @ sum(W.T @ W0 for W, W0 in zip(current, original, strict=True))
        adv = c @ A.T
        current = [(lam * W + s_e * (g @ W.T).T @ adv + s_p * (kept @ W.T).T @ kept)
                   @ torch.linalg.inv(lam * eye + s_e * adv.T @ adv + s_p * kept.T @ kept) for W in current]
    return current, adv


@pytest.mark.parametrize("rounds,erase_scale", [(1, 1.0), (3, 2.0)])
def test_rece_matches_the_per_layer_formula(rounds, erase_scale):
    W0 = _weights(3)
    W = [w + 0.3 * _tokens(w.shape[0], 30 + i)[:, :D] for i, w in enumerate(W0)]  # an already edited model
    c, g, kept = _tokens(9, 31), _tokens(9, 32), _tokens(7, 33)
    expected, adv = _rece_reference(W, W0, c, g, kept, rounds=rounds, lam=0.2, s_p=0.3, s_e=erase_scale, rho=0.05)
    new, report = rece_weights(W, W0, c, g, rounds=rounds, lam=0.2, preserve=kept.T @ kept, preserve_scale=0.3,
                               erase_scale=erase_scale, regularization=0.05)
    assert report.extra["rounds"] == rounds and len(report.extra["shift"]) == rounds
    torch.testing.assert_close(report.extra["adversarial"], adv, rtol=1e-9, atol=1e-10)
    for got, want, before in zip(new, expected, W, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        assert float((want - before).abs().max()) > 1e-2


def test_rece_adversarial_embedding_is_optimal_and_erased_by_the_last_round():
    W0 = _weights(4)
    W = [w + 0.3 * _tokens(w.shape[0], 40 + i)[:, :D] for i, w in enumerate(W0)]
    c, g = _tokens(5, 41), _tokens(5, 42)
    adv = adversarial_embeddings(W, W0, c, regularization=0.1)
    # Optimality: the gradient of sum_l ||W_l x - W0_l c||^2 + rho ||x||^2 vanishes at x = c'.
    grad = sum((adv @ w.T - c @ w0.T) @ w for w, w0 in zip(W, W0, strict=True)) + 0.1 * adv
    scale = sum(float((c @ w0.T @ w).norm()) for w, w0 in zip(W, W0, strict=True))
    assert float(grad.norm()) < 1e-10 * scale
    # ... and it brings the original outputs back far better than the concept's own embedding.
    recovered = sum(float((adv @ w.T - c @ w0.T).norm() ** 2) for w, w0 in zip(W, W0, strict=True))
    plain = sum(float((c @ w.T - c @ w0.T).norm() ** 2) for w, w0 in zip(W, W0, strict=True))
    assert recovered < 0.5 * plain
    # Two rounds equal one round from the first round's weights; the second round's embedding,
    # found against those weights, is what it maps onto the guide (5 tokens in 13 dims, tiny lam).
    first, _ = rece_weights(W, W0, c, g, rounds=1, lam=1e-6)
    both, report = rece_weights(W, W0, c, g, rounds=2, lam=1e-6)
    second, _ = rece_weights(first, W0, c, g, rounds=1, lam=1e-6)
    adv2 = report.extra["adversarial"]
    torch.testing.assert_close(adv2, adversarial_embeddings(first, W0, c, regularization=0.1))
    for w1, w2, w2b in zip(first, both, second, strict=True):
        torch.testing.assert_close(w2, w2b)
        before = (adv2 @ w1.T - g @ w1.T).norm()
        assert (adv2 @ w2.T - g @ w1.T).norm() < 1e-4 * before


def test_rece_rejects_bad_input():
    W, c = _weights(), _tokens(3, 0)
    with pytest.raises(ValueError, match="rounds"):
        rece_weights(W, W, c, c, rounds=0)
    with pytest.raises(ValueError, match="regularization"):
        adversarial_embeddings(W, W, c, regularization=-1)
    with pytest.raises(ValueError, match="original"):
        adversarial_embeddings(W, W[:2], c)
    with pytest.raises(ValueError, match="guide tokens"):
        rece_weights(W, W, c, c[:2])
    with pytest.raises(ValueError, match=r"tokens must be \(N, 13\)"):
        adversarial_embeddings(W, W, torch.zeros(3, 4))


# ----------------------------------------------------------------------------- on builtin:world

ERASED = "Qedark Draerba"  # red disc
KEPT = ["Nyfaes Laendlothzhu", "Granny Vixsengrourk", "Dorkpyx Zuthmyrk", "Laengrur Zarourknourk"]
GUIDE = "a glyph"


@pytest.fixture(scope="module")
def world():
    from mace.world import CONCEPTS, WORLD_MODEL

    pipe = mace.load_pipeline(WORLD_MODEL)
    names = [name for name, _ in mace.cross_attention_projections(pipe.unet)]
    return pipe, [w.clone() for w in projection_weights(pipe.unet)], names, [c.name for c in CONCEPTS]


@pytest.fixture
def world_pipe(world):
    pipe, original, names, concepts = world
    set_projection_weights(pipe.unet, original)
    return pipe, [w.double() for w in original], names, concepts


def _last_piece(pipe, texts):
    """Embeddings at each text's last word piece (computed here, not by mace.methods.speed)."""
    emb = mace.encode_prompts(pipe, texts).double()
    return torch.stack([emb[i, len(pipe.tokenizer(t).input_ids) - 2] for i, t in enumerate(texts)])


def _relative(tokens, W, W0):
    return float((tokens @ (W - W0).T).norm() / (tokens @ W0.T).norm())


def test_speed_on_the_world(world_pipe):
    pipe, W0, names, _ = world_pipe
    preserve = KEPT + [f"{ERASED} in the dark"]  # names an erased concept: dropped from the prior
    report = speed(pipe, [ERASED], GUIDE, preserve, projections="kv", prior_filter=False, augment=0)
    assert report.extra["dropped"] == 1 and report.extra["preserved"] == len(KEPT)
    # The pipeline's edit is the per-layer formula on the tokens SPEED reads: last word pieces,
    # the empty prompt's start token and k-means centres of its other positions.
    t, a, r = _last_piece(pipe, [ERASED]), _last_piece(pipe, [GUIDE]), _last_piece(pipe, KEPT)
    null = mace.encode_prompts(pipe, [""])[0].double()
    K = invariant_tokens(pipe, 3)
    torch.testing.assert_close(K[0], null[0])
    assert K.shape == (4, null.shape[1])
    new = _speed_reference(W0, t, a, r, K.T, tau=0.1, alpha=1.0, mu=0.0, augment=0, prior_filter=False, seed=0)
    edited = [w.double() for w in projection_weights(pipe.unet)]
    for got, want in zip(edited, new, strict=True):
        torch.testing.assert_close(got, want.float().double(), rtol=1e-5, atol=1e-6)
    for W, W1 in zip(W0, edited, strict=True):
        # Measured: the erased name's last piece is 0.08-0.11 of its distance from the guide's
        # (K and V); the kept names' outputs move by about 3e-8 relative (float32 weights).
        assert float((t @ W1.T - a @ W.T).norm() / (t @ W.T - a @ W.T).norm()) < 0.3
        assert _relative(r, W1, W) < 1e-5
        assert _relative(K, W1, W) < 1e-5
    # The reference's default edits the values only.
    set_projection_weights(pipe.unet, [w.float() for w in W0])
    report = speed(pipe, [ERASED], GUIDE, KEPT, seed=1)
    for name, W, W1 in zip(names, W0, projection_weights(pipe.unet), strict=True):
        assert torch.equal(W1, W.float()) == name.endswith("to_k"), name
    assert len(report.extra["null_dim"]) == len(names) // 2


def test_rece_on_the_world(world_pipe):
    pipe, W0, _, concepts = world_pipe
    others = [c for c in concepts if c != ERASED]
    uce(pipe, [ERASED], GUIDE, others, lam=0.1, preserve_scale=1.0)
    after_uce = [w.double() for w in projection_weights(pipe.unet)]
    set_projection_weights(pipe.unet, [w.float() for w in W0])
    report = rece(pipe, [ERASED], GUIDE, others, rounds=2, preserve_scale=1.0)
    assert report.extra["uce"] and report.extra["rounds"] == 2 and report.extra["preserved"] == len(others)
    edited = [w.double() for w in projection_weights(pipe.unet)]
    # The pipeline's rounds are the per-layer formula from the UCE weights, on every position of
    # the erased text and its guide, preserving the empty prompt's and the kept texts' tokens.
    d = W0[0].shape[1]
    c = mace.encode_prompts(pipe, [ERASED]).double().reshape(-1, d)
    g = mace.encode_prompts(pipe, [GUIDE]).double().reshape(-1, d)
    kept = mace.encode_prompts(pipe, [""] + others).double().reshape(-1, d)
    new, _ = _rece_reference(after_uce, W0, c, g, kept, rounds=2, lam=0.1, s_p=1.0, s_e=1.0, rho=0.1)
    for got, want in zip(edited, new, strict=True):
        torch.testing.assert_close(got, want.float().double(), rtol=1e-5, atol=1e-6)
    kept_tokens = mace.encode_prompts(pipe, KEPT).double().reshape(-1, d)
    for W, W1 in zip(W0, edited, strict=True):
        # Measured: in the edited model the erased text's keys/values are about 0.66 of their
        # original distance from the guide's; a kept text's move by about 9% of their size.
        assert float((c @ W1.T - g @ W1.T).norm() / (c @ W.T - g @ W.T).norm()) < 0.8
        assert _relative(kept_tokens, W1, W) < 0.15


def test_pipeline_entry_points_reject_bad_input(world_pipe):
    pipe, W0, _, _ = world_pipe
    with pytest.raises(ValueError, match="no concepts to erase"):
        speed(pipe, [], GUIDE)
    with pytest.raises(ValueError, match="2 concepts but 3 guides"):
        speed(pipe, [ERASED, KEPT[0]], [GUIDE] * 3)
    with pytest.raises(ValueError, match="projections must be one of"):
        speed(pipe, [ERASED], GUIDE, projections="q")
    with pytest.raises(ValueError, match="null_clusters"):
        speed(pipe, [ERASED], GUIDE, null_clusters=77)
    with pytest.raises(ValueError, match="no concepts to erase"):
        rece(pipe, [], GUIDE)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        rece(pipe, [ERASED], GUIDE, rounds=0)
    with pytest.raises(ValueError, match="1 concepts but 2 guides"):
        rece(pipe, [ERASED], [GUIDE, GUIDE])
    for W, W1 in zip(W0, projection_weights(pipe.unet), strict=True):  # nothing was written
        assert torch.equal(W1, W.float())
