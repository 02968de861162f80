"""The settings of ``fashionlens serve``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fashionlens.config import Config, usable_cores
from fashionlens.index.config import SearchConfig
from fashionlens.models.runtimes import Optimize


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
        "docs/experiments/serving.md), 1 on a GPU; the attribute model runs as many (one with method gradcam)")
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
    optimize: Optimize = Field("auto", description="speed-up of the embedding and attribute models (see index)")
    uploads: str | None = Field(None, description="where photos added through the API go: None = INDEX/uploads for "
                                "an index folder; for a Milvus store a folder or fsspec URL (s3://bucket/uploads) "
                                "that every replica reads")
    consistency: Literal["Strong", "Bounded", "Session", "Eventually"] = Field(
        "Bounded", description="Milvus stores: consistency of searches (Bounded: an add through another replica "
        "shows within Milvus's staleness bound, a few seconds; Strong: at once, each search waiting for it)")
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
