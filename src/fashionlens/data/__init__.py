"""Readers for catalogs and benchmark formats, image decoding and transforms."""

from fashionlens.data.records import Item

__all__ = ["Item"]
