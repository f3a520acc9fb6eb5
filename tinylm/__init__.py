"""tinylm: the tiny language model foundry.

From raw text (or a bigger model) to a small, fast, deployable Llama-style language model.
"""

from tinylm.core.errors import TinylmError
from tinylm.model.config import PRESETS, ModelConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "PRESETS", "TinylmError", "__version__"]
