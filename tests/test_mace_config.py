import pytest
import yaml

from mace.config import KNOWN_KEYS, ConfigError, MACEConfig, load_config

# The keys of the original MACE erase_*.yaml files, every one of which must be accepted.
ORIGINAL_KEYS = """adam_beta1 adam_beta2 adam_epsilon adam_weight_decay all_words allow_tf32 aug_length augment
center_crop checkpointing_steps concept_keyword dataloader_num_workers domain_preservation_cache_path
enable_xformers_memory_efficient_attention final_save_path fuse_preserve_scale generate_data
gradient_accumulation_steps gradient_checkpointing grounded_checkpoint grounded_config hub_model_id hub_token
importance_sampling input_data_dir instance_prompt lamb learning_rate local_rank logging_dir lora lr_num_cycles
lr_power lr_scheduler lr_warmup_steps mapping_concept max_grad_norm max_memory max_train_steps mixed_precision
multi_concept negative_guidance no_real_image num_class_images num_train_epochs output_dir preserve_data_dir
preserve_prompt preserve_weight pretrained_model_name_or_path prior_generation_precision prior_loss_weight
prior_preservation_cache_path prompt_len push_to_hub rank report_to resolution resume_from_checkpoint revision
sam_hq_checkpoint sample_batch_size scale_lr seed set_grads_to_none test_erased_model tokenizer_name
train_batch_size train_preserve_scale train_seperate train_text_encoder uncond_loss_weight use_8bit_adam use_gpt
use_gsam_mask use_pooler use_sam_hq with_prior_preservation with_uncond_loss""".split()


def _write(tmp_path, body: dict, wrap=True):
    path = tmp_path / "erase.yaml"
    path.write_text(yaml.safe_dump({"MACE": body} if wrap else body))
    return path


def _original_style(**changes):
    defaults = MACEConfig().to_dict()
    body = {k: defaults.get(k) for k in ORIGINAL_KEYS}
    body.update(multi_concept=[[["emma-stone", "object"], ["van-gogh", "style"]]], mapping_concept=["a person", "art"],
                prior_preservation_cache_path=False, domain_preservation_cache_path=False,
                pretrained_model_name_or_path="builtin:tiny", resolution=512)
    body.update(changes)
    return body


def test_every_original_key_is_known():
    assert not set(ORIGINAL_KEYS) - set(KNOWN_KEYS)


def test_original_file_layout_loads(tmp_path):
    config = load_config(_write(tmp_path, _original_style()))
    assert config.concepts == [("emma stone", "object"), ("van gogh", "style")]
    assert config.prior_preservation_cache_path is None
    flat = load_config(_write(tmp_path, _original_style(), wrap=False), ["lamb=0.5"])
    assert flat.lamb == 0.5
    assert flat.concepts == config.concepts  # the flat layout is read, not only the override
    # Values in the file are read (not the defaults), and an override beats the file.
    default = MACEConfig()
    assert default.lamb != 0.25 and default.aug_length != 7
    changed = load_config(_write(tmp_path, _original_style(lamb=0.25, aug_length=7)))
    assert (changed.lamb, changed.aug_length) == (0.25, 7)
    assert load_config(_write(tmp_path, _original_style(lamb=0.25)), ["lamb=0.5"]).lamb == 0.5


def test_typo_suggests_the_closest_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'lamda' \(did you mean 'lamb'\?\)"):
        load_config(_write(tmp_path, _original_style(lamda=0.1)))
    with pytest.raises(ConfigError, match="train_separate.*train_seperate"):
        load_config(_write(tmp_path, _original_style(train_separate=True)))


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(mapping_concept=["a person"]), "2 concepts but mapping_concept has 1"),
        (dict(multi_concept=[["emma-stone", "person"], ["x", "style"]]), "unknown concept type 'person'"),
        (dict(prior_preservation_cache_path="./missing.safetensors"), "does not exist"),
        (dict(domain_preservation_cache_path="./cache/cache_cele.pt"), "is a pickle"),
        (dict(pretrained_model_name_or_path="./models/missing"), "does not exist"),
        (dict(aug_length=40, prompt_len=30), "cannot exceed prompt_len"),
        (dict(multi_concept=[]), "no concepts"),
    ],
)
def test_bad_configs_fail_before_work(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, _original_style(**changes)))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
