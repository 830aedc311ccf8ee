"""Engines that run a federation: the embedded loop and the Flower apps, over the same functions."""
