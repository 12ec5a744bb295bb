"""Stories on request: the instruction header a story is trained and sampled after, and the measures of whether a
story followed it.

TinyStories was generated from instructions (Eldan & Li 2023): one verb, one noun and one adjective the story must
use, and features such as dialogue or a bad ending; its JSON archive keeps them per story as
`{"story", "instruction": {"words": [...], "features": [...]}, "summary"}`. prepare.py --instruct writes each story
after a header of those fields, in the spirit of the paper's TinyStories-Instruct layout:

    Words: dog, ball, happy
    Features: Dialogue
    Summary: A dog finds a ball.
    Story:
    Once upon a time, ...

A line whose field is empty is left out, so a story without instructions is "Story:" and the story. The header
ends with a newline, so the story's first word is tokenized as it is inside any story (a space before it would be
a token of its own here and nowhere else). sample.py, serve.py and eval.py --instruct build their prompts with
the same `header` function, so a prompt is byte for byte what the model was trained on.

Kept free of torch and `datasets`: sample.py and serve.py import it without prepare.py's dependencies.
"""

import re

STORY = "Story:\n"  # the last line of every header: the story starts after it

# Features whose presence can be read off the text: name -> test. Dialogue is quoted speech: a pair of quotation
# marks (straight or curly) around at least one letter.
_QUOTE = re.compile(r"[\"\u201c][^\"\u201c\u201d]*?[^\W\d_][^\"\u201c\u201d]*?[\"\u201d]")
CHECKABLE = {"Dialogue": lambda text: _QUOTE.search(text) is not None}


def _clean(value, name):
    """One header field as a single line of text: whitespace runs (newlines included) become one space, so a
    field can never start a header line of its own. Raises ValueError naming the field if it is not text."""
    if not isinstance(value, str):
        raise ValueError(f"{name} holds {type(value).__name__}, not text")
    return " ".join(value.split())


def _items(values, name):
    """A list field (words, features) as a list of cleaned, non-empty str. None is an empty list; a single str
    is one item. Raises ValueError naming the field for anything else (numbers, nested lists, ...)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} holds {type(values).__name__}, not a list of text")
    items = [_clean(v, name) for v in values]
    if any("," in v for v in items):
        raise ValueError(f"{name} has an item with a comma in it; give one item per list entry")
    return [v for v in items if v]


def header(words=None, features=None, summary=None):
    """The text written before a story: "Words: a, b, c\\n", "Features: X, Y\\n", "Summary: ...\\n" (each only
    when given and not empty), then "Story:\\n".

    Args:
        words, features: lists of str (or None); summary: str (or None). Whitespace inside a field is folded to
            single spaces.
    Returns:
        str, the same bytes for the same fields wherever it is built (prepare.py, sample.py, serve.py, eval.py).
    Raises:
        ValueError: a field of the wrong type (a number, a nested list) or a list item holding a comma.
    """
    lines = []
    words, features = _items(words, "words"), _items(features, "features")
    summary = _clean(summary, "summary") if summary is not None else ""
    if words:
        lines.append("Words: " + ", ".join(words))
    if features:
        lines.append("Features: " + ", ".join(features))
    if summary:
        lines.append("Summary: " + summary)
    return "".join(line + "\n" for line in lines) + STORY


def split_list(text):
    """A command-line list ("dog, ball,happy") as a list of stripped, non-empty str."""
    return [w.strip() for w in text.split(",") if w.strip()]


# Words too common to be asked for: the function words of English and TinyStories' stock phrases.
STOPWORDS = set("""a about above after again against all also am an and any are as at away back be because been
before being below between both but by can could did do does doing down during each even ever every few for from
further had has have having he her here hers herself him himself his how i if in into is it its itself just let
like me more most much my myself never no nor not now of off on once one only or other our ours out over own said
same say says she should so some still such than that the their them then there these they this those through
time to too under until up upon very was way we well were what when where which while who whom why will with
would yes yet you your day named once""".split())


def content_words(story):
    """The words of a story that an instruction could ask for: lowercase runs of letters of three or more, never
    written with a capital inside a sentence (names: Lily, Max), not in STOPWORDS. Returns a sorted list of str."""
    found = set()
    for m in re.finditer(r"[A-Za-z]+(?:'[A-Za-z]+)?", story):
        found.add(m.group())
    names = {w.lower() for w in found if w[0].isupper() and w.lower() not in found}
    return sorted(w for w in found if w.islower() and len(w) >= 3 and "'" not in w and w not in STOPWORDS
                  and w not in names)


EARLY_WORDS = 60  # variant_words draws from the story's first this many words


def variant_words(story, count, key, within=EARLY_WORDS):
    """`count` words drawn from the content_words of the story's first `within` words (all of the story's when
    there are fewer than `count` there), the same for the same (story, key): the words of an extra training header
    for the same story (prepare.py --instruct_variants), so that a story is seen with several word sets and the
    model learns to use the words it is given rather than which story goes with which words. Early words, because
    a training window of block_size tokens that holds the header holds only the story's beginning: a word used
    late is never seen together with the header that asked for it (docs/instruct.md measures this).
    Returns a list of str (fewer when the story has fewer content words)."""
    import hashlib
    import random
    head = " ".join(story.split()[:within])
    pool = content_words(head)
    if len(pool) < count:
        pool = content_words(story)
    rng = random.Random(hashlib.sha256(f"{key}\0{story}".encode()).digest())
    return rng.sample(pool, min(count, len(pool)))


def document(row, story_column="story", variant=0):
    """The training text of one archive row: header(instruction words, features, summary) + the story.

    Args:
        row: dict with the story (str) under story_column, and optionally "instruction" (a dict with "words" and
            "features") and "summary" (str).
        variant: 0 for the row's own instruction; k > 0 for an extra copy whose words are variant_words(story,
            as many as the instruction has, k), with the row's features and summary.
    Returns:
        (text, problem): problem is "" when the row's instructions were used, or says why they were not (the row
        then becomes "Story:\\n" + story, used without them).
    """
    story = row.get(story_column)
    if not isinstance(story, str) or not story.strip():
        return "", ""  # a blank document, dropped as prepare.py drops blank documents
    instruction, summary = row.get("instruction"), row.get("summary")
    if instruction is None and summary is None:
        return STORY + story, "no instruction"
    try:
        if instruction is not None and not isinstance(instruction, dict):
            raise ValueError(f"instruction holds {type(instruction).__name__}, not an object with words and "
                             f"features")
        instruction = instruction or {}
        words = instruction.get("words")
        if variant:  # an extra copy: as many other words of the story as the instruction asks for
            words = variant_words(story, len(_items(words, "words")) or 3, variant)
        return header(words, instruction.get("features"), summary) + story, ""
    except ValueError as e:
        return STORY + story, str(e)


# ------------------------------------------------------------------------------------------------------------------
# Did the story use the words?

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


def words(s):
    """The words of a text: maximal runs of letters, apostrophes allowed inside (don't), lowercased, with the
    typographic apostrophe (U+2019) read as '. Returns a list of str. (eval.py's story metrics count these too.)"""
    return _WORD.findall(s.lower().replace("\u2019", "'"))

# Irregular forms TinyStories' verbs, nouns and adjectives take most often; regular ones are derived in `forms`.
IRREGULAR = {
    "be": "am is are was were been being", "begin": "began begun", "bite": "bit bitten", "blow": "blew blown",
    "break": "broke broken", "bring": "brought", "build": "built", "buy": "bought", "catch": "caught",
    "choose": "chose chosen", "come": "came", "dig": "dug", "do": "did done does", "draw": "drew drawn",
    "dream": "dreamt", "drink": "drank drunk", "drive": "drove driven", "eat": "ate eaten", "fall": "fell fallen",
    "feed": "fed", "feel": "felt", "fight": "fought", "find": "found", "fly": "flew flown",
    "forget": "forgot forgotten",
    "freeze": "froze frozen", "get": "got gotten", "give": "gave given", "go": "went gone goes", "grow": "grew grown",
    "hang": "hung", "have": "had has", "hear": "heard", "hide": "hid hidden", "hold": "held", "hurt": "hurt",
    "keep": "kept", "know": "knew known", "lay": "laid", "lead": "led", "leave": "left", "lend": "lent", "let": "let",
    "lie": "lay lain", "lose": "lost", "make": "made", "mean": "meant", "meet": "met", "pay": "paid", "put": "put",
    "read": "read", "ride": "rode ridden", "ring": "rang rung", "rise": "rose risen", "run": "ran", "say": "said",
    "see": "saw seen", "sell": "sold", "send": "sent", "shake": "shook shaken", "shine": "shone", "shoot": "shot",
    "sing": "sang sung", "sink": "sank sunk", "sit": "sat", "sleep": "slept", "slide": "slid", "speak": "spoke spoken",
    "spend": "spent", "spin": "spun", "stand": "stood", "steal": "stole stolen", "stick": "stuck", "sting": "stung",
    "swim": "swam swum", "swing": "swung", "take": "took taken", "teach": "taught", "tear": "tore torn", "tell": "told",
    "think": "thought", "throw": "threw thrown", "understand": "understood", "wake": "woke woken", "wear": "wore worn",
    "win": "won", "write": "wrote written",
    "child": "children", "foot": "feet", "goose": "geese", "knife": "knives", "leaf": "leaves", "life": "lives",
    "man": "men", "mouse": "mice", "person": "people", "sheep": "sheep", "shelf": "shelves", "tooth": "teeth",
    "wife": "wives", "wolf": "wolves", "woman": "women",
    "bad": "worse worst", "good": "better best", "far": "farther further farthest furthest", "little": "less least",
    "many": "more most", "much": "more most",
}


def forms(word):
    """The inflections of a base word that count as using it: the word itself, plural / third person (-s, -es,
    -ies), past (-ed, -d, -ied), present participle (-ing, dropping a final e), comparative and superlative
    (-er, -est, -ier, -iest), with the final consonant doubled after a short vowel (stop -> stopped,
    big -> bigger), plus the IRREGULAR forms; derived words (happily, friendly) do not count. Lowercase;
    over-generates harmlessly (a non-word such as "playes" never occurs).
    Returns a set of str."""
    w = word.lower()
    out = {w} | set(IRREGULAR.get(w, "").split())
    stems = [w]
    if w.endswith("e"):
        stems.append(w[:-1])  # dance -> danc-ing, nice -> nic-er
    if len(w) > 1 and w.endswith("y") and w[-2] not in "aeiou":
        stems.append(w[:-1] + "i")  # happy -> happi-er, cry -> cri-ed
    if re.search(r"(?:^|[^aeiou])[aeiou][b-df-hj-np-tvz]$", w):
        stems.append(w + w[-1])  # stop -> stopp-ed, big -> bigg-er (not w, x or y, which are never doubled)
    for stem in stems:
        out.update(stem + end for end in ("s", "es", "ed", "ing", "er", "est"))
    return out


def uses(word, text):
    """True when `text` contains `word` or one of its `forms` as a whole word, ignoring case: "cat" is in "Cats!"
    but not in "catch". A required phrase of several words counts when its last word does so in order after the
    others (e.g. "ice cream" -> "ice creams")."""
    tokens = words(text)
    parts = word.lower().split()
    if not parts:
        return False
    if len(parts) == 1:
        return not forms(parts[0]).isdisjoint(tokens)
    last = forms(parts[-1])
    return any(tokens[i:i + len(parts) - 1] == parts[:-1] and tokens[i + len(parts) - 1] in last
               for i in range(len(tokens) - len(parts) + 1))


def has_feature(name, text):
    """Whether a CHECKABLE feature shows in the text: True/False, or None for a feature that cannot be checked."""
    test = CHECKABLE.get(name)
    return None if test is None else test(text)


def score(words, features, text):
    """How one story followed its instructions.

    Args:
        words: the required words (list of str); features: the features asked for (list of str); text: the story.
    Returns:
        dict: used (list of bool, one per word: `uses`), features (dict name -> True/False for every CHECKABLE
        feature: does the text show it), asked (list of the CHECKABLE features asked for).
    """
    return {"used": [uses(w, text) for w in words],
            "features": {name: test(text) for name, test in CHECKABLE.items()},
            "asked": [f for f in features if f in CHECKABLE]}


def summarize(scores):
    """The shares over many stories' `score` results.

    Returns:
        dict: words_required (int), words_used (int), word_share (used / required; None when no word was
        required), and per CHECKABLE feature a dict with asked and not_asked (story counts) and present_when_asked,
        present_when_not_asked (shares of those stories whose text shows it; None when there are none).
    """
    required = sum(len(s["used"]) for s in scores)
    used = sum(sum(s["used"]) for s in scores)
    out = {"words_required": required, "words_used": used, "word_share": used / required if required else None}
    for name in CHECKABLE:
        asked = [s["features"][name] for s in scores if name in s["asked"]]
        other = [s["features"][name] for s in scores if name not in s["asked"]]
        out[name] = {"asked": len(asked), "not_asked": len(other),
                     "present_when_asked": sum(asked) / len(asked) if asked else None,
                     "present_when_not_asked": sum(other) / len(other) if other else None}
    return out


def load_instructions(path, text):
    """The instructions of a JSON file in TinyStories' archive layout (a list of rows, or JSON Lines): per row a
    dict with words, features (lists of str) and summary (str or None). The stories in the file are not read.

    Args:
        path: the file's name, for messages; text: its content.
    Raises:
        ValueError: not JSON / JSON Lines, not a list of objects, no rows, or a row whose instruction fields are
        malformed (the message names the file and the row).
    """
    import json
    try:
        rows = json.loads(text)
    except ValueError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise ValueError(f"{path} is neither JSON nor JSON Lines ({e})") from None
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path} holds no rows: expected a list of objects like TinyStories' data00.json")
    out = []
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise ValueError(f"it is a {type(row).__name__}, not an object")
            instruction = row.get("instruction") or {}
            if not isinstance(instruction, dict):
                raise ValueError("instruction is not an object with words and features")
            words, features = _items(instruction.get("words"), "words"), _items(instruction.get("features"), "features")
            summary = row.get("summary")
            summary = _clean(summary, "summary") if summary is not None else None
        except ValueError as e:
            raise ValueError(f"{path}, row {i}: {e}; fix or remove that row") from None
        out.append({"words": words, "features": features, "summary": summary})
    return out
