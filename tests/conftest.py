import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    """The real packaged default target (dequantized once into the cache, then ~0.5 s a load)."""
    from lit_sahs.targets import load_target

    return load_target("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_llava():
    from lit_sahs.targets import load_target

    return load_target("tiny-llava")
