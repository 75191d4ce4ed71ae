"""User text: HTML stripped, spam refused.

HTML is removed with nh3 (the ammonia sanitizer): a well-kept parser handles
malformed markup, comments and script content far better than a regex. What
remains is plain text (entities decoded), since clients render text, not HTML.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

import nh3

from .errors import ProtocolError

__all__ = ["DEFAULT_SPAM_PATTERNS", "SpamFilter", "plain_text"]

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
