"""Readers for the DeepFashion retrieval benchmarks' ``list_eval_partition.txt``.

Both benchmarks share one text format: line 1 is the number of rows, line 2 the
whitespace-separated header, then one whitespace-separated row per line.

- In-shop Clothes Retrieval: ``image_name item_id evaluation_status``, status
  ``train``/``query``/``gallery``, e.g.
  ``img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train``.
- Consumer-to-shop Clothes Retrieval: ``image_pair_name_1 image_pair_name_2 item_id
  evaluation_status``, status ``train``/``val``/``test``, e.g.
  ``img/CLOTHING/Blouse/id_00000001/comsumer_01.jpg img/CLOTHING/Blouse/id_00000001/shop_01.jpg
  id_00000001 train`` (the release spells "comsumer").

``root`` is the folder that holds ``img/``; image paths become ``root / image_name``. The
partition file defaults to ``root/list_eval_partition.txt``, else ``root/Eval/...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fashionlens.data.records import Item
from fashionlens.errors import UserError

INSHOP_HEADER = ("image_name", "item_id", "evaluation_status")
INSHOP_SPLITS = ("train", "query", "gallery")
CONSUMER_TO_SHOP_HEADER = ("image_pair_name_1", "image_pair_name_2", "item_id",
                           "evaluation_status")
CONSUMER_TO_SHOP_SPLITS = ("train", "val", "test")


def _partition_path(root: Path, partition: Path | None) -> Path:
    """The partition file to read: ``partition``, or the default under ``root``."""
    if partition is not None:
        return Path(partition)
    for candidate in (root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"):
        if candidate.is_file():
            return candidate
    return root / "list_eval_partition.txt"


def _read_partition(path: Path, header: tuple[str, ...],
                    splits: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """Validated ``(line number, fields)`` rows of a DeepFashion partition file.

    Checks the count line, the header, the column count, the split value, and that the
    declared count equals the number of rows; blank lines are skipped.
    """
    if not path.is_file():
        raise UserError(f"{path}: DeepFashion partition file not found")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if not lines or not lines[0].strip().isdigit():
        first = lines[0].strip() if lines else ""
        raise UserError(f"{path}:1: expected the number of rows, got {first!r}")
    declared = int(lines[0])
    if len(lines) < 2 or tuple(lines[1].split()) != header:
        got = lines[1].strip() if len(lines) > 1 else ""
        raise UserError(f"{path}:2: expected header {' '.join(header)!r}, got {got!r}")
    rows: list[tuple[int, list[str]]] = []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(header):
            raise UserError(f"{path}:{number}: expected {len(header)} columns, got {len(fields)}")
        if fields[-1] not in splits:
            raise UserError(f"{path}:{number}: unknown evaluation_status {fields[-1]!r}; "
                            f"expected one of {', '.join(splits)}")
        rows.append((number, fields))
    if declared != len(rows):
        raise UserError(f"{path}:1: declares {declared} rows but holds {len(rows)}")
    return rows


def _category(image_name: str) -> tuple[str, str] | None:
    """``(category, top folder)`` from ``img/<top>/<sub>/...``: ``("WOMEN/Dresses", "WOMEN")``."""
    parts = PurePosixPath(image_name).parts
    if len(parts) >= 4 and parts[0] == "img":
        return f"{parts[1]}/{parts[2]}", parts[1]
    return None


def read_inshop(root: Path, partition: Path | None = None) -> dict[str, list[Item]]:
    """Read In-shop Clothes Retrieval into ``{"train": [...], "query": [...], "gallery": [...]}``.

    Each :class:`Item` has ``id`` = the image name as written (unique), ``path`` =
    ``root / image_name`` and metadata ``item_id``, ``split`` and, when the name is
    ``img/<gender>/<category>/...``, ``category`` (``"WOMEN/Dresses"``) and ``gender``
    (``"WOMEN"``). Items keep file order. A repeated image raises :class:`UserError`.
    """
    root = Path(root)
    path = _partition_path(root, partition)
    splits: dict[str, list[Item]] = {name: [] for name in INSHOP_SPLITS}
    seen: dict[str, int] = {}
    for number, (image_name, item_id, split) in _read_partition(path, INSHOP_HEADER,
                                                                  INSHOP_SPLITS):
        if image_name in seen:
            raise UserError(f"{path}:{number}: image {image_name} already listed at line "
                            f"{seen[image_name]}")
        seen[image_name] = number
        metadata = {"item_id": item_id, "split": split}
        if (found := _category(image_name)) is not None:
            metadata["category"], metadata["gender"] = found
        splits[split].append(Item(image_name, root / image_name, metadata))
    return splits


@dataclass
class ConsumerToShop:
    """Consumer-to-shop pairs: ``(consumer Item, shop Item, split)`` in file order.

    A consumer photo appears in one row per matching shop photo, so the same :class:`Item`
    (same ``id``) can appear in several pairs.
    """

    pairs: list[tuple[Item, Item, str]] = field(default_factory=list)

    def _unique(self, splits: tuple[str, ...], side: int) -> list[Item]:
        for split in splits:
            if split not in CONSUMER_TO_SHOP_SPLITS:
                raise UserError(f"unknown consumer-to-shop split {split!r}; expected one of "
                                f"{', '.join(CONSUMER_TO_SHOP_SPLITS)}")
        unique: dict[str, Item] = {}
        for pair in self.pairs:
            if pair[2] in splits:
                unique.setdefault(pair[side].id, pair[side])
        return list(unique.values())

    def queries(self, split: str, *more: str) -> list[Item]:
        """Unique consumer images of ``split`` (and ``more``), in order of first appearance."""
        return self._unique((split, *more), 0)

    def gallery(self, split: str, *more: str) -> list[Item]:
        """Unique shop images of ``split`` (and ``more``), in order of first appearance.

        By the usual protocol (Liu et al., CVPR 2016; the benchmark README) the gallery for
        evaluating a split is *all* shop images of that split, not only those paired with a
        given query; a query is a hit when a retrieved shop image has its ``item_id``. The
        README says "test"; some copies say "val + test": ``gallery("val", "test")``.
        Items do not overlap between splits.
        """
        return self._unique((split, *more), 1)


def read_consumer_to_shop(root: Path, partition: Path | None = None) -> ConsumerToShop:
    """Read Consumer-to-shop Clothes Retrieval pairs.

    Both images of a row become :class:`Item` s with ``id`` = the image name as written,
    ``path`` = ``root / name`` and metadata ``item_id``, ``split`` and, for names
    ``img/<group>/<category>/...``, ``category`` (``"CLOTHING/Blouse"``). An image that
    occurs in several rows is the same Item object each time.
    """
    root = Path(root)
    path = _partition_path(root, partition)
    items: dict[str, Item] = {}

    def item(name: str, item_id: str, split: str, number: int) -> Item:
        known = items.get(name)
        if known is not None:
            if (known.metadata["item_id"], known.metadata["split"]) != (item_id, split):
                raise UserError(f"{path}:{number}: image {name} listed with item "
                                f"{known.metadata['item_id']} ({known.metadata['split']}) "
                                f"earlier, now {item_id} ({split})")
            return known
        metadata = {"item_id": item_id, "split": split}
        if (found := _category(name)) is not None:
            metadata["category"] = found[0]
        items[name] = Item(name, root / name, metadata)
        return items[name]

    pairs = [(item(consumer, item_id, split, number), item(shop, item_id, split, number), split)
             for number, (consumer, shop, item_id, split)
             in _read_partition(path, CONSUMER_TO_SHOP_HEADER, CONSUMER_TO_SHOP_SPLITS)]
    return ConsumerToShop(pairs)
