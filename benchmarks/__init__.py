"""conclave-kernel benchmarks: the kernel and its baselines, side by side, in one run.

    python -m benchmarks.run [--quick] [--out DIR] [--only NAME ...]
    python -m benchmarks.compare --baseline-ref REF

``run`` measures every scenario (``benchmarks.scenarios``) against the baselines in
``benchmarks.baselines`` and writes the README's table; ``compare`` puts the kernel of
another commit next to this one's.  Run both from the repository root.
"""
