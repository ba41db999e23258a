"""The last gaps to the original MACE code (docs/fidelity.md):
where the original tools keep object masks, Grounded-SAM's empty segmentations, masks on
styles, the lr schedule under gradient accumulation and report_to's trackers."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import load_file

import mace
import mace.stages.lora_training as training
from mace.config import ConfigError, ConfigWarning, config_from_dict
from mace.stages.grounded_sam import GroundedSamMasker
from mace.stages.lora_training import LoraTrainingSettings
from mace.stages.prepare import (
    GenerationSettings,
    concept_data_files,
    generate_concept_data,
    load_concept_data,
    mask_folders,
    original_mask_folder,
)

SIZE = 64
RES = 32  # training resolution: the builtin model's smallest useful latents, for speed


def _write_images(folder, n, seed=0, size=SIZE, suffix=".jpg", stem="a-photo-of-the-{}_{}", name="x"):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / (stem.format(name.replace(" ", "-"), i) + suffix))


def _original_tools_masks(input_data_dir, rows_per_image):
    """What the original data-preparation script does after generating images: walk
    input_data_dir and save each image's mask into the folder named by replacing the folder's
    name with '<name> mask' over the whole path, as '<file>_mask.jpg'. Mask i covers its first
    rows_per_image[i] rows. Returns the folders written to."""
    written = []
    for root, _, files in os.walk(str(input_data_dir)):
        base = os.path.basename(root)
        mask_root = root.replace(base, f"{base} mask")
        os.makedirs(mask_root, exist_ok=True)
        for i, file in enumerate(sorted(files)):
            mask = np.zeros((SIZE, SIZE), np.uint8)
            mask[: rows_per_image[i]] = 255
            Image.fromarray(mask, mode="L").save(os.path.join(mask_root, file).replace(".jpg", "_mask.jpg"))
            written.append(mask_root)
    return sorted(set(written))


def _pairs(name, mapping="ground", kind="object"):
    return mace.concept_prompt_pairs(name, mapping, kind, aug_length=2)


def _lora(result, name):
    return load_file(str(result.files[name]))


def _b_weights(weights):
    return torch.cat([v.flatten() for k, v in sorted(weights.items()) if "lora_B" in k])


# --- 1. object masks where the original tools put them ------------------------------------------

def test_masks_of_an_original_object_config_are_read_from_where_its_tools_wrote_them(tmp_path, tiny_pipe):
    # The original object configs name a folder per object: input_data_dir: ./data/object/ship.
    data = tmp_path / "data" / "object" / "ship"
    _write_images(data / "ship", 2, name="ship")
    written = _original_tools_masks(data, rows_per_image=[16, 48])
    assert written == [str(tmp_path / "data" / "object" / "ship mask" / "ship mask")]  # not <data>/ship mask
    assert original_mask_folder(data, "ship") == tmp_path / "data" / "object" / "ship mask" / "ship mask"
    assert mask_folders(data, "ship") == [data / "ship mask", tmp_path / "data" / "object" / "ship mask" / "ship mask"]
    files = concept_data_files(data, "ship", "object")
    assert [f.name for f in files] == ["a-photo-of-the-ship_0.jpg", "a-photo-of-the-ship_0_mask.jpg",
                                       "a-photo-of-the-ship_1.jpg", "a-photo-of-the-ship_1_mask.jpg"]
    assert files[1].parent == original_mask_folder(data, "ship")
    _, masks = load_concept_data(data, "ship", "object", SIZE)
    assert [float(m.mean()) for m in masks] == pytest.approx([16 / SIZE, 48 / SIZE], abs=0.02)
    # The data is complete: prepare keeps it and generates nothing.
    settings = GenerationSettings(num_images=2, steps=2, batch_size=2, seed=0)
    assert generate_concept_data(tiny_pipe, "ship", "ground", "object", data, settings, progress=False) == 0
    # A mask missing from both places is an error that names both.
    (original_mask_folder(data, "ship") / "a-photo-of-the-ship_1_mask.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"ship_1\.jpg is missing: .*ship/ship mask/.*ship mask/ship mask/"):
        concept_data_files(data, "ship", "object")


def test_without_the_name_in_input_data_dir_both_layouts_are_one_folder(tmp_path):
    data = tmp_path / "cele"
    _write_images(data / "emma stone", 1, name="emma stone")
    assert _original_tools_masks(data, rows_per_image=[32]) == [str(data / "emma stone mask")]
    assert mask_folders(data, "emma stone") == [data / "emma stone mask"]
    _, masks = load_concept_data(data, "emma stone", "celebrity", SIZE)
    assert float(masks[0].mean()) == pytest.approx(0.5, abs=0.02)


# --- 2. Grounded-SAM: nothing detected -> full mask; detected, nothing segmented -> empty mask -----

class _Stub(torch.nn.Linear):
    def __init__(self):
        super().__init__(1, 1)


def _masker(boxes, segmented):
    """A masker whose detector returns ``boxes`` per image and whose SAM returns ``segmented``."""
    masker = GroundedSamMasker(_Stub(), None, _Stub(), None)
    masker.detect = lambda images, text: [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
    masker.segment = lambda images, b: [m.clone() for m in segmented]
    return masker


def test_an_empty_segmentation_keeps_an_empty_mask_and_no_detection_a_full_one():
    inside = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    inside[0, 8:24, 4:40] = True
    segmented = [inside, torch.zeros(2, SIZE, SIZE, dtype=torch.bool), torch.zeros(0, SIZE, SIZE, dtype=torch.bool)]
    masker = _masker([[[4, 8, 40, 24]], [[0, 0, 10, 10], [5, 5, 20, 20]], []], segmented)
    images = [Image.new("RGB", (SIZE, SIZE)) for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = masker(images, "the ship")
    pixels = [np.asarray(m) for m in masks]
    assert np.array_equal(pixels[0], inside[0].numpy().astype(np.uint8) * 255)  # the union of SAM's masks
    assert pixels[1].max() == 0  # boxes found, SAM segmented nothing: empty, as the original keeps it
    assert pixels[2].min() == 255  # nothing detected: the whole image, as the original
    assert (masker.fallbacks, masker.last_fallbacks, masker.empty, masker.last_empty) == (1, [2], 1, [1])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "nothing found for 'ship.' in 1 of 3" in messages[0]
    assert "'ship.' detected but SAM segmented nothing in 1 of 3" in messages[1]


def test_an_empty_mask_gives_no_loss_from_its_images(tmp_path, tiny_pipe):
    """The original's empty mask selects no pixel: the LoRA gets no gradient from such an image.
    With every mask empty, B (zero at the start) stays exactly zero; full masks train it."""
    trained = {}
    for fill in (0, 255):
        data = tmp_path / f"data-{fill}"
        _write_images(data / "ship", 1, name="ship", suffix=".png", stem="{1}")
        (data / "ship mask").mkdir()
        Image.new("L", (SIZE, SIZE), fill).save(data / "ship mask" / "0.png")
        settings = LoraTrainingSettings(max_train_steps=1, resolution=RES, learning_rate=1e-2)
        result = training.train_concept_loras(tiny_pipe, [("ship", "object", _pairs("ship"))], settings,
                                              input_data_dir=data, output_dir=tmp_path / f"out-{fill}", progress=False)
        trained[fill] = _b_weights(_lora(result, "ship"))
    assert float(trained[0].abs().max()) == 0.0
    assert float(trained[255].abs().max()) > 1e-4


# --- 3. use_gsam_mask on a style ----------------------------------------------------------------

def test_use_gsam_mask_on_a_style_trains_it_on_every_pixel(tmp_path, tiny_pipe):
    """The original crashes there (its style batches carry no mask); here a style never uses one,
    even with masks on, alone or batched with an object: its LoRA is the no-mask LoRA."""
    data = tmp_path / "data"
    _write_images(data / "van gogh", 2, seed=1, name="van gogh")
    _write_images(data / "ship", 2, seed=2, name="ship")
    for folder in ("van gogh mask", "ship mask"):  # empty masks: used, they would stop all training
        (data / folder).mkdir()
        for i in range(2):
            Image.new("L", (SIZE, SIZE), 0).save(data / folder / f"a-photo-of-the-{folder[:-5].replace(' ', '-')}_{i}_mask.jpg")
    assert [f.parent.name for f in concept_data_files(data, "van gogh", "style")] == ["van gogh", "van gogh"]
    style = ("van gogh", "style", _pairs("van gogh", "art", "style"))
    results = {}
    for label, concepts, use_masks in (("alone, no masks", [style], False), ("alone, masks", [style], True),
                                       ("with an object, masks", [("ship", "object", _pairs("ship")), style], True)):
        settings = LoraTrainingSettings(max_train_steps=2, resolution=RES, learning_rate=1e-2, use_masks=use_masks)
        result = training.train_concept_loras(tiny_pipe, concepts, settings, input_data_dir=data,
                                              output_dir=tmp_path / label, progress=False)
        results[label] = result
    reference = _lora(results["alone, no masks"], "van gogh")
    assert float(_b_weights(reference).abs().max()) > 1e-4
    alone = _lora(results["alone, masks"], "van gogh")
    assert all(torch.equal(alone[k], reference[k]) for k in reference)
    batched = _lora(results["with an object, masks"], "van gogh")
    for k in reference:
        torch.testing.assert_close(batched[k], reference[k], rtol=1e-4, atol=1e-6)
    assert float(_b_weights(_lora(results["with an object, masks"], "ship")).abs().max()) == 0.0  # its masks are used


# --- 4. the lr schedule under gradient accumulation -------------------------------------------

def _accelerate_lrs(kind, warmup, total, accumulate, base, num_cycles=1):
    """The original's schedule, literally: built over warmup x accumulate and total x accumulate
    steps, prepared by accelerate and stepped every batch inside ``accelerator.accumulate``; the
    lr read after each optimiser step (as the original logs it)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=base)
    schedule = get_scheduler(kind, optimizer, num_warmup_steps=warmup * accumulate,
                             num_training_steps=total * accumulate, num_cycles=num_cycles)
    accelerator = Accelerator(gradient_accumulation_steps=accumulate, cpu=True)
    try:
        model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
        lrs = []
        for _ in range(total * accumulate):
            with accelerator.accumulate(model):
                model(torch.ones(1, 1)).sum().backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                lrs.append(schedule.get_last_lr()[0])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return lrs


class RecordingTracker(GeneralTracker):
    """A tracker through accelerate's generic interface: records what it is given."""

    name = "mace_test_recorder"
    requires_logging_directory = True
    runs: list = []

    def __init__(self, run_name, logging_dir):
        super().__init__()
        self.run_name, self.logging_dir, self.logged, self.started, self.finished = run_name, logging_dir, [], False, False
        RecordingTracker.runs.append(self)

    @property
    def tracker(self):
        return self

    def start(self):
        self.started = True

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


@pytest.fixture
def recorder(monkeypatch):
    RecordingTracker.runs = []
    monkeypatch.setitem(LOGGER_TYPE_TO_CLASS, RecordingTracker.name, RecordingTracker)  # register_tracker_class, undone
    return RecordingTracker


def test_accumulation_stretches_the_schedule_as_the_original_and_steps_are_logged(tmp_path, tiny_pipe, recorder,
                                                                                   monkeypatch):
    data = tmp_path / "data"
    _write_images(data / "ship", 2, name="ship")
    _original_tools_masks(data, rows_per_image=[64, 64])
    losses = []
    real_step = training.train_step

    def spy(*args, **kwargs):
        losses.append(float(real_step(*args, **kwargs)))
        return torch.tensor(losses[-1])

    monkeypatch.setattr(training, "train_step", spy)
    base, steps, accumulate, warmup = 1e-3, 3, 2, 1
    settings = LoraTrainingSettings(max_train_steps=steps, resolution=RES, learning_rate=base, lr_scheduler="linear",
                                    lr_warmup_steps=warmup, gradient_accumulation_steps=accumulate,
                                    report_to=recorder.name, logging_dir="runs")
    training.train_concept_loras(tiny_pipe, [("ship", "object", _pairs("ship"))], settings, input_data_dir=data,
                                 output_dir=tmp_path / "out", progress=False)
    (run,) = recorder.runs
    assert (run.run_name, run.logging_dir, run.started, run.finished) == ("MACE", str(tmp_path / "out" / "runs"), True, True)
    assert [step for step, _ in run.logged] == [1, 2, 3]
    lrs = [values["lr"] for _, values in run.logged]
    # The original's formula: linear warm-up over warmup x accumulate steps, then linear decay to
    # zero at steps x accumulate, the schedule advancing once per optimiser step.
    w, t = warmup * accumulate, steps * accumulate
    expected = [base * (k / w if k < w else max(0.0, (t - k) / (t - w))) for k in range(1, steps + 1)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs == pytest.approx([5e-4, 1e-3, 7.5e-4])  # without the stretch: 1e-3, 5e-4, 0
    assert lrs == pytest.approx(_accelerate_lrs("linear", warmup, steps, accumulate, base), rel=1e-9)
    assert lrs[-1] == pytest.approx(base * 3 / 4)  # the original stops a quarter of the way down, not at 0
    # Each step's logged loss is the mean of its accumulated batches' losses.
    assert len(losses) == steps * accumulate
    for k, (_, values) in enumerate(run.logged):
        assert values["loss"] == pytest.approx(sum(losses[2 * k:2 * k + 2]) / 2, rel=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "constant_with_warmup", "polynomial", "cosine_with_restarts"])
def test_schedules_under_accumulation_follow_accelerate(kind):
    """lr_schedule stepped once per optimiser step against accelerate stepping the original's
    schedule every batch."""
    base, steps, accumulate, warmup = 1.0, 6, 3, 1
    settings = LoraTrainingSettings(max_train_steps=steps, learning_rate=base, lr_scheduler=kind, lr_warmup_steps=warmup,
                                    gradient_accumulation_steps=accumulate, lr_num_cycles=2)
    optimizer = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=base)
    schedule = training.lr_schedule(optimizer, settings)
    lrs = []
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    assert lrs == pytest.approx(_accelerate_lrs(kind, warmup, steps, accumulate, base, num_cycles=2), rel=1e-9, abs=1e-12)
    if kind == "cosine":  # ends half-way down the cosine, where the original ends
        t, w = steps * accumulate, warmup * accumulate
        assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (steps - w) / (t - w))))
        assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 15)))  # not 0, as without accumulation


def test_fingerprints_follow_the_schedule_but_not_the_trackers():
    plain = LoraTrainingSettings()
    assert LoraTrainingSettings(report_to="tensorboard", logging_dir="x").result_fields() == plain.result_fields()
    assert "schedule_steps" not in LoraTrainingSettings(gradient_accumulation_steps=2).result_fields()  # constant lr
    assert LoraTrainingSettings(gradient_accumulation_steps=2, lr_scheduler="linear").result_fields()["schedule_steps"]


# --- 5. report_to ---------------------------------------------------------------------------------

def _config(**changes):
    body = {"multi_concept": [[["ship", "object"]]], "mapping_concept": ["ground"],
            "pretrained_model_name_or_path": "builtin:tiny", **changes}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = config_from_dict(body, check_paths=False)
    return config, [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


def test_report_to_names_a_missing_tracker_package_in_one_line(monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])  # nothing installed
    config, messages = _config(report_to="tensorboard")
    assert messages == ["report_to='tensorboard' has no effect here: the tensorboard package is not installed "
                        "(nothing is logged to tensorboard)"]
    assert training.start_trackers(config.report_to, "logs") == []
    assert _config(report_to="all")[1] == ["report_to='all' has no effect here: no tracker package (tensorboard, "
                                           "wandb, ...) is installed"]
    assert _config(report_to="none")[1] == [] and _config()[1] == []
    with pytest.raises(ConfigError, match=r"report_to: unknown tracker 'tensorbord'; choose 'none', 'all' or one of "):
        _config(report_to="tensorbord")
    # Installed, it is used and nothing is warned about.
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [accelerate.tracking.LoggerType.TENSORBOARD])
    assert _config(report_to="tensorboard")[1] == []
    config, _ = _config(report_to="tensorboard", logging_dir="tb")
    settings = LoraTrainingSettings.from_config(config, 64)
    assert (settings.report_to, settings.logging_dir) == ("tensorboard", "tb")


def test_a_registered_tracker_gets_each_rank_its_own_run(recorder, monkeypatch, tmp_path):
    assert _config(report_to=recorder.name)[1] == []
    monkeypatch.setattr(training.distributed, "rank", lambda: 2)
    (tracker,) = training.start_trackers([recorder.name], tmp_path)
    assert (tracker.run_name, tracker.logging_dir, tracker.started) == ("MACE-rank2", str(tmp_path), True)
    assert tracker.main_process_only is False  # each rank logs the concepts it trains


@pytest.mark.skipif(not __import__("importlib").util.find_spec("tensorboard"), reason="tensorboard is not installed")
def test_tensorboard_event_file_holds_loss_and_lr(tmp_path, tiny_pipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data"
    _write_images(data / "ship", 1, name="ship")
    _original_tools_masks(data, rows_per_image=[64])
    settings = LoraTrainingSettings(max_train_steps=2, resolution=RES, learning_rate=1e-3, lr_scheduler="linear",
                                    report_to="tensorboard")
    training.train_concept_loras(tiny_pipe, [("ship", "object", _pairs("ship"))], settings, input_data_dir=data,
                                 output_dir=tmp_path / "out", progress=False)
    events = EventAccumulator(str(tmp_path / "out" / "logs" / "MACE"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("lr")] == [(1, pytest.approx(5e-4)), (2, 0.0)]
    assert [e.step for e in events.Scalars("loss")] == [1, 2] and all(e.value > 0 for e in events.Scalars("loss"))
