"""Cross-domain sample mining (docs/METHODS.md, retrieval 8): pseudo-identities from unlabeled target photos.

One mining step with the current model:

1. embed every target photo, streaming, into chunk files on disk (``index.vectors.ChunkFiles``);
2. draw ``queries`` photos at random; the *rest* of the target is the gallery, put into a FAISS
   index whose type is chosen by size (``choose_spec``: exact up to ``flat_max``, then IVF-Flat
   up to 100,000, IVF-PQ codes above, not re-scored), chunk by chunk;
3. search each query's top ``j``: ranks 1..m with the query make a new identity; ranks i..j are
   that identity's negatives (0 < m < i <= j).

Nothing holds the whole target as one matrix: only the query vectors and one chunk at a time.

The result is written as ``mined.csv``, one row per photo, for a person to read::

    identity,role,rank,score,path[,label]
    0,query,0,1.0,/data/consumer/train/shirt/a.jpg
    0,positive,1,0.91,...
    0,negative,30,0.55,...

``label`` appears only when the target's labels are known (measurement only: the sub-folder a
photo lies in); :func:`~fashionlens.training.pseudo_labels.label_precision` then says how often
the mined positives share the query's label. Labels are never used for mining or training. The
file, the measures of its pseudo-labels and the cap per identity are in
:mod:`fashionlens.training.pseudo_labels`.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fashionlens.data.catalog import iter_image_folder
from fashionlens.errors import UserError
from fashionlens.index.types import choose_spec, new_index
from fashionlens.index.vectors import ChunkFiles, sample_for_training

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
class SourceVote:
    """Cross-domain assignment (an extension of the method's mining): each mined group (query +
    ranks 1..m) is searched, by the mean of its embeddings, among the labelled ``paths`` of the
    source; when at least ``min_share`` of its ``k`` nearest source photos belong to one source
    identity, the group joins that identity instead of becoming a new one. :func:`vote_photos`
    uses the same settings photo by photo."""

    paths: list[Path]
    identities: list[str]  # the source identity of each path
    k: int = 20
    min_share: float = 0.5
    prior_power: float = 0.0  # a vote for identity c weighs (c's share of the source) ** -prior_power

    def weights(self, names: list[str]) -> np.ndarray | None:
        """Each identity's vote weight (None: plain counts): the inverse of its share of the source
        photos to the power ``prior_power``, scaled so that a vote drawn at random from the source
        photos weighs 1 on average. Written here: a class-prior correction of a k-NN vote (dividing
        the vote by the prior turns p(class | photo) into a likelihood ratio) that no library
        offers for FAISS results."""
        if not self.prior_power:
            return None
        counts = Counter(self.identities)
        share = np.array([counts[n] / len(self.identities) for n in names])
        w = share ** -self.prior_power
        return w / float((share * w).sum())


@dataclass
class Mined:
    """Per query: its target row, and the target rows and scores of ranks 1..m and i..j; with a
    :class:`SourceVote`, the source identity each group joins (None: no majority) and its share."""

    queries: np.ndarray  # (Q,) target rows
    positives: list[np.ndarray]
    positive_scores: list[np.ndarray]
    negatives: list[np.ndarray]
    negative_scores: list[np.ndarray]
    negative_ranks: list[np.ndarray]
    index: dict  # the IndexSpec used
    assigned: list[str | None] | None = None
    assigned_share: list[float] | None = None


def embed_to_chunks(paths: Sequence[Path], embed: Embed, folder: Path, chunk_size: int = 4096,
                    progress: Callable[[int, int], None] | None = None
                    ) -> tuple[ChunkFiles, list[int], int, np.ndarray]:
    """Embed ``paths`` chunk by chunk into ``folder``; rows of photos that cannot be read are
    left out. Returns (chunks, chunk numbers, dimension, the rows written)."""
    files, numbers, dim, written = ChunkFiles(folder), [], 0, []
    for number, start in enumerate(range(0, len(paths), chunk_size)):
        vecs = embed(paths[start:start + chunk_size]).float()
        ok = ~torch.isnan(vecs).any(dim=1)
        rows = np.arange(start, start + len(vecs))[ok.numpy()]
        vecs = torch.nn.functional.normalize(vecs[ok], dim=1).numpy()
        dim = vecs.shape[1] if len(vecs) else dim
        files.write(number, rows, vecs)
        numbers.append(number)
        written.append(rows)
        if progress:
            progress(min(start + chunk_size, len(paths)), len(paths))
    return files, numbers, dim, (np.concatenate(written) if written else np.zeros(0, np.int64))


def _build_index(files: ChunkFiles, numbers: list[int], dim: int, n: int, exclude: np.ndarray,
                 index_type: str, flat_max: int, seed: int):
    """A FAISS index (type chosen by size) over the chunks' rows that are not in ``exclude``."""
    spec = choose_spec(n, dim, index_type, flat_max=flat_max)
    index = new_index(spec)

    def kept_chunks():
        for c in numbers:
            rows, vecs = files.read(c)
            keep = ~np.isin(rows, exclude)
            yield rows[keep], vecs[keep]

    if not index.is_trained:
        index.train(sample_for_training(kept_chunks(), n, 50_000, dim, seed))
    for rows, vecs in kept_chunks():
        index.add_with_ids(vecs, rows)
    return index, spec


def _rows_of(files: ChunkFiles, numbers: list[int], wanted: np.ndarray, dim: int) -> np.ndarray:
    """The vectors of the sorted unique rows ``wanted``, read chunk by chunk."""
    out = np.zeros((len(wanted), dim), np.float32)
    for c in numbers:
        rows, vecs = files.read(c)
        hit = np.isin(rows, wanted)
        out[np.searchsorted(wanted, rows[hit])] = vecs[hit]
    return out


def _source_index(vote: SourceVote, embed: Embed, work: Path, dim: int, flat_max: int, seed: int, chunk_size: int):
    """A FAISS index over the vote's source photos (row = position in ``vote.paths``), its type
    chosen by the source's own size (the target's ``index_type`` does not apply to it)."""
    s_files, s_numbers, _, s_rows = embed_to_chunks(vote.paths, embed, work / "source", chunk_size)
    if len(s_rows) < vote.k:
        raise UserError(f"{len(s_rows)} readable source photos: fewer than the vote's k={vote.k}")
    index, _ = _build_index(s_files, s_numbers, dim, len(s_rows), np.zeros(0, np.int64), "auto", flat_max, seed)
    return index


def _identity_codes(vote: SourceVote) -> tuple[list[str], np.ndarray]:
    """The vote's identities, sorted, and each source photo's number among them."""
    names = sorted(set(vote.identities))
    number = {name: i for i, name in enumerate(names)}
    return names, np.array([number[n] for n in vote.identities], np.int32)


def _votes(ids: np.ndarray, code: np.ndarray) -> np.ndarray:
    """The identity numbers of FAISS results ``ids`` (-1 where the index returned nothing)."""
    return np.where(ids >= 0, code[np.maximum(ids, 0)], -1)


def _majority(votes: np.ndarray, weights: np.ndarray | None = None) -> tuple[int, float, float]:
    """The identity number with the most ``votes`` (those >= 0; each weighing ``weights[number]``,
    or 1), its weighted count and the weighted count of all the votes (an abstention, -1, weighs
    1); a tie goes to the one reached first (the nearer photo). (-1, 0, n) when there is no vote."""
    cast = votes[votes >= 0]
    abstained = len(votes) - len(cast)
    if not len(cast):
        return -1, 0, float(abstained)
    ids, first, counts = np.unique(cast, return_index=True, return_counts=True)
    scores = counts.astype(np.float64) if weights is None else counts * weights[ids]
    tied = np.flatnonzero(scores == scores.max())
    best = tied[np.argmin(first[tied])]
    return int(ids[best]), float(scores[best]), float(scores.sum()) + abstained


def _vote(groups: list[np.ndarray], files: ChunkFiles, numbers: list[int], dim: int, vote: SourceVote,
          embed: Embed, work: Path, flat_max: int, seed: int, chunk_size: int
          ) -> tuple[list[str | None], list[float]]:
    wanted = np.unique(np.concatenate(groups))
    vecs = _rows_of(files, numbers, wanted, dim)
    centroids = np.stack([vecs[np.searchsorted(wanted, g)].mean(axis=0) for g in groups])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    index = _source_index(vote, embed, work, dim, flat_max, seed, chunk_size)
    _, ids = index.search(centroids.astype(np.float32), vote.k)
    names, code = _identity_codes(vote)
    weights = vote.weights(names)
    assigned, shares = [], []
    for row in _votes(ids, code):
        best, count, total = _majority(row, weights)
        share = count / total
        assigned.append(names[best] if count and share >= vote.min_share else None)
        shares.append(share)
    return assigned, shares


def mine(paths: Sequence[Path], embed: Embed, work: Path, queries: int, m: int, i: int, j: int,
         seed: int = 0, index_type: str = "auto", flat_max: int = 100_000, chunk_size: int = 4096,
         progress: Callable[[int, int], None] | None = None, vote: SourceVote | None = None) -> Mined:
    """One mining step over the target photos ``paths`` (see the module docstring). ``work`` is
    a scratch folder for the embedding chunks, removed at the end. With ``vote``, each group is
    also assigned to a source identity (:class:`SourceVote`)."""
    if not 0 < m < i <= j:
        raise UserError(f"mining needs 0 < m < i <= j, got m={m}, i={i}, j={j}")
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    try:
        files, numbers, dim, readable = embed_to_chunks(paths, embed, work, chunk_size, progress)
        n_gallery = len(readable) - queries
        if queries < 1 or n_gallery < j:
            raise UserError(f"{len(readable)} readable target photos: too few for {queries} queries and "
                            f"a gallery of at least j={j} (lower queries or i/j)")
        rng = np.random.default_rng(seed)
        query_rows = np.sort(rng.choice(readable, queries, replace=False))
        index, spec = _build_index(files, numbers, dim, n_gallery, query_rows, index_type, flat_max, seed)
        scores, ids = index.search(_rows_of(files, numbers, query_rows, dim), j)
        del index
        ranks = np.arange(1, j + 1)
        pos, pos_s, neg, neg_s, neg_r = [], [], [], [], []
        for s_row, i_row in zip(scores, ids):
            found = i_row >= 0
            take_p = found & (ranks <= m)
            take_n = found & (ranks >= i)
            pos.append(i_row[take_p]), pos_s.append(s_row[take_p])
            neg.append(i_row[take_n]), neg_s.append(s_row[take_n]), neg_r.append(ranks[take_n])
        mined = Mined(query_rows, pos, pos_s, neg, neg_s, neg_r, spec.to_dict())
        if vote is not None:
            groups = [np.concatenate([[q], p]) for q, p in zip(query_rows, pos)]
            mined.assigned, mined.assigned_share = _vote(groups, files, numbers, dim, vote, embed, work,
                                                         flat_max, seed, chunk_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return mined


def vote_photos(paths: Sequence[Path], embed: Embed, work: Path, vote: SourceVote, m: int, index_type: str = "auto",
                flat_max: int = 100_000, seed: int = 0, chunk_size: int = 4096,
                progress: Callable[[int, int], None] | None = None) -> Mined:
    """Pseudo-labels photo by photo (``assign=photo``, an extension of the method's mining):
    every readable target photo is a query; its vote pools the ``vote.k`` nearest source photos
    of itself and of its ``m`` nearest target photos (m = 0: its own alone), and the photo alone
    (not its neighbours) joins the source identity with the most votes when that holds at least
    ``vote.min_share`` of the ``vote.k`` x (1 + neighbours found) votes (a vote an approximate
    index does not return counts as an abstention). The neighbours lend evidence without
    receiving the label, so one wrong neighbour does not mislabel a whole group. Both searches
    go through FAISS indexes chosen by size (the target's by ``index_type``), one after the
    other; besides them only k + m integers a photo are held."""
    if m < 0:
        raise UserError(f"m={m}: the neighbours pooled into a photo's vote cannot be negative")
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    try:
        files, numbers, dim, readable = embed_to_chunks(paths, embed, work / "target", chunk_size, progress)
        if len(readable) < m + 1:
            raise UserError(f"{len(readable)} readable target photos: too few for m={m} neighbours each (lower m)")
        names, code = _identity_codes(vote)
        votes = np.full((len(paths), vote.k), -1, np.int32)  # each photo's k source votes, nearest first
        index = _source_index(vote, embed, work, dim, flat_max, seed, chunk_size)
        for c in numbers:
            rows, vecs = files.read(c)
            _, ids = index.search(vecs, vote.k)
            votes[rows] = _votes(ids, code)
        del index  # one index at a time
        near = np.full((len(paths), m), -1, np.int32)  # each photo's m nearest other target photos
        if m == 0:  # no target search; its index type is recorded all the same
            spec = choose_spec(len(readable), dim, index_type, flat_max=flat_max)
        else:
            index, spec = _build_index(files, numbers, dim, len(readable), np.zeros(0, np.int64), index_type,
                                       flat_max, seed)
            for c in numbers:
                rows, vecs = files.read(c)
                _, ids = index.search(vecs, m + 1)
                for row, found in zip(rows, ids):
                    others = found[(found >= 0) & (found != row)][:m]
                    near[row, :len(others)] = others
            del index
        assigned, shares = [], []
        weights = vote.weights(names)
        for row in readable:
            found = near[row][near[row] >= 0]
            # the photo's own votes first: a tie goes to its nearer source photos
            best, count, total = _majority(np.concatenate([votes[row], votes[found].ravel()]), weights)
            share = count / total  # plain counts: of the vote.k x (1 + neighbours found) votes
            assigned.append(names[best] if count and share >= vote.min_share else None)
            shares.append(share)
        # no positives: the label is the photo's alone (its neighbours only voted)
        none, no_scores = [np.zeros(0, np.int64)] * len(readable), [np.zeros(0, np.float32)] * len(readable)
        return Mined(np.asarray(readable), none, no_scores, none, no_scores, none, spec.to_dict(), assigned, shares)
    finally:
        shutil.rmtree(work, ignore_errors=True)
