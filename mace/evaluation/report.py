"""report.html: the same seeds before and after an erasure, for the erased concepts' prompts and
for kept prompts, each strip optionally labelled by a judge (on the glyph world, the
classifier: mace.world.glyph_judge)."""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image

from mace.utils.atomic import save_image_atomically, write_text_atomically

# Defaults of the config keys report_batch_size and report_steps (see MACEConfig for the others).
REPORT_BATCH = 8  # images per pipeline call
REPORT_STEPS = 8  # sampling steps, at most the run's generation_steps
Judge = Callable[[str, Sequence[Image.Image]], str]
T = TypeVar("T")


def erased_prompts(concepts: Sequence[tuple[str, str]]) -> list[str]:
    """One prompt per erased concept, worded for its type."""
    return [f"a painting in the style of {name}" if kind == "style" else f"a photo of {name}" for name, kind in concepts]


def sample(items: Sequence[T], limit: int | None) -> list[T]:
    """At most ``limit`` of ``items``, spread evenly over the list (the first and the last
    included), in their order; all of them when ``limit`` is None or not below their number."""
    n = len(items)
    if limit is None or n <= limit:
        return list(items)
    if limit <= 1:
        return list(items[:limit])
    return [items[i * (n - 1) // (limit - 1)] for i in range(limit)]


@torch.no_grad()
def strips(pipe, prompts: Sequence[str], seeds: Sequence[int], *, size: int, steps: int, guidance_scale: float,
           batch_size: int = REPORT_BATCH) -> list[list[Image.Image]]:
    """For each prompt, one image per seed, ``batch_size`` images per pipeline call.

    Each image has its own generator, seeded as if its prompt were generated alone, so batching
    changes no image beyond float rounding. The VAE decodes one image at a time meanwhile."""
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    batch_size = max(1, batch_size)
    images: list[Image.Image] = []
    vae = getattr(pipe, "vae", None)
    slicing = getattr(vae, "use_slicing", None)
    if slicing is not None:
        vae.use_slicing = True  # decode one image at a time: the batch costs no decoder memory
    try:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            images += pipe([prompt for prompt, _ in batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                           height=size, width=size, output_type="pil",
                           generator=[torch.Generator().manual_seed(seed) for _, seed in batch]).images
    finally:
        if slicing is not None:
            vae.use_slicing = slicing
    return [images[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]


def write_report(
    out_dir: str | os.PathLike,
    *,
    title: str,
    groups: dict[str, list[str]],
    images: dict[str, dict[str, list[list[Image.Image]]]],
    seeds: Sequence[int],
    stage_seconds: dict[str, float],
    judge: Judge | None = None,
    note: str = "",
    steps: int | None = None,
) -> Path:
    """Write ``out_dir/report.html`` and its strips under ``out_dir/report/``.

    groups: group name -> prompts. images: "before"/"after" -> group -> per prompt its images.
    note: a line under the title (e.g. that only a sample of the erased concepts is shown);
    steps: the sampling steps, stated on the page.
    """
    out_dir = Path(out_dir)
    rows = []
    for group, prompts in groups.items():
        for i, prompt in enumerate(prompts):
            cells = []
            for tag in ("before", "after"):
                row = images[tag][group][i]
                size = row[0].width
                strip = Image.new("RGB", (size * len(row), size))
                for j, image in enumerate(row):
                    strip.paste(image, (j * size, 0))
                name = f"{group}-{i}-{tag}.png"
                save_image_atomically(strip, out_dir / "report" / name)
                verdict = f"<br><small>{html.escape(judge(prompt, row))}</small>" if judge else ""
                cells.append(f'<td><img src="report/{name}" alt="{html.escape(prompt)} ({tag})" '
                             f'width="{max(size, 96) * len(row)}">{verdict}</td>')
            rows.append(f"<tr><td>{group}</td><td>{html.escape(prompt)}</td>{''.join(cells)}</tr>")
    at = f", {steps} sampling steps" if steps else ""
    shown = f'\n<p class="note"><b>{html.escape(note)}</b></p>' if note else ""
    times = "".join(f"<li>{k}: {v:.1f} s</li>" for k, v in stage_seconds.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>MACE erasure report</title>
<style>body{{font-family:sans-serif}} td{{padding:4px;vertical-align:middle}} img{{image-rendering:pixelated}}</style></head>
<body><h1>MACE erasure report</h1>
<p>{html.escape(title)}. The same {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}) before and after{at}.</p>{shown}
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
    return write_text_atomically(out_dir / "report.html", page)
