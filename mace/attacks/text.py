"""The text-only attack (after Ring-A-Bell): a whole-word prompt whose embedding is nearest the
concept's direction added to a prompt without it; reads the text encoder only."""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mace.attacks.settings import TextAttack
from mace.pipelines.components import encode_ids, frozen, text_encoders, tokenize
from mace.stages.prompts import OBJECT_TEMPLATES
from mace.utils.fingerprint import seed_for

# --------------------------------------------------------------------------------------------
# The text-only attack

_WORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _word_vocabulary(tok) -> tuple[torch.Tensor, dict[int, str]]:
    """Ids and spellings of the tokenizer's whole-word tokens of two or more letters (a prompt of
    such words separated by spaces tokenises back to exactly these ids)."""
    if tok not in _WORDS:
        words = {i: t[:-4] for t, i in tok.get_vocab().items() if re.fullmatch(r"[a-z]{2,}</w>", t)}
        _WORDS[tok] = (torch.tensor(sorted(words)), words)
    return _WORDS[tok]


def _forbidden_ids(tok, concept: str) -> set[int]:
    """Every token id of the concept's name, whole and word by word."""
    out = set()
    for text in [concept, *concept.split()]:
        out.update(tok(text, add_special_tokens=False).input_ids)
    return out


@dataclass
class TextSearchResult:
    """What the text-only search found for one concept."""

    prompt: str
    words: list[str]
    budget_used: int
    distance_start: float
    distance_end: float
    plain_distance: float
    setup_prompts: int


class _WordPrompts:
    """Prompts ``template`` with {} replaced by K whole words, built directly as token ids for
    every text encoder (exactly what tokenising the text gives)."""

    def __init__(self, pipe, template: str):
        if template.count("{}") != 1:
            raise ValueError(f"the prompt template needs exactly one {{}}, got {template!r}")
        before, after = template.split("{}")
        self.template = template
        self.parts = []
        for tok, _ in text_encoders(pipe):
            pre = tok(before.strip(), add_special_tokens=False).input_ids if before.strip() else []
            post = tok(after.strip(), add_special_tokens=False).input_ids if after.strip() else []
            self.parts.append((tok, pre, post))

    def positions(self, k: int) -> torch.Tensor:
        return 1 + len(self.parts[0][1]) + torch.arange(k)

    def ids(self, words: torch.Tensor) -> list[torch.Tensor]:
        """(B, 77) ids per encoder for word id rows (B, K)."""
        out = []
        for tok, pre, post in self.parts:
            length = tok.model_max_length
            rows = []
            for w in words.tolist():
                content = (pre + w + post)[: length - 2]
                row = [tok.bos_token_id, *content, tok.eos_token_id]
                rows.append(row + [tok.pad_token_id] * (length - len(row)))
            out.append(torch.tensor(rows))
        return out

    def text(self, spelled: Sequence[str]) -> str:
        return self.template.format(" ".join(spelled))


def concept_direction(pipe, concept: str, templates: Sequence[str] = tuple(OBJECT_TEMPLATES), neutral: str = "") -> torch.Tensor:
    """The concept's direction in the text encoder's output (77, d): the mean over ``templates``
    of the prompt embedding with the concept minus the one with ``neutral`` in its place."""
    with torch.no_grad():
        with_c, _ = encode_ids(pipe, tokenize(pipe, [t.format(concept) for t in templates]))
        without, _ = encode_ids(pipe, tokenize(pipe, [" ".join(t.format(neutral).split()) for t in templates]))
    return (with_c - without).mean(0)


def text_attack(pipe, concept: str, template: str = "a photo of {}", settings: TextAttack | None = None, *,
                seed: int = 0) -> TextSearchResult:
    """Search whole-word prompts ``template`` with {} = ``settings.num_tokens`` words (none of
    the concept's tokens) whose prompt embedding is nearest ``E(template with neutral) + eta x
    direction``, spending at most ``settings.budget`` text-encoder prompt evaluations."""
    s = settings or TextAttack()
    tok = pipe.tokenizer
    maker = _WordPrompts(pipe, template)
    plain = template.format(concept)
    vocab_ids, spelling = _word_vocabulary(tok)
    forbidden = _forbidden_ids(tok, concept)
    allowed = vocab_ids[~torch.isin(vocab_ids, torch.tensor(sorted(forbidden)))]
    g = torch.Generator().manual_seed(seed_for(seed, "text", concept))

    direction = concept_direction(pipe, concept, s.templates, s.neutral)
    with torch.no_grad():
        base, _ = encode_ids(pipe, tokenize(pipe, [" ".join(template.format(s.neutral).split()), plain]))
    target = base[0] + s.eta * direction
    setup = 2 * len(s.templates) + 2
    plain_distance = float(((base[1] - target) ** 2).mean())

    used = 0

    @torch.no_grad()
    def distance(words: torch.Tensor) -> torch.Tensor:
        nonlocal used
        used += len(words)
        emb, _ = encode_ids(pipe, maker.ids(words))
        return ((emb - target) ** 2).mean((1, 2)).cpu()

    k = s.num_tokens
    if s.budget < 1:
        return TextSearchResult(plain, [], 0, plain_distance, plain_distance, plain_distance, setup)

    if s.search == "coordinate":
        best = allowed[torch.randint(len(allowed), (1, k), generator=g)]
        best_d = distance(best)
        start = float(best_d[0])
        encoders = text_encoders(pipe)
        vocab_size = min(enc.get_input_embeddings().weight.shape[0] for _, enc in encoders)
        is_allowed = torch.zeros(vocab_size, dtype=torch.bool)
        is_allowed[allowed[allowed < vocab_size]] = True
        positions = maker.positions(k)
        while used + 2 <= s.budget:
            n = min(s.batch, s.budget - used - 1)  # the last step may try fewer swaps
            # One gradient pass: d distance / d one-hot word choice, through the text encoder only.
            onehot = torch.zeros(k, vocab_size)
            onehot[torch.arange(k), best[0]] = 1
            onehot.requires_grad_(True)
            with torch.enable_grad(), frozen(*(enc for _, enc in encoders)):
                insert = [onehot.to(enc.device, enc.dtype) @ enc.get_input_embeddings().weight[:vocab_size] for _, enc in encoders]
                emb, _ = encode_ids(pipe, maker.ids(best), insert, positions)
                ((emb[0] - target) ** 2).mean().backward()
            used += 1
            grad = onehot.grad.float().masked_fill(~is_allowed, float("inf"))
            top = (-grad).topk(min(s.top_k, int(is_allowed.sum())), dim=1).indices
            cand = best.repeat(n, 1)
            where = torch.randint(k, (n,), generator=g)
            pick = torch.randint(top.shape[1], (n,), generator=g)
            cand[torch.arange(n), where] = top[where, pick]
            d = distance(cand)
            if float(d.min()) < float(best_d[0]):
                best, best_d = cand[d.argmin()][None], d.min()[None]
        words = best[0]
        end = float(best_d[0])
    else:
        pop = allowed[torch.randint(len(allowed), (min(s.batch, s.budget), k), generator=g)]
        fit = distance(pop)
        start = float(fit.min())
        while used < s.budget:
            order = fit.argsort()
            pop, fit = pop[order], fit[order]
            size, elite = len(pop), min(s.elite, len(pop))
            n = min(s.batch - elite, s.budget - used)  # the last generation may be smaller
            # Parents by tournaments of two (ranks), uniform crossover, per-word mutation.
            a = torch.randint(size, (n, 2), generator=g).min(1).values
            b = torch.randint(size, (n, 2), generator=g).min(1).values
            mix = torch.rand(n, k, generator=g) < 0.5
            kids = torch.where(mix, pop[a], pop[b])
            mutate = torch.rand(n, k, generator=g) < s.mutation
            kids = torch.where(mutate, allowed[torch.randint(len(allowed), (n, k), generator=g)], kids)
            pop = torch.cat([pop[:elite], kids])
            fit = torch.cat([fit[:elite], distance(kids)])
        words = pop[fit.argmin()]
        end = float(fit.min())
    spelled = [spelling[int(i)] for i in words]
    prompt = maker.text(spelled)
    if tokenize(pipe, [prompt])[0][0].tolist() != maker.ids(words[None])[0][0].tolist():
        raise RuntimeError(f"the found prompt {prompt!r} does not tokenise back to the searched ids")
    return TextSearchResult(prompt, spelled, used, start, end, plain_distance, setup)
