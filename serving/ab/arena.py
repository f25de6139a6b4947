"""The blind arena: two arms drawn at random answer side by side without labels; the user votes
A / B / tie / both bad; only then are the arms revealed. Votes feed Bradley-Terry ratings."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from serving.ab import stats
from serving.ab.runs import ABStore
from serving.config import ServingError
from serving.modes import uses_adapter, uses_retrieval

OUTCOMES = {"a": "A is better", "b": "B is better", "tie": "tie", "both_bad": "both bad"}


def usable_arms(collection: str | None, adapter: str | None) -> list[str]:
    arms = ["base"]
    if collection:
        arms.append("rag")
    if adapter:
        arms.append("ft")
    if collection and adapter:
        arms.append("rag+ft")
    return arms


@dataclass
class ArenaRound:
    question: str
    arm_a: str
    arm_b: str
    collection: str | None
    adapter: str | None
    answers: dict[str, str] = field(default_factory=dict)  # "a"/"b" -> text, filled as the answers complete
    voted: str | None = None

    def revealed(self) -> dict[str, str] | None:
        """The arms behind A and B: known only after the vote."""
        return {"a": self.arm_a, "b": self.arm_b} if self.voted else None


def new_round(question: str, collection: str | None, adapter: str | None, rng: random.Random | None = None) -> ArenaRound:
    arms = usable_arms(collection, adapter)
    if len(arms) < 2:
        raise ServingError("the arena needs two arms: pick a collection (rag) and/or an adapter (ft)")
    if not question.strip():
        raise ServingError("empty question: type a question")
    arm_a, arm_b = (rng or random.SystemRandom()).sample(arms, 2)
    return ArenaRound(question.strip(), arm_a, arm_b, collection, adapter)


def stream_side(assistant: Any, round_: ArenaRound, side: str):
    """An :class:`AnswerStream` for side "a" or "b" (not logged as chat)."""
    arm = round_.arm_a if side == "a" else round_.arm_b
    return assistant.stream(round_.question, mode=arm,
                            collection=round_.collection if uses_retrieval(arm) else None,
                            adapter=round_.adapter if uses_adapter(arm) else None, log=False)


def stream_sides(assistant: Any, round_: ArenaRound, sides: list[str]) -> dict[str, Any]:
    """The streams of ``sides``, all started before any is read, so the engine decodes them in one batch;
    a side that cannot be served holds its :class:`ServingError` instead."""
    out: dict[str, Any] = {}
    for side in sides:
        try:
            out[side] = stream_side(assistant, round_, side)
        except ServingError as exc:
            out[side] = exc
    return out


def record_vote(store: ABStore, round_: ArenaRound, outcome: str) -> int:
    if round_.voted:
        raise ServingError("this round already has a vote; ask another question")
    if set(round_.answers) != {"a", "b"}:
        raise ServingError("wait for both answers before voting")
    vote_id = store.add_vote(round_.question, round_.arm_a, round_.arm_b, round_.answers["a"], round_.answers["b"],
                             outcome, round_.collection, round_.adapter)
    round_.voted = outcome
    return vote_id


def leaderboard(store: ABStore, min_votes: int = stats.MIN_VOTES_TO_SEPARATE) -> dict[str, Any]:
    return stats.bradley_terry(store.votes(), min_votes=min_votes)


def leaderboard_caption(board: dict[str, Any]) -> str:
    """One line saying what the votes support, and nothing more."""
    if not board["ratings"]:
        return ""
    if board["separated"]:
        return ("The top two are separated: the 95% interval of their rating difference excludes zero "
                f"({board['votes']} votes).")
    if board["votes_to_separate"] is None:
        return "The top two are level; more votes are needed to tell them apart."
    if board["votes"] < board["min_votes"]:
        return (f"Too few votes to rank reliably ({board['votes']} of at least {board['min_votes']}); "
                f"roughly {board['votes_to_separate']} more votes before the top two could be separated.")
    return f"The top two overlap; roughly {board['votes_to_separate']} more votes would separate them at this gap."
