"""Fixtures shared by the trainer tests."""
from __future__ import annotations

import pytest

from .engine.fake_openai import serving


@pytest.fixture
def server():
    """The scripted OpenAI-compatible server (engine/fake_openai.py) the engine, TeacherGen and
    decontamination tests talk to, stopped after the test."""
    with serving() as fake:
        yield fake
