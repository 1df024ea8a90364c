import pytest

from model_helpers import make_model


@pytest.fixture(scope="module")
def tiny():
    return make_model()
