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
a token of its own here and nowhere else). sample.py and serve.py build their prompts with `instructed_prompt`,
eval.py --instruct with `header` itself, so a prompt is byte for byte what the model was trained on.

Kept free of torch and `datasets` (numpy only): sample.py and serve.py import it without prepare.py's
dependencies.
"""

import re

import numpy as np

from errors import UserError

STORY = "Story:\n"  # the last line of every header: the story starts after it
FIELDS = ("Words: ", "Features: ", "Summary: ")  # how the header's other lines start

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


def instructed_prompt(prompt, words="", features="", summary=""):
    """A prompt as sample.py --words/--features/--summary and serve.py's page fields ask for it: `header` of the
    fields, then the prompt; the prompt unchanged when every field is blank ("", whitespace only, None or []).

    Args:
        prompt: str, the story's opening (may be "").
        words, features: the items as comma-separated text ("dog, ball,happy", split by split_list) or a list
            of str; summary: str or None.
    Returns:
        str: header(...) + prompt, the bytes prepare.py --instruct trains on; or `prompt` itself.
    Raises:
        UserError: "bad instruction: ..." for a field that header refuses (not text, a list item with a comma).
    """
    if all(_blank(v) for v in (words, features, summary)):
        return prompt
    words, features = (split_list(v) if isinstance(v, str) else v for v in (words, features))
    try:
        return header(words, features, summary or None) + prompt
    except ValueError as e:
        raise UserError(f"bad instruction: {e}") from None


def _blank(value):
    """Whether an instructed_prompt field is not given: None, an empty list or text of whitespace only."""
    return value is None or (not value.strip() if isinstance(value, str) else value in ([], ()))


def document(row, story_column="story"):
    """The training text of one archive row: header(instruction words, features, summary) + the story.

    Args:
        row: dict with the story (str) under story_column, and optionally "instruction" (a dict with "words" and
            "features") and "summary" (str).
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
        return header(instruction.get("words"), instruction.get("features"), summary) + story, ""
    except ValueError as e:
        return STORY + story, str(e)


def header_chars(prompt):
    """The length in characters of the instruction header `prompt` starts with, or 0 when it does not start with
    one. A header is what `header` writes: lines that start with "Words: ", "Features: " or "Summary: ", then
    "Story:\n". header folds every field into one line, so each field line ends at its first newline, and the
    header ends at the first "Story:\n" line after them: a word or a summary that itself ends in "Story:" is
    part of its field's line, not the header's end. sample.py, serve.py and eval.py keep that many characters'
    tokens at the start of every generation window (GPT.generate's `keep`), as training does.

    Args:
        prompt: str.
    Returns:
        int, characters (0 <= result <= len(prompt)).
    """
    pos = 0
    while prompt.startswith(FIELDS, pos):
        end = prompt.find("\n", pos)
        if end < 0:
            return 0  # a field line that never ends: no "Story:" line, no header
        pos = end + 1
    return pos + len(STORY) if prompt.startswith(STORY, pos) else 0


def header_tokens(tok, prompt):
    """The number of tokens of the instruction header `prompt` starts with (0 without one): the `keep` that
    sample.py and serve.py give GPT.generate_stream. tok: a Tokenizer (tokenizer.py)."""
    return len(tok.encode(prompt[:header_chars(prompt)]))


# ------------------------------------------------------------------------------------------------------------------
# Training windows that see their story's instructions

class TrainingWindows:
    """Training windows over data prepared with --instruct (train.py uses them for its training batches): each
    window holds the header of the story it is in, and the loss can weigh up the tokens that start a word the
    header asked for.

    A window of a flat token stream that starts inside a story usually does not hold its header: the story's
    words are then learned without the request that made them likely, and a model learns to follow
    instructions only from the few windows that start before a story. So a window that would start after its
    story's header starts with that header instead (its tokens, then the window's own), and the header's
    predictions there count for nothing (target -1: the step from "Story:" to the middle of a story is not
    text). A window that starts inside a header starts at its story's beginning. Headers longer than half a
    window are not repeated. Generation keeps the header in the same way (GPT.generate_stream's `keep`).

    `word_weight` (train.py's instruct_word_weight) is the loss weight of each story token that starts a word its
    header asked for (" dog" or " Dog" for "dog"), against 1 for every other token: the asked-for words are a few
    tokens in hundreds, so their share of the gradient is small unless it is weighed up (docs/instruct.md
    measures it, and the price: the stories then repeat the words more than TinyStories' own do). Only a header's
    first MAX_WORDS words are weighed (see `asked`).

    Args:
        tokens: the token stream (1-D numpy array or memmap of a split).
        tok: its Tokenizer (tokenizer.py): eot_token, encode, decode.
        word_weight: float > 0.
    Call: windows(tokens, starts, block_size) -> (x, y, w): x and y (len(starts), block_size) int64, y[b, t] the
        token after x[b, :t+1] or -1, and w (len(starts), block_size) float32 loss weights; starts (the windows'
        first positions, each <= len(tokens) - block_size - 1) as get_batch draws them.
    """

    MAX_WORDS = 32          # asked-for words weighed per header: the first ones (TinyStories asks for 3)
    HEAD_TOKENS = 1024      # header tokens read for them: the "Words:" line is the header's first
    CACHED = 1 << 14        # documents whose asked-for ids are kept (under 1 KB each)

    def __init__(self, tokens, tok, word_weight=1.0):
        self.tok, self.word_weight = tok, word_weight
        self.starts, self.ends = document_headers(tokens, tok.eot_token, tok.encode(STORY))
        self._asked = {}  # document -> asked-for ids, the CACHED most recently read

    def asked(self, tokens, d):
        """The token ids that start a word document d's header asks for (" dog" and " Dog" for "dog"): a 1-D int64
        numpy array.

        Read from the header once per document and kept (for the last CACHED documents read), so batches that
        touch a document again do not encode its words again. What one reading costs is bounded whatever the
        header: it reads at most the header's first HEAD_TOKENS tokens (a "Words:" line cut there loses its
        last, possibly partial, word) and weighs at most its first MAX_WORDS words. The weight is for the few
        tokens a story was asked to use; a header asking for more words than that is not such a request, and
        encoding each of 20,000 words made every batch that touched it take seconds."""
        ids = self._asked.get(d)
        if ids is None:
            if len(self._asked) >= self.CACHED:
                del self._asked[next(iter(self._asked))]  # the oldest entry
            ids = self._asked[d] = self._read_asked(tokens, d)
        return ids

    def _read_asked(self, tokens, d):
        """asked(tokens, d), read from the header's tokens (see asked)."""
        first, end = self.starts[d], self.ends[d]
        cut = end - first > self.HEAD_TOKENS
        head = self.tok.decode(np.asarray(tokens[first:min(end, first + self.HEAD_TOKENS)]).tolist())
        line = head.split("\n", 1)
        if not line[0].startswith("Words: "):
            return np.zeros(0, np.int64)
        words = split_list(line[0][len("Words: "):])
        if cut and len(line) == 1:
            words = words[:-1]  # the line goes on past what was read: its last word may be cut
        words = words[:self.MAX_WORDS]
        return np.array([self.tok.encode(" " + form)[0] for w in words for form in (w, w[:1].upper() + w[1:])],
                         dtype=np.int64)

    def __call__(self, tokens, starts, block_size):
        n = len(starts)
        x, y = np.empty((n, block_size), np.int64), np.empty((n, block_size), np.int64)
        w = np.ones((n, block_size), np.float32)
        for b, r in enumerate(starts):
            d = np.searchsorted(self.starts, r, side="right") - 1
            first, head_end = self.starts[d], self.ends[d]
            if r < head_end:
                r = first
            lead = head_end - first if r > first and head_end - first <= block_size // 2 else 0
            row = np.concatenate([tokens[first:first + lead], tokens[r:r + block_size + 1 - lead]]).astype(np.int64)
            x[b], y[b] = row[:-1], row[1:]
            y[b, :lead] = -1
            if self.word_weight == 1:
                continue
            where = np.arange(r + 1, r + block_size + 1 - lead)  # each later target's position in the stream
            docs = np.searchsorted(self.starts, where, side="right") - 1
            for k in np.unique(docs):
                story = (docs == k) & (where >= self.ends[k]) & np.isin(y[b, lead:], self.asked(tokens, k))
                w[b, lead:][story] = self.word_weight
        return x, y, w


def document_headers(tokens, eot_token, story_ids, chunk=1 << 24):
    """Where each document of a token stream starts and where its header ends.

    Args:
        tokens: 1-D numpy array or memmap; documents end with eot_token (the last one may not).
        story_ids: the token ids of STORY, the header's last line.
        chunk: tokens read at a time, so that a large split is never in memory whole.
    Returns:
        (starts, ends): int64 arrays, one entry per document: its first position, and the position after the first
        story_ids inside it (== its start when it has none: no header).
    """
    n, k = len(tokens), len(story_ids)
    eots, hits = [], []
    for lo in range(0, n, chunk):
        part = np.asarray(tokens[lo:min(n, lo + chunk + k - 1)])
        eots.append(np.flatnonzero(part[:chunk] == eot_token) + lo)
        match = np.ones(max(0, len(part) - k + 1), dtype=bool)
        for j, t in enumerate(story_ids):
            match &= part[j:j + len(match)] == t
        hits.append(np.flatnonzero(match) + lo + k)
    eots, hits = np.concatenate(eots), np.concatenate(hits)
    starts = np.concatenate([[0], eots + 1])
    starts = starts[starts < n]  # no document after a final end-of-text
    limits = np.append(eots, n)[:len(starts)]  # each document's end-of-text (or the stream's end)
    j = np.searchsorted(hits, starts + k)  # the first header end that leaves room for story_ids in the document
    found = hits[np.minimum(j, len(hits) - 1)] if len(hits) else starts
    ends = np.where((j < len(hits)) & (found <= limits), found, starts)
    return starts.astype(np.int64), ends.astype(np.int64)


# ------------------------------------------------------------------------------------------------------------------
# Did the story use the words?

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


def words(s):
    """The words of a text: maximal runs of letters, apostrophes allowed inside (don't), lowercased, with the
    typographic apostrophe (U+2019) read as '. Returns a list of str. (eval.py's story metrics count these too.)"""
    return _WORD.findall(s.lower().replace("\u2019", "'"))

def longest_repeat(ws):
    """Length of the longest n-gram that occurs at two or more positions of the word list `ws` (occurrences may
    overlap: "a a a" repeats "a a"); 0 when no word repeats. Returns int."""
    def repeats(n):
        grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
        return len(set(grams)) < len(grams)
    lo, hi = 0, max(0, len(ws) - 1)  # a repeat at n implies one at n - 1: binary search the largest n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if repeats(mid) else (lo, mid - 1)
    return lo


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
    return count_uses(word, text) > 0


def count_uses(word, text):
    """How many times `text` uses `word`, as `uses` counts a use. Returns int."""
    return len(use_offsets(word, text))


def use_offsets(word, text):
    """Where `text` uses `word` (see `uses`): the character offset in `text` of each use's first word, in order.
    Returns a list of int (offsets are scaled to `text` where lowercasing changed its length, e.g. for U+0130)."""
    parts = word.lower().split()
    if not parts:
        return []
    lowered = text.lower().replace("\u2019", "'")
    scale = len(text) / max(1, len(lowered))
    found = [(m.group(), round(m.start() * scale)) for m in _WORD.finditer(lowered)]
    n, last = len(parts), forms(parts[-1])
    return [found[i][1] for i in range(len(found) - n + 1)
            if [w for w, _ in found[i:i + n - 1]] == parts[:-1] and found[i + n - 1][0] in last]


def has_feature(name, text):
    """Whether a CHECKABLE feature shows in the text: True/False, or None for a feature that cannot be checked."""
    test = CHECKABLE.get(name)
    return None if test is None else test(text)


# ------------------------------------------------------------------------------------------------------------------
# The reward rl.py trains on and eval.py --instruct reports: did the story do what was asked, the way TinyStories'
# own stories do? The limits come from the stand-in's 880 training stories scored against their own instructions
# (docs/instruct.md): a required word is used once in 66% of them, twice in 18%, three times or more in 16% (1.8
# uses per used word); the longest repeated phrase is at most 6 words in 90% of them; 95% are 80 words or longer.

NATURAL_USES = 2      # uses of a required word that cost nothing; each of the next OVERUSE_SPAN costs 1/OVERUSE_SPAN
OVERUSE_SPAN = 3      # of the word's worth, so a word said 5 times or more is worth nothing: stuffing earns nothing
NATURAL_REPEAT = 6    # words of the longest repeated phrase that cost nothing; each further word costs 1 / LOOP_SPAN
LOOP_SPAN = 6         # so a phrase of 12 words or more said twice costs a whole point: a loop
MIN_WORDS = 80        # an ending counts after this many words: "Tom was happy. The end." is not a story
WORDS_WEIGHT = 3.0    # the worth of using every required word: the request, so the largest part
ENDING_WEIGHT = 0.5   # the worth of an ending


def reward(required, text, ended):
    """The reward of one story written for its instructions: what rl.py maximises and eval.py --instruct reports.

        reward = WORDS_WEIGHT * (words - overuse) + ENDING_WEIGHT * ending - loop

    Args:
        required: the required words (list of str; may be empty); text: the story, without <|endoftext|>;
        ended: bool, whether the model ended it (produced <|endoftext|> before the token limit).
    Returns:
        dict of floats: reward, and its parts
        - words: the share of the required words the story uses (`uses`), in [0, 1] (0 when none is required);
        - overuse: the mean over required words of min(1, max(0, uses - NATURAL_USES) / OVERUSE_SPAN), in [0, 1];
        - ending: 1.0 when the story ended after at least MIN_WORDS words, else 0.0;
        - loop: min(1, max(0, longest repeated phrase in words - NATURAL_REPEAT) / LOOP_SPAN), in [0, 1].
    A story that uses all its words as TinyStories' own stories do and ends gets WORDS_WEIGHT + ENDING_WEIGHT; a
    word said 3 times is worth 2/3 of one said once or twice, and one said 5 times or more nothing, as if left out.
    The limits are TinyStories' habits (above).
    """
    return reward_events(required, text, ended)[0]


def reward_events(required, text, ended):
    """`reward`, and where in the text each part of it is earned, for rl.py to credit the tokens that earned it.

    Returns:
        (reward's dict, events): events a list of (character offset in text, value) whose values add up to the
        reward: +WORDS_WEIGHT / len(required) at each required word's first use, -WORDS_WEIGHT / (OVERUSE_SPAN *
        len(required)) at each of its uses after the first NATURAL_USES (at most OVERUSE_SPAN of them), and
        the ending's and the loop's at len(text), the end.
    """
    n, events = len(required), []
    offsets = [use_offsets(word, text) for word in required]
    for at in offsets:
        events += [(a, WORDS_WEIGHT / n) for a in at[:1]]
        events += [(a, -WORDS_WEIGHT / (OVERUSE_SPAN * n)) for a in at[NATURAL_USES:NATURAL_USES + OVERUSE_SPAN]]
    counts = [len(at) for at in offsets]
    ws = words(text)
    parts = {"words": sum(c > 0 for c in counts) / n if n else 0.0,
             "overuse": sum(min(1.0, max(0, c - NATURAL_USES) / OVERUSE_SPAN) for c in counts) / n if n else 0.0,
             "ending": float(bool(ended) and len(ws) >= MIN_WORDS),
             "loop": min(1.0, max(0, longest_repeat(ws) - NATURAL_REPEAT) / LOOP_SPAN)}
    events += [(len(text), ENDING_WEIGHT * parts["ending"] - parts["loop"])]
    total = WORDS_WEIGHT * (parts["words"] - parts["overuse"]) + ENDING_WEIGHT * parts["ending"] - parts["loop"]
    return {"reward": total, **parts}, events


REWARD_PARTS = ("reward", "words", "overuse", "ending", "loop")  # reward's keys, in log.csv's and reports' order


def score(words, features, text, ended):
    """How one story followed its instructions.

    Args:
        words: the required words (list of str); features: the features asked for (list of str); text: the story;
        ended: whether the model ended it (see `reward`).
    Returns:
        dict: used (list of bool, one per word: `uses`), count (list of int: `count_uses`), features (dict
        name -> True/False for every CHECKABLE feature: does the text show it), asked (list of the CHECKABLE
        features asked for), reward (`reward`'s dict).
    """
    counts = [count_uses(w, text) for w in words]
    return {"used": [c > 0 for c in counts], "count": counts,
            "features": {name: test(text) for name, test in CHECKABLE.items()},
            "asked": [f for f in features if f in CHECKABLE], "reward": reward(words, text, ended)}


def summarize(scores):
    """The shares over many stories' `score` results.

    Returns:
        dict: words_required (int), words_used (int), word_share (used / required; None when no word was
        required), uses_per_used_word (how many times a story that uses a required word uses it, on average;
        TinyStories' own stories: about 2; None when none was used), and per CHECKABLE feature a dict with asked
        and not_asked (story counts) and present_when_asked, present_when_not_asked (shares of those stories whose
        text shows it; None when there are none), and reward: the mean of each of `reward`'s parts (None when
        there are no stories).
    """
    required = sum(len(s["used"]) for s in scores)
    used = sum(sum(s["used"]) for s in scores)
    counts = [c for s in scores for c in s["count"] if c]
    out = {"words_required": required, "words_used": used, "word_share": used / required if required else None,
           "uses_per_used_word": sum(counts) / len(counts) if counts else None,
           "reward": {k: sum(s["reward"][k] for s in scores) / len(scores) for k in REWARD_PARTS} if scores else None}
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
