import os

import pytest

from minicpmv_jax import config as C
from minicpmv_jax.testing.checkpoint import write_checkpoint
from minicpmv_jax.testing.tokenizer_files import write_tokenizer_files

# Keep XLA to the test machine's cores and off any accelerator (tests are the CPU tier).
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
