"""Subnet search on a trained supernet (SPEC §7): validation-based selection (TOFA eq. 5).

* :mod:`.evaluator` — :class:`SubnetEvaluator`, accuracy of many subnets, BN recalibrated each;
* :mod:`.evolution` — :func:`evolutionary_search` and :func:`random_search` under a cost budget.
"""

from .evaluator import SubnetEvaluator
from .evolution import Genome, SearchResult, evolutionary_search, random_search

__all__ = ["Genome", "SearchResult", "SubnetEvaluator", "evolutionary_search", "random_search"]
