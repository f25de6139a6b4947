"""Multi-task mixtures: sampling weights per task and a progressive schedule for a new task.

Each training example carries a task tag. :class:`MixtureSampler` draws, for every position of an epoch,
a task and then the next example of that task (each task walks through its own shuffled order and
reshuffles when exhausted, so small tasks are replayed and large ones subsampled as the weights say).

- static mixture: P(task) is proportional to its ``weight``;
- progressive schedule (``new_task``, ``p0``, ``p1``): the new task's share ramps linearly from p0 at
  the first draw to p1 at the last draw of training; the remaining share replays the other tasks in
  proportion to their weights. This is the replay mitigation for catastrophic forgetting.

The order depends only on (seed, epoch), so a resumed run (Trainer replays and skips the batches it
has already seen) gets exactly the same batches as an uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch.utils.data


@dataclass
class Schedule:
    weights: dict[str, float]
    new_task: str | None = None
    p0: float = 0.5
    p1: float = 0.9

    def shares(self, progress: float) -> dict[str, float]:
        """P(task) at ``progress`` in [0, 1] of training."""
        tasks = sorted(self.weights)
        if self.new_task is None or len(tasks) == 1:
            total = sum(self.weights.values())
            return {t: self.weights[t] / total for t in tasks}
        p = self.p0 + (self.p1 - self.p0) * min(max(progress, 0.0), 1.0)
        rest = {t: w for t, w in self.weights.items() if t != self.new_task}
        rest_total = sum(rest.values())
        out = {t: (1.0 - p) * w / rest_total for t, w in rest.items()}
        out[self.new_task] = p
        return out


class MixtureSampler(torch.utils.data.Sampler[int]):
    """Indices into a dataset whose rows have tasks ``tasks[i]``; ``len`` equals the dataset size per epoch."""

    def __init__(self, tasks: list[str], schedule: Schedule, seed: int, total_epochs: float = 1.0,
                 total_draws: int | None = None):
        self.by_task: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            self.by_task.setdefault(t, []).append(i)
        missing = set(schedule.weights) - set(self.by_task)
        self.schedule = Schedule({t: w for t, w in schedule.weights.items() if t in self.by_task} or {t: 1.0 for t in self.by_task},
                                 schedule.new_task if schedule.new_task not in missing else None, schedule.p0, schedule.p1)
        self.n = len(tasks)
        self.seed = seed
        self.epoch = 0
        # draws over the whole run, to place each draw on the p0 -> p1 ramp
        self.total_draws = max(1, total_draws if total_draws else int(round(total_epochs * self.n)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = random.Random(f"{self.seed}-{self.epoch}")
        orders = {}
        cursors = {}
        for t, idx in sorted(self.by_task.items()):
            orders[t] = rng.sample(idx, len(idx))
            cursors[t] = 0
        tasks = sorted(self.by_task)
        for k in range(self.n):
            draw = self.epoch * self.n + k
            shares = self.schedule.shares(draw / max(1, self.total_draws - 1))
            t = rng.choices(tasks, weights=[shares.get(x, 0.0) for x in tasks])[0]
            if cursors[t] == len(orders[t]):
                orders[t] = rng.sample(self.by_task[t], len(self.by_task[t]))
                cursors[t] = 0
            yield orders[t][cursors[t]]
            cursors[t] += 1
