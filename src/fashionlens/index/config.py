"""The settings of the index stage's commands: ``index`` (:class:`IndexConfig`), ``search``
(:class:`SearchConfig`) and ``index-attributes`` (:class:`IndexAttributesConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fashionlens.config import Config
from fashionlens.data.crops import CropName
from fashionlens.index.engines import EngineName
from fashionlens.index.types import IndexTypeName
from fashionlens.models.embedder import EmbedConfig
from fashionlens.models.runtimes import Optimize


class IndexConfig(EmbedConfig):
    chunk_size: int = Field(1024, ge=1, le=30_000, description="vectors per chunk file: the most a kill can lose")
    index_type: IndexTypeName = Field(
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
    engine: EngineName = Field("local", description="local = decode and embed in this process; ray = Ray Data "
                               "batch inference on a Ray cluster (ray_address) or a local one")
    ray_address: str | None = Field(None, description="Ray cluster to run on (ray://HOST:10001, or auto); "
                                    "None = $RAY_ADDRESS, else a local cluster started for the run")
    ray_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray cluster (None = all)")
    ray_actors: int | Literal["auto"] = Field("auto", description="embedding actors (one model each); auto = one a "
                                              "GPU, else CPUs // ray_actor_cpus")
    ray_actor_cpus: int = Field(1, ge=1, le=256, description="CPUs (and torch threads) of each embedding actor")
    ray_decode_share: float = Field(0.125, gt=0, lt=1, description="CPU clusters: the share of every CPU kept for "
                                    "decoding (actors ask for the rest); never 0, or the decode tasks would wait "
                                    "for CPUs that never free")
    ray_gpus_per_actor: float | None = Field(None, ge=0, le=8, description="GPUs of each actor (None = 1 when "
                                             "device is cuda, else 0)")
    milvus_index: Literal["auto", "FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "DISKANN"] = Field(
        "auto", description="Milvus stores: the vector index; auto = FLAT up to flat_max items, HNSW up to "
        "milvus_hnsw_max, IVF_SQ8 above")
    milvus_hnsw_max: int = Field(2_000_000, ge=1, description="Milvus stores: largest collection indexed with HNSW "
                                 "when auto (every vector in the query nodes' memory, plus its graph)")


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
    crop: CropName = Field("none", description="cut each query photo before embedding it: none, person, garment "
                           "(the region the photo shows of its person) or auto (garment, else the salient object); "
                           "independent of the catalog's crop")


class IndexAttributesConfig(Config):
    batch_size: int = Field(16, ge=1, le=1024, description="photos explained together")
    workers: int = Field(0, ge=0, le=64, description="image-decoding processes (0 = decode in the main process)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    box_threshold: float = Field(0.5, gt=0, lt=1, description="an attribute's box: its CAM's largest region "
                                 "above this share of the peak")
    method: Literal["auto", "gradcam"] = Field("auto", description="CAM computation (auto = closed form for linear heads)")
    optimize: Optimize = Field(
        "auto", description="forward-pass speed-up: auto = TorchScript freeze on CPU (checked against eager)")
    feature_dim: int = Field(128, ge=0, le=65536, description="region features are stored as float16, projected to "
                             "this many dims by a fixed random orthonormal projection (cosine similarity is "
                             "approximately preserved, error about 1/sqrt(dims)); 0 = the full vector")
    projection_seed: int = Field(0, description="seed of the random projection (recorded in the index)")
