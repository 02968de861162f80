"""fashionlens: find clothes by photo in large catalogs, and show why each result matches."""

__version__ = "0.1.0"
