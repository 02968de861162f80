"""Vector-index types (each module of this package registers one; :mod:`.base` chooses)."""

from fashionlens.index.types.base import (
    INDEX_TYPES,
    IVF_MIN,
    NPROBE,
    IndexSettings,
    IndexSpec,
    IndexType,
    IndexTypeName,
    apply_search_params,
    choose_spec,
    new_index,
    outgrown,
    supports_remove,
    training_minimum,
    with_search_settings,
)

__all__ = ["INDEX_TYPES", "IVF_MIN", "NPROBE", "IndexSettings", "IndexSpec", "IndexType", "IndexTypeName",
           "apply_search_params", "choose_spec", "new_index", "outgrown", "supports_remove", "training_minimum",
           "with_search_settings"]
