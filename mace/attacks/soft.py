"""The soft-prompt attack (after UnlearnDiffAtk): token embeddings before the concept's prompt,
optimised through the text encoder and the edited UNet to denoise images of the concept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mace.attacks.judges import Targets
from mace.attacks.settings import SoftPromptAttack
from mace.pipelines.components import encode_ids, frozen, pooled_conditions, text_encoders
from mace.stages.lora import forward_process, prediction_target
from mace.utils.fingerprint import seed_for


class _Counter:
    """Counts forward calls (and batch rows) of modules while active."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.calls = self.rows = 0
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in modules]

    def _hook(self, module, args, kwargs):
        self.calls += 1
        first = args[0] if args else next(iter(kwargs.values()), None)
        self.rows += int(first.shape[0]) if isinstance(first, torch.Tensor) else 0

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# The soft-prompt attack


@dataclass
class SoftSearchResult:
    """What the soft-prompt search found for one concept: the prompt embeddings to sample with."""

    prompt: str
    embeddings: torch.Tensor  # (1, 77, d)
    pooled: torch.Tensor | None  # SDXL's pooled embedding (1, p), else None
    nearest_words: list[str]
    budget_used: int
    loss_start: float
    loss_end: float
    unet_calls: int


def _noisy_batch(scheduler, latents: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    index = torch.randint(len(latents), (n,), generator=g)
    t = torch.randint(scheduler.config.num_train_timesteps, (n,), generator=g)
    noise = torch.randn(latents[index].shape, generator=g)
    z0 = latents[index]
    process = forward_process(scheduler)  # DDPM's, whatever the pipeline samples with (no-op when it is)
    return process.add_noise(z0, noise, t), t, prediction_target(process, z0, noise, t)


def soft_prompt_attack(pipe, concept: str, targets: Targets, template: str = "a photo of {}",
                       settings: SoftPromptAttack | None = None, *, seed: int = 0) -> SoftSearchResult:
    """Optimise ``settings.num_tokens`` token embeddings placed before the concept's prompt so
    that the pipeline's UNet denoises images of the concept (``targets``) well; at most
    ``settings.budget`` gradient steps (Adam)."""
    s = settings or SoftPromptAttack()
    prompt = template.format(concept)
    k = s.num_tokens
    device = pipe.unet.device
    g = torch.Generator().manual_seed(seed_for(seed, "soft", concept))
    images = targets(concept, s.target_images, seed_for(seed, "soft-targets", concept))
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if images.shape[-2:] != (side, side):
        images = nn.functional.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        vae = pipe.vae
        latents = vae.encode(images.to(device, vae.dtype)).latent_dist.mean.float().cpu() * vae.config.scaling_factor

    encoders = text_encoders(pipe)
    ids = []
    for tok, _ in encoders:
        row = tok(prompt, truncation=True, max_length=tok.model_max_length - k).input_ids
        placeholder = tok("x", add_special_tokens=False).input_ids[0]  # an ordinary token; its embedding is replaced
        row = row[:1] + [placeholder] * k + row[1:]
        ids.append(torch.tensor([row + [tok.pad_token_id] * (tok.model_max_length - len(row))]))
    positions = torch.arange(1, 1 + k)
    tables = [enc.get_input_embeddings().weight.detach() for _, enc in encoders]
    init = torch.randint(min(len(t) for t in tables), (k,), generator=g)
    soft = [t[init].float().clone().requires_grad_(True) for t in tables]
    optimiser = torch.optim.Adam(soft, lr=s.lr)
    counter = _Counter([pipe.unet])

    def loss(zt, t, target) -> torch.Tensor:
        emb, pooled = encode_ids(pipe, ids, soft, positions)
        n = len(zt)
        extra = pooled_conditions(None if pooled is None else pooled.expand(n, -1), side)
        pred = pipe.unet(zt.to(device, pipe.unet.dtype), t.to(device), encoder_hidden_states=emb.expand(n, -1, -1).to(pipe.unet.dtype),
                         added_cond_kwargs=extra).sample
        return ((pred.float() - target.to(device)) ** 2).mean()

    process = forward_process(pipe.scheduler)
    probe = _noisy_batch(process, latents, s.probe_size, torch.Generator().manual_seed(seed_for(seed, "probe", concept)))
    try:
        with frozen(pipe.unet, pipe.vae, *(enc for _, enc in encoders)):
            with torch.no_grad():
                start = float(loss(*probe))
            for _ in range(s.budget):
                optimiser.zero_grad()
                with torch.enable_grad():
                    loss(*_noisy_batch(process, latents, s.batch_size, g)).backward()
                optimiser.step()
            with torch.no_grad():
                end = float(loss(*probe))
                emb, pooled = encode_ids(pipe, ids, [x.detach() for x in soft], positions)
    finally:
        counter.close()
    # The nearest vocabulary token of each optimised embedding (cosine), for the record.
    table = nn.functional.normalize(tables[0].float(), dim=-1)
    nearest = (nn.functional.normalize(soft[0].detach(), dim=-1) @ table.T).argmax(-1)
    words = [encoders[0][0].convert_ids_to_tokens(int(i)).replace("</w>", "") for i in nearest]
    return SoftSearchResult(prompt, emb, pooled, words, s.budget, start, end, counter.calls)


@torch.no_grad()
def generate_from_embeddings(pipe, embeddings: torch.Tensor, pooled: torch.Tensor | None, seeds: Sequence[int], *,
                             steps: int = 20, guidance_scale: float = 4.0, batch_size: int = 32) -> torch.Tensor:
    """Images in [-1, 1] from prompt embeddings (N, 77, d) (SDXL: with pooled (N, p)), image i
    from the noise of ``seeds[i]`` alone, the negative prompt empty, as ``generate_images``."""
    if len(embeddings) != len(seeds):
        raise ValueError(f"{len(embeddings)} embeddings but {len(seeds)} seeds")
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = slice(start, start + batch_size)
        kwargs = {"prompt_embeds": embeddings[chunk].to(pipe.unet.device, pipe.unet.dtype)}
        if pooled is not None:
            kwargs["pooled_prompt_embeds"] = pooled[chunk].to(pipe.unet.device, pipe.unet.dtype)
        generators = [torch.Generator().manual_seed(int(x)) for x in seeds[chunk]]
        images = pipe(**kwargs, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                      output_type="pt").images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out) if out else torch.zeros(0, 3, 32, 32)
