"""Every policy by its configured name: the one list `[optimization] policy` is checked against.

The registry imports the implementations and `policies.base` imports none of them, so
there is no cycle: a new policy is one module with a class satisfying `PolicyClass`
(a `name` and a `from_settings` classmethod) plus one entry below.
"""

from __future__ import annotations

import math

from policies.base import Discount, Policy, PolicyClass
from policies.baseline import BaselinePolicy, UniformPolicy
from policies.linucb import LinUCBPolicy
from policies.settings import LinUCBSettings, ThompsonSettings
from policies.thompson import ThompsonGaussianPolicy

_CLASSES: tuple[PolicyClass, ...] = (ThompsonGaussianPolicy, LinUCBPolicy, BaselinePolicy, UniformPolicy)

POLICIES: dict[str, PolicyClass] = {cls.name: cls for cls in _CLASSES}
"""name -> class, in the order the README lists them (the first is the default)."""


def make_policy(
    name: str, *, thompson: ThompsonSettings | None = None, linucb: LinUCBSettings | None = None, half_life_s: float = math.inf
) -> Policy:
    """A fresh policy of the registered class `name`, tuned by the settings section it reads;
    `half_life_s` (`[policy] half_life_s`) discounts the statistics of those that learn."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
    return cls.from_settings(thompson=thompson or ThompsonSettings(), linucb=linucb or LinUCBSettings(), discount=Discount(half_life_s))
