"""GSM8K prompt building and answer extraction. Pure: no models, no Ray.

Prompt: 8-shot chain-of-thought with the Wei et al. (2022) exemplars in a fixed, recorded order
(``EXEMPLAR_ORDER``), blocks ``Q: <question>\\nA: <chain> The answer is <n>.`` joined by a blank line, then
``Q: <question>\\nA:``. ``chat=True`` wraps that text as one user turn in the tokenizer's chat template.
Answers: prediction = first number after "the answer is" (case-insensitive), else the last number in the
text; gold = the number after ``####`` with commas removed (as upstream grade-school-math).
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


def few_shot_text(question: str, num_shots: int = 8) -> str:
    blocks = [f"Q: {EXEMPLARS[i][0]}\nA: {EXEMPLARS[i][1]}" for i in EXEMPLAR_ORDER[:num_shots]]
    blocks.append(f"Q: {question}\nA:")
    return "\n\n".join(blocks)


def build_prompt(question: str, chat: bool = False, tokenizer=None, num_shots: int = 8) -> str:
    text = few_shot_text(question, num_shots)
    if not chat:
        return text
    if tokenizer is None:
        raise ValueError("chat prompts need the tokenizer's chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


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
    path = Path(data_dir or DATA_DIR) / f"{split}.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
