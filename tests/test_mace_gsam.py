"""mask_method grounded_sam: Grounding DINO boxes segmented by SAM, on tiny random-weight models."""

import types

import numpy as np
import pytest
import torch
from PIL import Image

from mace.stages.grounded_sam import GroundedSamMasker, detection_query, union_mask
from mace.stages.prepare import GenerationSettings, concept_folders, generate_concept_data

SIZE = 64
QUERIES = 6
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "person", "ship", "ground", "photo", "of"]


def _save_grounding_dino(folder, vocab_file):
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        ResNetConfig,
    )

    vocab = {word: i for i, word in enumerate(vocab_file.read_text().split("\n")) if word}
    tokenizer = BertTokenizer(vocab=vocab)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": SIZE, "longest_edge": SIZE})
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=64, num_queries=QUERIES,
                                 encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2,
                                 decoder_n_points=2, max_text_len=32, disable_custom_kernels=True)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _save_sam(folder):
    from transformers import (
        SamConfig,
        SamImageProcessorPil,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                             patch_size=8, window_size=4, global_attn_indexes=[1], num_pos_feats=16, mlp_ratio=2.0)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=SIZE, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)).save_pretrained(folder)
    image_processor = SamImageProcessorPil(size={"longest_edge": SIZE}, pad_size={"height": SIZE, "width": SIZE},
                                           mask_size={"longest_edge": SIZE // 4}, mask_pad_size={"height": SIZE // 4, "width": SIZE // 4})
    SamProcessor(image_processor=image_processor).save_pretrained(folder)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsam")
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    torch.manual_seed(0)
    _save_grounding_dino(root / "dino", root / "vocab.txt")
    _save_sam(root / "sam")
    return root / "dino", root / "sam"


@pytest.fixture(scope="module")
def loaded(model_dirs):
    masker = GroundedSamMasker.from_pretrained(*model_dirs, device="cpu")
    return masker.detector, masker.detector_processor, masker.sam, masker.sam_processor


def _image(seed, size=(SIZE, SIZE)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _pixels(mask):
    return np.asarray(mask, dtype=np.uint8)


def test_detection_query_and_union():
    assert detection_query("a Person") == "person."
    assert detection_query("  The Eiffel   Tower. ") == "eiffel tower."
    assert detection_query("ship") == "ship."
    with pytest.raises(ValueError, match="empty"):
        detection_query(" . ")
    masks = torch.zeros(2, 4, 6, dtype=torch.bool)
    assert union_mask(masks[:0], (6, 4)) is None and union_mask(masks, (6, 4)) is None
    masks[0, 0, :2] = masks[1, 3, 5] = True
    expected = np.zeros((4, 6), np.uint8)
    expected[0, :2] = expected[3, 5] = 255
    assert np.array_equal(_pixels(union_mask(masks, (6, 4))), expected)
    with pytest.raises(ValueError, match="shape"):
        union_mask(masks, (4, 6))


def test_real_models_give_binary_masks_of_each_image_size(model_dirs):
    masker = GroundedSamMasker.from_pretrained(*model_dirs, box_threshold=0.0, text_threshold=0.0, device="cpu")
    images = [_image(0), _image(1, (SIZE, 48)), _image(2)]
    boxes = masker.detect(images, "a person")
    assert [len(b) for b in boxes] == [QUERIES] * 3  # threshold 0 keeps every query
    for b, image in zip(boxes, images, strict=True):
        assert bool((b[:, 2] <= image.width).all() and (b[:, 3] <= image.height).all() and (b[:, :2] >= 0).all())
    masks = masker(images, "a person")
    assert [m.size for m in masks] == [im.size for im in images]
    assert all(m.mode == "L" and set(np.unique(_pixels(m))) <= {0, 255} for m in masks)
    assert masker.images_seen == 3
    assert masker.fallbacks == 0  # SAM found something in every image: the masks below are unions, not fallbacks
    # Each mask is the union of SAM's masks of that image's boxes (a full mask where it is empty).
    for mask, per_box, image in zip(masks, masker.segment(images, boxes), images, strict=True):
        assert per_box.shape == (QUERIES, image.height, image.width)
        assert np.array_equal(_pixels(mask), _pixels(union_mask(per_box, image.size)))


class FakeDetector:
    """Grounding DINO outputs with chosen boxes: query q is found with score ~1 where ``found`` says."""

    def __init__(self, boxes, found):
        self.boxes, self.found, self.input_ids = torch.tensor(boxes), torch.tensor(found), None

    def __call__(self, input_ids, **_):
        self.input_ids = input_ids
        batch, length = input_ids.shape
        logits = torch.full((batch, self.boxes.shape[1], 32), -10.0)
        logits[:, :, :length] = torch.where(self.found, 10.0, -10.0)[..., None]
        return types.SimpleNamespace(logits=logits, pred_boxes=self.boxes.float(), input_ids=input_ids)


class FakeSam:
    """SAM that segments exactly its box prompts (mask logits +5 inside, -5 outside), or nothing."""

    def __init__(self, empty=False):
        self.empty, self.calls = empty, []

    def __call__(self, pixel_values, input_boxes, multimask_output=True):
        self.calls.append((input_boxes.clone(), multimask_output))
        batch, n = input_boxes.shape[:2]
        masks = torch.full((batch, n, 1, SIZE, SIZE), -5.0)
        if not self.empty:
            for b in range(batch):
                for k, (x0, y0, x1, y1) in enumerate(input_boxes[b].round().long().tolist()):
                    masks[b, k, 0, y0:y1, x0:x1] = 5.0
        return types.SimpleNamespace(pred_masks=masks)


def test_boxes_go_to_sam_and_masks_are_their_union(loaded):
    masker = GroundedSamMasker(*loaded)
    # (cx, cy, w, h) relative: image 0 finds two boxes, image 1 one; the third query is below the threshold.
    detector = FakeDetector([[[0.25, 0.25, 0.25, 0.25], [0.75, 0.75, 0.25, 0.25], [0.5, 0.5, 0.5, 0.5]],
                             [[0.125, 0.125, 0.25, 0.25], [0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5]]],
                            [[True, True, False], [True, False, False]])
    sam = FakeSam()
    masker.detector, masker.sam = detector, sam
    masks = masker([_image(0), _image(1)], "a person")
    assert detector.input_ids[0].tolist() == masker.detector_processor.tokenizer("person.").input_ids
    (boxes, multimask), = sam.calls
    assert multimask is False
    # Pixel boxes (x0, y0, x1, y1); image 1's single box is repeated to fill the batch.
    torch.testing.assert_close(boxes.float(), torch.tensor([[[8.0, 8, 24, 24], [40, 40, 56, 56]],
                                                            [[0.0, 0, 16, 16], [0, 0, 16, 16]]]))
    expected = np.zeros((2, SIZE, SIZE), np.uint8)
    expected[0, 8:24, 8:24] = expected[0, 40:56, 40:56] = expected[1, 0:16, 0:16] = 255
    assert np.array_equal(np.stack([_pixels(m) for m in masks]), expected)
    assert masker.fallbacks == 0 and masker.last_fallbacks == []


def test_nothing_found_gives_a_full_mask_and_is_counted(loaded):
    masker = GroundedSamMasker(*loaded)
    masker.detector = FakeDetector([[[0.5, 0.5, 0.5, 0.5]]] * 2, [[True], [False]])
    masker.sam = FakeSam(empty=True)  # image 0's box gives an empty mask, image 1 has no box
    with pytest.warns(UserWarning, match=r"nothing found for 'ship\.' in 1 of 2"):
        masks = masker([_image(0), _image(1)], "ship")
    assert all(m.size == (SIZE, SIZE) for m in masks)
    assert np.all(_pixels(masks[0]) == 0) and np.all(_pixels(masks[1]) == 255)  # the empty one kept, as the original
    assert masker.fallbacks == 1 and masker.last_fallbacks == [1] and masker.empty == 1 and masker.last_empty == [0]
    masker.sam = FakeSam()
    with pytest.warns(UserWarning, match="in 1 of 2"):
        masks = masker([_image(0), _image(1)], "ship")
    assert masker.fallbacks == 2 and masker.last_fallbacks == [1] and masker.images_seen == 4 and masker.last_empty == []
    assert int((_pixels(masks[0]) == 255).sum()) == 32 * 32 and np.all(_pixels(masks[1]) == 255)


def test_generate_concept_data_writes_the_masker_masks(loaded, tiny_pipe, tmp_path):
    real = GroundedSamMasker(*loaded, box_threshold=0.0, text_threshold=0.0)
    calls = []

    def masker(images, text):
        masks = real(images, text)
        calls.append((text, [im.size for im in images], masks))
        return masks

    settings = GenerationSettings(num_images=2, steps=2, batch_size=2, seed=0)
    made = generate_concept_data(tiny_pipe, "Emma Stone", "a person", "celebrity", tmp_path, settings, progress=False,
                                 masker=masker)
    assert made == 2 and len(calls) == 1
    text, sizes, masks = calls[0]
    assert text == "Emma Stone" and sizes == [(SIZE, SIZE)] * 2  # the erased concept, as the original queries
    _, mask_dir = concept_folders(tmp_path, "Emma Stone")
    assert mask_dir.name == "Emma Stone mask"
    for i, mask in enumerate(masks):
        saved = Image.open(mask_dir / f"{i}.png")
        assert saved.mode == "L" and np.array_equal(_pixels(saved), _pixels(mask))
    # Styles get no masks and never call the masker.
    generate_concept_data(tiny_pipe, "ship", " ", "object", tmp_path, GenerationSettings(num_images=1, steps=2, seed=0),
                          progress=False, masker=masker)
    assert calls[-1][0] == "ship" and (tmp_path / "ship mask" / "0.png").exists()
    generate_concept_data(tiny_pipe, "Van Gogh", "art", "style", tmp_path, GenerationSettings(num_images=1, steps=2, seed=0),
                          progress=False, masker=masker)
    assert len(calls) == 2 and not (tmp_path / "Van Gogh mask").exists()


def test_missing_models_are_clear_errors(model_dirs, tmp_path):
    dino, sam = model_dirs
    with pytest.raises(FileNotFoundError, match=r"grounding_model: model folder .*no-dino does not exist"):
        GroundedSamMasker.from_pretrained(tmp_path / "no-dino", sam)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"sam_model: .*empty has no config.json"):
        GroundedSamMasker.from_pretrained(dino, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"sam_model: model folder \./models/sam does not exist"):
        GroundedSamMasker.from_pretrained(dino, "./models/sam")
    # A hub id that is not in the cache (tests run offline): named, with the loader's reason.
    with pytest.raises(FileNotFoundError, match=r"sam_model: cannot load 'nobody/no-such-sam'"):
        GroundedSamMasker.from_pretrained(dino, "nobody/no-such-sam", device="cpu")


def test_erase_prepare_stage_uses_grounded_sam(model_dirs, tmp_path, monkeypatch):
    from mace.config import config_from_dict
    from mace.erase import erase
    from mace.stages import grounded_sam

    built = []
    original = GroundedSamMasker.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        built.append((args, kwargs))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(grounded_sam.GroundedSamMasker, "from_pretrained", classmethod(counting))
    asked = []
    real_call = GroundedSamMasker.__call__

    def recording(self, images, text):
        masks = real_call(self, images, text)
        asked.append((text, [_pixels(m) for m in masks]))
        return masks

    monkeypatch.setattr(grounded_sam.GroundedSamMasker, "__call__", recording)
    config = config_from_dict({
        "multi_concept": [["ship", "object"], ["emma-stone", "celebrity"]], "mapping_concept": ["ground", "a person"],
        "pretrained_model_name_or_path": "builtin:tiny", "mask_method": "grounded_sam", "grounding_model": str(model_dirs[0]),
        "sam_model": str(model_dirs[1]), "num_images_per_concept": 1, "generation_steps": 2,
        "input_data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"),
    })
    summary = erase(config, stages=("prepare",), progress=False)
    assert "prepare" in summary.seconds and len(built) == 1  # one masker for every concept
    assert built[0][0] == (str(model_dirs[0]), str(model_dirs[1]))
    for name in ("ship", "emma stone"):
        mask = Image.open(tmp_path / "data" / f"{name} mask" / "0.png")
        assert mask.mode == "L" and mask.size == (SIZE, SIZE)
    # The masker was asked once per concept, and its masks are the ones saved.
    assert len(asked) == 2
    fresh = GroundedSamMasker.from_pretrained(*model_dirs, device="cpu")
    for name, (text, (made,)) in zip(("ship", "emma stone"), list(asked), strict=True):  # fresh() below records too
        saved = _pixels(Image.open(tmp_path / "data" / f"{name} mask" / "0.png"))
        assert np.array_equal(saved, made)
        # ... and Grounded-SAM run afresh on the saved image gives that mask again.
        (again,) = fresh([Image.open(tmp_path / "data" / name / "0.png")], text)
        assert np.array_equal(saved, _pixels(again))
