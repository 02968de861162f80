"""``ray``: Ray Data batch inference, on a Ray cluster (``ray_address``, or ``$RAY_ADDRESS``) or a
local one started here.

The pipeline: the page's rows -> decode and letterbox (CPU tasks, one CPU each; a photo may be a
local path or any URL fsspec opens, e.g. ``s3://``) -> embed (an actor pool, one model per actor,
``ray_actor_cpus`` CPUs and ``ray_gpus_per_actor`` GPUs each, ``batch_size`` photos a call) ->
batches back to this process, where the store's writer upserts them. Decoded photos travel as
letterboxed uint8 (a quarter of the normalised floats) and are normalised in the actor exactly as
:class:`~fashionlens.data.transforms.Preprocess` does, so a photo's vector is the local engine's.

The actors never get every CPU: Ray Data's decode tasks would then wait for CPUs that never free.
On a GPU cluster ``ray_actors: auto`` gives one actor per GPU (``ray_actor_cpus`` CPUs each) and
the decode tasks one CPU each from the rest. On CPUs, decoding costs a fraction of the model (a
core decodes and letterboxes about 500 catalog photos a second and embeds about 40:
docs/BENCHMARKS.md), so a whole CPU kept for it would idle most of the time (half a 2-core node):
each actor asks for ``ray_actor_cpus x (1 - ray_decode_share)`` CPUs, ``auto`` makes CPUs //
``ray_actor_cpus`` of them, and each decode task asks for ``ray_decode_share`` of a CPU, so a node's
decode tasks always have ``ray_decode_share`` of its CPUs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket

import numpy as np

from fashionlens.errors import UserError
from fashionlens.index.engines.base import ENGINES, Engine



BLOCK_BATCHES = 8


@functools.lru_cache(maxsize=2)
def _cropper(crop: str, regions: str | None):
    """One cropper (its models loaded once) per Ray worker process."""
    from fashionlens.data.crops import build_cropper

    return build_cropper(crop, regions)


def decode_batch(batch: dict, size: int, crop: str = "none", regions: str | None = None) -> dict:
    """Ray Data task: decode each row's photo, cut it (``crop``: the crop stage, to the row's
    ``region``) and letterbox it (uint8, size x size x 3); a photo that cannot be read gives a black
    image and its reason in ``error``; ``crop`` holds each box as JSON ("" without a crop)."""
    from fashionlens.data.images import ImageError
    from fashionlens.data.loader import open_cut
    from fashionlens.data.transforms import letterbox

    cropper = _cropper(crop, regions) if crop != "none" else None
    images = np.zeros((len(batch["path"]), size, size, 3), np.uint8)
    errors = np.full(len(batch["path"]), "", dtype=object)
    boxes = np.full(len(batch["path"]), "", dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            img, box = open_cut(str(path), size, cropper, str(batch["region"][i]) or None)
            boxes[i] = json.dumps(box) if box else ""
            images[i] = np.asarray(letterbox(img, size), np.uint8)
        except ImageError as exc:
            errors[i] = str(exc)
        except Exception as exc:  # a codec bug must not end a run of millions of photos
            errors[i] = f"{path}: cannot decode ({type(exc).__name__}: {exc})"
    return {"key": batch["key"], "image": images, "error": errors, "crop": boxes}


class EmbedActor:
    """Ray Data actor: one model, built once; letterboxed photos in, unit vectors out."""

    def __init__(self, model: str, input_size: int | None, device: str, optimize: str, threads: int):
        import torch

        from fashionlens.models.embedder import build_embedder

        torch.set_num_threads(max(1, threads))
        self.embedder = build_embedder(model, input_size, device, optimize=optimize)
        pre = self.embedder.preprocess
        self.mean, self.inv_std = pre.mean, pre.inv_std

    def __call__(self, batch: dict) -> dict:
        import torch

        ok = batch["error"] == ""
        vectors = np.zeros((len(ok), self.embedder.dim), np.float32)
        if ok.any():
            # Preprocess's arithmetic, photo by photo (the same floats as the local engine's)
            tensors = [torch.from_numpy(np.ascontiguousarray(
                ((np.asarray(img, np.float32) - self.mean) * self.inv_std).transpose(2, 0, 1)))
                for img in batch["image"][ok]]
            batch_t = torch.stack(tensors).contiguous(memory_format=torch.channels_last)
            vectors[ok] = self.embedder.embed_tensors(batch_t)
        return {"key": batch["key"], "vector": vectors, "error": batch["error"], "crop": batch["crop"]}


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """A cluster named by HOST:PORT (or ray://HOST:PORT) that does not answer: a one-line error now
    (``ray.init`` retries a dead address for minutes)."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc})") from None


@ENGINES.register("ray")
class RayEngine(Engine):
    page = 1_000_000  # one Ray Data job per page: its actors start once a page

    def __init__(self, cfg, embedder):
        super().__init__(cfg, embedder)
        try:
            import ray
        except ImportError:
            raise UserError("--engine ray needs Ray: pip install 'fashionlens[scale]'") from None
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
        _check_reachable(address)
        if not ray.is_initialized():
            # a cluster started here runs its workers at the command's priority, as the local engine runs
            # (Ray's default, 15, lets anything else on the machine starve the actors)
            os.environ.setdefault("RAY_worker_niceness", "0")
            try:
                if address:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                else:
                    ray.init(num_cpus=cfg.ray_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(f"cannot start or reach the Ray cluster {address or '(local)'}: {exc}") from None
        self.started = not address
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the command shows its own
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        resources = ray.cluster_resources()
        self.cpus, self.gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        gpu = embedder.device.type == "cuda"
        if gpu and not self.gpus:
            raise UserError(f"device {cfg.device}: the Ray cluster has no GPU")
        self.gpus_per_actor = cfg.ray_gpus_per_actor if cfg.ray_gpus_per_actor is not None else (1.0 if gpu else 0.0)
        self.threads = cfg.ray_actor_cpus
        if self.gpus_per_actor:
            self.actors = max(1, int(self.gpus // self.gpus_per_actor))
            self.actor_cpus, self.decode_cpus = float(self.threads), 1.0
        else:
            self.actors = max(1, self.cpus // self.threads)
            self.actor_cpus, self.decode_cpus = self.threads * (1 - cfg.ray_decode_share), cfg.ray_decode_share
        if cfg.ray_actors != "auto":
            self.actors = int(cfg.ray_actors)
        if self.actors * self.actor_cpus + self.decode_cpus > self.cpus:
            raise UserError(f"{self.actors} actors x {self.actor_cpus:g} CPUs leave no CPU of the Ray cluster's "
                            f"{self.cpus} for decoding (ray_actors, ray_actor_cpus, ray_decode_share)")

    def embed(self, rows):
        import ray

        size = self.embedder.preprocess.size
        items = [{"key": key, "path": str(path), "region": (region[0] or "") if region else ""}
                 for key, path, *region in rows]
        if not items:
            return
        # blocks of a few batches: results stream back as they are made (a block is decoded and embedded whole)
        blocks = max(1, -(-len(items) // (BLOCK_BATCHES * self.cfg.batch_size)))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        # decoding as tasks of their own (its resources differ from the actors', so Ray does not fuse
        # it into them): the actors' CPUs only run the model
        ds = ds.map_batches(decode_batch, fn_kwargs={"size": size, "crop": self.cfg.crop,
                                                      "regions": self.cfg.crop_regions}, batch_size=self.cfg.batch_size,
                            num_cpus=self.decode_cpus, batch_format="numpy")
        ds = ds.map_batches(
            EmbedActor, batch_size=self.cfg.batch_size, batch_format="numpy", concurrency=self.actors,
            num_cpus=self.actor_cpus, num_gpus=self.gpus_per_actor,
            fn_constructor_kwargs={"model": self.cfg.model, "input_size": self.cfg.input_size,
                                   "device": self.cfg.device, "optimize": self.cfg.optimize,
                                   "threads": self.threads})
        from fashionlens.models.embedder import EmbeddedBatch

        for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            ok = out["error"] == ""
            keys = [k.item() if hasattr(k, "item") else k for k in out["key"]]
            yield EmbeddedBatch([k for k, good in zip(keys, ok) if good], out["vector"][ok],
                                [(k, str(e)) for k, e, good in zip(keys, out["error"], ok) if not good],
                                [json.loads(c) if c else None for c, good in zip(out["crop"], ok) if good])

    def describe(self) -> str:
        return (f"ray ({self.actors} actors x {self.threads} CPU"
                + (f" x {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else "") + f", {self.cpus} CPUs)")

    def close(self) -> None:
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()
