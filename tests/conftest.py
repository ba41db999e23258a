import os

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before mace_kernels imports, so
# the Triton kernels run on the CPU (slowly: tests use small shapes).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("MACE_KERNELS_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402

ALL_BACKENDS = ["torch", "triton", "cpp"]

# Tolerances of a backend against the torch reference, by the dtype results are returned in.
# Both accumulate in float32 (float64) from the same rounded inputs, so they differ only by
# summation order; results cast back to fp16/bf16 may differ by one unit in the last place
# (the interpreter's bf16 stores truncate).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, name: str = ""
) -> None:
    """assert_close with the absolute tolerance scaled by the reference's magnitude.

    ``name`` (e.g. which gradient) prefixes the failure message.
    """
    tol = TOLERANCES[dtype or expected.dtype]
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1.0)
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, rtol=tol["rtol"], atol=tol["atol"] * scale,
        msg=(lambda message: f"{name}: {message}") if name else None,
    )


def pytest_configure(config):
    """Stop at once, with the reason, where Triton's interpreter cannot run the kernels."""
    from mace_kernels import _backend

    if _backend.INTERPRETER_CONFLICT:
        raise pytest.UsageError(_backend.INTERPRETER_CONFLICT)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _mace_home(tmp_path_factory):
    """Builtin models are built once per test session into a temporary MACE_HOME."""
    os.environ["MACE_HOME"] = str(tmp_path_factory.mktemp("mace_home"))
    yield


@pytest.fixture(scope="session")
def tiny_path(_mace_home):
    from mace.pipelines.builtin import builtin_model_path

    return builtin_model_path("builtin:tiny")


@pytest.fixture
def tiny_pipe(tiny_path):
    import mace

    return mace.load_pipeline(tiny_path)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    """A tiny random CLIP model folder (CLIPModel + processor with the real tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from mace.utils.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=clip_tokenizer())
    processor.save_pretrained(path)
    return path
