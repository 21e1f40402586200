"""Tests of tokensieve.targets.tensorrt (a package so its folder name cannot shadow an installed module, e.g. tensorrt)."""
