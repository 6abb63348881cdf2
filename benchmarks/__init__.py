"""Benchmarks of datafabric against baselines measured in the same run.

``python -m benchmarks [--quick] [--repeat N] [--out DIR]``: numbers from different runs
(or machines) are not comparable, so every figure is reported next to the physical limit
or the alternative it should be judged against, measured minutes apart on the same cluster.
"""
