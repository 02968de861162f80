"""One configuration object per command, loadable from YAML, overridable on the command line.

Every artefact records the configuration that made it (an index stores it in its SQLite
``meta`` table).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fashionlens.errors import UserError


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def read_yaml_mapping(path: Path | str) -> dict:
    """A YAML config file as a dict, or a one-line UserError."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read the YAML config ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a mapping of settings")
    return data


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def load(cls, path: Path | None = None, **overrides):
        """Defaults, then the YAML file (if any), then command-line values that are not None."""
        data = read_yaml_mapping(path) if path is not None else {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            raise UserError(f"config setting {where!r}: {msg}" if where else f"config: {msg}") from None

    @classmethod
    def help_lines(cls, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
        """One ``prefix+name = default: meaning`` line per setting (required ones marked)."""
        def shown(field) -> str:
            if field.is_required():
                return "(required)"
            default = field.get_default(call_default_factory=True)
            return f"{type(default).__name__} defaults" if isinstance(default, BaseModel) else repr(default)

        return [f"{prefix}{name} = {shown(field)}: {field.description or ''}"
                for name, field in cls.model_fields.items() if name not in skip]

    @classmethod
    def help_text(cls) -> str:
        """The settings, defaults and meanings, for ``--help``."""
        return "\n\n".join(cls.help_lines())


class EmbedConfig(Config):
    model: str = Field("lite0", description="'lite0' (offline ImageNet EfficientNet-Lite0), a timm model name, "
                       "or a checkpoint or train / adapt run folder (its chosen model)")
    input_size: int | None = Field(None, ge=32, le=1024, description="letterbox size; None = the model's own (224)")
    batch_size: int = Field(8, ge=1, le=1024, description="images embedded together")
    workers: int = Field(0, ge=0, le=64, description="image-decoding processes beside the model (0 = decode in the main process)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    optimize: Literal["auto", "jit", "none"] = Field(
        "auto", description="inference speed-up: auto = TorchScript freeze on CPU (checked against eager)")


# the vector index types (fashionlens.index.vectors.choose_spec); auto picks by the catalog's size
INDEX_TYPES = ("auto", "flat", "ivfflat", "hnsw", "ivfpq")
IndexType = Literal[INDEX_TYPES]


class IndexConfig(EmbedConfig):
    chunk_size: int = Field(1024, ge=1, le=30_000, description="vectors per chunk file: the most a kill can lose")
    index_type: IndexType = Field(
        "auto", description="auto = exact up to flat_max items, IVF-Flat up to ivf_flat_max, IVF-PQ above")
    flat_max: int = Field(20_000, ge=1, description="largest catalog searched exactly (every vector) when auto")
    ivf_flat_max: int = Field(100_000, ge=1, description="largest catalog searched with IVF-Flat (full vectors in "
                              "memory: 0.5 GB at 100,000 x 1,280 dims) when auto; IVF-PQ above")
    train_sample: int = Field(50_000, ge=256, le=1_000_000,
                              description="vectors sampled to train IVF indexes (50,000 x 1,280 floats = 256 MB)")
    pq_bytes: int = Field(128, ge=1, le=1024, description="IVF-PQ: bytes a vector in memory (the largest divisor "
                          "of the dimension up to this; 128 MB a million vectors)")
    rerank: int = Field(400, ge=0, le=10_000, description="IVF-PQ: candidates re-scored exactly with their stored "
                        "vectors, read from disk (0 = the approximate scores)")


class SearchConfig(Config):
    k: int = Field(10, ge=1, le=1000, description="results per photo")
    batch_size: int = Field(16, ge=1, description="photos embedded together")
    explain: bool = Field(False, description="say why each result matches: attributes that agree (most similar "
                          "region first) and differ (needs 'fashionlens index-attributes')")
    want: list[str] = Field([], description="ATTR=VALUE: only items whose stored prediction is that value "
                            "(attribute by display name, neckline=v-shape, or full name)")
    filters: list[str] = Field([], description="COLUMN=VALUE: only items with that metadata value (a column given "
                               "twice takes either value), e.g. gender=Men")
    min_confidence: float = Field(0.5, ge=0, le=1, description="predictions below this score are not mentioned "
                                  "(both sides) and do not meet 'want'")
    max_pool: int = Field(2000, ge=1, description="with want or filters: the most nearest items searched for k matches")
    max_reasons: int = Field(5, ge=0, description="attributes named per list in the text of the reasons (0 = all)")
    device: str = Field("cpu", description="torch device of the attribute model (explain)")


class IndexAttributesConfig(Config):
    batch_size: int = Field(16, ge=1, le=1024, description="photos explained together")
    workers: int = Field(0, ge=0, le=64, description="image-decoding processes (0 = decode in the main process)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    box_threshold: float = Field(0.5, gt=0, lt=1, description="an attribute's box: its CAM's largest region "
                                 "above this share of the peak")
    method: Literal["auto", "gradcam"] = Field("auto", description="CAM computation (auto = closed form for linear heads)")
    optimize: Literal["auto", "jit", "none"] = Field(
        "auto", description="forward-pass speed-up: auto = TorchScript freeze on CPU (checked against eager)")
    feature_dim: int = Field(128, ge=0, le=65536, description="region features are stored as float16, projected to "
                             "this many dims by a fixed random orthonormal projection (cosine similarity is "
                             "approximately preserved, error about 1/sqrt(dims)); 0 = the full vector")
    projection_seed: int = Field(0, description="seed of the random projection (recorded in the index)")


class RecommendConfig(Config):
    k: int = Field(10, ge=1, le=1000, description="items recommended")
    min_share: float = Field(0.6, gt=0, le=1, description="an attribute value is shared when at least this share "
                             "of the liked items (and 2 of them, when 2+ are liked) confidently predict it")
    min_confidence: float = Field(0.5, ge=0, le=1, description="a prediction counts from this score on")
    visual_weight: float = Field(0.5, ge=0, description="weight of the cosine similarity to the liked items' "
                                 "mean embedding, beside the mean score of the shared values")
    pool: int = Field(1000, ge=1, description="nearest items to the liked items' mean that are re-ranked")


class EvaluateConfig(EmbedConfig):
    ks: list[int] = Field([1, 4, 10, 20], description="cut-offs for hit rate, Recall@K and mAP@K")
    max_html_queries: int = Field(200, ge=0, description="queries shown on the HTML page")


class ServeConfig(Config):
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port, printed at start)")
    api_key_env: str = Field("FASHIONLENS_API_KEY", description="environment variable holding the API key "
                             "that POST/DELETE /api/items need; unset = the catalog is read-only")
    max_upload_mb: float = Field(10.0, gt=0, le=1024, description="largest request body accepted (413 above)")
    max_pixels: int = Field(40_000_000, ge=1, description="largest photo accepted, width x height (decompression "
                            "bombs are refused from the header, before decoding)")
    default_k: int = Field(12, ge=1, le=1000, description="results per search when k is not given")
    max_k: int = Field(100, ge=1, le=1000, description="largest k a client may ask")
    max_batch: int = Field(8, ge=1, le=256, description="photos in the model at once, shared evenly among the "
                           "model_workers: each model call takes at most ceil(max_batch / model_workers)")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="how long a batch waits for more photos")
    model_workers: int | Literal["auto"] = Field(
        "auto", description="batches run side by side, each model call on cores / model_workers threads; auto: "
        "on CPU the most workers up to 4 that divide the cores (forwards on fewer threads each leave no core "
        "idle at OpenMP barriers; on 2 cores the idle share under load fell from 0.2 to 0.05, "
        "docs/BENCHMARKS.md), 1 on a GPU; the attribute model runs as many (one with method gradcam)")
    persist_seconds: float = Field(300.0, ge=1, description="the FAISS file is rewritten this often after "
                                   "changes (and at shutdown); SQLite and the vector chunks are durable at once")
    device: str = Field("cpu", description="torch device of the models")
    model_nice: int = Field(5, ge=0, le=19, description="how much lower than the request threads the model "
                            "threads run (Linux thread nice value; 0 = same): answers and new requests are never "
                            "queued behind a forward")
    rebuild_nice: int = Field(10, ge=0, le=19, description="how much lower than the request threads a "
                              "rebuild of the FAISS structure runs (when the catalog outgrows it, e.g. past "
                              "flat_max), beside the structure in use (Linux thread nice value)")
    faiss_threads: int = Field(1, ge=1, le=256, description="OpenMP threads of each FAISS search (exact flat "
                               "searches of under 20 queries run on torch's threads instead); more only contend "
                               "with the model on a small machine")
    optimize: Literal["auto", "jit", "none"] = Field("auto", description="speed-up of the embedding and "
                                                     "attribute models (see index)")
    thumbnail_px: int = Field(256, ge=16, le=2048, description="longest side of result thumbnails")
    search: SearchConfig = Field(default_factory=SearchConfig,
                                 description="defaults of each search: min_confidence, max_pool, max_reasons")

    @field_validator("model_workers", mode="before")
    @classmethod
    def _workers_range(cls, value):
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if isinstance(value, bool) or not text.isdigit() or not 1 <= int(text) <= 64:
            raise ValueError(f"model_workers must be 'auto' or a whole number from 1 to 64, not {value!r}")
        return int(text)

    def resolved_model_workers(self) -> int:
        """``model_workers`` as a number: as given, or for ``auto`` 1 on a GPU and on CPU the
        most workers up to 4 that share the cores evenly (each gets cores / workers threads)."""
        if self.model_workers != "auto":
            return int(self.model_workers)
        if self.device.split(":")[0].strip().lower() != "cpu":
            return 1
        cores = usable_cores()
        return max(w for w in range(1, 5) if cores % w == 0)

    def worker_batch(self, workers: int | None = None) -> int:
        """The most photos one model call takes with ``workers`` side by side (default: the resolved
        ``model_workers``): ``max_batch`` shared evenly, so no worker takes a large batch while
        another waits idle; the photos in the model at once stay within ``max_batch`` rounded up
        to a multiple of the workers."""
        return -(-self.max_batch // (workers or self.resolved_model_workers()))

    def model_threads(self, workers: int | None = None) -> int:
        """torch threads of each model call with ``workers`` side by side (default: the resolved
        ``model_workers``): the usable cores shared evenly, at least one."""
        return max(1, usable_cores() // (workers or self.resolved_model_workers()))
