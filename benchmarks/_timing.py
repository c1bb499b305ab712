"""Interleaved timing: inference calls (int8_speed, lowrank_speed, lowrank_accuracy's latency) and training steps.

Variants take turns strictly in order (a b c a b c ...; one untimed warm-up call each per round), the order rotated
each round, so a burst of load from the shared machine hits every variant within a fraction of a second. Each turn
is ``block`` calls in a row, each timed alone with ``perf_counter`` (wall) and ``time.thread_time`` (CPU of the
calling thread, which does not count the time other jobs held the core). With ``block`` > 1 the first call of a turn
(caches still holding the previous variant's weights) is kept apart as ``cold_wall_ms``. Training steps take turns
the same way (:func:`interleaved_steps`), or, for whole Lightning fits in threads, through :class:`Turns`.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, TypeVar

import torch
from _common import spread
from _models import forward_hooks
from torch import nn

T = TypeVar("T")
Rounds = list[dict[str, dict[str, list[float]]]]


def rotated(items: Sequence[T], shift: int) -> list[T]:
    """``items`` starting at position ``shift`` (modulo its length): the turn order of round ``shift``."""
    k = shift % len(items)
    return [*items[k:], *items[:k]]


def time_round(
    variants: dict[str, nn.Module], inputs: tuple[torch.Tensor, ...], order: list[str], iters: int, block: int = 1
) -> dict[str, dict[str, list[float]]]:
    """``iters`` turns of every variant in ``order``, each ``block`` calls; per variant ``wall_ms``, ``cpu_ms`` and
    ``cold_wall_ms`` (the first call of each turn when ``block`` > 1, else empty)."""
    out: dict[str, dict[str, list[float]]] = {name: {"wall_ms": [], "cpu_ms": [], "cold_wall_ms": []} for name in order}
    gc.collect()
    with torch.inference_mode():
        for name in order:  # warm-up
            variants[name](*inputs)
        for _ in range(iters):
            for name in order:
                for i in range(block):
                    c0 = time.thread_time()
                    t0 = time.perf_counter()
                    variants[name](*inputs)
                    wall = time.perf_counter() - t0
                    cpu = time.thread_time() - c0
                    if i == 0 and block > 1:
                        out[name]["cold_wall_ms"].append(round(1e3 * wall, 4))
                        continue
                    out[name]["wall_ms"].append(round(1e3 * wall, 4))
                    out[name]["cpu_ms"].append(round(1e3 * cpu, 4))
    return out


def interleaved(
    variants: dict[str, nn.Module], inputs: tuple[torch.Tensor, ...], rounds: int, iters: int, block: int, label: str
) -> Rounds:
    """``rounds`` calls of :func:`time_round`, the turn order rotated each round; prints each round's medians."""
    names = list(variants)
    out: Rounds = []
    for r in range(rounds):
        order = rotated(names, r)
        out.append(time_round(variants, inputs, order, iters, block))
        medians = ", ".join(f"{n} {statistics.median(out[-1][n]['wall_ms']):.2f} ms" for n in names)
        print(f"[{label}] round {r} ({order[0]} first): {medians}", flush=True)
    return out


def interleaved_steps(
    step: Callable[[str], object], order: Sequence[str], steps: int, warmup: int = 0
) -> dict[str, list[float]]:
    """``warmup`` untimed, then ``steps`` timed turns in which every name of ``order`` takes one ``step(name)``; the
    ms of each timed step, per name."""
    gc.collect()
    for _ in range(warmup):
        for name in order:
            step(name)
    times: dict[str, list[float]] = {name: [] for name in order}
    for _ in range(steps):
        for name in order:
            t0 = time.perf_counter()
            step(name)
            times[name].append(round(1e3 * (time.perf_counter() - t0), 3))
    return times


def per_round(rounds: Rounds, name: str, stat: Callable[[list[float]], float], key: str = "wall_ms") -> list[float]:
    """``stat`` (median, mean) of variant ``name``'s ``key`` times in every round."""
    return [stat(rd[name][key]) for rd in rounds]


def ratio(
    rounds: Rounds, numerator: str, denominator: str, stat: Callable[[list[float]], float], key: str = "wall_ms"
) -> dict[str, float]:
    """The spread over rounds of ``stat(numerator) / stat(denominator)`` within each round (a speed-up when the
    numerator is the reference)."""
    return spread([stat(rd[numerator][key]) / stat(rd[denominator][key]) for rd in rounds])


def latency_summary(rounds: Rounds, name: str, block: int) -> dict[str, Any]:
    """Variant ``name``'s latency over rounds: medians, means and CPU medians (and cold first calls), each a spread."""
    summary = {
        "median_of_medians_ms": spread(per_round(rounds, name, statistics.median)),
        "mean_ms": spread(per_round(rounds, name, statistics.fmean)),
        "cpu_median_of_medians_ms": spread(per_round(rounds, name, statistics.median, "cpu_ms")),
    }
    if block > 1:
        summary["cold_median_of_medians_ms"] = spread(per_round(rounds, name, statistics.median, "cold_wall_ms"))
    return summary


def time_inside(
    variants: dict[str, nn.Module], layers: dict[str, dict[str, nn.Module]], inputs: tuple, iters: int, block: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Per variant, ``iters`` forwards timed with hooks on its ``layers`` (name -> module): for each, the whole
    forward (``"forward"``), the time inside all those layers (``"inside"``) and inside each layer (by name), in ms.

    Variants take turns after one warm-up forward each; a turn runs ``block`` forwards and keeps the last.
    """
    record: dict[str, dict[str, list[float]]] = {variant: {} for variant in variants}
    with ExitStack() as stack:
        spent: dict[str, dict[str, float]] = {}
        for variant, named in layers.items():
            starts: dict[str, float] = {}
            spent[variant] = inside = {}
            stack.enter_context(
                forward_hooks(
                    named,
                    before=lambda n, s=starts: s.__setitem__(n, time.perf_counter()),
                    after=lambda n, i, o, s=starts, d=inside: d.__setitem__(n, time.perf_counter() - s[n]),
                )
            )
        stack.enter_context(torch.inference_mode())
        for model in variants.values():
            model(*inputs)
        for _ in range(iters):
            for variant, model in variants.items():
                for _ in range(block):
                    t0 = time.perf_counter()
                    model(*inputs)
                    total = time.perf_counter() - t0
                times = {"forward": total, "inside": sum(spent[variant].values()), **spent[variant]}
                for name, seconds in times.items():
                    record[variant].setdefault(name, []).append(1e3 * seconds)
    return record


class Turns:
    """The runs of one round take optimizer steps strictly in turn: a b c a b c ... (one thread at a time)."""

    def __init__(self, order: list[int], timeout_s: float = 300.0) -> None:
        self.order, self.timeout_s = order, timeout_s
        self.cond = threading.Condition()
        self.turn = order[0]
        self.done: set[int] = set()

    def wait(self, i: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.turn == i, timeout=self.timeout_s):
                raise TimeoutError(f"run {i} waited {self.timeout_s} s for its turn")

    def pass_on(self, i: int, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(i)
            left = [j for j in self.order if j not in self.done]
            pos = self.order.index(i)
            following = [self.order[(pos + k) % len(self.order)] for k in range(1, len(self.order) + 1)]
            self.turn = next((j for j in following if j in left), -1)
            self.cond.notify_all()

    def wait_all_done(self) -> None:
        """Block until every run took its last step (so no run's teardown overlaps another's timed step)."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.turn == -1, timeout=self.timeout_s):
                raise TimeoutError(f"waited {self.timeout_s} s for the other runs to finish")


def fit_in_turns(trainers: Sequence[Any], models: Sequence[Any], data: Sequence[Any], turns: Turns) -> None:
    """Fit every ``trainers[i]`` on ``models[i]`` and ``data[i]`` in its own thread (the threads take optimizer steps
    through ``turns``); the first error of any fit is raised once all threads ended."""
    errors: list[BaseException] = []

    def fit(i: int) -> None:
        try:
            trainers[i].fit(models[i], datamodule=data[i])
        except BaseException as err:  # keep the other runs from waiting forever
            errors.append(err)
            turns.pass_on(i, finished=True)

    gc.collect()
    threads = [threading.Thread(target=fit, args=(i,)) for i in range(len(trainers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
