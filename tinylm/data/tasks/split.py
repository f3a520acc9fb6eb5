"""The train / test split of the built-in tasks: by a hash of a prompt's normalised text, whatever the seed.

A prompt (an instruction, a request) is held out when the SHA-256 of its normalised text falls in one bucket of
TEST_SHARE. The same text always lands in the same split, so no test prompt is ever a
training prompt, and two seeds' training sets may overlap but never reach into the test split.
"""

from __future__ import annotations

import hashlib
import re

TEST_SHARE = 10  # one prompt in TEST_SHARE is held out


def normalise(text: str) -> str:
    """Lowercase letters and digits, words separated by single spaces: the text that splits and dedupes compare."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def in_test_split(text: str) -> bool:
    """Whether a prompt belongs to the held-out split (a hash of its normalised text).

    Args:
        text: the prompt.
    """
    return int(hashlib.sha256(normalise(text).encode()).hexdigest()[:8], 16) % TEST_SHARE == 0
