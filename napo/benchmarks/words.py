"""Word-level text processing shared by the caption benchmarks (CHAIR, AMBER): tokenising and singularising.

The reference scripts use NLTK and pattern, which need downloaded data (NLTK's punkt, tagger and WordNet) or do
not install on current Python (pattern 3.6 needs mysqlclient). napo re-implements the parts whose output the
metrics depend on, deterministically and without downloads:

- `tokenize`: what `nltk.word_tokenize` (punkt sentences + the Treebank word tokenizer) yields for the tokens that
  can be object words. Words are split at whitespace and at the punctuation Treebank splits off (, ; : ! ? ( ) [ ]
  { } < > " and a sentence-final period, which punkt separates for every non-abbreviation); clitics 's 're 've 'll
  'd 'm n't become their own tokens; hyphens, slashes and inner periods stay inside a word ("hot-dog", "3.5").
  Known difference: punkt keeps the period of an abbreviation ("mr.", "st."); napo splits it. No COCO or AMBER
  object word is such an abbreviation, so the objects found are the same.
- `singularize`: pattern.en's rule set (`pattern/text/en/inflect.py`, `singularize(word, pos=NOUN)`), applied
  rule for rule from the packaged `data/pattern_singular.json`, quirks included: "bus" -> "bu", "glass" ->
  "glas", "ties" -> "ty" (the CHAIR reference was computed with them; see `data/SOURCES.md`).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources

# Treebank splits these off any word; "&" "@" "#" "$" "%" too.
_SPLIT = re.compile(r"""([,;:!?()\[\]{}<>"@#$%&*]|``|'')""")
_CLITIC = re.compile(r"(?i)^(.+?)('s|'re|'ve|'ll|'d|'m|n't|')$")


def tokenize(text: str) -> list[str]:
    """Word tokens of `text` as `nltk.word_tokenize` splits them where it matters for object words (module doc)."""
    tokens: list[str] = []
    for chunk in _SPLIT.sub(r" \1 ", text).split():
        if _SPLIT.fullmatch(chunk):
            tokens.append(chunk)
            continue
        if chunk.startswith("'") and len(chunk) > 1 and chunk[1].isalnum():  # an opening quote
            tokens.append("'")
            chunk = chunk[1:]
        word, dots = re.fullmatch(r"(.*?)(\.*)", chunk).groups()
        if not word:  # "..." alone
            tokens.append(dots)
            continue
        clitic = _CLITIC.match(word)
        tokens += [clitic.group(1), clitic.group(2)] if clitic else [word]
        if dots:
            tokens.append(dots)
    return tokens


@lru_cache(maxsize=1)
def _pattern_rules() -> dict:
    with resources.files("napo.benchmarks").joinpath("data/pattern_singular.json").open() as f:
        data = json.load(f)
    data["rules"] = [(re.compile(pattern), replacement) for pattern, replacement in data["rules"]]
    data["plural_prepositions"] = frozenset(data["plural_prepositions"])
    return data


def singularize(word: str) -> str:
    """The singular of a noun by pattern.en's rules (pattern 3.6 `singularize(word, pos=NOUN)`), in their order:
    compound "x-of-y" recursion, trailing apostrophe, uninflected and uncountable words (a word that is the *end*
    of one of them is returned unchanged, as pattern tests `x.endswith(w)`), -ie words, irregular plurals, then the
    first matching suffix rule."""
    rules = _pattern_rules()
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in rules["plural_prepositions"]:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    lower = word.lower()
    if any(x.endswith(lower) for x in rules["uninflected"]) or any(x.endswith(lower) for x in rules["uncountable"]):
        return word
    if any(lower.endswith(x + "s") for x in rules["ie"]):
        return lower
    for plural, singular in rules["irregular"]:
        if lower.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for suffix, inflection in rules["rules"]:
        if suffix.search(word):
            return suffix.sub(inflection, word)
    return word


def data_text(name: str) -> str:
    """The text of a packaged data file (`napo/benchmarks/data/<name>`)."""
    return resources.files("napo.benchmarks").joinpath("data", name).read_text(encoding="utf-8")
