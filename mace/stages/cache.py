"""Preservation caches: the d x d statistic C_p = sum e e^T over every token of a prompt set.

The original MACE cached per-layer products (W_l C_p, C_p) as pickles; since every layer only
needs C_p (docs/design.md, section 3), a cache here is one d x d float64 matrix (a few MB) in
safetensors, with metadata saying which text encoder made it. Building streams the prompts
in batches, checkpoints a partial file as it goes, and resumes from it after an interruption.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

import mace_kernels as mk
from mace import distributed
from mace.pipelines.components import encode_prompts, text_encoder_fingerprint, text_width
from mace.utils.atomic import atomic_path
from mace.utils.fingerprint import files_digest

CACHE_VERSION = "1"


class CacheMismatchError(ValueError):
    """A cache that was made by another text encoder (or is not a MACE cache)."""


@dataclass
class PreservationCache:
    cov: torch.Tensor  # (d, d) float64, sum of e e^T
    tokens: int
    prompts: int
    model: str
    fingerprint: str
    prompts_sha256: str = ""

    def save(self, path: str | os.PathLike, *, partial: bool = False) -> None:
        """Write atomically (a temporary file renamed over the target)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "mace_cache_version": CACHE_VERSION, "model": self.model, "text_encoder_fingerprint": self.fingerprint,
            "tokens": str(self.tokens), "prompts": str(self.prompts), "prompts_sha256": self.prompts_sha256,
            "dtype": str(self.cov.dtype).replace("torch.", ""), "d": str(self.cov.shape[0]),
            "complete": "false" if partial else "true",
        }
        with atomic_path(path) as tmp:
            save_file({"cov": self.cov.contiguous().cpu()}, str(tmp), metadata=meta)


def load_preservation_cache(path: str | os.PathLike, *, pipe=None, allow_partial: bool = False) -> PreservationCache:
    """Load a cache; with ``pipe``, refuse one made by a different text encoder."""
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
        raise CacheMismatchError(
            f"{path}: pickled caches of the original MACE code are not loaded (unsafe); "
            "rebuild it with `mace cache --model M --prompts FILE --out CACHE.safetensors`"
        )
    if not path.exists():
        raise FileNotFoundError(f"preservation cache {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("mace_cache_version") != CACHE_VERSION or "cov" not in f.keys():
                raise CacheMismatchError(f"{path} is not a MACE preservation cache (version {CACHE_VERSION})")
            cov = f.get_tensor("cov")
    except SafetensorError as err:
        raise CacheMismatchError(f"{path}: not a readable safetensors file ({err}); rebuild it with `mace cache`") from None
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1] or not all(k in meta for k in ("tokens", "prompts")):
        raise CacheMismatchError(f"{path}: damaged cache (statistic of shape {tuple(cov.shape)}, metadata {sorted(meta)})")
    if meta.get("complete") != "true" and not allow_partial:
        raise CacheMismatchError(f"{path} is an unfinished cache; run `mace cache` again to complete it")
    cache = PreservationCache(cov.to(torch.float64), int(meta["tokens"]), int(meta["prompts"]), meta.get("model", ""),
                              meta.get("text_encoder_fingerprint", ""), meta.get("prompts_sha256", ""))
    if pipe is not None:
        fp = text_encoder_fingerprint(pipe)
        if cache.fingerprint != fp:
            raise CacheMismatchError(
                f"{path} was made with another text encoder (fingerprint {cache.fingerprint}, model "
                f"{cache.model!r}); this model's is {fp}. Rebuild the cache with this model."
            )
        if cov.shape[0] != text_width(pipe):
            raise CacheMismatchError(f"{path} is {cov.shape[0]} wide, the model's text embedding is {text_width(pipe)}")
    return cache


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line) or a CSV with a 'prompt' column."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or "prompt" not in reader.fieldnames:
                    raise ValueError(f"{path}: a CSV prompt file needs a 'prompt' column, has {reader.fieldnames}")
                prompts = [(row["prompt"] or "").strip() for row in reader]
        else:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {err.start}); a prompt file is text, one prompt per line") from None
    except csv.Error as err:
        raise ValueError(f"{path}: not a readable CSV file ({err})") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def _sha(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def build_preservation_cache(
    pipe,
    prompts: Sequence[str],
    out: str | os.PathLike,
    *,
    model_id: str = "",
    batch_size: int = 64,
    checkpoint_every: int = 20,
    progress: bool = True,
) -> PreservationCache:
    """Stream ``prompts`` through the text encoder(s) and save C_p = sum e e^T to ``out``.

    Every token of every prompt counts (start, words, end and padding: all of them reach the
    cross-attention). Resumes from ``out``'s partial file when a previous run was interrupted;
    returns at once when ``out`` is already complete for these prompts and this model.

    Under torchrun every rank calls it with the same arguments (mace.distributed): each
    encodes a contiguous share of the prompts, checkpointed to a partial file of its own
    (``OUT.rank<r>-of-<n>.partial``, resumed only for the same share of the same prompts),
    the statistics are summed over ranks and rank 0 writes ``out``; every rank returns it.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"cache path {out} must end in .safetensors")
    if distributed.launched():
        if pipe.device.type == "cuda":
            pipe.to(distributed.local_device("cuda"))  # one GPU per rank on a node
        distributed.init_from_env(pipe.device)
    prompts = list(prompts)
    fingerprint = text_encoder_fingerprint(pipe)
    sha = _sha(prompts)
    if out.exists():  # written only after every rank's last collective: the same answer on all
        done = load_preservation_cache(out, allow_partial=True)
        if done.prompts_sha256 == sha and done.fingerprint == fingerprint:
            return done
    mine = distributed.shard(prompts)  # all of them in a single process
    own = f".rank{distributed.rank()}-of-{distributed.world_size()}" if distributed.is_distributed() else ""
    partial = out.with_name(f"{out.name}{own}.partial")
    d = text_width(pipe)
    # The partial file's hash is of this process's prompts: another share is never resumed.
    cache = PreservationCache(torch.zeros(d, d, dtype=torch.float64), 0, 0, model_id, fingerprint, _sha(mine))
    if partial.exists():
        previous = load_preservation_cache(partial, allow_partial=True)
        if previous.prompts_sha256 == cache.prompts_sha256 and previous.fingerprint == fingerprint:
            cache = previous
    starts = range(cache.prompts, len(mine), batch_size)
    bar = tqdm(starts, desc=f"cache {out.name}", unit="batch", disable=not distributed.show_progress(progress),
               initial=cache.prompts // batch_size, total=-(-len(mine) // batch_size))
    for step, start in enumerate(bar, 1):
        chunk = list(mine[start:start + batch_size])
        emb = encode_prompts(pipe, chunk, batch_size=batch_size)
        cxx, _ = mk.token_covariance(emb.reshape(-1, d))
        cache.cov += cxx.to(torch.float64).cpu()  # the running sum lives on the CPU, like the file
        cache.tokens += emb.shape[0] * emb.shape[1]
        cache.prompts = start + len(chunk)
        if step % checkpoint_every == 0 and cache.prompts < len(mine):
            cache.save(partial, partial=True)
    if distributed.is_distributed():
        cache.save(partial, partial=True)  # this share is done: a rerun after another rank failed keeps it
        cache = PreservationCache(distributed.all_reduce_sum(cache.cov), distributed.sum_over_ranks(cache.tokens),
                                  len(prompts), model_id, fingerprint, sha)
        distributed.on_main(lambda: cache.save(out))
    else:
        cache.save(out)
    partial.unlink(missing_ok=True)
    return cache


@dataclass(frozen=True)
class PreservationSettings:
    """Which caches a closed-form stage preserves and how they combine: P = C_prior +
    preserve_weight * C_domain (either may be absent; the stage's scale multiplies P)."""

    prior_cache: str | None = None
    domain_cache: str | None = None
    preserve_weight: float = 0.0
    per_token: bool = False  # each cache divided by its token count: P is a weighted mean of e e^T

    @classmethod
    def from_config(cls, config) -> PreservationSettings:
        """The caches of a MACEConfig and their weights."""
        return cls(config.prior_preservation_cache_path, config.domain_preservation_cache_path, config.preserve_weight,
                   config.preserve_per_token)

    @property
    def files(self) -> list[Path]:
        return [Path(p) for p in (self.prior_cache, self.domain_cache) if p]

    def identity(self) -> dict:
        """The settings plus a hash of each cache file's bytes (for fingerprints)."""
        return {"prior": files_digest([self.prior_cache]) if self.prior_cache else None,
                "domain": files_digest([self.domain_cache]) if self.domain_cache else None,
                "preserve_weight": self.preserve_weight, "per_token": self.per_token}

    def matrix(self, pipe) -> torch.Tensor | None:
        """P for ``pipe`` (each cache checked against its text encoder), None without caches;
        with ``per_token``, P = C_prior / N_prior + preserve_weight * C_domain / N_domain."""
        caches = []
        for path, weight in ((self.prior_cache, 1.0), (self.domain_cache, self.preserve_weight)):
            if path:
                cache = load_preservation_cache(path, pipe=pipe)
                caches.append((cache, weight / max(cache.tokens, 1) if self.per_token else weight))
        return preservation_matrix(caches)


def preservation_matrix(
    caches: Sequence[tuple[PreservationCache | torch.Tensor | None, float]],
) -> torch.Tensor | None:
    """P = sum_k weight_k C_k over the given (cache, weight) pairs; None when there are none."""
    total = None
    for cache, weight in caches:
        if cache is None:
            continue
        cov = cache.cov if isinstance(cache, PreservationCache) else cache
        total = weight * cov.to(torch.float64) if total is None else total + weight * cov.to(torch.float64)
    return total
