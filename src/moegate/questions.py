"""The offline question writer: plausible student questions written from a context's own words.

No model, no server, no key. For one context (a few chunks of one cluster) it

1. splits the text into sentences and words,
2. scores candidate key terms (runs of up to three content words between stop words, punctuation and
   common verbs) by how often they occur and how specific they look (long, not in a generic list),
3. fills a varied set of student-question templates with those terms and with the context's own
   declarative sentences ("What is X?", "How does X affect Y?", "Why is it that <clause>?",
   "Which of the following best describes X?", keyword queries like "X vs Y", ...).

The questions carry the context's domain vocabulary in question form, which is what a router trained
on them needs. Output is deterministic for (seed, context id, context text): the random choices come
from a generator seeded with a hash of those, never from Python's salted ``hash``.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass

# recorded in queries/{expert}.parquet `model`; bump when the templates change
MODEL_NAME = "offline-templates-v1"

# Function words, spoken fillers (lecture transcripts are a common KB) and textbook boilerplate.
STOP_WORDS = frozenset("""
a about above across after afterwards again against all almost alone along already also although always am
among amongst an and another any anybody anyhow anyone anything anyway anywhere are aren around as at away
back be became because become becomes becoming been before beforehand behind being below beside besides
between beyond both but by can cannot cant could couldn did didn do does doesn doing don done down due
during each either else elsewhere enough especially etc even ever every everybody everyone everything
everywhere except far few for former formerly from further furthermore had hadn has hasn have haven having
he hence her here hereby herein hers herself him himself his how however i ie if in indeed instead into
is isn it its itself just last latter least less let lets like likely ll may maybe me meanwhile might mine
more moreover most mostly much must my myself namely neither never nevertheless next no nobody none noone
nor not nothing now nowhere of off often on once one only onto or other others otherwise ought our ours
ourselves out over own per perhaps please quite rather re really same shall she should since so some
somebody somehow someone something sometime sometimes somewhat somewhere still such than that the their
theirs them themselves then thence there thereafter thereby therefore therein thereof these they this
those though through throughout thru thus to together too toward towards under unless unlike until up
upon us use used uses using usually ve very via was wasn we well were weren what whatever when whence
whenever where whereas whereby wherein whether which while whither who whoever whole whom whose why will
with within without won would wouldn yet you your yours yourself yourselves
um uh uhm hmm okay ok yeah yes oh gonna wanna gotta kinda sorta alright right actually basically
literally stuff things thing lot lots guys guy bit today tomorrow yesterday minute minutes second
seconds week weeks class lecture slide slides video folks everybody anyways
zero two three four five six seven eight nine ten hundred thousand million billion first second third
also figure figures table tables chapter chapters section sections page pages link links example examples
exercise exercises unit units module modules appendix summary introduction review key terms
""".split())

# Nouns and adjectives too generic to name a topic on their own; they may still sit inside a phrase.
GENERIC_WORDS = frozenset("""
way ways time times part parts kind kinds type types number numbers case cases form forms point points
fact facts idea ideas thing result results group groups order level levels area areas end side sides
amount amounts term terms word words name names place places people person world year years day days
month months century centuries view views step steps question questions reference references title titles
important different various certain particular specific general common similar main major large small
high low new old good great better best able possible actual real entire single additional overall
typical basic simple many much several whole true false own next previous following given known called
based related able little big long short early late whole sure easy hard difference differences
fine free final sort sorts lower higher greater larger smaller bigger fewer easier harder relative
""".split())

# Verb lemmas that rarely name a concept; their inflections split candidate terms. Verbs that are
# also course terms ("work", "change", "run", "cause", "set") are left out on purpose.
_VERB_LEMMAS = """
be have do say get make go know take see come think look want give find tell ask seem feel try leave
call keep let begin show hear bring happen write provide sit stand lose pay meet include continue learn
lead understand watch follow stop create speak read allow add spend grow open walk win remember consider
appear buy wait serve die send expect build stay reach kill remain suggest raise sell require decide pull
describe explain discuss define identify contain involve produce represent refer depend determine help
occur enable ensure apply tend become mean need put turn start talk
""".split()


def _inflections(lemma: str) -> set[str]:
    forms = {lemma, lemma + "s", lemma + "es", lemma + "ed", lemma + "d", lemma + "ing"}
    if lemma.endswith("e"):
        forms |= {lemma[:-1] + "ing", lemma[:-1] + "ed"}
    if lemma.endswith("y"):
        forms |= {lemma[:-1] + "ies", lemma[:-1] + "ied"}
    return forms


_IRREGULAR = """
is are was were been am has had did done said got gotten made went gone knew known took taken saw seen
came thought looked gave given found told felt tried left kept began begun shown heard held brought wrote
written sat stood lost paid met led understood spent grew grown won bought built fell fallen cut sold
""".split()
COMMON_VERBS = frozenset(_IRREGULAR).union(*(_inflections(v) for v in _VERB_LEMMAS))

# Adverb suffixes that (almost) never end a noun: "typically", "rapidly", "efficiently", ...
_ADVERB = re.compile(r"(?:ally|ively|ously|ently|antly|ingly|edly|ately|ably|ibly|fully|lessly|arly|ely)$")
_LY_NOUNS = frozenset("""
family supply assembly monopoly oligopoly duopoly anomaly italy butterfly reply ally july jelly belly homily
lily rally tally firefly polygyny polyandry
""".split())
# Lecture chatter rather than course content: a clause with these words is not turned into a question.
_CHATTER = frozenset("""
i i'm i'll i've i'd me my we we're we'll we've let's you you're you'll you've your okay ok gonna um uh yeah
""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:['’-][A-Za-z0-9]+)*")
# A clause boundary inside a sentence: punctuation that ends a noun phrase.
_BREAK = re.compile(r"[,;:()\[\]{}\"“”!?]|\s[-–—]\s|\.(?:\s|$)")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")
_AUX = ("is", "are", "was", "were", "can", "will", "may", "must", "should", "would", "could")
# Template junk: a question must not end on a function word ("What is the?").
_DANGLING = re.compile(r"\b(?:the|a|an|of|and|or|to|in|on|for|with|by|that|is|are)\W*$", re.IGNORECASE)


@dataclass(frozen=True)
class Term:
    """A candidate key term of one context."""

    text: str  # surface form used in questions (lowercase unless a name or acronym)
    key: str  # lowercase, singular-ish: what duplicates are judged by
    words: int
    count: int
    score: float


def _singular(word: str) -> str:
    w = word.lower()
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def is_plural(phrase: str) -> bool:
    """Whether a noun phrase reads as plural (its last word), for is/are agreement."""
    last = phrase.split()[-1].lower()
    return len(last) > 3 and last.endswith("s") and not last.endswith(("ss", "us", "is", "ics", "sis"))


def _is_content(word: str) -> bool:
    low = word.lower()
    if "'" in low:  # contractions: "we're", "don't"
        return False
    if low.endswith("ly") and low not in _LY_NOUNS:  # adverbs and -ly adjectives: "honestly", "early"
        return False
    if low in STOP_WORDS or low in COMMON_VERBS or len(low) < 3 and not word.isupper():
        return False
    if _ADVERB.search(low) and len(low) > 6:
        return False
    if any(ch.isdigit() for ch in word) and not word[0].isupper():  # "3x", "1960s" but keep "CO2", "H2O"
        return False
    return True


def split_sentences(text: str) -> list[str]:
    """Sentences of a context, whitespace collapsed."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s.strip() for s in _SENTENCE.split(text) if s.strip()]


def key_terms(text: str, limit: int = 16) -> list[Term]:
    """The context's most salient terms, best first (at most ``limit``).

    A term is a run of up to three content words inside one clause; its score is its count in the
    context times the mean specificity of its words (long, non-generic words score higher).
    """
    counts: Counter[str] = Counter()
    surfaces: dict[str, Counter[str]] = {}
    word_tf: Counter[str] = Counter(w.lower() for w in _WORD.findall(text))
    for sentence in split_sentences(text):
        first = True  # a capital on a sentence's first word says nothing about a name
        for clause in _BREAK.split(sentence):
            run: list[tuple[str, bool]] = []  # (word, is the sentence's first word)
            for m in _WORD.finditer(clause):
                word = m.group(0).replace("’", "'")
                word = word.removesuffix("'s")
                if _is_content(word):
                    run.append((word, first))
                else:
                    _add_runs(run, counts, surfaces)
                    run = []
                first = False
            _add_runs(run, counts, surfaces)
    terms = []
    for key, count in counts.items():
        words = key.split()
        if len(words) > 1 and count < 2:
            continue  # a multi-word run seen once is more often an accident than a term
        if len(words) == 1 and not _noun_like(words[0]):
            continue
        if all(w in GENERIC_WORDS for w in words):
            continue
        spec = sum(_specificity(w, word_tf[w]) for w in words) / len(words)
        score = spec * (count ** 0.7) * (1.0 + 0.5 * (len(words) - 1))
        terms.append(Term(_surface(key, surfaces.get(key)), _norm_key(key), len(words), count, score))
    terms.sort(key=lambda t: (-t.score, t.key))
    chosen: list[Term] = []
    seen: set[str] = set()
    for t in terms:
        if t.key in seen:
            continue
        seen.add(t.key)
        chosen.append(t)
        if len(chosen) >= limit:
            break
    return chosen


def _noun_like(word: str) -> bool:
    """A single word that can stand alone as a term: not a participle or an obvious adjective."""
    if word in GENERIC_WORDS:
        return False
    if len(word) > 5 and word.endswith("ed") and not word.endswith("eed"):
        return False  # "removed", "based": participles
    if word.endswith(("ous", "ful", "less", "ical", "ible", "able", "ize", "ify")) and len(word) > 6:
        return False  # adjectives ("continuous") and verbs ("emphasize", "classify")
    return True


def _norm_key(key: str) -> str:
    return " ".join(_singular(w) for w in key.split())


def _specificity(word: str, tf: int) -> float:
    if word in GENERIC_WORDS:
        return 0.3
    return 1.0 + min(len(word), 12) / 6.0 + 0.1 * min(tf, 5)


def _add_runs(run: list[tuple[str, bool]], counts: Counter, surfaces: dict) -> None:
    """Count every 1-3 word n-gram of a run of content words, and how it is spelled mid-sentence."""
    n = len(run)
    for size in (1, 2, 3):
        for i in range(n - size + 1):
            gram = run[i : i + size]
            key = " ".join(w.lower() for w, _ in gram)
            counts[key] += 1
            if not gram[0][1]:
                surfaces.setdefault(key, Counter())[" ".join(w for w, _ in gram)] += 1


def _surface(key: str, forms: Counter | None) -> str:
    """How to spell a term: lowercase when it appears so, else its usual mid-sentence spelling."""
    if not forms or key in forms:
        return key
    return forms.most_common(1)[0][0]


@dataclass(frozen=True)
class Clause:
    """A declarative sentence usable inside a question, split at its auxiliary verb when it has one."""

    text: str  # the sentence as a clause: no final period, first letter lowercased unless a name
    subject: str | None  # words before the auxiliary ("carbohydrates")
    aux: str | None  # "is", "are", "can", ...
    predicate: str | None  # words after it ("an essential part of our diet")


_DEPENDENT_START = frozenset("""
this these that those it its they their he she his her we our you your i here there so and but or then
also for as if because however thus therefore such another other both each which what who
kind sort like just well now yeah anyway again right alright actually basically
""".split())
_RELATIVE = frozenset({"that", "which", "who", "whom", "whose", "where", "when", "if", "because", "while"})
_URL = re.compile(r"\S+://\S+|www\.\S+|\S+\.(?:org|com|edu|net|gov|io)(?:/\S*)?\b")
_LEANING = re.compile(
    r"(?:in|at|for|on|from|by) (?:this|that|these|those|the same|our|my|your)\b"
    r"|for example\b|in other words\b",
    re.IGNORECASE,
)
# A capitalised function word inside a sentence: a heading ran into the text ("... Pyruvate In order").
_MERGED_HEADING = re.compile(r"[a-z,] (?:The|In|A|An|If|When|This|These|For|To|As|It|We|Of|On|By) ")


def clauses(text: str, max_words: int = 28) -> list[Clause]:
    """Declarative sentences of moderate length that read cleanly inside a question template."""
    # words written with a capital inside a sentence are names ("Darwin", "Calvin"): they keep it
    names = {m.group(1) for m in re.finditer(r"[a-z,;] ([A-Z][a-z]+)", text)}
    out = []
    for s in split_sentences(text):
        s = re.split(r";|\s[-–—]\s", s)[0].strip().rstrip(".").strip()
        words = s.split()
        if not 6 <= len(words) <= max_words or s.endswith("?") or ":" in s:
            continue
        alpha = sum(1 for w in words if re.fullmatch(r"[A-Za-z][A-Za-z'’,-]*", w))
        markup = re.search(r"[=<>{}\[\]|\\/_*#@$%^~`]", s)
        if alpha < 0.85 * len(words) or markup or _MERGED_HEADING.search(s):
            continue  # formulas, code, markup leftovers and run-in headings read badly in a question
        first = re.sub(r"\W+$", "", words[0].lower())
        if first in _DEPENDENT_START or "'" in first or "’" in first or _LEANING.match(s):
            continue  # leans on the previous sentence ("It's", "That's", "In this case")
        if any(re.sub(r"[^\w']", "", w.lower().replace("’", "'")) in _CHATTER for w in words):
            continue
        # keep the capital of a name ("Darwin"), drop the one that only starts the sentence
        bare = re.sub(r"\W+$", "", words[0])
        lead = words[0] if bare in names or (bare.isupper() and len(bare) > 1) else words[0].lower()
        clause = " ".join([lead] + words[1:])
        subject = aux = predicate = None
        low = [w.lower() for w in words]
        for i, w in enumerate(low[1:6], start=1):  # a short subject, then the auxiliary
            if w in _AUX:
                subj_words = [lead] + words[1:i]
                if (any(x.endswith(",") or x.lower() in _RELATIVE for x in subj_words)
                        or len(words) - i - 1 < 3 or low[i + 1] in _RELATIVE | {"not", "also", "just", "so"}):
                    break  # not a plain noun-phrase subject: only the whole-clause templates fit
                subject, aux, predicate = " ".join(subj_words), w, " ".join(words[i + 1 :])
                break
        out.append(Clause(clause, subject, aux, predicate))
    return out


# -- templates ------------------------------------------------------------------------------------
# Each family takes the chosen terms / clause and returns a question or None when it does not fit.

def _one_term(x: Term, topic: Term | None, rng: random.Random) -> str | None:
    t = x.text
    be = "are" if is_plural(t) else "is"
    options = [
        f"What {be} {t}?",
        f"What does {t} mean?",
        f"What is meant by {t}?",
        f"Can you explain {t}?",
        f"Can you explain {t} in simple terms?",
        f"Why {be} {t} important?",
        f"What is an example of {t}?",
        f"Which of the following best describes {t}?",
        f"Which of the following statements about {t} is correct?",
        f"How would you define {t}?",
        f"I don't understand {t}, can you help?",
        f"What are the main features of {t}?",
        f"Explain {t} with an example.",
        f"What is the purpose of {t}?",
    ]
    if topic is not None and topic.key != x.key:
        s = topic.text
        options += [
            f"In {s}, what {be} {t}?",
            f"What role does {t} play in {s}?",
            f"Why does {t} matter when studying {s}?",
        ]
    return rng.choice(options)


def _two_terms(x: Term, y: Term, rng: random.Random) -> str | None:
    a, b = x.text, y.text
    options = [
        f"How does {a} affect {b}?",
        f"What is the relationship between {a} and {b}?",
        f"Can you explain the difference between {a} and {b}?",
        f"How are {a} and {b} related?",
        f"How is {a} used in {b}?",
        f"What role does {a} play in {b}?",
        f"Compare {a} and {b}.",
        f"Why is {a} important for understanding {b}?",
        f"Which of the following best explains how {a} relates to {b}?",
        f"What happens to {b} when {a} changes?",
    ]
    return rng.choice(options)


def _clause_question(c: Clause, topic: Term | None, rng: random.Random) -> str | None:
    options = [
        f"Why is it that {c.text}?",
        f"How would you explain why {c.text}?",
        f"Is it true that {c.text}?",
        f"Which of the following explains why {c.text}?",
        f"What does it mean that {c.text}?",
    ]
    if topic is not None:
        options.append(f"In {topic.text}, what does it mean that {c.text}?")
    if c.aux is not None:
        options += [
            f"Why {c.aux} {c.subject} {c.predicate}?",
            f"What {c.aux} {c.predicate}?",
        ]
    return rng.choice(options)


def _keyword_query(x: Term, y: Term | None, rng: random.Random) -> str | None:
    options = [f"{x.text} definition", f"{x.text} example", f"{x.text} explained", f"what is {x.text}"]
    if y is not None:
        options += [f"{x.text} vs {y.text}", f"{x.text} and {y.text}", f"{y.text} {x.text}"]
    return rng.choice(options)


_FAMILIES = ("one", "one", "one", "two", "two", "clause", "clause", "clause", "keyword")


def _clean(question: str) -> str | None:
    """Whitespace tidied; None for template junk (too short, too long, ending on a function word)."""
    q = re.sub(r"\s+", " ", question).strip()
    q = re.sub(r"\s+([?.,])", r"\1", q)
    body = q.rstrip("?.").strip()
    if len(body.split()) < 2 or len(q.split()) > 60 or _DANGLING.search(body):
        return None
    return q


class OfflineQuestionWriter:
    """Writes ``n`` questions for a context; deterministic for (seed, context id, text)."""

    name = "offline"
    model = MODEL_NAME

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _rng(self, context_id: str, text: str) -> random.Random:
        digest = hashlib.sha256(f"{self.seed}\0{context_id}\0{text}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def questions(self, context_id: str, text: str, n: int) -> list[str]:
        """Up to ``n`` distinct questions (fewer only when the context is too short to carry them)."""
        rng = self._rng(context_id, text)
        text = _URL.sub(" ", text)  # links are not what a student asks about
        terms = key_terms(text)
        sentences = clauses(text)
        rng.shuffle(sentences)
        if not terms and not sentences:
            return []
        topic = terms[0] if terms else None  # the context's most salient term stands for its topic
        out: list[str] = []
        seen: set[str] = set()
        used: Counter[str] = Counter()  # spreads the questions over the context's terms
        next_sentence = 0
        for _ in range(12 * n):  # bounded: a short context may not carry n distinct questions
            if len(out) >= n:
                break
            family = rng.choice(_FAMILIES)
            if family == "clause" and sentences:
                q = _clause_question(sentences[next_sentence % len(sentences)],
                                     topic if rng.random() < 0.3 else None, rng)
                next_sentence += 1
            elif terms:
                x = self._pick(terms, used, rng)
                others = [t for t in terms if t.key != x.key]
                if family == "two" and others:
                    q = _two_terms(x, self._pick(others, used, rng), rng)
                elif family == "keyword":
                    q = _keyword_query(x, rng.choice(others) if others and rng.random() < 0.5 else None, rng)
                else:
                    q = _one_term(x, topic if rng.random() < 0.3 else None, rng)
            else:
                continue
            q = _clean(q) if q else None
            if q is None or q.lower() in seen:
                continue
            seen.add(q.lower())
            out.append(q)
        return out

    @staticmethod
    def _pick(terms: list[Term], used: Counter, rng: random.Random) -> Term:
        """A term drawn by score, damped for terms this context's questions already used."""
        weights = [t.score / (1.0 + 2.0 * used[t.key]) for t in terms]
        term = rng.choices(terms, weights=weights, k=1)[0]
        used[term.key] += 1
        return term
