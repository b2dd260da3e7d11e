import os

import pytest


# Keep XLA to the test machine's cores and off any accelerator (tests are the CPU tier).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight simulated CPU devices for the sharding tests (read when the backend starts, i.e. at first use).
# Unsharded computations still run on one device; measured: no slowdown of the single-device tests.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from minicpmv_jax import config as C  # noqa: E402 (after the XLA environment)
from minicpmv_jax.testing.checkpoint import write_checkpoint
from minicpmv_jax.testing.tokenizer_files import write_tokenizer_files


@pytest.fixture(scope="session")
def tiny_config():
    return C.tiny()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config):
    """A sharded float32 tiny checkpoint with tokenizer files: (folder, tensors as written)."""
    folder = tmp_path_factory.mktemp("tiny_ckpt")
    tensors = write_checkpoint(folder, tiny_config, seed=1234, num_shards=3)
    return str(folder), tensors


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A MiniCPM-V tokenizer folder built from the real Qwen2 vocabulary (written once per session)."""
    path = str(tmp_path_factory.mktemp("tokenizer"))
    write_tokenizer_files(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint loaded in float32 (shared: loading and compiling once per session)."""
    from minicpmv_jax import MiniCPMV
    return MiniCPMV.from_pretrained(tiny_checkpoint[0], dtype="float32")


@pytest.fixture(scope="session")
def tiny_processor(tiny_checkpoint):
    from minicpmv_jax import MiniCPMVProcessor
    return MiniCPMVProcessor.from_pretrained(tiny_checkpoint[0])


@pytest.fixture(scope="session")
def torch_reference(tiny_config, tiny_checkpoint):
    """The torch composite (transformers Qwen2 + torch vision reference) on the tiny checkpoint."""
    from torch_composite import TorchMiniCPMV
    return TorchMiniCPMV(tiny_config, tiny_checkpoint[1])


@pytest.fixture(scope="module")
def release_compiled_programs():
    """Drops every compiled program (``jax.clear_caches``) when the module that asks for it ends.

    The quantization modules compile many int8 / int4 programs on 8-device meshes. With them in the
    session, XLA:CPU crashed (segmentation fault, deterministic) while compiling
    test_sharded_model's sharded logits later in the same process. The test passes alone and after
    any one of those modules, and the suite without them passes. Releasing their programs when each
    module ends keeps the later compiles in a process that no longer holds them."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
