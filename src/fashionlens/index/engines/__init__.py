"""Embedding engines of ``fashionlens index`` (each module of this package registers one)."""

from fashionlens.index.engines.base import ENGINES, Engine, EngineName

__all__ = ["ENGINES", "Engine", "EngineName"]
