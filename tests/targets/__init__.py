"""Tests of tokensieve.targets (a package so its folder name cannot shadow an installed module, e.g. tensorrt)."""
