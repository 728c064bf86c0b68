"""User text (prompts, names, errors, anything from a recipe) made safe to show.

Two risks besides markup: explicit bidi controls (a right-to-left override, U+202E, reverses
everything after it up to the end of its paragraph, our own text included) and strong RTL
characters, which reorder the neutral text next to them. Controls are replaced by a visible
marker; user text is wrapped in <bdi> (an isolate), so it can only reorder itself.
"""
from __future__ import annotations

import html
import json
import re
from typing import Any

# embeddings, overrides and isolates; the marks (U+200E, U+200F, U+061C) only affect their
# neighbours inside an isolate and are legitimate in RTL text, so they stay
BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")


def neutralise(text: str) -> str:
    """Bidi controls shown as what they are ("[U+202E]") instead of acting on the text."""
    return BIDI_CONTROLS.sub(lambda m: f"[U+{ord(m.group()):04X}]", text)


def esc(text: Any) -> str:
    """For attributes and text where no element can go (<title>, alt, aria-label)."""
    return html.escape(neutralise(str(text)), quote=True)


def user(text: Any) -> str:
    """User text in element content: escaped and isolated."""
    return f"<bdi>{esc(text)}</bdi>"


def script_json(data: Any) -> str:
    """JSON that cannot end its <script> element early, whatever the prompts contain; its
    strings are neutralised here, once, and the page's JS isolates each one it shows."""
    text = neutralise(json.dumps(data, ensure_ascii=False, separators=(",", ":")))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
