"""User text: HTML stripped, spam refused.

HTML is removed with nh3 (the ammonia sanitizer): a well-kept parser handles
malformed markup, comments and script content far better than a regex. What
remains is plain text (entities decoded), since clients render text, not HTML.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterable

import nh3

from .errors import ProtocolError

__all__ = ["DEFAULT_SPAM_PATTERNS", "SpamFilter", "normalize_text", "plain_text"]

#: Default patterns: the spam seen on Korean community Q&A boards (gambling,
#: private loans, adult content), link shorteners, "contact me on Telegram/
#: KakaoTalk" solicitations, and one character repeated 20 times or more.
DEFAULT_SPAM_PATTERNS: tuple[str, ...] = (
    r"카지노|바카라|토토사이트|먹튀",
    r"대출\s*(?:상담|문의|가능)|급전",
    r"\b(?:viagra|cialis|casino|porn)\b",
    r"\b(?:bit\.ly|tinyurl\.com|goo\.gl|t\.co)/",
    r"(?:텔레|telegram|카톡|kakao)\s*(?:id|아이디)?\s*[:：]?\s*@?\w{3,}.*(?:문의|contact)",
    r"(.)\1{19,}",
)


#: Characters that are never part of what a user meant to write: zero-width
#: spaces and joiners, word joiner, byte-order mark, bidi controls.
_INVISIBLE = dict.fromkeys(
    [0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069]
)


def normalize_text(value: str, *, multiline: bool = False) -> str:
    """One Unicode form for every user string: NFC, no control or zero-width characters.

    Hangul typed or pasted on some systems arrives decomposed (NFD): without
    this, ``맛집`` in NFD would never match ``맛집`` in NFC (a hashtag, an
    expert's tag), and its length would count twice its letters. Newlines
    and tabs stay in ``multiline`` text (bodies, answers).
    """
    value = unicodedata.normalize("NFC", value).translate(_INVISIBLE)
    keep = "\n\t" if multiline else ""
    return "".join(c for c in value if c in keep or unicodedata.category(c) != "Cc")


def plain_text(value: str) -> str:
    """``value`` with HTML tags (and script/style content) removed, entities decoded, trimmed."""
    if "<" not in value and "&" not in value:
        return value.strip()
    return html.unescape(nh3.clean(value, tags=set())).strip()


class SpamFilter:
    """Refuses text matching any configured pattern (case-insensitive).

    Raises:
        re.error: a pattern does not compile (checked when settings load).
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._regex = re.compile("|".join(f"(?:{p})" for p in self.patterns), re.IGNORECASE) if self.patterns else None

    def check(self, *texts: str) -> None:
        if self._regex is None:
            return
        for text in texts:
            if self._regex.search(text):
                raise ProtocolError("spam", "the text looks like spam and was refused")
