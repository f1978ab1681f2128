import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest, torch
from todre.tiny import tiny_llava, sample_image

torch.set_num_threads(min(2, torch.get_num_threads()))

PROMPTS = ["USER: <image>\nWhere is the cup? ASSISTANT:", "USER: <image>\nWhat? ASSISTANT:"]

@pytest.fixture(scope="session")
def images():
    return [sample_image("coffee"), sample_image("astronaut")]

@pytest.fixture(scope="session")
def llava():
    return tiny_llava("llava")

@pytest.fixture(scope="session")
def llava_eager():
    return tiny_llava("llava", attn_implementation="eager")

@pytest.fixture(scope="session")
def llava_next():
    return tiny_llava("llava_next")
