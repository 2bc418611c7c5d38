"""The `make bench` suite: edgekiln measured against the tools users would otherwise reach for.

It lives outside the installed package on purpose: it may import anything in ``edgekiln``
(passes, search, fleet), and nothing in ``edgekiln`` imports it. Run it from the repository root::

    python -m benchmarks.suite [--quick] [--only NAME ...]

:mod:`.suite` runs the cases (``cases_*.py``) and rewrites BENCHMARKS.md and bench/results/;
:mod:`.peers` runs the peer tools (onnxruntime's quantizer, NNCF); :mod:`.netns` is the shaped
network between two Linux network namespaces that the split-computing case measures over.
"""
