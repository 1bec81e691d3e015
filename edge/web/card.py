"""The model card (CARD.md of the bundle) as HTML for the Model page.

Rendered by markdown-it-py with tables; raw HTML in the card is not passed through (a card is
data from a bundle, not trusted markup), and image paths relative to the bundle are served by
``/model/files/<name>``, so the plots stand next to the figures they support.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flask import url_for
from markupsafe import Markup


@lru_cache(maxsize=8)
def _render(path: str, mtime_ns: int, files_url: str) -> str:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def image(self, tokens, idx, options, env):  # bound to the renderer by add_render_rule
        token = tokens[idx]
        src = token.attrGet("src") or ""
        if "/" not in src and ":" not in src:  # a file of the bundle
            token.attrSet("src", files_url.replace("__name__", src))
        token.attrSet("loading", "lazy")
        return self.image(tokens, idx, options, env)

    md.add_render_rule("image", image)
    return md.render(Path(path).read_text(encoding="utf-8"))


def card_html(card: Path | None) -> Markup | None:
    """The card as safe HTML, or None when the bundle has none (cached per file version)."""
    if card is None or not card.is_file():
        return None
    files_url = url_for("pages.model_file", name="__name__")
    return Markup(_render(str(card), card.stat().st_mtime_ns, files_url))
