"""The comparisons store: one SQLite file of prompts, samples and people's choices between two samples.

    prompts      (id, text, split)                                    one row per (text, split)
    samples      (id, prompt_id, model_id, seed, settings, codes, png, created)
    pairs        (id, prompt_id, a_id, b_id, gold)                    two samples of one prompt to compare;
                                                                      gold: "a" or "b" when the answer is known
    comparisons  (id, pair_id, left_id, choice, rater, created)       one judgement: which sample was shown
                                                                      on the left, and "left", "right",
                                                                      "tie" or "skip"

Every write is one transaction in WAL mode with synchronous=FULL: a process killed mid-write leaves the
file as it was before that write, and readers never block a writer. Several processes (two raters' web
requests, a sampler) may write at once; SQLite serialises them, waiting up to `timeout` seconds.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHOICES = ("left", "right", "tie", "skip")
SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY, text TEXT NOT NULL, split TEXT NOT NULL DEFAULT '', UNIQUE (text, split));
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id), model_id TEXT NOT NULL,
    seed INTEGER NOT NULL, settings TEXT NOT NULL, codes BLOB NOT NULL, png BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    a_id INTEGER NOT NULL REFERENCES samples(id), b_id INTEGER NOT NULL REFERENCES samples(id),
    gold TEXT CHECK (gold IS NULL OR gold IN ('a', 'b')), CHECK (a_id != b_id));
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY, pair_id INTEGER NOT NULL REFERENCES pairs(id),
    left_id INTEGER NOT NULL REFERENCES samples(id),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'skip')),
    rater TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS comparisons_by_rater ON comparisons (rater, id);
"""


@dataclass(frozen=True)
class Judgement:
    """A comparison as the reward model reads it: the preferred sample first; tie when neither is."""

    pair_id: int
    winner_id: int
    loser_id: int
    tie: bool
    rater: str


class Store:
    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: all of it is written, or none of it."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- writing ------------------------------------------------------------------------------
    def prompt(self, text: str, split: str = "") -> int:
        """The id of (text, split), added if new."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO prompts (text, split) VALUES (?, ?)", (text, split))
            return db.execute("SELECT id FROM prompts WHERE text = ? AND split = ?", (text, split)).fetchone()[0]

    def add_sample(self, prompt_id: int, model_id: str, seed: int, settings: dict[str, Any], codes: list[int],
                   png: bytes) -> int:
        with self.transaction() as db:
            cur = db.execute("INSERT INTO samples (prompt_id, model_id, seed, settings, codes, png, created) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (prompt_id, model_id, seed, json.dumps(settings),
                                                              json.dumps(codes).encode(), png, time.time()))
            return cur.lastrowid

    def add_pair(self, a_id: int, b_id: int, gold: str | None = None) -> int:
        if gold not in (None, "a", "b"):
            raise ValueError(f"gold must be 'a', 'b' or None, got {gold!r}")
        with self.transaction() as db:
            rows = db.execute("SELECT prompt_id FROM samples WHERE id IN (?, ?)", (a_id, b_id)).fetchall()
            if len(rows) != 2 or rows[0][0] != rows[1][0]:
                raise ValueError(f"samples {a_id} and {b_id} must exist and share one prompt to be compared")
            return db.execute("INSERT INTO pairs (prompt_id, a_id, b_id, gold) VALUES (?, ?, ?, ?)",
                              (rows[0][0], a_id, b_id, gold)).lastrowid

    def record(self, pair_id: int, left_id: int, choice: str, rater: str) -> int:
        """One judgement of a pair as shown (`left_id` on the left). Returns the comparison's id."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        if not rater:
            raise ValueError("a comparison needs a rater name")
        with self.transaction() as db:
            pair = db.execute("SELECT a_id, b_id FROM pairs WHERE id = ?", (pair_id,)).fetchone()
            if pair is None or left_id not in pair:
                raise ValueError(f"pair {pair_id} does not exist or does not hold sample {left_id}")
            return db.execute("INSERT INTO comparisons (pair_id, left_id, choice, rater, created) "
                              "VALUES (?, ?, ?, ?, ?)", (pair_id, left_id, choice, rater, time.time())).lastrowid

    def undo(self, rater: str) -> int | None:
        """Remove the rater's latest comparison; its pair id, or None when the rater has none."""
        with self.transaction() as db:
            row = db.execute("SELECT id, pair_id FROM comparisons WHERE rater = ? ORDER BY id DESC LIMIT 1",
                             (rater,)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM comparisons WHERE id = ?", (row[0],))
            return row[1]

    # -- reading ------------------------------------------------------------------------------
    def next_pair(self, rater: str) -> int | None:
        """A pair this rater has not judged yet, fewest judgements first; None when all are done."""
        row = self.db.execute(
            "SELECT p.id FROM pairs p LEFT JOIN comparisons c ON c.pair_id = p.id "
            "WHERE p.id NOT IN (SELECT pair_id FROM comparisons WHERE rater = ?) "
            "GROUP BY p.id ORDER BY COUNT(c.id), p.id LIMIT 1", (rater,)).fetchone()
        return None if row is None else row[0]

    def pair(self, pair_id: int) -> dict[str, Any]:
        row = self.db.execute("SELECT p.id, p.a_id, p.b_id, p.gold, q.text, q.split FROM pairs p "
                              "JOIN prompts q ON q.id = p.prompt_id WHERE p.id = ?", (pair_id,)).fetchone()
        if row is None:
            raise KeyError(f"no pair {pair_id}")
        return dict(zip(("id", "a_id", "b_id", "gold", "prompt", "split"), row))

    def png(self, sample_id: int) -> bytes:
        row = self.db.execute("SELECT png FROM samples WHERE id = ?", (sample_id,)).fetchone()
        if row is None:
            raise KeyError(f"no sample {sample_id}")
        return row[0]

    def samples_of(self, model_id: str) -> list[int]:
        """Ids of model `model_id`'s samples, oldest first; ValueError naming the store's models if it has none."""
        ids = [r[0] for r in self.db.execute("SELECT id FROM samples WHERE model_id = ? ORDER BY id", (model_id,))]
        if not ids:
            known = [r[0] for r in self.db.execute("SELECT DISTINCT model_id FROM samples")]
            raise ValueError(f"the store has no samples of model {model_id!r}; its models: {known}")
        return ids

    def codes(self, sample_id: int) -> list[int]:
        return json.loads(self.db.execute("SELECT codes FROM samples WHERE id = ?", (sample_id,)).fetchone()[0])

    def judgements(self, split: str | None = None) -> list[Judgement]:
        """Every comparison that chose (skips left out), winner first, in the order they were made."""
        rows = self.db.execute(
            "SELECT c.pair_id, c.left_id, c.choice, c.rater, p.a_id, p.b_id FROM comparisons c "
            "JOIN pairs p ON p.id = c.pair_id JOIN prompts q ON q.id = p.prompt_id "
            "WHERE c.choice != 'skip' AND (? IS NULL OR q.split = ?) ORDER BY c.id", (split, split)).fetchall()
        out = []
        for pair_id, left, choice, rater, a, b in rows:
            right = b if left == a else a
            winner, loser = (right, left) if choice == "right" else (left, right)
            out.append(Judgement(pair_id, winner, loser, choice == "tie", rater))
        return out

    def counts(self) -> dict[str, int]:
        return {t: self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608 (fixed names)
                for t in ("prompts", "samples", "pairs", "comparisons")}

    # -- statistics ---------------------------------------------------------------------------
    def rater_stats(self) -> dict[str, dict[str, float | int]]:
        """Per rater: comparisons made (skips included), agreement with the gold answer on gold pairs,
        and agreement with other raters on pairs that several judged (ties and skips left out)."""
        rows = self.db.execute(
            "SELECT c.rater, c.pair_id, c.left_id, c.choice, p.a_id, p.gold FROM comparisons c "
            "JOIN pairs p ON p.id = c.pair_id ORDER BY c.id").fetchall()
        picks: dict[int, dict[str, str]] = {}  # pair -> rater -> "a" | "b" (the latest judgement)
        stats: dict[str, dict[str, list[bool] | int]] = {}
        for rater, pair_id, left, choice, a, gold in rows:
            s = stats.setdefault(rater, {"comparisons": 0, "gold": [], "agree": []})
            s["comparisons"] += 1
            if choice in ("left", "right"):
                pick = "a" if (choice == "left") == (left == a) else "b"
                picks.setdefault(pair_id, {})[rater] = pick
                if gold is not None:
                    s["gold"].append(pick == gold)
        for judged in picks.values():
            for rater, pick in judged.items():
                stats[rater]["agree"] += [pick == other for r, other in judged.items() if r != rater]
        return {rater: {"comparisons": s["comparisons"], "gold_pairs": len(s["gold"]),
                        "gold_accuracy": sum(s["gold"]) / len(s["gold"]) if s["gold"] else float("nan"),
                        "shared_judgements": len(s["agree"]),
                        "agreement": sum(s["agree"]) / len(s["agree"]) if s["agree"] else float("nan")}
                for rater, s in stats.items()}


def export_jsonl(store: Store, path: str | Path) -> int:
    """Every comparison with its prompt and both samples (codes, seeds, settings; PNGs left out: the codes
    decode to them), one JSON object a line. Returns the number of lines."""
    rows = store.db.execute(
        "SELECT c.id, c.left_id, c.choice, c.rater, c.created, p.a_id, p.b_id, p.gold, q.text, q.split "
        "FROM comparisons c JOIN pairs p ON p.id = c.pair_id JOIN prompts q ON q.id = p.prompt_id "
        "ORDER BY c.id").fetchall()
    with Path(path).open("w", encoding="utf-8") as f:
        for _id, left, choice, rater, created, a, b, gold, text, split in rows:
            record = {"prompt": text, "split": split, "choice": choice, "rater": rater, "created": created,
                      "gold": gold, "left": "a" if left == a else "b",
                      "a": _sample_record(store, a), "b": _sample_record(store, b)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(rows)


def _sample_record(store: Store, sample_id: int) -> dict[str, Any]:
    model, seed, settings, codes = store.db.execute(
        "SELECT model_id, seed, settings, codes FROM samples WHERE id = ?", (sample_id,)).fetchone()
    return {"model": model, "seed": seed, "settings": json.loads(settings), "codes": json.loads(codes)}


def import_jsonl(store: Store, path: str | Path, render: Any) -> int:
    """Add the comparisons of an `export_jsonl` file. `render(codes) -> png bytes` remakes each sample's
    image. A line that is not a comparison is an error naming the file and line; nothing of the file is
    kept then."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    with store.transaction() as db:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                ids = {}
                db.execute("INSERT OR IGNORE INTO prompts (text, split) VALUES (?, ?)", (r["prompt"], r["split"]))
                prompt_id = db.execute("SELECT id FROM prompts WHERE text = ? AND split = ?",
                                       (r["prompt"], r["split"])).fetchone()[0]
                for side in ("a", "b"):
                    s = r[side]
                    ids[side] = db.execute(
                        "INSERT INTO samples (prompt_id, model_id, seed, settings, codes, png, created) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (prompt_id, s["model"], int(s["seed"]),
                                                         json.dumps(s["settings"]), json.dumps(s["codes"]).encode(),
                                                         render(s["codes"]), r["created"])).lastrowid
                pair = db.execute("INSERT INTO pairs (prompt_id, a_id, b_id, gold) VALUES (?, ?, ?, ?)",
                                  (prompt_id, ids["a"], ids["b"], r["gold"])).lastrowid
                db.execute("INSERT INTO comparisons (pair_id, left_id, choice, rater, created) VALUES (?, ?, ?, ?, ?)",
                           (pair, ids[r["left"]], r["choice"], r["rater"], r["created"]))
            except (KeyError, TypeError, ValueError, sqlite3.IntegrityError) as e:
                raise ValueError(f"{path}:{n}: not a comparison record ({type(e).__name__}: {e})") from None
    return sum(1 for line in lines if line.strip())
