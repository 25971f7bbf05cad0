"""Reading knowledge sources: JSONL records and MediaWiki XML dumps (plain or .bz2), streamed.

The dump is parsed with ``xml.etree.ElementTree.iterparse`` and each ``<page>`` is cleared once read, so
memory stays flat on a 20 GB dump. Wiki markup is stripped well enough for BM25 and for prompt text:
templates, tables, references, files and categories go; links keep their label; bold/italic quotes,
headings, list markers and HTML tags go; the reference sections at the end are dropped.
"""
import bz2
import gzip
import html
import json
import re
import xml.etree.ElementTree as ET

_TAIL_SECTIONS = re.compile(
    r"^==+\s*(references|notes|see also|external links|further reading|bibliography|sources|citations|"
    r"footnotes|gallery)\s*==+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_BLOCK_TAGS = re.compile(r"<(gallery|math|score|syntaxhighlight|source|timeline|imagemap)[^>]*>.*?</\1>",
                         re.DOTALL | re.IGNORECASE)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.DOTALL)
_FILE_LINK = re.compile(r"\[\[(?:file|image|category|media):[^\[\]]*\]\]", re.IGNORECASE)
_LINK = re.compile(r"\[\[(?!\s*(?:file|image|category|media):)(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]", re.IGNORECASE)
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?:\s([^\]]*))?\]")
_URL = re.compile(r"(?:https?|ftp)://\S+")
_HEADING = re.compile(r"^=+[^=\n]*=+\s*$", re.MULTILINE)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_QUOTES = re.compile(r"'{2,}")
_LIST = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_MAGIC = re.compile(r"__[A-Z]+__")


def _repeat(pattern, repl, text):
    """Apply a non-nesting pattern until nothing changes, which removes nested constructs inside out."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def strip_wiki_markup(text):
    """Plain prose from wikitext; paragraphs are separated by blank lines."""
    m = _TAIL_SECTIONS.search(text)
    if m:
        text = text[: m.start()]
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _BLOCK_TAGS.sub("", text)
    text = _repeat(_TEMPLATE, "", text)
    text = _repeat(_TABLE, "", text)
    # links keep their label; file captions may hold links, so links go first, then files and categories
    text = _LINK.sub(r"\1", text)
    text = _repeat(_FILE_LINK, "", text)
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _URL.sub("", text)
    text = _HEADING.sub("\n", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _LIST.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(html.unescape(text)).replace("\xa0", " ")
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "( )" left by removed templates
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;:])", r"\1", text)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if len(p.split()) >= 4)


def _open(path):
    path = str(path)
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_wiki_dump(path, max_articles=None, min_words=20):
    """Yield ``(title, plain_text)`` for the articles (namespace 0, not redirects) of a MediaWiki dump."""
    n = 0
    with _open(path) as f:
        try:
            root = None
            for event, elem in ET.iterparse(f, events=("start", "end")):
                if root is None:
                    root = elem  # <mediawiki>: cleared after every page so finished pages do not pile up
                if event != "end":
                    continue
                tag = elem.tag.rsplit("}", 1)[-1]
                if tag != "page":
                    continue
                ns = title = text = None
                redirect = False
                for child in elem.iter():
                    ctag = child.tag.rsplit("}", 1)[-1]
                    if ctag == "ns":
                        ns = (child.text or "").strip()
                    elif ctag == "title":
                        title = child.text or ""
                    elif ctag == "redirect":
                        redirect = True
                    elif ctag == "text":
                        text = child.text or ""
                root.clear()
                if redirect or (ns not in (None, "0")) or not title or not text:
                    continue
                if text.lstrip().lower().startswith("#redirect"):
                    continue
                plain = strip_wiki_markup(text)
                if len(plain.split()) < min_words:
                    continue
                yield title, plain
                n += 1
                if max_articles and n >= max_articles:
                    return
        except ET.ParseError as e:
            raise ValueError(f"{path}: not a readable MediaWiki XML dump ({e})") from e


def iter_jsonl(path):
    """Yield ``(title, text)`` from a JSONL file of ``{"title": ..., "text": ...}`` objects."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be "
                                 '{"title": "...", "text": "..."}') from e
            if not isinstance(record, dict) or not isinstance(record.get("title"), str) \
                    or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{lineno}: each line must be an object with string "title" and "text"')
            yield record["title"], record["text"]


def count_jsonl(path):
    """The number of records (non-empty lines) of a JSONL file: the total for a build's progress."""
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())
