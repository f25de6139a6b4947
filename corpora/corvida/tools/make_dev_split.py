"""Split corpora/corvida/qa/train.jsonl into a dev split and the rest, by fact (never by row).

    python corpora/corvida/tools/make_dev_split.py

Options, thresholds and decoding settings are chosen on ``qa/dev.jsonl``; adapters whose effect is
measured on dev train on ``qa/train_nodev.jsonl`` (no dev fact in any training row). The test and
unseen sets are never read. The rule is stated, not sampled: a fact (``fact`` id, or the row id for
rows without one) goes to dev when the first byte of its SHA-256 is below 52 (~20%).
"""

import hashlib
import json
from pathlib import Path

QA = Path(__file__).resolve().parents[1] / "qa"


def in_dev(row: dict) -> bool:
    key = row.get("fact") or row["id"]
    return hashlib.sha256(key.encode()).digest()[0] < 52


def main() -> None:
    rows = [json.loads(line) for line in (QA / "train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    dev = [r for r in rows if in_dev(r)]
    rest = [r for r in rows if not in_dev(r)]
    for name, part in (("dev.jsonl", dev), ("train_nodev.jsonl", rest)):
        (QA / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    print(f"dev {len(dev)} rows, train_nodev {len(rest)} rows")


if __name__ == "__main__":
    main()
