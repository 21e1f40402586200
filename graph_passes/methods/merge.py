"""Merging methods (ToMe, token transforming): reduce tokens by weighted averages, as MatMuls."""
from __future__ import annotations

METHODS: tuple = ()
