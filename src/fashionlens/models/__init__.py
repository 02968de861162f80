"""Backbones and embedding models."""

from fashionlens.models.embedder import Embedder, build_embedder

__all__ = ["Embedder", "build_embedder"]
