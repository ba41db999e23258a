"""`mace erase`: prepare -> refine -> LoRAs -> fuse, each stage resumable, then a summary."""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .atomic import write_json_atomically
from .cache import load_preservation_cache, preservation_matrix, read_prompt_file
from .cfr import refine
from .config import MACEConfig
from .fusion import fuse
from .lora_io import LORA_WEIGHT_NAME
from .models import load_pipeline
from .prepare import GenerationSettings, concept_folders, generate_concept_data, image_tensor
from .prompts import concept_prompt_pairs
from .train import lora_dir, train_concept_loras

STAGES = ("prepare", "refine", "train", "fuse", "report")
_STATE = ".mace_state.json"


@dataclass
class ErasureSummary:
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    concepts: list[str] = field(default_factory=list)
    refined_model: str = ""
    final_model: str = ""
    report: str = ""

    def line(self) -> str:
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        skipped = f" (already done: {', '.join(self.skipped)})" if self.skipped else ""
        return (f"erased {len(self.concepts)} concept(s) [{'; '.join(self.concepts)}] in {sum(self.seconds.values()):.1f} s "
                f"({times}){skipped}; final model: {self.final_model}; report: {self.report or '-'}")


def save_pipeline_atomically(pipe, path: str | os.PathLike) -> Path:
    """save_pretrained into a temporary sibling, then swap it in: the old model survives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        pipe.save_pretrained(staging)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}-old-{os.getpid()}")
            path.rename(old)
        staging.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _pairs(config: MACEConfig):
    templates = read_prompt_file(config.concept_prompts_file) if config.concept_prompts_file else None
    return {
        name: concept_prompt_pairs(name, mapping, kind, aug_length=config.aug_length, prompt_len=config.prompt_len,
                                   seed=config.seed, templates=templates)
        for (name, kind), mapping in zip(config.concepts, config.mapping_concept)
    }


def _state(config: MACEConfig) -> dict:
    path = Path(config.output_dir) / _STATE
    return json.loads(path.read_text()) if path.exists() else {}


def _mark_done(config: MACEConfig, stage: str, fingerprint: str) -> None:
    state = _state(config)
    state[stage] = fingerprint
    write_json_atomically(Path(config.output_dir) / _STATE, state)


def _fingerprint(config: MACEConfig, keys: tuple[str, ...]) -> str:
    d = config.to_dict()
    return json.dumps({k: d[k] for k in keys}, sort_keys=True, default=str)


_REFINE_KEYS = ("pretrained_model_name_or_path", "multi_concept", "mapping_concept", "lamb", "train_preserve_scale",
                "preserve_weight", "prior_preservation_cache_path", "domain_preservation_cache_path", "all_words",
                "aug_length", "prompt_len", "seed", "method", "concept_prompts_file")
_FUSE_KEYS = _REFINE_KEYS + ("fuse_preserve_scale", "rank", "learning_rate", "max_train_steps", "train_batch_size")


def _resolution(pipe, config: MACEConfig) -> int:
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return config.resolution if config.resolution and config.resolution <= 4 * native else native


def erase(config: MACEConfig, stages: tuple[str, ...] = STAGES, progress: bool = True) -> ErasureSummary:
    """Run the requested stages of MACE for ``config``; finished stages are skipped on a rerun."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    masker = None  # mask_method grounded_sam: masks from Grounding DINO boxes and SAM; loaded before any work
    if "prepare" in stages and config.mask_method == "grounded_sam" and any(kind != "style" for _, kind in config.concepts):
        from .grounded_sam import GroundedSamMasker

        masker = GroundedSamMasker.from_pretrained(config.grounding_model, config.sam_model, device=config.device)
    summary = ErasureSummary(concepts=[name for name, _ in config.concepts])
    output_dir = Path(config.output_dir)
    input_dir = Path(config.input_data_dir or output_dir / "data")
    pairs = _pairs(config)
    state = _state(config)
    device = config.device
    torch.manual_seed(config.seed)

    if "prepare" in stages:
        start = time.perf_counter()
        original = load_pipeline(config.pretrained_model_name_or_path, device=device)
        settings = GenerationSettings(num_images=config.num_images_per_concept, steps=config.generation_steps,
                                      guidance_scale=config.guidance_scale, batch_size=config.sample_batch_size,
                                      resolution=_resolution(original, config), seed=config.seed,
                                      mask_threshold=config.mask_threshold)
        made = 0
        for (name, kind), mapping in zip(config.concepts, config.mapping_concept):
            made += generate_concept_data(original, name, mapping, kind, input_dir, settings,
                                          prompts=[p.old for p in pairs[name]], progress=progress, masker=masker)
        if made == 0:
            summary.skipped.append("prepare")
        summary.seconds["prepare"] = time.perf_counter() - start

    refined_path = output_dir / "refined"
    if "refine" in stages:
        start = time.perf_counter()
        fp = _fingerprint(config, _REFINE_KEYS)
        if state.get("refine") == fp and (refined_path / "model_index.json").exists():
            summary.skipped.append("refine")
        else:
            pipe = load_pipeline(config.pretrained_model_name_or_path, device=device)
            P = _preservation(config, pipe)
            refine(pipe, [p for name in pairs for p in pairs[name]], lam=config.lamb, preserve=P,
                   preserve_scale=config.train_preserve_scale if P is not None else 0.0, all_words=config.all_words,
                   method=config.method, jitter=config.solve_jitter)
            save_pipeline_atomically(pipe, refined_path)
            _mark_done(config, "refine", fp)
        summary.seconds["refine"] = time.perf_counter() - start
    summary.refined_model = str(refined_path)

    if "train" in stages:
        start = time.perf_counter()
        _require(refined_path, "refine")
        pipe = load_pipeline(refined_path, device=device)
        for name, _ in config.concepts:
            images, _ = concept_folders(input_dir, name)
            if not images.is_dir():
                raise FileNotFoundError(f"no prepared data for {name!r} in {images}; run the prepare stage")
        before = sum((lora_dir(output_dir, n) / LORA_WEIGHT_NAME).exists() for n, _ in config.concepts)
        train_concept_loras(
            pipe, [(name, kind, pairs[name]) for name, kind in config.concepts], input_data_dir=input_dir,
            output_dir=output_dir, rank=config.rank, learning_rate=config.learning_rate,
            max_train_steps=config.max_train_steps, train_batch_size=config.train_batch_size,
            importance_sampling=config.importance_sampling, use_pooler=config.use_pooler,
            concepts_per_batch=config.concepts_per_batch, resolution=_resolution(pipe, config), seed=config.seed,
            progress=progress, with_prior_preservation=config.with_prior_preservation,
            preserve_prompt=config.preserve_prompt, preserve_data_dir=config.preserve_data_dir,
            prior_loss_weight=config.prior_loss_weight, num_class_images=config.num_class_images,
        )
        if before == len(config.concepts):
            summary.skipped.append("train")
        summary.seconds["train"] = time.perf_counter() - start

    final_path = Path(config.final_save_path)
    if "fuse" in stages:
        start = time.perf_counter()
        fp = _fingerprint(config, _FUSE_KEYS)
        if state.get("fuse") == fp and (final_path / "model_index.json").exists():
            summary.skipped.append("fuse")
        else:
            _require(refined_path, "refine")
            pipe = load_pipeline(refined_path, device=device)
            original = load_pipeline(config.pretrained_model_name_or_path, device=device)
            loras = {}
            for name, _ in config.concepts:
                folder = lora_dir(output_dir, name)
                if not (folder / LORA_WEIGHT_NAME).exists():
                    raise FileNotFoundError(f"no LoRA for {name!r} in {folder}; run the train stage")
                loras[name] = folder
            P = _preservation(config, pipe)
            fuse(pipe, loras, {n: [p.old for p in pairs[n]] for n in pairs}, lam=config.lamb, preserve=P,
                 preserve_scale=config.fuse_preserve_scale if P is not None else 0.0, original=original,
                 method=config.method, jitter=config.solve_jitter)
            save_pipeline_atomically(pipe, final_path)
            _mark_done(config, "fuse", fp)
        summary.seconds["fuse"] = time.perf_counter() - start
    summary.final_model = str(final_path)

    if "report" in stages and (final_path / "model_index.json").exists():
        start = time.perf_counter()
        summary.report = str(write_report(config, summary, final_path, progress=progress))
        summary.seconds["report"] = time.perf_counter() - start
    return summary


def _require(path: Path, stage: str) -> None:
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"{path} is missing: run the {stage} stage first")


def _preservation(config: MACEConfig, pipe):
    caches = []
    if config.prior_preservation_cache_path:
        caches.append((load_preservation_cache(config.prior_preservation_cache_path, pipe=pipe), 1.0))
    if config.domain_preservation_cache_path:
        caches.append((load_preservation_cache(config.domain_preservation_cache_path, pipe=pipe), config.preserve_weight))
    return preservation_matrix(caches)


REPORT_IMAGES = 4  # images per prompt and model in report.html, seeds seed..seed+3


def _glyph_judge(config: MACEConfig):
    """For the glyph world: a function telling what the classifier sees in a prompt's images."""
    from .world import CONCEPTS, NONE_CLASS, WORLD_MODEL, load_classifier

    if config.pretrained_model_name_or_path != WORLD_MODEL:
        return None
    classifier = load_classifier()

    def judge(prompt: str, images) -> str:
        labels, _ = classifier.predict(torch.stack([image_tensor(im) for im in images]))
        asked = next((c for c in CONCEPTS if c.name in prompt or c.alias in prompt), None)
        if asked is not None:
            hits = int((labels == asked.index).sum())
            return f"classifier: {hits}/{len(images)} show {asked.description} ({asked.name})"
        return "classifier: " + ", ".join("nothing" if int(x) == NONE_CLASS else CONCEPTS[int(x)].description for x in labels)

    return judge


@torch.no_grad()
def write_report(config: MACEConfig, summary: ErasureSummary, final_path: Path, progress: bool = True) -> Path:
    """report.html: before/after images with the same seeds for erased and kept prompts."""
    out = Path(config.output_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    erased = [f"a photo of {name}" if kind != "style" else f"a painting in the style of {name}" for name, kind in config.concepts]
    kept = list(config.report_prompts) or ["a photo of a dog", "a landscape painting", "a red car in the street"]
    models = {"before": load_pipeline(config.pretrained_model_name_or_path, device=config.device),
              "after": load_pipeline(final_path, device=config.device)}
    size = _resolution(models["before"], config)
    judge = _glyph_judge(config)
    seeds = [config.seed + i for i in range(REPORT_IMAGES)]
    rows = []
    for group, prompts in (("erased", erased), ("kept", kept)):
        for i, prompt in enumerate(prompts):
            cells = []
            for tag, pipe in models.items():
                images = pipe([prompt] * len(seeds), num_inference_steps=config.generation_steps,
                              guidance_scale=config.guidance_scale, height=size, width=size, output_type="pil",
                              generator=[torch.Generator().manual_seed(s) for s in seeds]).images
                strip = Image.new("RGB", (size * len(images), size))
                for j, image in enumerate(images):
                    strip.paste(image, (j * size, 0))
                name = f"{group}-{i}-{tag}.png"
                strip.save(out / name)
                verdict = f"<br><small>{html.escape(judge(prompt, images))}</small>" if judge else ""
                cells.append(f'<td><img src="report/{name}" alt="{html.escape(prompt)} ({tag})" '
                             f'width="{max(size, 96) * len(images)}">{verdict}</td>')
            rows.append(f"<tr><td>{group}</td><td>{html.escape(prompt)}</td>{''.join(cells)}</tr>")
    times = "".join(f"<li>{k}: {v:.1f} s</li>" for k, v in summary.seconds.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>MACE erasure report</title>
<style>body{{font-family:sans-serif}} td{{padding:4px;vertical-align:middle}} img{{image-rendering:pixelated}}</style></head>
<body><h1>MACE erasure report</h1>
<p>Model {html.escape(str(config.pretrained_model_name_or_path))} &rarr; {html.escape(str(final_path))};
erased: {html.escape(', '.join(summary.concepts))}. The same {REPORT_IMAGES} seeds ({config.seed}..{seeds[-1]}) before and after.</p>
<table><tr><th>group</th><th>prompt</th><th>before</th><th>after</th></tr>{''.join(rows)}</table>
<h2>Stage times</h2><ul>{times}</ul>
<script>
// Marks how many images loaded, so a headless browser can check the report.
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});
</script></body></html>"""
    path = Path(config.output_dir) / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
