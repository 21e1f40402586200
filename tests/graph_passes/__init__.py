"""Tests of tokensieve.graph_passes (a package so its folder name cannot shadow an installed module, e.g. tensorrt)."""
