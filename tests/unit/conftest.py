from __future__ import annotations

import pytest

from tests.support.tiny_families import family_configs
from tests.support.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random HF model directory, built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """The tiny model loaded in fp32 on CPU (exact, so batch composition cannot change greedy tokens)."""
    from common.model_files import resolve
    from worker.model import load_model

    return load_model(resolve(str(tiny_model_dir)), "", "cpu", "fp32", 1)


@pytest.fixture(scope="session", params=sorted(family_configs()))
def family(request, tmp_path_factory):
    """(model_type, model directory, its model loaded by tgq in fp32): each family with a fused forward."""
    from common.model_files import resolve
    from tests.support.tiny_families import build_family_model
    from worker.model import load_model

    kind = request.param
    path = build_family_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
    return kind, path, load_model(resolve(str(path)), "", "cpu", "fp32", 1)
