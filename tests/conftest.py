import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

WORDS = [f"w{i}" for i in range(92)]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from pearl_ray.testing import make_word_tokenizer

    return make_word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tiny_tokenizer_dir):
    """Paths of tiny random Llama models sharing one tokenizer: target, a different draft, and a copy."""
    from pearl_ray.testing import save_tiny_llama

    root = tmp_path_factory.mktemp("models")
    target = save_tiny_llama(root / "target", seed=0, num_layers=2, tokenizer_dir=tiny_tokenizer_dir)
    draft = save_tiny_llama(root / "draft", seed=1, num_layers=1, tokenizer_dir=tiny_tokenizer_dir)
    return {"target": str(target), "draft": str(draft)}
