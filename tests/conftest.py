"""Shared fixtures: tiny random backbones saved to folders (no network), built once per session."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import build_vlm, make_tiny_backbones  # noqa: E402


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory):
    """(vision_dir, llm_dir): a full tiny CLIPModel and a tiny Llama + byte-level BPE tokenizer."""
    return make_tiny_backbones(str(tmp_path_factory.mktemp("backbones")))


@pytest.fixture
def tiny_vlm(tiny_backbones):
    """A fresh (model, processor) built from the tiny backbones with build_vlm."""
    model, processor = build_vlm(*tiny_backbones)
    return model.eval(), processor
