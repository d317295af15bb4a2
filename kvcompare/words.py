"""Common English words for RULER's word-based tasks: the noun, adjective and verb lists of ``wonderwords``.

RULER (Hsieh et al., 2024) draws its word keys (adjective-noun pairs) and the words of its common-words task
from these three lists of the ``wonderwords`` package. :func:`english_words` reads them from the installed
package, so nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import importlib.resources

from kvcompare.task import TaskError

#: The word lists of wonderwords that RULER uses, in the package's ``assets`` folder.
WORD_LISTS = ("nounlist.txt", "adjectivelist.txt", "verblist.txt")


@functools.cache
def english_words() -> tuple[str, ...]:
    """wonderwords' nouns, adjectives and verbs: deduplicated, lowercase alphabetic only (no "TV", no
    "arm-rest"), sorted; the same tuple on every machine with the same wonderwords lists.

    Raises TaskError when wonderwords is not installed.
    """
    try:
        import wonderwords
    except ImportError:
        raise TaskError(
            "RULER's word lists come from the wonderwords package, which is not installed: pip install wonderwords"
        ) from None
    assets = importlib.resources.files(wonderwords) / "assets"
    words: set[str] = set()
    for name in WORD_LISTS:
        for line in (assets / name).read_text(encoding="utf-8").splitlines():
            word = line.strip()
            if word.isascii() and word.isalpha() and word.islower():
                words.add(word)
    if not words:
        raise TaskError(f"the wonderwords package at {assets} has no words in {', '.join(WORD_LISTS)}")
    return tuple(sorted(words))
