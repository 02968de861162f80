"""Crop methods: each module registers one or more with ``@CROPPERS.register("name")``."""
