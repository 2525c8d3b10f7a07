"""Fixtures shared by the training tests."""

import pytest

from _util import write_corpus_texts


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Two small train documents and one held-out document cut from the shipped corpus."""
    return write_corpus_texts(tmp_path_factory.mktemp("texts"))
