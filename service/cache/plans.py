"""Comparison plans for cache lookups: memoised per request shape, with the facts every lookup reads off them.

A plan (`exact.plan_comparison`) fixes the tensor set a request compares; the cache keys
its entries by that set. Light requests repeat the same plans thousands of times a
second, so plans are memoised by (identities, labels, slicing), and the few facts read
off a plan on every request (its tensor list, tensors per group, whether it slices) are
computed once per plan object.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kinship_service.checkpoints.identity import CheckpointIdentity
from kinship_service.kinship.exact import ComparisonPlan, Skipped, plan_comparison

TensorList = list[tuple[str, tuple[int, ...]]]
"""(name, shape) of every compared tensor, in plan order."""

MAX_PLANS = 1024
MAX_FACTS = 4096

_INTERNED_LOCK = threading.Lock()
_INTERNED: dict[tuple[tuple[str, tuple[int, ...]], ...], TensorList] = {}


def interned(tensors: TensorList) -> TensorList:
    """One shared list object per distinct tensor set (never modified), equal to `tensors`.

    A fingerprint's tensor list is compared with the plan's on every FINGERPRINT
    request: hundreds of (name, shape) tuples for a real model. With both sides
    interned the comparison meets the very same tuples and Python's identity
    shortcut answers each in nanoseconds; it is still a full equality test.
    """
    try:
        key = tuple(tensors)
        hash(key)
    except TypeError:  # an unhashable shape: leave the list as it is
        return tensors
    with _INTERNED_LOCK:
        hit = _INTERNED.get(key)
        if hit is None:
            if len(_INTERNED) >= 256:
                _INTERNED.clear()
            hit = _INTERNED[key] = list(key)
        return hit


def tensor_list(plan: ComparisonPlan) -> TensorList:
    """(name, shape) of the plan's tensors, in order."""
    return [(t.name, tuple(t.shape)) for t in plan.tensors]


def tensors_by_group(plan: ComparisonPlan) -> dict[str, int]:
    """How many compared tensors each layer group holds."""
    out: dict[str, int] = {}
    for t in plan.tensors:
        out[t.group] = out.get(t.group, 0) + 1
    return out


def skipped_tuples(skipped: Sequence[Skipped]) -> list[tuple[str, str, str]]:
    """Skipped tensors as (name, reason, detail), as fingerprints record them."""
    return [(s.name, s.reason, s.detail) for s in skipped]


@dataclass(frozen=True)
class PlanFacts:
    """What the light paths read off a (memoised, never modified) plan on every request: computed once per plan."""

    tensor_list: TensorList
    """`tensor_list(plan)`, interned."""
    tensors_by_group: dict[str, int]
    """`tensors_by_group(plan)`; hand out copies."""
    sliced: bool
    """Whether any tensor is compared over a leading slice."""


class PlanMemo:
    """Memoised comparison plans and their facts (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plans: OrderedDict[tuple[object, ...], ComparisonPlan] = OrderedDict()
        self._facts: dict[int, tuple[weakref.ref[ComparisonPlan], PlanFacts]] = {}

    def plan(self, idents: Sequence[CheckpointIdentity], labels: Sequence[str], leading_slice: bool) -> ComparisonPlan:
        """The plan of comparing `idents[1:]` against the base `idents[0]` (from their headers; no file is read)."""
        key = (tuple(i.identity for i in idents), tuple(labels), leading_slice)
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
                return hit
        plan = plan_comparison([i.headers for i in idents], labels, leading_slice)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)
        return plan

    def facts(self, plan: ComparisonPlan) -> PlanFacts:
        """The `PlanFacts` of `plan`, memoised by the plan object (held weakly: an evicted plan's entry never answers)."""
        with self._lock:
            hit = self._facts.get(id(plan))
        if hit is not None and hit[0]() is plan:
            return hit[1]
        facts = PlanFacts(interned(tensor_list(plan)), tensors_by_group(plan), any(t.sliced for t in plan.tensors))
        with self._lock:
            if len(self._facts) >= MAX_FACTS:
                self._facts.clear()
            self._facts[id(plan)] = (weakref.ref(plan), facts)
        return facts

    def pair_plan(self, base: CheckpointIdentity, model: CheckpointIdentity) -> ComparisonPlan:
        """The plan of one model against the base: the tensor set its fingerprint and delta cover."""
        return self.plan([base, model], ["base", "checkpoint"], False)

    def canonical(self, joint: ComparisonPlan, base: CheckpointIdentity, model: CheckpointIdentity) -> bool:
        """True when a pass over `joint` covers exactly the model's own tensor set against the base."""
        if any(t.sliced for t in joint.tensors):
            return False
        return tensor_list(joint) == tensor_list(self.pair_plan(base, model))

    def clear(self) -> None:
        """Forget every memoised plan."""
        with self._lock:
            self._plans.clear()
