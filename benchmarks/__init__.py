"""Benchmarks of datafabric side by side with its baselines, measured in the same run.

``python -m benchmarks [--quick] [--peers ray,vineyard] [--out DIR]``: numbers from
different runs (or machines) are not comparable, so every figure is reported next to the
physical limit it should be judged against (a plain copy, view or memmove of shared
memory in the same process) and next to Dask, Ray and Vineyard doing the same thing,
measured minutes apart on the same machine.  The suite has one module per group of
measurements (``put``, ``get``, ``small``, ``memory``, ``lifecycle``); ``cluster`` holds
the plan and the cluster, ``peers`` starts and stops the peers' daemons, ``report`` and
``plot`` write the results.
"""
