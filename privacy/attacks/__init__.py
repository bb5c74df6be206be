"""Attack evaluation: membership inference (``membership``), gradient inversion (``inversion``), their metrics
(``metrics``) and the target models they run against (``targets``). Driven by ``bench/bench_attacks.py``."""
