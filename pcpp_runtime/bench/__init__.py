"""Benchmarks: ``pcpp bench`` (the grid, each point in fresh worker processes), the throttled-link
mode (two network namespaces joined by a tbf-limited veth pair) and ``pcpp plan`` (the cost model).

Modules: :mod:`.model` (the benchmark UNet, DDIM loop, inputs), :mod:`.worker` (one process of a
point), :mod:`.launcher` (N workers through the local launcher, optionally one per namespace),
:mod:`.runner` (the grid), :mod:`.machine` (quiet-machine checks), :mod:`.netns` (the link),
:mod:`.costmodel`, :mod:`.report` (JSON, CSV, Markdown, plots), :mod:`.command` (the CLI).
Importing this package imports nothing heavy (no torch), so ``pcpp --help`` stays quick.
"""
