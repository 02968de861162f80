"""Cross-domain sample mining (thesis A, 3.2.4): pseudo-identities from unlabeled target photos.

One mining step with the current model:

1. embed every target photo, streaming, into chunk files on disk (``index.vectors.ChunkFiles``);
2. draw ``queries`` photos at random; the *rest* of the target is the gallery, put into a FAISS
   index whose type is chosen by size (exact up to ``flat_max``, IVF-PQ above), chunk by chunk;
3. search each query's top ``j``: ranks 1..m with the query make a new identity; ranks i..j are
   that identity's negatives (0 < m < i <= j).

Nothing holds the whole target as one matrix: only the query vectors and one chunk at a time.

The result is written as ``mined.csv``, one row per photo, for a person to read::

    identity,role,rank,score,path[,label]
    0,query,0,1.0,/data/consumer/train/shirt/a.jpg
    0,positive,1,0.91,...
    0,negative,30,0.55,...

``label`` appears only when the target's labels are known (measurement only: the sub-folder a
photo lies in); :func:`label_precision` then says how often the mined positives share the
query's label. Labels are never used for mining or training.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fashionlens.data.catalog import iter_image_folder
from fashionlens.errors import UserError
from fashionlens.index.vectors import ChunkFiles, choose_spec, new_index, sample_for_training
from fashionlens.training.data import MinedIdentities

Embed = Callable[[Sequence[Path]], torch.Tensor]


@dataclass
class TargetPhotos:
    """The target domain's photos (every image below a folder) and, for measurement only,
    the sub-folder each lies in."""

    paths: list[Path]
    labels: list[str]

    @classmethod
    def read(cls, folder: str | Path) -> TargetPhotos:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"target {folder}: not a folder of photos")
        items = list(iter_image_folder(folder))
        if not items:
            raise UserError(f"target {folder}: no images (jpg, png, webp, ...) below it")
        return cls([Path(it.path) for it in items], [str(it.metadata.get("label", "")) for it in items])


@dataclass
class Mined:
    """Per query: its target row, and the target rows and scores of ranks 1..m and i..j."""

    queries: np.ndarray  # (Q,) target rows
    positives: list[np.ndarray]
    positive_scores: list[np.ndarray]
    negatives: list[np.ndarray]
    negative_scores: list[np.ndarray]
    negative_ranks: list[np.ndarray]
    index: dict  # the IndexSpec used


def embed_to_chunks(paths: Sequence[Path], embed: Embed, folder: Path, chunk_size: int = 4096,
                    progress: Callable[[int, int], None] | None = None) -> tuple[ChunkFiles, list[int], int]:
    """Embed ``paths`` chunk by chunk into ``folder``; rows of photos that cannot be read are
    left out. Returns (chunks, chunk numbers, dimension)."""
    files, numbers, dim = ChunkFiles(folder), [], 0
    for number, start in enumerate(range(0, len(paths), chunk_size)):
        vecs = embed(paths[start:start + chunk_size]).float()
        ok = ~torch.isnan(vecs).any(dim=1)
        rows = np.arange(start, start + len(vecs))[ok.numpy()]
        vecs = torch.nn.functional.normalize(vecs[ok], dim=1).numpy()
        dim = vecs.shape[1] if len(vecs) else dim
        files.write(number, rows, vecs)
        numbers.append(number)
        if progress:
            progress(min(start + chunk_size, len(paths)), len(paths))
    return files, numbers, dim


def mine(paths: Sequence[Path], embed: Embed, work: Path, queries: int, m: int, i: int, j: int,
         seed: int = 0, index_type: str = "auto", flat_max: int = 100_000, chunk_size: int = 4096,
         progress: Callable[[int, int], None] | None = None) -> Mined:
    """One mining step over the target photos ``paths`` (see the module docstring). ``work`` is
    a scratch folder for the embedding chunks, removed at the end."""
    if not 0 < m < i <= j:
        raise UserError(f"mining needs 0 < m < i <= j, got m={m}, i={i}, j={j}")
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    try:
        files, numbers, dim = embed_to_chunks(paths, embed, work, chunk_size, progress)
        readable = np.concatenate([files.read(c)[0] for c in numbers])
        n_gallery = len(readable) - queries
        if queries < 1 or n_gallery < j:
            raise UserError(f"{len(readable)} readable target photos: too few for {queries} queries and "
                            f"a gallery of at least j={j} (lower queries or i/j)")
        rng = np.random.default_rng(seed)
        query_rows = np.sort(rng.choice(readable, queries, replace=False))
        spec = choose_spec(n_gallery, dim, index_type, flat_max=flat_max)
        index = new_index(spec)

        def gallery_chunks():
            for c in numbers:
                rows, vecs = files.read(c)
                keep = ~np.isin(rows, query_rows)
                yield rows[keep], vecs[keep]

        if not index.is_trained:
            index.train(sample_for_training(gallery_chunks(), n_gallery, 50_000, dim, seed))
        q_vecs = np.zeros((queries, dim), np.float32)
        for c in numbers:
            rows, vecs = files.read(c)
            hit = np.isin(rows, query_rows)
            index.add_with_ids(vecs[~hit], rows[~hit])
            q_vecs[np.searchsorted(query_rows, rows[hit])] = vecs[hit]
        scores, ids = index.search(q_vecs, j)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ranks = np.arange(1, j + 1)
    pos, pos_s, neg, neg_s, neg_r = [], [], [], [], []
    for s_row, i_row in zip(scores, ids):
        found = i_row >= 0
        take_p = found & (ranks <= m)
        take_n = found & (ranks >= i)
        pos.append(i_row[take_p]), pos_s.append(s_row[take_p])
        neg.append(i_row[take_n]), neg_s.append(s_row[take_n]), neg_r.append(ranks[take_n])
    return Mined(query_rows, pos, pos_s, neg, neg_s, neg_r, spec.to_dict())


def to_identities(mined: Mined, target: TargetPhotos) -> MinedIdentities:
    p = target.paths
    return MinedIdentities([[p[q]] + [p[r] for r in rows] for q, rows in zip(mined.queries, mined.positives)],
                           [[p[r] for r in rows] for rows in mined.negatives])


def write_mined_csv(path: Path, mined: Mined, target: TargetPhotos, with_labels: bool = False) -> None:
    """``mined.csv`` (see the module docstring), written to a temporary file and renamed."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    columns = ["identity", "role", "rank", "score", "path"] + (["label"] if with_labels else [])
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)

        def row(ident, role, rank, score, r):
            writer.writerow([ident, role, rank, f"{float(score):.6f}", str(target.paths[r])]
                            + ([target.labels[r]] if with_labels else []))

        for ident, q in enumerate(mined.queries):
            row(ident, "query", 0, 1.0, q)
            for rank, (r, s) in enumerate(zip(mined.positives[ident], mined.positive_scores[ident]), start=1):
                row(ident, "positive", rank, s, r)
            for rank, r, s in zip(mined.negative_ranks[ident], mined.negatives[ident], mined.negative_scores[ident]):
                row(ident, "negative", rank, s, r)
    os.replace(tmp, path)


def read_mined_csv(path: Path) -> MinedIdentities:
    """The identities of a ``mined.csv``: query + positives, and negatives."""
    positives: dict[int, list[Path]] = {}
    negatives: dict[int, list[Path]] = {}
    try:
        with open(path, newline="") as fh:
            for line, row in enumerate(csv.DictReader(fh), start=2):
                ident, role = int(row["identity"]), row["role"]
                if role not in ("query", "positive", "negative"):
                    raise ValueError(f"unknown role {role!r}")
                (negatives if role == "negative" else positives).setdefault(ident, []).append(Path(row["path"]))
    except (KeyError, ValueError, TypeError, csv.Error) as exc:
        raise UserError(f"{path}: not a mined-identities CSV ({exc})") from None
    order = sorted(set(positives) | set(negatives))
    return MinedIdentities([positives.get(q, []) for q in order], [negatives.get(q, []) for q in order])


def label_precision(mined: Mined, labels: Sequence[str]) -> dict:
    """Measurement only: ``positive_precision`` = share of mined positives (ranks 1..m) whose
    label is the query's; ``negative_same_label`` = share of mined negatives (ranks i..j) whose
    label is the query's (negatives that are in fact positives at the labels' granularity)."""
    lab = np.asarray(labels)
    pos_same = [lab[rows] == lab[q] for q, rows in zip(mined.queries, mined.positives)]
    neg_same = [lab[rows] == lab[q] for q, rows in zip(mined.queries, mined.negatives)]
    n_pos, n_neg = sum(len(x) for x in pos_same), sum(len(x) for x in neg_same)
    return {
        "positive_precision": float(sum(x.sum() for x in pos_same) / n_pos) if n_pos else None,
        "negative_same_label": float(sum(x.sum() for x in neg_same) / n_neg) if n_neg else None,
        "positives": n_pos, "negatives": n_neg,
    }
