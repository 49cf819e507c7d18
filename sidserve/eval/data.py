"""The evaluation dataset: user sequences + item text, leave-one-out split, popularity.

Layout (as tests/data/beauty-slice/, a slice of Amazon Beauty, holds it): a directory with
``sequences.txt`` (one line per user: ``user_id item_id item_id ...``, 1-based item ids,
chronological) and ``items.jsonl`` (one object per item: ``item_id``, ``title``,
``brand``, ``categories``). Any catalog written in that layout can be evaluated.

Split (the papers' protocol): per user, the last item is the test target, the one before
it the validation target, the rest is training. Popularity is counted on the training
part only, so the head/tail groups do not peek at test interactions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

SEQUENCES_FILE = "sequences.txt"
ITEMS_FILE = "items.jsonl"
MIN_SEQUENCE = 3  # leave-one-out needs >= 1 training item + validation + test
# what an item's content modalities say (issue 47): "full" = title, brand and categories;
# "weak" = a catalog whose content says little about behavior, built from the same items:
# ``text`` = the first three words of the title, ``meta`` = the first (most general)
# category, nothing else (interactions unchanged)
CONTENT = ("full", "weak")
WEAK_TITLE_WORDS = 3


@dataclass
class Dataset:
    """Users' chronological item sequences over items 1..num_items (0 = padding)."""

    sequences: list[np.ndarray]  # per user: (n_u,) int64 item ids in 1..num_items
    items: list[dict]  # item_id - 1 -> {"title", "brand", "categories", ...}
    name: str = ""

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    # ---- split -------------------------------------------------------------------
    def train_sequences(self) -> list[np.ndarray]:
        """Per user, every item but the last two."""
        return [s[:-2] for s in self.sequences]

    def targets(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(histories, targets) for ``split`` in {'valid', 'test'}: the test history is
        training + validation item, the validation history the training items."""
        if split == "test":
            return [s[:-1] for s in self.sequences], np.array([s[-1] for s in self.sequences])
        if split == "valid":
            return [s[:-2] for s in self.sequences], np.array([s[-2] for s in self.sequences])
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def popularity(self) -> np.ndarray:
        """(num_items + 1,) training interactions per item id (index 0 unused)."""
        return np.bincount(np.concatenate(self.train_sequences()), minlength=self.num_items + 1)

    def popularity_groups(self, share: float = 0.25) -> dict[str, np.ndarray]:
        """Item ids of the head (top ``share`` by training popularity) and the long tail
        (bottom ``share``); ties broken by item id so the split is deterministic."""
        if not 0 < share <= 0.5:
            raise ValueError(f"share must be in (0, 0.5], got {share}")
        pop = self.popularity()[1:]
        order = np.lexsort((np.arange(pop.size), -pop))  # most popular first
        k = int(round(share * pop.size))
        return {"head": np.sort(order[:k]) + 1, "tail": np.sort(order[-k:]) + 1}

    # ---- item text ---------------------------------------------------------------
    def item_texts(self, content: str = "full") -> dict[str, list[str]]:
        """Two content modalities. ``full``: ``text`` = title + brand + categories, ``meta`` =
        brand + categories only (the README's second modality; there are no images).
        ``weak``: ``text`` = the title's first three words, ``meta`` = the first category."""
        if content not in CONTENT:
            raise ValueError(f"content must be one of {CONTENT}, got {content!r}")
        text, meta = [], []
        for it in self.items:
            title = (it.get("title") or "").strip()
            categories = it.get("categories") or []
            if content == "weak":
                first = categories[0] if categories else ""
                words = " ".join(title.split()[:WEAK_TITLE_WORDS])
                text.append(words or first)  # an item without a title keeps some text
                meta.append(first or words)
                continue
            cats = ", ".join(categories)
            brand = it.get("brand") or ""
            meta_s = "; ".join(x for x in (f"Brand: {brand}" if brand else "", f"Categories: {cats}" if cats else "") if x)
            text.append(f"{title}. {meta_s}" if title else meta_s)
            meta.append(meta_s or title)
        return {"text": text, "meta": meta}

    # ---- subsampling (--quick) -----------------------------------------------------
    def subsample(self, num_users: int, seed: int = 0) -> "Dataset":
        """The sequences of ``num_users`` random users, with the items they touch
        renumbered 1..n (order of first id kept)."""
        if num_users <= 0:
            raise ValueError(f"num_users must be positive, got {num_users}")
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(self.num_users, size=min(num_users, self.num_users), replace=False))
        seqs = [self.sequences[i] for i in pick]
        used = np.unique(np.concatenate(seqs))
        remap = np.zeros(self.num_items + 1, dtype=np.int64)
        remap[used] = np.arange(1, used.size + 1)
        items = [dict(self.items[i - 1], item_id=int(remap[i])) for i in used]
        return Dataset([remap[s] for s in seqs], items, name=f"{self.name}[{len(pick)} users]")

    def save(self, root: str) -> None:
        """Write the dataset in the layout ``load_dataset`` reads."""
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, SEQUENCES_FILE), "w") as f:
            for u, s in enumerate(self.sequences, start=1):
                f.write(" ".join(map(str, [u, *s.tolist()])) + "\n")
        with open(os.path.join(root, ITEMS_FILE), "w") as f:
            for it in self.items:
                f.write(json.dumps(it, ensure_ascii=False) + "\n")


def load_dataset(root: str) -> Dataset:
    """Read ``<root>/sequences.txt`` and ``<root>/items.jsonl``; errors name file and line."""
    seq_path, items_path = os.path.join(root, SEQUENCES_FILE), os.path.join(root, ITEMS_FILE)
    for p in (seq_path, items_path):
        if not os.path.isfile(p):
            raise ValueError(f"dataset file {p} not found (expected {SEQUENCES_FILE} and {ITEMS_FILE} in {root})")
    items: list[dict] = []
    with open(items_path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                it = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{items_path}:{lineno}: not JSON ({e.msg})") from None
            if it.get("item_id") != len(items) + 1:
                raise ValueError(f"{items_path}:{lineno}: item_id must be {len(items) + 1} (1-based, in order), "
                                 f"got {it.get('item_id')!r}")
            items.append(it)
    n = len(items)
    sequences = []
    with open(seq_path) as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                seq = np.array([int(x) for x in parts[1:]], dtype=np.int64)
            except ValueError:
                raise ValueError(f"{seq_path}:{lineno}: ids must be integers") from None
            if seq.size < MIN_SEQUENCE:
                raise ValueError(f"{seq_path}:{lineno}: user {parts[0]} has {seq.size} items; "
                                 f"leave-one-out needs >= {MIN_SEQUENCE}")
            if seq.min() < 1 or seq.max() > n:
                raise ValueError(f"{seq_path}:{lineno}: item id outside 1..{n}")
            sequences.append(seq)
    if not sequences:
        raise ValueError(f"{seq_path} has no users")
    return Dataset(sequences, items, name=os.path.basename(os.path.normpath(root)))
