"""Document cleaning: markdown, HTML and plain-text files to the plain text that gets chunked.

Removes front matter, HTML comments and hidden blocks, tags, kramdown attribute lists, image links
and link targets, emphasis and escapes; renders MathML to readable text (``x^2``, ``a/b``, accents).
Used by the ingest stage (:mod:`moegate.stages.ingest`) for experts whose ``source`` is a folder of documents.
"""

from __future__ import annotations

import html
import re

_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\n.*?\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HIDDEN_BLOCK = re.compile(r"<(script|style|head|noscript)\b[^>]*>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
# MathML and the whitespace after it: converters put inline math on its own line(s)
_MATH = re.compile(r"<math\b[^>]*>(.*?)</math\s*>([ \t]*(?:\n[ \t]*)*)", re.DOTALL | re.IGNORECASE)
_MATH_ANNOTATION = re.compile(r"<annotation(?:-xml)?\b[^>]*>.*?</annotation(?:-xml)?\s*>", re.DOTALL | re.IGNORECASE)
_MATH_TOKEN = re.compile(r"<(m[a-z]+)\b[^<>]*>([^<>]*)</\1\s*>", re.IGNORECASE)
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:-]*)\b[^<>]*?(/?)>")
_SUP = re.compile(r"<sup\b[^>]*>([^<>\s]{1,12})</sup\s*>", re.IGNORECASE)
# [alt](target "title"): the alt may hold one level of brackets; the target may be <...>, hold balanced
# (...) or (as some converters write file names) single spaces; the optional title may span lines
_LINK_TEXT = r"\[((?:[^\[\]\\]|\\.|\[[^\[\]]*\])*)\]"
_LINK_TARGET = (r"\(\s*(?:<[^<>\n]*>|(?:[^()\s\"']|[ ](?![ \"'(])|\([^()\s]*\))*)"
                r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^()]*\)))?\s*\)")
_IMAGE = re.compile(r"!" + _LINK_TEXT + _LINK_TARGET)
_LINK = re.compile(_LINK_TEXT + _LINK_TARGET)
_REF_LINK = re.compile(_LINK_TEXT + r"\[[^\[\]]*\]")
_LINK_DEFINITION = re.compile(r"^[ \t]{0,3}\[[^\]]+\]:[ \t]*\S+.*$", re.MULTILINE)
_AUTOLINK = re.compile(r"<(?:https?|ftp|mailto):[^<>\s]*>", re.IGNORECASE)
_ATTRIBUTE_LIST = re.compile(r"\{:?[:#.][^{}\n]*\}|\{:\}")  # kramdown {: .class #id key="v"}, {#id}, {::}
_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.MULTILINE)
# horizontal rules and setext underlines; OpenStax also ends lines with "* * *" as a line break
_SETEXT_RULE = re.compile(r"^[ \t]*(?:[-*_][ \t]*){3,}$|^[ \t]*=+[ \t]*$|[ \t]*\*[ \t]\*[ \t]\*[ \t]*$", re.MULTILINE)
_BULLET = re.compile(r"^([ \t]*)(?:[*+-]|>+)[ \t]+", re.MULTILINE)
_FENCE = re.compile(r"^[ \t]*(?:```|~~~).*$", re.MULTILINE)
_EMPHASIS = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1|(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])", re.DOTALL)
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>~])")
_BLOCK_TAGS = {
    "address", "article", "aside", "blockquote", "br", "caption", "dd", "div", "dl", "dt", "figcaption",
    "figure", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p",
    "pre", "section", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "ul",
}


_ACCENTS = {"¯": "\u0304", "‾": "\u0304", "^": "\u0302", "ˆ": "\u0302", "˙": "\u0307", "~": "\u0303",
            "˜": "\u0303", "→": "\u20d7", "⇀": "\u20d7"}  # accent marks over a base → combining characters


def _mathml_tokens(inner: str) -> str:
    """Fallback for MathML that is not well-formed XML: its token texts, operators spaced."""
    parts = []
    for tag, token in _MATH_TOKEN.findall(_MATH_ANNOTATION.sub(" ", inner)):
        token = token.strip()
        if token:
            parts.append(_math_operator(token) if tag.lower() == "mo" else token)
    return "".join(parts)


def _math_operator(token: str) -> str:
    if token in "()[]{}|":
        return token
    return token + " " if token in ",;:" else f" {token} "


def _render_mathml(node) -> str:
    """Linear text of a MathML element: x^2, x0 (subscripts follow their base), (a)/(b), √(x)."""
    tag = node.tag.rsplit("}", 1)[-1].lower()
    if tag in ("annotation", "annotation-xml"):
        return ""
    kids = [_render_mathml(child) for child in node]
    if tag in ("mi", "mn", "mtext", "ms"):
        return (node.text or "").strip()
    if tag == "mo":
        return _math_operator((node.text or "").strip()) if (node.text or "").strip() else ""
    if tag == "msup" and len(kids) == 2:
        return f"{kids[0]}^{kids[1]}" if len(kids[1]) <= 1 else f"{kids[0]}^({kids[1]})"
    if tag in ("mover", "munder") and len(kids) == 2 and len(kids[1].strip()) == 1:  # x̄, v⃗
        return kids[0] + _ACCENTS.get(kids[1].strip(), kids[1].strip())
    if tag == "mfrac" and len(kids) == 2:
        return f"({kids[0]})/({kids[1]})"
    if tag in ("msqrt", "mroot") and kids:
        return f"√({kids[0]})"
    return "".join(kids)  # mrow, msub, msubsup, mstyle, semantics, ...: children in order


def _math_text(match: re.Match) -> str:
    """MathML → linear text (``Δx = xf − x0``, ``2.98 × 10^5``), without TeX/StarMath annotations.

    The math stays inline unless a new paragraph (blank line, capital letter) follows it.
    """
    import xml.etree.ElementTree as ET

    try:
        rendered = _render_mathml(ET.fromstring(f"<math>{match.group(1)}</math>"))
    except ET.ParseError:  # entities or broken markup: fall back to the tokens' text
        rendered = _mathml_tokens(match.group(1))
    rendered = re.sub(r"\s{2,}", " ", rendered).strip()
    after = match.group(2)
    rest = match.string[match.end():match.end() + 1]
    if "\n" in after and (not rest or rest.isupper() or rest == "<"):
        return f" {rendered}\n\n"
    return f" {rendered} " if after else f" {rendered}"


def _tag(match: re.Match) -> str:
    # block-level tags separate words (and sentences); inline ones (span, em, sub) must not split words
    return "\n" if match.group(2).lower() in _BLOCK_TAGS else ""


def _unwrap_emphasis(match: re.Match) -> str:
    return match.group(2) if match.group(2) is not None else match.group(3)


def _tidy_whitespace(text: str, markup: bool = False) -> str:
    """Collapse runs of spaces, strip lines, keep at most one blank line; for markup also close the
    gap that removed tags leave before punctuation (``xf .`` → ``xf.``)."""
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return re.sub(r"(?<=\S) +([,.;:!?])(?=\s|$)", r"\1", text) if markup else text


def clean_html(text: str) -> str:
    """Readable text of an HTML page or fragment: no comments, scripts, MathML markup or tags."""
    text = _COMMENT.sub(" ", text)
    text = _HIDDEN_BLOCK.sub(" ", text)
    text = _MATH.sub(_math_text, text)
    text = _SUP.sub(r"^\1", text)
    text = _TAG.sub(_tag, text)
    return _tidy_whitespace(html.unescape(text), markup=True)


def clean_markdown(text: str) -> str:
    """Readable text of a markdown document (kramdown/Jekyll flavoured, as OpenStax exports are).

    Removes YAML front matter, HTML comments/tags, MathML (keeping its token text), image links,
    link targets (keeping the link text), kramdown attribute lists, heading/list/emphasis markers.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _FRONT_MATTER.sub("", text, count=1)
    text = _COMMENT.sub(" ", text)
    text = _HIDDEN_BLOCK.sub(" ", text)
    text = _MATH.sub(_math_text, text)
    text = _IMAGE.sub(" ", text)
    text = _LINK.sub(r"\1", text)
    text = _REF_LINK.sub(r"\1", text)
    text = _LINK_DEFINITION.sub("", text)
    text = _AUTOLINK.sub(" ", text)
    text = _ATTRIBUTE_LIST.sub("", text)
    text = _SUP.sub(r"^\1", text)
    text = _TAG.sub(_tag, text)
    text = _FENCE.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _SETEXT_RULE.sub("", text)
    text = _BULLET.sub(r"\1", text)
    text = _EMPHASIS.sub(_unwrap_emphasis, text)
    text = text.replace("`", "").replace("**", "")  # stray markers the unwrapping could not pair
    text = _ESCAPE.sub(r"\1", text)
    text = re.sub(r"\\(?=[^\sA-Za-z0-9])", "", text)  # doubly escaped punctuation (\\\_ → \_) left by converters
    return _tidy_whitespace(html.unescape(html.unescape(text)), markup=True)  # twice: &amp;#8221; occurs


def clean_document(text: str, kind: str) -> str:
    """Plain text of one document of ``kind`` (markdown | html | text)."""
    if kind == "markdown":
        return clean_markdown(text)
    if kind == "html":
        return clean_html(text)
    return _tidy_whitespace(text.replace("\r\n", "\n").replace("\r", "\n"))
