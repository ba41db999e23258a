"""report.html: batched generation, the bounded sample of erased concepts, the cost bound."""

import math

import numpy as np
import torch

from mace.config import config_from_dict
from mace.erase import DEFAULT_REPORT_PROMPTS, ErasureSummary, _report
from mace.evaluation.report import erased_prompts, sample, strips

PROMPTS = ["a photo of Emma Stone", "a photo of a ship", "a dog sleeping on a sofa"]
SEEDS = [7, 8, 9]


class CountingPipe:
    """A pipeline that counts its calls and the images each call asks for."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, prompt, **kwargs):
        self.calls.append(len(prompt))
        return self.pipe(prompt, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


class OneModel:
    """RunModels' interface for the report: the same counting pipeline for every version."""

    def __init__(self, pipe):
        self.pipe = pipe

    def use(self, version):
        return self.pipe


def _pixels(rows):
    return np.stack([np.asarray(image, dtype=np.int16) for row in rows for image in row])


def test_batched_images_equal_each_prompt_alone(tiny_pipe):
    kw = dict(size=32, steps=2, guidance_scale=7.5)
    counting = CountingPipe(tiny_pipe)
    batched = strips(counting, PROMPTS, SEEDS, batch_size=4, **kw)  # batches cut across prompts
    assert counting.calls == [4, 4, 1]
    assert [len(row) for row in batched] == [len(SEEDS)] * len(PROMPTS)
    # The unbatched reference: one call per prompt with its seeds' generators (the report's
    # generation before batching), and one call per image.
    alone = [tiny_pipe([p] * len(SEEDS), num_inference_steps=2, guidance_scale=7.5, height=32, width=32,
                       generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images for p in PROMPTS]
    single = strips(tiny_pipe, PROMPTS, SEEDS, batch_size=1, **kw)
    everything = strips(tiny_pipe, PROMPTS, SEEDS, batch_size=16, **kw)
    want = _pixels(alone)
    for name, got in (("4 per call", batched), ("1 per call", single), ("16 per call", everything)):
        diff = np.abs(_pixels(got) - want).reshape(len(want), -1).max(axis=1)
        assert diff.max() <= 1, (name, diff)  # float rounding at most flips a level
    # Seeds and prompts change the images by more than the tolerance (seeds by far more: the
    # random text encoder tells prompts apart only a little), so a mix-up would be caught.
    assert np.abs(want[0] - want[1]).max() > 100 and np.abs(want[0] - want[len(SEEDS)]).max() >= 5


def test_sample_is_spread_and_deterministic():
    items = list(range(100))
    assert sample(items, 8) == [0, 14, 28, 42, 56, 70, 84, 99]
    assert sample(items, 8) == sample(list(items), 8)
    assert sample(items[:5], 8) == items[:5] and sample(items[:8], 8) == items[:8]
    assert sample(items, 1) == [0] and sample(items, None) == items
    assert len(set(sample(items[:9], 8))) == 8


def _config(tmp_path, n, **extra):
    body = {"multi_concept": [[f"concept{i:03d}", "style" if i % 2 else "object"] for i in range(n)],
            "mapping_concept": ["a thing"] * n, "pretrained_model_name_or_path": "builtin:tiny",
            "output_dir": str(tmp_path / "out"), "final_save_path": str(tmp_path / "out" / "final"),
            "resolution": 32, "generation_steps": 1, "report_images": 2, "seed": 3}
    body.update(extra)
    return config_from_dict(body, check_paths=False)


def test_report_shows_a_bounded_sample_in_a_bounded_number_of_calls(tmp_path, tiny_pipe):
    config = _config(tmp_path, 100, report_max_concepts=5, report_batch_size=8)
    counting = CountingPipe(tiny_pipe)
    path = _report(config, OneModel(counting), ErasureSummary(concepts=[n for n, _ in config.concepts]))
    page = path.read_text()
    shown = sample(config.concepts, 5)
    assert "Showing 5 of 100 erased concepts" in page
    images = 2 * (5 + len(DEFAULT_REPORT_PROMPTS)) * 2  # before and after, 2 seeds per prompt
    assert sum(counting.calls) == images and max(counting.calls) <= 8
    assert len(counting.calls) == 2 * math.ceil(images / 2 / 8)  # 100 concepts, still 4 calls
    assert page.count("<img") == 2 * (5 + len(DEFAULT_REPORT_PROMPTS))
    assert all(prompt in page for prompt in erased_prompts(shown))
    assert "concept000" in page.split("<table>")[1] and "concept099" in page.split("<table>")[1]
    assert "concept001" not in page.split("<table>")[1]  # not in the sample: no row


def test_report_of_few_concepts_shows_them_all_without_a_note(tmp_path, tiny_pipe):
    config = _config(tmp_path, 2, report_prompts=["a red car"], report_images=1, report_steps=2)
    counting = CountingPipe(tiny_pipe)
    page = _report(config, OneModel(counting), ErasureSummary(concepts=["concept000", "concept001"])).read_text()
    assert "Showing" not in page and page.count("<img") == 2 * 3
    assert counting.calls == [3, 3]  # one call per model
    assert "2 sampling steps" in page
