"""vlbench: a benchmark suite and leaderboard harness for the adversarial robustness of
CLIP-style vision-language models.

The core package knows no defense or attack by name; it finds them through its registries
(:mod:`vlbench.registry`, :mod:`vlbench.plugins`).
"""

__version__ = "0.1.0"
