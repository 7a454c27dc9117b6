"""GSM8K prompt building and answer extraction. Pure: no models, no Ray.

Prompts:
- ``fewshot``: 8-shot chain-of-thought with the Wei et al. (2022) exemplars in a fixed, recorded order
  (``EXEMPLAR_ORDER``), blocks ``Q: <question>\\nA: <chain> The answer is <n>.`` joined by a blank line, then
  ``Q: <question>\\nA:`` (lm-eval-harness ``gsm8k_cot``). ``build_prompt(..., chat=True)`` wraps that whole
  text as one user turn in the tokenizer's chat template (what the default draft was distilled on).
- ``chat``: zero-shot, the question as one user turn in the chat template with lm-eval's zero-shot CoT cue
  and an instruction to end with "The answer is N." (``chat_prompt``).

Answers, as lm-eval-harness scores ``gsm8k_cot`` (task version 3.0):
- strict: the first ``The answer is (\\-?[0-9\\.\\,]+).`` (case-sensitive; the final ``.`` is any character);
- flexible: the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``;
- gold: the number after ``####`` (commas removed, as upstream grade-school-math);
- a prediction is correct when it equals the gold after removing ``,``, ``$``, anything up to ``#### `` and a
  trailing ``.``, ignoring case (``exact_match``: a string comparison, so "18.0" does not equal "18").
Both are applied to ``answer_text``: the output up to the first stop string (lm-eval's ``until``).
``extract_answer``/``is_correct`` are the project's earlier, more lenient rule (numeric comparison).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "gsm8k"

EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]
EXEMPLAR_ORDER = list(range(8))  # fixed order (the published one); recorded with every result
STOP_STRINGS = ("Q:", "</s>", "<|im_end|>")
"""lm-eval's ``until`` for gsm8k_cot: generation (``--protocol eos``) and scoring stop at the first one."""
CHAT_INSTRUCTION = 'Solve the problem step by step, then end with "The answer is N." where N is the final number.'
STRICT_PATTERN = r"The answer is (\-?[0-9\.\,]+)."
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORE_PATTERNS = (",", r"\$", r"(?s).*#### ", r"\.$")


def few_shot_text(question: str, num_shots: int = 8) -> str:
    blocks = [f"Q: {EXEMPLARS[i][0]}\nA: {EXEMPLARS[i][1]}" for i in EXEMPLAR_ORDER[:num_shots]]
    blocks.append(f"Q: {question}\nA:")
    return "\n\n".join(blocks)


def build_prompt(question: str, chat: bool = False, tokenizer=None, num_shots: int = 8) -> str:
    """The few-shot prompt; ``chat=True`` wraps it as one user turn in the tokenizer's chat template."""
    text = few_shot_text(question, num_shots)
    if not chat:
        return text
    from ..modeling.chat import user_turn

    return user_turn(tokenizer, text)


def chat_prompt(question: str, tokenizer) -> str:
    """Zero-shot chat prompt: the question, lm-eval's zero-shot CoT cue and the answer format, as one user
    turn in the tokenizer's chat template (with the assistant turn opened)."""
    from ..modeling.chat import user_turn

    content = f"Q: {question}\n{CHAT_INSTRUCTION}\nA: Let's think step by step."
    return user_turn(tokenizer, content)


def answer_text(text: str, stops=STOP_STRINGS) -> str:
    """The part of an output that is scored: everything before the first stop string.

    Example:
        >>> answer_text(" 3 + 2 = 5. The answer is 5.\\n\\nQ: Next question")
        ' 3 + 2 = 5. The answer is 5.\\n\\n'
    """
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def extract_strict(text: str) -> str | None:
    """lm-eval strict-match: the number in the first "The answer is N." (raw, not normalised).

    Example:
        >>> extract_strict("The answer is 18. Then 20 more.")
        '18.'
        >>> extract_strict("so the answer is 18.") is None  # case-sensitive
        True
    """
    m = re.search(STRICT_PATTERN, text)
    return m.group(1).strip() if m else None


def extract_flexible(text: str) -> str | None:
    """lm-eval flexible-extract: the last number-like span (raw, not normalised).

    Example:
        >>> extract_flexible("She pays $1,234.50 for 3 items")
        '3'
        >>> extract_flexible("it fell to -5 degrees")
        '-5'
    """
    matches = re.findall(FLEXIBLE_PATTERN, text)
    if not matches:
        return None
    return next(g for g in matches[-1] if g).strip()


def normalize_answer(answer: str) -> str:
    """lm-eval exact_match normalisation (``regexes_to_ignore`` then lower case).

    Example:
        >>> normalize_answer("$1,234.50.")
        '1234.50'
    """
    for pattern in IGNORE_PATTERNS:
        answer = re.sub(pattern, "", answer)
    return answer.strip().lower()


def exact_match(pred: str | None, gold: str | None) -> bool:
    """True when both exist and are equal after ``normalize_answer``."""
    return pred is not None and gold is not None and normalize_answer(pred) == normalize_answer(gold)


def score(text: str, gold: str | None) -> dict:
    """Strict and flexible predictions (normalised) and their correctness for one output text."""
    scored = answer_text(text)
    out = {}
    for name, pred in (("strict", extract_strict(scored)), ("flexible", extract_flexible(scored))):
        out[f"pred_{name}"] = None if pred is None else normalize_answer(pred)
        out[f"correct_{name}"] = exact_match(pred, gold)
    return out


_NUM = r"-?[$0-9.,]*[0-9]"


def _clean(num: str) -> str:
    num = num.replace(",", "").replace("$", "").rstrip(".")
    return num


def extract_answer(text: str) -> str | None:
    """Prediction: first number after 'the answer is', else the last number in the text.

    Example:
        >>> extract_answer("5 + 4 = 9. The answer is 9.")
        '9'
        >>> extract_answer("so 1,200 dollars")
        '1200'
    """
    m = re.search(r"the answer is\s*(" + _NUM + ")", text, flags=re.IGNORECASE)
    if m:
        return _clean(m.group(1))
    nums = re.findall(_NUM, text)
    return _clean(nums[-1]) if nums else None


def gold_answer(answer: str) -> str | None:
    """The number after ``####`` with commas removed; None when there is none.

    Example:
        >>> gold_answer("3 + 4 = <<3+4=7>>7\\n#### 1,007")
        '1007'
    """
    m = re.search(r"#### (\-?[0-9\.\,]+)", answer)
    return m.group(1).strip().replace(",", "") if m else None


def is_correct(pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None:
        return False
    try:
        return abs(float(pred) - float(gold)) < 1e-6
    except ValueError:
        return pred == gold


def load_split(split: str = "test", data_dir: Path | None = None) -> list[dict]:
    """The rows (``question``, ``answer``) of ``<data_dir>/<split>.jsonl``."""
    path = Path(data_dir or DATA_DIR) / f"{split}.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
