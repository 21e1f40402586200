"""Diversity / similarity selection (DivPrune, MMR): greedy selection of K tokens."""
from __future__ import annotations

METHODS: tuple = ()
