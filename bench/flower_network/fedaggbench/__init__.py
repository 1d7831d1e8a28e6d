"""Flower side of fedagg's bench/network.R."""
