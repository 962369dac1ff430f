"""vlbench: a benchmark suite and leaderboard harness for the adversarial robustness of
CLIP-style vision-language models.

The core package knows no defense or attack by name; it finds them through its registries
(:mod:`vlbench.registry`, :mod:`vlbench.plugins`).
"""

import os

__version__ = "0.1.0"

# vlbench never downloads: weights and datasets are read from disk or the Hugging Face cache.
# huggingface_hub reads this variable once, when it is first imported (by open_clip,
# transformers or diffusers), so it is decided here, before any of them; a user who sets it
# to 0 keeps downloads on.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
