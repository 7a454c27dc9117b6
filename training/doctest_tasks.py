"""Original HumanEval-style tasks for the ``code_doctest`` prompt family (``training/families.py``). Pure Python.

Each ``DoctestTask`` is a small programming task written for this project (not taken from HumanEval, which
stays the held-out code evaluation): a typed signature, a 1-3 sentence description, a reference
implementation and example arguments. ``render_doctest`` turns a task into a plain-completion prompt (typing
imports, the signature and a docstring whose example outputs the reference implementation computes, ending
at the closing quotes), in one of three example styles fixed by the task's name.
"""

from __future__ import annotations

import ast
import bisect
import calendar
import collections
import copy
import datetime
import functools
import hashlib
import heapq
import itertools
import math
import re
import statistics
import string
import textwrap
from collections import Counter
from fractions import Fraction
from typing import Callable, NamedTuple

class DoctestTask(NamedTuple):
    """An original HumanEval-style task: the signature's parts, a 1-3 sentence description, a reference
    implementation whose parameters are named as in ``params``, and the example argument tuples."""
    name: str
    params: str
    ret: str
    doc: str
    ref: Callable
    examples: tuple
    uses_math: bool = False  # the prompt also has ``import math``


_VOWELS = "aeiouAEIOU"
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _alternate_case(s):
    out, up = [], True
    for c in s:
        if c.isalpha():
            out.append(c.upper() if up else c.lower())
            up = not up
        else:
            out.append(c)
    return "".join(out)


def _title_words(sentence, small):
    return " ".join(w.capitalize() if i == 0 or w.lower() not in small else w.lower()
                    for i, w in enumerate(sentence.split()))


def _pad_center(text, width, fill):
    pad = max(width - len(text), 0)
    return fill * (pad // 2) + text + fill * (pad - pad // 2)


def _wrap_text(text, width):
    lines, cur = [], ""
    for w in text.split():
        if cur and len(cur) + 1 + len(w) <= width:
            cur += " " + w
        else:
            if cur:
                lines.append(cur)
            cur = w
    return lines + [cur] if cur else lines


def _expand_ranges(spec):
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def _collapse_ranges(nums):
    parts, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{nums[i]}-{nums[j]}")
            i = j + 1
        else:
            parts.append(str(nums[i]))
            i += 1
    return ",".join(parts)


def _snake_to_camel(name):
    parts = [p for p in name.split("_") if p]
    return parts[0].lower() + "".join(p.capitalize() for p in parts[1:]) if parts else ""


def _reverse_vowels(s):
    vs = [c for c in s if c in _VOWELS]
    return "".join(vs.pop() if c in _VOWELS else c for c in s)


def _count_char_types(s):
    letters, digits = sum(c.isalpha() for c in s), sum(c.isdigit() for c in s)
    return letters, digits, len(s) - letters - digits


def _common_suffix(words):
    if not words:
        return ""
    rev, n = [w[::-1] for w in words], 0
    while all(len(r) > n and r[n] == rev[0][n] for r in rev):
        n += 1
    return rev[0][:n][::-1]


def _brackets_match(s):
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for c in s:
        if c in "([{":
            stack.append(c)
        elif c in pairs and (not stack or stack.pop() != pairs[c]):
            return False
    return not stack


def _ordinal(n):
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _longest_increasing_run(nums):
    best = cur = 0
    for i, x in enumerate(nums):
        cur = cur + 1 if i and x > nums[i - 1] else 1
        best = max(best, cur)
    return best


def _merge_intervals(intervals):
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _spiral_order(matrix):
    m, out = [list(r) for r in matrix], []
    while m:
        out += m.pop(0)
        m = [list(r) for r in zip(*m)][::-1]
    return out


def _is_mountain(nums):
    i = 0
    while i + 1 < len(nums) and nums[i] < nums[i + 1]:
        i += 1
    if i == 0 or i == len(nums) - 1:
        return False
    while i + 1 < len(nums) and nums[i] > nums[i + 1]:
        i += 1
    return i == len(nums) - 1


def _top_k_frequent(words, k):
    counts = Counter(words)
    return sorted(counts, key=lambda w: (-counts[w], w))[:k]


def _group_anagrams(words):
    groups = {}
    for w in words:
        groups.setdefault("".join(sorted(w)), []).append(w)
    return list(groups.values())


def _find_duplicates(nums):
    seen, out = set(), []
    for x in nums:
        if x in seen and x not in out:
            out.append(x)
        seen.add(x)
    return out


def _binary_search_index(sorted_nums, target):
    i = bisect.bisect_left(sorted_nums, target)
    return i if i < len(sorted_nums) and sorted_nums[i] == target else -1


def _max_profit(prices):
    best, low = 0, float("inf")
    for p in prices:
        low = min(low, p)
        best = max(best, p - low)
    return best


def _min_coins(amount, coins):
    inf = float("inf")
    best = [0] + [inf] * amount
    for a in range(1, amount + 1):
        best[a] = min((best[a - c] + 1 for c in coins if c <= a), default=inf)
    return best[amount] if best[amount] != inf else -1


def _climb_ways(steps):
    ways = [1, 1, 2]
    for _ in range(3, steps + 1):
        ways.append(ways[-1] + ways[-2] + ways[-3])
    return ways[steps]


def _lcs_length(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _knapsack_value(weights, values, capacity):
    best = [0] * (capacity + 1)
    for w, v in zip(weights, values):
        for c in range(capacity, w - 1, -1):
            best[c] = max(best[c], best[c - w] + v)
    return best[capacity]


def _count_islands(grid):
    seen, count = set(), 0
    for r, row in enumerate(grid):
        for c, ch in enumerate(row):
            if ch != "#" or (r, c) in seen:
                continue
            count += 1
            stack = [(r, c)]
            seen.add((r, c))
            while stack:
                y, x = stack.pop()
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < len(grid) and 0 <= nx < len(grid[ny]) and grid[ny][nx] == "#" \
                            and (ny, nx) not in seen:
                        seen.add((ny, nx))
                        stack.append((ny, nx))
    return count


def _shortest_path_length(grid):
    if not grid or grid[0][0] != "." or grid[-1][-1] != ".":
        return -1
    goal, dist, queue = (len(grid) - 1, len(grid[0]) - 1), {(0, 0): 0}, collections.deque([(0, 0)])
    while queue:
        y, x = queue.popleft()
        if (y, x) == goal:
            return dist[y, x]
        for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
            if 0 <= ny < len(grid) and 0 <= nx < len(grid[0]) and grid[ny][nx] == "." and (ny, nx) not in dist:
                dist[ny, nx] = dist[y, x] + 1
                queue.append((ny, nx))
    return -1


def _has_cycle(n, edges):
    parent = list(range(n))

    def root(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in edges:
        ra, rb = root(a), root(b)
        if ra == rb:
            return True
        parent[ra] = rb
    return False


def _topological_order(n, edges):
    indeg, succ = [0] * n, [[] for _ in range(n)]
    for a, b in edges:
        succ[a].append(b)
        indeg[b] += 1
    ready, out = [i for i in range(n) if indeg[i] == 0], []
    heapq.heapify(ready)
    while ready:
        a = heapq.heappop(ready)
        out.append(a)
        for b in succ[a]:
            indeg[b] -= 1
            if indeg[b] == 0:
                heapq.heappush(ready, b)
    return out if len(out) == n else []


def _reachable(graph, start):
    seen, stack = {start}, [start]
    while stack:
        for nxt in graph.get(stack.pop(), []):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return sorted(seen)


def _digital_root(n):
    while n >= 10:
        n = sum(map(int, str(n)))
    return n


def _is_prime(n):
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _distinct_prime_factors(n):
    out, d = [], 2
    while d * d <= n:
        if n % d == 0:
            out.append(d)
            while n % d == 0:
                n //= d
        d += 1
    return out + [n] if n > 1 else out


def _nth_prime(n):
    k = 1
    while n:
        k += 1
        n -= _is_prime(k)
    return k


def _collatz_steps(n):
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def _reduce_fraction(num, den):
    g = math.gcd(num, den) * (-1 if den < 0 else 1)
    return num // g, den // g


def _add_fractions(a, b):
    f = Fraction(*a) + Fraction(*b)
    return f.numerator, f.denominator


def _change_due(price_cents, paid_cents):
    rest, out = paid_cents - price_cents, {}
    for coin in (25, 10, 5, 1):
        if rest >= coin:
            out[coin], rest = divmod(rest, coin)
    return out


def _minutes_between(t1, t2):
    m1, m2 = (int(t[:2]) * 60 + int(t[3:]) for t in (t1, t2))
    return (m2 - m1) % (24 * 60)


def _clock_angle(hour, minute):
    d = abs(30 * (hour % 12) - 5.5 * minute)
    return min(d, 360 - d)


def _inventory_update(stock, sold):
    left = dict(stock)
    for item in sold:
        left[item] -= 1
    return {k: v for k, v in left.items() if v > 0}


def _team_points(results):
    points = {}
    for home, away, hg, ag in results:
        points[home] = points.get(home, 0) + (3 if hg > ag else 1 if hg == ag else 0)
        points[away] = points.get(away, 0) + (3 if ag > hg else 1 if hg == ag else 0)
    return dict(sorted(points.items()))


def _water_trapped(heights):
    total = 0
    for i, h in enumerate(heights):
        total += max(0, min(max(heights[:i + 1]), max(heights[i:])) - h)
    return total


def _meeting_rooms(meetings):
    events = sorted([(s, 1) for s, _ in meetings] + [(e, -1) for _, e in meetings], key=lambda ev: (ev[0], ev[1]))
    rooms = best = 0
    for _, delta in events:
        rooms += delta
        best = max(best, rooms)
    return best


def _valid_password(password):
    return len(password) >= 8 and any(c.islower() for c in password) and any(c.isupper() for c in password) \
        and any(c.isdigit() for c in password)


def _valid_ipv4(address):
    parts = address.split(".")
    return len(parts) == 4 and all(p.isdigit() and p.isascii() and (p == "0" or not p.startswith("0"))
                                   and int(p) <= 255 for p in parts)


def _normalize_phone(number):
    digits = "".join(c for c in number if c.isdigit())
    return f"{digits[:3]}-{digits[3:6]}-{digits[6:]}" if len(digits) == 10 else None


def _luhn_valid(card):
    digits = [int(c) for c in card if c != " "]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return len(digits) > 1 and total % 10 == 0


def _triangle_type(a, b, c):
    x, y, z = sorted((a, b, c))
    if x <= 0 or x + y <= z:
        return "invalid"
    return "equilateral" if x == z else "isosceles" if x == y or y == z else "scalene"


def _word_index(lines):
    index = {}
    for no, line in enumerate(lines, 1):
        for w in line.lower().split():
            if no not in index.setdefault(w, []):
                index[w].append(no)
    return dict(sorted(index.items()))


def _tally_votes(votes):
    final = Counter(votes)
    top, running = max(final.values()), Counter()
    for v in votes:
        running[v] += 1
        if running[v] == top:
            return v


def _fuel_stops(distance, tank, stations):
    pos, stops, i = tank, 0, 0
    while pos < distance:
        best = None
        while i < len(stations) and stations[i] <= pos:
            best = stations[i]
            i += 1
        if best is None:
            return -1
        pos, stops = best + tank, stops + 1
    return stops


def _sum_nested(data):
    return sum(_sum_nested(x) if isinstance(x, list) else x for x in data)


def _max_depth(nested):
    return 1 + max((_max_depth(x) for x in nested if isinstance(x, list)), default=0)


def _longest_palindrome(s):
    best = ""
    for i in range(len(s)):
        for lo, hi in ((i, i), (i, i + 1)):
            while lo >= 0 and hi < len(s) and s[lo] == s[hi]:
                lo, hi = lo - 1, hi + 1
            if hi - lo - 1 > len(best):
                best = s[lo + 1:hi]
    return best


def _tax_owed(income):
    return round(max(0, min(income, 40000) - 10000) * 0.2 + max(0, income - 40000) * 0.4, 2)


_T = DoctestTask
DOCTEST_TASKS: list[DoctestTask] = [
    # ---- strings
    _T("reverse_words", "sentence: str", "str",
       "Given a sentence whose words are separated by single spaces, return the sentence with the order of the "
       "words reversed. The words themselves are not changed.",
       lambda sentence: " ".join(sentence.split(" ")[::-1]), (("the quick brown fox",), ("hello",), ("a b c",))),
    _T("count_consonants", "text: str", "int",
       "Return the number of consonants in text. Every letter other than a, e, i, o and u counts as a consonant, "
       "in either case; characters that are not letters are ignored.",
       lambda text: sum(c.isalpha() and c not in _VOWELS for c in text), (("Hello, World!",), ("aeiou",), ("Rhythm",))),
    _T("swap_halves", "s: str", "str",
       "You are given a string s. Split it into two halves, where the first half is one character shorter when "
       "the length is odd, and return the second half followed by the first half.",
       lambda s: s[len(s) // 2:] + s[:len(s) // 2], (("abcdef",), ("abcde",), ("x",))),
    _T("alternate_case", "s: str", "str",
       "Return a copy of s in which the letters alternate between upper and lower case, starting with upper case. "
       "Only letters take part in the alternation; all other characters are kept as they are.",
       _alternate_case, (("hello world",), ("a1b2c3",), ("PYTHON",))),
    _T("initials", "full_name: str", "str",
       "Given a person's full name with the parts separated by spaces, return their initials in upper case, "
       "each followed by a period.",
       lambda full_name: "".join(w[0].upper() + "." for w in full_name.split()),
       (("ada lovelace",), ("Grace Brewster Murray Hopper",), ("x",))),
    _T("longest_run", "s: str", "int",
       "Return the length of the longest block of identical consecutive characters in s. An empty string has "
       "no blocks, so the answer for it is 0.",
       lambda s: max((len(list(g)) for _, g in itertools.groupby(s)), default=0), (("aabbbcc",), ("",), ("abc",))),
    _T("compress_spaces", "text: str", "str",
       "Replace every run of spaces in text with a single space and remove the spaces at both ends.",
       lambda text: re.sub(" +", " ", text).strip(" "), (("  too   many    spaces ",), ("fine",))),
    _T("is_isogram", "word: str", "bool",
       "An isogram is a word in which no letter occurs more than once, ignoring case. Return True if word is an "
       "isogram and False otherwise.",
       lambda word: (lambda letters: len(set(letters)) == len(letters))([c for c in word.lower() if c.isalpha()]),
       (("Dermatoglyphics",), ("Letter",), ("six-year-old",), ("",))),
    _T("mask_secret", "secret: str, visible: int", "str",
       "Hide all but the last visible characters of secret by replacing them with '#'. A secret that has at "
       "most visible characters is returned unchanged.",
       lambda secret, visible: "#" * max(len(secret) - visible, 0) + secret[max(len(secret) - visible, 0):],
       (("4556364607935616", 4), ("abc", 5), ("password", 0))),
    _T("char_positions", "text: str, ch: str", "List[int]",
       "Return the indices at which the character ch occurs in text, in increasing order.",
       lambda text, ch: [i for i, c in enumerate(text) if c == ch], (("banana", "a"), ("xyz", "q"))),
    _T("title_words", "sentence: str, small: List[str]", "str",
       "Capitalize the first letter of every word of sentence, except for the words listed in small, which are "
       "written in lower case. The first word is always capitalized.",
       _title_words, (("the lord of the rings", ["of", "the"]), ("a tale OF two cities", ["a", "of"]))),
    _T("dedupe_letters", "s: str", "str",
       "Remove every character of s that already appeared earlier in the string, keeping the first occurrences "
       "in their original order.",
       lambda s: "".join(dict.fromkeys(s)), (("mississippi",), ("abc",), ("aaaa",))),
    _T("vowel_ratio", "word: str", "float",
       "Return the fraction of the characters of word that are vowels (a, e, i, o, u, in either case), rounded "
       "to two decimal places. An empty word has ratio 0.0.",
       lambda word: round(sum(c in _VOWELS for c in word) / len(word), 2) if word else 0.0,
       (("banana",), ("sky",), ("Audio",))),
    _T("pad_center", "text: str, width: int, fill: str", "str",
       "Center text in a field of the given width, padding with the fill character. When the padding cannot be "
       "split evenly, the extra character goes on the right. Text that is already at least width long is "
       "returned unchanged.",
       _pad_center, (("cat", 8, "*"), ("hi", 6, "-"), ("toolong", 3, "."))),
    _T("acronym", "phrase: str", "str",
       "Build an acronym from phrase by taking the first letter of every word, where words are separated by "
       "spaces or hyphens. Return the letters in upper case.",
       lambda phrase: "".join(w[0] for w in re.split(r"[ -]+", phrase) if w).upper(),
       (("portable network graphics",), ("Complementary metal-oxide semiconductor",))),
    _T("sort_letters", "word: str", "str",
       "Return the letters of word sorted alphabetically. Case is ignored when comparing, but every letter "
       "keeps its original case, and equal letters keep their original order.",
       lambda word: "".join(sorted(word, key=str.lower)), (("Banana",), ("Python",))),
    _T("word_lengths", "sentence: str", "Dict[str, int]",
       "Return a dictionary that maps every distinct word of sentence to its length. Words are separated by "
       "whitespace, and the dictionary lists them in the order of their first appearance.",
       lambda sentence: {w: len(w) for w in sentence.split()}, (("to be or not to be",), ("one",))),
    _T("first_unique_char", "s: str", "int",
       "Return the index of the first character of s that occurs exactly once in s, or -1 if every character "
       "is repeated.",
       lambda s: next((i for i, c in enumerate(s) if s.count(c) == 1), -1), (("swiss",), ("aabb",), ("z",))),
    _T("is_rotation", "a: str, b: str", "bool",
       "Return True if b can be obtained from a by a rotation, that is, by moving some characters from the "
       "front of a to its end, and False otherwise.",
       lambda a, b: len(a) == len(b) and b in a + a, (("waterbottle", "erbottlewat"), ("abc", "acb"), ("", ""))),
    _T("camel_to_snake", "name: str", "str",
       "Convert an identifier written in camelCase to snake_case: put an underscore before every upper-case "
       "letter that is not the first character, then lower-case everything.",
       lambda name: re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower(), (("parseHttpResponse",), ("Value",), ("x",))),
    _T("snake_to_camel", "name: str", "str",
       "Convert a snake_case identifier to lowerCamelCase. Empty parts caused by repeated or leading "
       "underscores are ignored.",
       _snake_to_camel, (("max_retry_count",), ("single",), ("__private_value",))),
    _T("wrap_text", "text: str, width: int", "list[str]",
       "Greedily break text into lines of at most width characters, putting as many words on each line as fit. "
       "Words are never split: a word longer than width gets a line of its own.",
       _wrap_text, (("the cat sat on the warm mat", 10), ("extraordinary words", 5))),
    _T("remove_digits", "s: str", "str",
       "Return s with all of its decimal digits removed.",
       lambda s: "".join(c for c in s if not c.isdigit()), (("a1b2c3",), ("2024",), ("no digits",))),
    _T("most_common_letter", "text: str", "str",
       "Return the letter that occurs most often in text, in lower case. Case is ignored and characters that "
       "are not letters are skipped; ties go to the letter that comes first in the alphabet, and a text without "
       "letters gives an empty string.",
       lambda text: min(Counter(c for c in text.lower() if c.isalpha()).items(), key=lambda kv: (-kv[1], kv[0]),
                        default=("",))[0],
       (("Hello World",), ("aAbB",), ("123",))),
    _T("count_with_prefix", "words: list[str], prefix: str", "int",
       "Count how many of the words start with the given prefix. The comparison is case-sensitive.",
       lambda words, prefix: sum(w.startswith(prefix) for w in words),
       ((["apple", "apricot", "banana", "Apple"], "ap"), (["x"], ""))),
    _T("expand_ranges", "spec: str", "list[int]",
       "You are given a string such as '1-3,7' describing integers and ranges of integers separated by commas. "
       "Return the list of all the integers it describes, in the order given.",
       _expand_ranges, (("1-3,7,10-12",), ("5",), ("4-4,2",))),
    _T("collapse_ranges", "nums: List[int]", "str",
       "Given a sorted list of distinct integers, describe it compactly: every run of three or more consecutive "
       "numbers becomes 'start-end', the remaining numbers are listed alone, and all parts are joined by commas.",
       _collapse_ranges, (([1, 2, 3, 5, 7, 8, 9, 10],), ([4, 5],), ([],))),
    _T("caesar_shift", "text: str, k: int", "str",
       "Shift every lower-case letter of text forward by k positions in the alphabet, wrapping around from 'z' "
       "to 'a'. All other characters are left alone.",
       lambda text, k: "".join(chr((ord(c) - 97 + k) % 26 + 97) if "a" <= c <= "z" else c for c in text),
       (("hello world", 3), ("xyz", 2), ("Abc!", 1))),
    _T("missing_letters", "sentence: str", "str",
       "Return, in alphabetical order, the letters of the English alphabet that do not appear anywhere in "
       "sentence, ignoring case.",
       lambda sentence: "".join(c for c in string.ascii_lowercase if c not in sentence.lower()),
       (("The quick brown fox jumps over the dog",), ("abc",))),
    _T("count_char_types", "s: str", "Tuple[int, int, int]",
       "Return a tuple (letters, digits, others) with the number of letters, the number of digits and the "
       "number of all remaining characters of s.",
       _count_char_types, (("R2-D2 & C-3PO",), ("",), ("abc123",))),
    _T("numbered_lines", "lines: List[str]", "List[str]",
       "Prefix every line with its line number, starting from 1, followed by a colon and a space.",
       lambda lines: [f"{i}: {ln}" for i, ln in enumerate(lines, 1)], ((["alpha", "beta"],), ([],))),
    _T("longest_common_suffix", "words: List[str]", "str",
       "Return the longest string that every word in words ends with. An empty list of words has the empty "
       "string as its suffix.",
       _common_suffix, ((["walking", "talking", "stalking"],), (["abc", "xyz"],), ([],))),
    _T("vowel_initial_words", "words: list[str]", "list[str]",
       "Keep only the words that start with a vowel, in either case, and return them in their original order.",
       lambda words: [w for w in words if w[:1] in _VOWELS], ((["apple", "Banana", "Egg", "ice", "tea"],), ([],))),
    _T("brackets_match", "s: str", "bool",
       "Return True if every round, square and curly bracket in s is closed by a bracket of the same kind in the "
       "right order. Characters that are not brackets are ignored.",
       _brackets_match, (("f(a[1], {b: 2})",), ("(]",), ("((x)",))),
    _T("reverse_vowels", "s: str", "str",
       "Reverse the order of the vowels in s while every other character stays where it is.",
       _reverse_vowels, (("hello",), ("programming",), ("rhythm",))),
    _T("string_checksum", "s: str", "int",
       "Return the sum of the character codes of s, as given by ord, modulo 256.",
       lambda s: sum(map(ord, s)) % 256, (("abc",), ("",), ("Hello",))),
    _T("repeat_chars", "s: str, n: int", "str",
       "Return a string in which every character of s is repeated n times in place.",
       lambda s, n: "".join(c * n for c in s), (("abc", 2), ("xy", 0), ("z", 3))),
    _T("common_chars", "a: str, b: str", "str",
       "Return the characters that occur in both a and b, each listed once, in the order in which they first "
       "appear in a.",
       lambda a, b: "".join(dict.fromkeys(c for c in a if c in b)), (("apple", "grape"), ("abc", "xyz"))),
    _T("interleave_strings", "a: str, b: str", "str",
       "Merge a and b by taking characters from them alternately, starting with a. When one string runs out, "
       "the rest of the other one is appended.",
       lambda a, b: "".join(x + y for x, y in zip(a, b)) + a[len(b):] + b[len(a):], (("abc", "12345"), ("hello", ""))),
    _T("is_subsequence", "small: str, big: str", "bool",
       "Return True if all characters of small appear in big in the same order, though not necessarily next to "
       "each other.",
       lambda small, big: (lambda it: all(c in it for c in small))(iter(big)),
       (("ace", "abcde"), ("aec", "abcde"), ("", "xyz"))),
    _T("capitalize_sentences", "text: str", "str",
       "Upper-case the first letter of text and the first letter that follows every '. ', '! ' or '? '.",
       lambda text: re.sub(r"(^|[.!?] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text),
       (("hi there. how are you? fine! ok",), ("already Fine.",))),
    _T("encode_runs", "s: str", "List[Tuple[str, int]]",
       "Describe s as a list of (character, count) pairs, one pair for each run of equal consecutive "
       "characters.",
       lambda s: [(c, len(list(g))) for c, g in itertools.groupby(s)], (("aaabccdddd",), ("",))),
    _T("decode_runs", "pairs: List[Tuple[str, int]]", "str",
       "You are given a list of (character, count) pairs. Build the string in which every character is "
       "repeated count times, in the order of the pairs.",
       lambda pairs: "".join(c * n for c, n in pairs), (([("x", 3), ("y", 1), ("z", 2)],), ([],))),
    _T("hamming_distance", "a: str, b: str", "int",
       "Given two strings of equal length, return the number of positions at which their characters differ.",
       lambda a, b: sum(x != y for x, y in zip(a, b)), (("karolin", "kathrin"), ("abc", "abc"))),
    _T("shortest_word_length", "sentence: str", "int",
       "Return the length of the shortest word in a non-empty sentence whose words are separated by spaces.",
       lambda sentence: min(len(w) for w in sentence.split()), (("the quick brown fox",), ("encyclopedia",))),
    _T("parse_key_values", "text: str", "Dict[str, str]",
       "You are given a string of 'key=value' pairs separated by semicolons. Return a dictionary of the pairs "
       "with surrounding spaces removed from keys and values; when a key occurs twice, the later value wins.",
       lambda text: {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in text.split(";") if p.strip())},
       (("a=1; b = two;a=3",), ("name=Ada",))),
    _T("format_duration", "seconds: int", "str",
       "Format a number of seconds as 'H:MM:SS'. The hours are not padded, while minutes and seconds always "
       "have two digits.",
       lambda seconds: f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}", ((3725,), (59,), (86399,))),
    _T("parse_duration", "text: str", "int",
       "You are given a time span written as 'H:MM:SS'. Return the total number of seconds it lasts.",
       lambda text: (lambda h, m, s: 3600 * h + 60 * m + s)(*map(int, text.split(":"))), (("1:02:05",), ("0:00:07",))),
    _T("ordinal", "n: int", "str",
       "Return the positive integer n followed by its English ordinal suffix, as in 1st, 2nd, 3rd, 4th, 11th, "
       "21st or 112th.",
       _ordinal, ((1,), (12,), (23,), (111,))),
    _T("spell_digits", "n: int", "str",
       "Spell out the decimal digits of the non-negative integer n as English words separated by hyphens.",
       lambda n: "-".join(_DIGIT_WORDS[int(d)] for d in str(n)), ((407,), (0,))),
    _T("count_palindromic_words", "sentence: str", "int",
       "Count the words of sentence that read the same forwards and backwards, ignoring case. Words are "
       "separated by spaces.",
       lambda sentence: sum(w.lower() == w.lower()[::-1] for w in sentence.split()),
       (("Anna saw a racecar at noon",), ("hello world",))),
    _T("is_valid_identifier", "name: str", "bool",
       "Return True if name could be used as a Python variable name: it is non-empty, consists only of ASCII "
       "letters, digits and underscores, and does not start with a digit.",
       lambda name: re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None,
       (("total_2",), ("2fast",), ("_",), ("has space",))),
    _T("remove_prefix_all", "words: List[str], prefix: str", "List[str]",
       "Remove prefix from the start of every word that begins with it; the other words stay unchanged.",
       lambda words, prefix: [w[len(prefix):] if w.startswith(prefix) else w for w in words],
       ((["unhappy", "undo", "usual"], "un"), (["a", "b"], "c"))),
    _T("mirror_string", "s: str", "str",
       "Return s followed by its reverse, without repeating the last character of s, so that the result is a "
       "palindrome.",
       lambda s: s + s[-2::-1], (("abc",), ("x",), ("",))),
    _T("extract_numbers", "text: str", "List[int]",
       "Return all integers written in text, in order. A number is a maximal run of digits, optionally preceded "
       "by a minus sign.",
       lambda text: [int(x) for x in re.findall(r"-?\d+", text)], (("3 apples cost 12 dollars, -4 left",), ("none",))),
    _T("hashtags", "post: str", "list[str]",
       "Return the hashtags of a social media post in the order in which they appear, without the '#' and in "
       "lower case. A hashtag is a '#' followed by one or more letters, digits or underscores.",
       lambda post: [h.lower() for h in re.findall(r"#(\w+)", post)], (("Loving the #Sun and #beach_day!",), ("#",))),
    _T("slugify", "title: str", "str",
       "Turn a title into a URL slug: lower-case it, replace every run of characters that are not letters or "
       "digits by a single hyphen, and strip hyphens from both ends.",
       lambda title: re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-"),
       (("Hello, World!",), ("  10 Tips for Python  ",))),
    _T("count_sentences", "text: str", "int",
       "A sentence ends with one or more of the characters '.', '!' and '?'. Return the number of sentences in "
       "text.",
       lambda text: len(re.findall(r"[.!?]+", text)), (("Hi! How are you? I am fine...",), ("no end",))),
    _T("abbreviate_long_words", "sentence: str, limit: int", "str",
       "Replace every word longer than limit characters by its first letter, the number of letters in between "
       "and its last letter, so that 'localization' becomes 'l10n'. Shorter words stay as they are.",
       lambda sentence, limit: " ".join(w if len(w) <= limit else f"{w[0]}{len(w) - 2}{w[-1]}"
                                        for w in sentence.split()),
       (("internationalization is a long word", 8), ("short words only", 10))),
    _T("can_form_palindrome", "s: str", "bool",
       "Return True if the characters of s can be rearranged into a palindrome, and False otherwise.",
       lambda s: sum(c % 2 for c in Counter(s).values()) <= 1, (("carrace",), ("abc",), ("",))),
    _T("longest_palindromic_substring", "s: str", "str",
       "Return the longest contiguous substring of s that is a palindrome. If there are several of the same "
       "length, return the one that starts first.",
       _longest_palindrome, (("babad",), ("cbbd",), ("a",))),
    _T("count_distinct_substrings", "s: str, k: int", "int",
       "Return the number of different substrings of length k in s.",
       lambda s, k: len({s[i:i + k] for i in range(len(s) - k + 1)}), (("abab", 2), ("aaaa", 1), ("abc", 4))),
    _T("next_letter", "letters: list[str], target: str", "str",
       "letters is a sorted list of lower-case letters. Return the smallest letter in the list that is strictly "
       "greater than target, wrapping around to the first letter when there is none.",
       lambda letters, target: next((c for c in letters if c > target), letters[0]),
       ((["c", "f", "j"], "a"), (["c", "f", "j"], "f"), (["c", "f", "j"], "k"))),
    _T("bold_keyword", "text: str, word: str", "str",
       "Wrap every occurrence of word in text with '**' on both sides.",
       lambda text, word: text.replace(word, f"**{word}**"), (("to be or not to be", "be"), ("nothing here", "x"))),
    _T("vowel_counts_per_word", "sentence: str", "List[int]",
       "For each word of sentence, count its vowels (a, e, i, o, u, in either case) and return the counts in "
       "the order of the words.",
       lambda sentence: [sum(c in _VOWELS for c in w) for w in sentence.split()], (("Education is key",), ("",))),
    _T("count_uppercase_words", "text: str", "int",
       "Count the words of text that are written entirely in capital letters. Words without any letters do "
       "not count.",
       lambda text: sum(w.isupper() for w in text.split()), (("NASA and the ESA launched IT",), ("123 abc",))),
    _T("score_word", "word: str", "int",
       "In a word game, every letter is worth its position in the alphabet (a is 1, b is 2, ..., z is 26), "
       "ignoring case, and all other characters are worth nothing. Return the score of word.",
       lambda word: sum(ord(c) - 96 for c in word.lower() if "a" <= c <= "z"), (("abc",), ("Zoo!",))),
    _T("valid_password", "password: str", "bool",
       "A password is valid when it has at least 8 characters and contains at least one lower-case letter, one "
       "upper-case letter and one digit. Return whether password is valid.",
       _valid_password, (("Secret123",), ("secret123",), ("Ab1",))),
    _T("valid_ipv4", "address: str", "bool",
       "Return True if address is a valid IPv4 address: four decimal numbers from 0 to 255 separated by dots, "
       "written without leading zeros.",
       _valid_ipv4, (("192.168.0.1",), ("256.1.1.1",), ("10.01.0.1",), ("1.2.3",))),
    _T("normalize_phone", "number: str", "Optional[str]",
       "Remove every character of number that is not a digit. If exactly ten digits remain, return them "
       "formatted as 'XXX-XXX-XXXX'; otherwise return None.",
       _normalize_phone, (("(555) 123 4567",), ("12345",))),
    _T("luhn_valid", "card: str", "bool",
       "Check a card number with the Luhn algorithm: from the right, double every second digit, subtract 9 "
       "from any result above 9, and sum all digits; the number is valid if the sum is divisible by 10. Spaces "
       "are ignored and a single digit is never valid.",
       _luhn_valid, (("4539 3195 0343 6467",), ("8273 1232 7352 0569",), ("0",))),
    _T("rle_string", "s: str", "str",
       "Compress s by writing each run of equal characters as the character followed by the length of the run. "
       "Runs of length one are written as the character alone.",
       lambda s: "".join(c + (str(len(run)) if len(run) > 1 else "")
                         for c, run in ((c, list(g)) for c, g in itertools.groupby(s))),
       (("aaabccdddd",), ("abc",))),
    # ---- lists
    _T("running_product", "nums: List[int]", "List[int]",
       "Return a list whose i-th element is the product of nums[0] through nums[i].",
       lambda nums: list(itertools.accumulate(nums, lambda a, b: a * b)), (([1, 2, 3, 4],), ([5, 0, 2],), ([],))),
    _T("pairwise_differences", "nums: list[int]", "list[int]",
       "Return the differences between neighbouring elements of nums: the i-th item of the result is "
       "nums[i + 1] - nums[i].",
       lambda nums: [b - a for a, b in zip(nums, nums[1:])], (([1, 4, 9, 16],), ([7],))),
    _T("chunk_list", "items: List[int], size: int", "List[List[int]]",
       "Split items into consecutive chunks of the given size. The last chunk may be shorter.",
       lambda items, size: [items[i:i + size] for i in range(0, len(items), size)],
       (([1, 2, 3, 4, 5], 2), ([1, 2, 3], 3), ([], 4))),
    _T("kth_largest_distinct", "nums: List[int], k: int", "Optional[int]",
       "Return the k-th largest distinct value in nums, where k = 1 gives the maximum, or None if nums has "
       "fewer than k distinct values.",
       lambda nums, k: (sorted(set(nums), reverse=True) + [None] * k)[k - 1],
       (([4, 1, 4, 3, 2], 2), ([5, 5, 5], 2), ([7, 9], 1))),
    _T("move_zeros_to_end", "nums: list[int]", "list[int]",
       "Return a new list in which all zeros of nums are moved to the end, while the other elements keep their "
       "relative order.",
       lambda nums: [x for x in nums if x != 0] + [0] * nums.count(0), (([0, 1, 0, 3, 12],), ([1, 2],))),
    _T("rotate_right", "items: list[int], k: int", "list[int]",
       "Rotate the list k steps to the right, so that its last k elements come first. k may be larger than "
       "the length of the list.",
       lambda items, k: items[-(k % len(items)):] + items[:-(k % len(items))] if items else [],
       (([1, 2, 3, 4, 5], 2), ([1, 2, 3], 4), ([], 3))),
    _T("count_inversions", "nums: List[int]", "int",
       "Count the pairs of positions i < j for which nums[i] > nums[j].",
       lambda nums: sum(a > b for a, b in itertools.combinations(nums, 2)), (([2, 4, 1, 3, 5],), ([1, 2, 3],))),
    _T("majority_element", "nums: List[int]", "Optional[int]",
       "Return the value that fills more than half of the positions of nums, or None if no value does.",
       lambda nums: next((v for v, c in Counter(nums).items() if 2 * c > len(nums)), None),
       (([3, 1, 3, 3, 2],), ([1, 2, 1, 2],))),
    _T("merge_intervals", "intervals: List[Tuple[int, int]]", "List[Tuple[int, int]]",
       "Given closed intervals as (start, end) pairs, merge all intervals that share at least one point and "
       "return the merged intervals sorted by their start.",
       _merge_intervals, (([(1, 3), (8, 10), (2, 6), (10, 12)],), ([(5, 7)],))),
    _T("find_peaks", "values: list[int]", "list[int]",
       "Return the indices of the elements that are strictly greater than both of their neighbours. The first "
       "and the last element are never peaks.",
       lambda values: [i for i in range(1, len(values) - 1) if values[i - 1] < values[i] > values[i + 1]],
       (([1, 3, 2, 4, 1, 5],), ([1, 2, 3],))),
    _T("longest_increasing_run", "nums: list[int]", "int",
       "Return the length of the longest contiguous stretch of nums in which every element is strictly larger "
       "than the one before it.",
       _longest_increasing_run, (([1, 2, 2, 3, 4, 5, 1],), ([5, 4, 3],), ([],))),
    _T("pair_with_sum", "nums: List[int], target: int", "Optional[Tuple[int, int]]",
       "Return the first pair of indices (i, j) with i < j and nums[i] + nums[j] == target, trying i in "
       "increasing order and, for each i, j in increasing order. Return None if there is no such pair.",
       lambda nums, target: next(((i, j) for i, j in itertools.combinations(range(len(nums)), 2)
                                  if nums[i] + nums[j] == target), None),
       (([2, 7, 11, 15], 9), ([3, 2, 4], 6), ([1, 2], 7))),
    _T("remove_adjacent_duplicates", "items: list[str]", "list[str]",
       "Collapse every run of equal neighbouring elements of items into a single element.",
       lambda items: [k for k, _ in itertools.groupby(items)], ((["a", "a", "b", "a", "a", "a"],), ([],))),
    _T("flatten_once", "nested: List[List[int]]", "List[int]",
       "Flatten a list of lists into a single list, keeping the order of the elements.",
       lambda nested: [x for row in nested for x in row], (([[1, 2], [], [3]],), ([],))),
    _T("transpose", "matrix: List[List[int]]", "List[List[int]]",
       "Given a rectangular matrix as a list of rows, return its transpose.",
       lambda matrix: [list(col) for col in zip(*matrix)], (([[1, 2, 3], [4, 5, 6]],), ([[7]],))),
    _T("diagonal_sum", "matrix: list[list[int]]", "int",
       "Given a square matrix, return the sum of the elements on its main diagonal and on its anti-diagonal. "
       "The centre element of a matrix of odd size is counted only once.",
       lambda matrix: sum(matrix[i][i] + matrix[i][-1 - i] for i in range(len(matrix)))
       - (matrix[len(matrix) // 2][len(matrix) // 2] if len(matrix) % 2 else 0),
       (([[1, 2, 3], [4, 5, 6], [7, 8, 9]],), ([[1, 2], [3, 4]],))),
    _T("spiral_order", "matrix: List[List[int]]", "List[int]",
       "Return the elements of a rectangular matrix in clockwise spiral order, starting from the top-left "
       "corner.",
       _spiral_order, (([[1, 2, 3], [4, 5, 6], [7, 8, 9]],), ([[1, 2], [3, 4], [5, 6]],))),
    _T("rotate_matrix", "matrix: List[List[int]]", "List[List[int]]",
       "Return the matrix rotated by 90 degrees clockwise.",
       lambda matrix: [list(r) for r in zip(*matrix[::-1])], (([[1, 2], [3, 4]],), ([[1, 2, 3]],))),
    _T("row_with_max_sum", "matrix: list[list[int]]", "int",
       "Return the index of the row of matrix with the largest sum. If several rows share it, return the "
       "smallest index.",
       lambda matrix: max(range(len(matrix)), key=lambda i: (sum(matrix[i]), -i)),
       (([[1, 2], [5, 0], [3, 3]],), ([[0], [0]],))),
    _T("count_smaller", "nums: list[int]", "list[int]",
       "For every element of nums, count how many elements of nums are strictly smaller than it, and return "
       "the counts in the original order.",
       lambda nums: [sum(y < x for y in nums) for x in nums], (([8, 1, 2, 2, 3],), ([7, 7],))),
    _T("running_average", "values: List[float]", "List[float]",
       "For every position i, return the average of values[0] through values[i], rounded to two decimals.",
       lambda values: [round(s / (i + 1), 2) for i, s in enumerate(itertools.accumulate(values))],
       (([2.0, 4.0, 9.0],), ([1.0, 2.0, 2.0, 1.0],))),
    _T("sliding_window_sums", "nums: List[int], k: int", "List[int]",
       "Return the sums of all contiguous windows of length k in nums, from left to right.",
       lambda nums, k: [sum(nums[i:i + k]) for i in range(len(nums) - k + 1)], (([1, 3, 2, 6, -1], 3), ([4, 5], 3))),
    _T("partition_by_sign", "nums: list[int]", "tuple[list[int], list[int]]",
       "Split nums into the negative numbers and the non-negative numbers, keeping the original order within "
       "each group, and return the two lists as a tuple.",
       lambda nums: ([x for x in nums if x < 0], [x for x in nums if x >= 0]), (([3, -1, 0, -7, 2],), ([],))),
    _T("index_of_min", "values: List[float]", "int",
       "Return the position of the smallest value in a non-empty list. If the smallest value occurs more than "
       "once, return its last position.",
       lambda values: len(values) - 1 - values[::-1].index(min(values)), (([3.5, 1.0, 2.0, 1.0],), ([4.0],))),
    _T("interleave_lists", "a: List[int], b: List[int]", "List[int]",
       "Merge two lists by taking elements from them alternately, starting with a. The leftover elements of "
       "the longer list are appended at the end.",
       lambda a, b: [x for pair in zip(a, b) for x in pair] + a[len(b):] + b[len(a):],
       (([1, 3, 5], [2, 4]), ([], [9, 8]))),
    _T("zip_to_dict", "keys: List[str], values: List[int]", "Dict[str, int]",
       "Pair up keys and values by position and return them as a dictionary. Keys without a value map to 0, "
       "and values without a key are dropped.",
       lambda keys, values: {k: values[i] if i < len(values) else 0 for i, k in enumerate(keys)},
       ((["a", "b", "c"], [1, 2]), (["x"], [5, 6]))),
    _T("is_arithmetic", "nums: list[int]", "bool",
       "Return True if all differences between consecutive elements of nums are equal. Lists with fewer than "
       "three elements always count as arithmetic.",
       lambda nums: len({b - a for a, b in zip(nums, nums[1:])}) <= 1, (([3, 7, 11, 15],), ([1, 2, 4],), ([5],))),
    _T("is_mountain", "nums: list[int]", "bool",
       "A list is a mountain if it has at least three elements, strictly increases up to some peak and then "
       "strictly decreases until its end. Return whether nums is a mountain.",
       _is_mountain, (([0, 3, 5, 2],), ([1, 2, 3],), ([2, 2, 1],))),
    _T("equilibrium_index", "nums: List[int]", "int",
       "Return the first index i at which the sum of the elements left of i equals the sum of the elements "
       "right of i, or -1 if there is no such index.",
       lambda nums: next((i for i in range(len(nums)) if sum(nums[:i]) == sum(nums[i + 1:])), -1),
       (([1, 7, 3, 6, 5, 6],), ([1, 2, 3],))),
    _T("product_except_self", "nums: List[int]", "List[int]",
       "For every position of nums, return the product of all the other elements.",
       lambda nums: [math.prod(nums[:i] + nums[i + 1:]) for i in range(len(nums))], (([1, 2, 3, 4],), ([0, 5, 2],))),
    _T("top_k_frequent", "words: List[str], k: int", "List[str]",
       "Return the k most frequent words, most frequent first. Words that occur equally often are ordered "
       "alphabetically.",
       _top_k_frequent, ((["b", "a", "c", "a", "b", "d"], 2), (["x"], 3))),
    _T("group_anagrams", "words: List[str]", "List[List[str]]",
       "Group together the words that are anagrams of each other. The groups appear in the order of their "
       "first word, and inside a group the words keep their original order.",
       _group_anagrams, ((["eat", "tea", "tan", "ate", "nat", "bat"],), ([],))),
    _T("nth_from_end", "items: list[str], n: int", "Optional[str]",
       "Return the n-th element of items counting from the end, where n = 1 is the last element, or None if "
       "the list is too short.",
       lambda items, n: items[-n] if 1 <= n <= len(items) else None, ((["a", "b", "c"], 1), (["a", "b", "c"], 3),
                                                                       (["a"], 2))),
    _T("count_pairs_with_difference", "nums: List[int], d: int", "int",
       "Count the pairs of positions i < j for which the absolute difference of nums[i] and nums[j] is d.",
       lambda nums, d: sum(abs(a - b) == d for a, b in itertools.combinations(nums, 2)),
       (([1, 5, 3, 4, 2], 2), ([1, 1, 1], 0))),
    _T("only_in_first", "a: list[int], b: list[int]", "list[int]",
       "Return the elements of a that do not occur anywhere in b, keeping their order and their repetitions.",
       lambda a, b: [x for x in a if x not in b], (([1, 2, 2, 3, 4], [2, 4]), ([5], []))),
    _T("missing_in_range", "nums: List[int], low: int, high: int", "List[int]",
       "Return the integers from low to high, both included, that do not occur in nums, in increasing order.",
       lambda nums, low, high: [x for x in range(low, high + 1) if x not in nums], (([3, 7, 1], 1, 8), ([], 2, 4))),
    _T("find_duplicates", "nums: List[int]", "List[int]",
       "Return the values that occur more than once in nums, each reported once, in the order in which their "
       "second occurrences appear.",
       _find_duplicates, (([4, 3, 2, 7, 8, 2, 3, 1, 3],), ([1, 2],))),
    _T("sum_of_unique", "nums: list[int]", "int",
       "Return the sum of the elements of nums that occur exactly once.",
       lambda nums: sum(x for x, c in Counter(nums).items() if c == 1), (([1, 2, 3, 2],), ([5, 5],))),
    _T("clamp_all", "values: List[int], low: int, high: int", "List[int]",
       "Clamp every value into the range from low to high: smaller values become low and larger values become "
       "high.",
       lambda values, low, high: [min(max(v, low), high) for v in values], (([-5, 0, 5, 10, 15], 0, 10),)),
    _T("replace_with_rank", "nums: list[int]", "list[int]",
       "Replace every element by its rank among the distinct values of nums, where the smallest value has rank "
       "1 and equal values share the same rank.",
       lambda nums: [sorted(set(nums)).index(x) + 1 for x in nums], (([40, 10, 20, 10],), ([],))),
    _T("alternating_sum", "nums: list[int]", "int",
       "Return nums[0] - nums[1] + nums[2] - nums[3] + ..., with signs alternating and the first one positive.",
       lambda nums: sum(x if i % 2 == 0 else -x for i, x in enumerate(nums)), (([5, 3, 8, 1],), ([],))),
    _T("first_repeated", "items: List[str]", "Optional[str]",
       "Return the first element of items that already appeared earlier in the list, or None if all elements "
       "are distinct.",
       lambda items: next((x for i, x in enumerate(items) if x in items[:i]), None),
       ((["a", "b", "c", "b", "a"],), (["x", "y"],))),
    _T("add_lists", "a: list[int], b: list[int]", "list[int]",
       "Add two lists element by element. When one list is longer, its extra elements are copied unchanged.",
       lambda a, b: [x + y for x, y in itertools.zip_longest(a, b, fillvalue=0)], (([1, 2, 3], [10, 20]), ([], [4]))),
    _T("sort_by_length", "words: List[str]", "List[str]",
       "Sort the words by length, shortest first. Words of equal length keep their original order.",
       lambda words: sorted(words, key=len), ((["banana", "fig", "apple", "kiwi"],), ([],))),
    _T("sort_by_last_char", "words: List[str]", "List[str]",
       "Sort non-empty words by their last character; words that end in the same character are ordered "
       "alphabetically.",
       lambda words: sorted(words, key=lambda w: (w[-1], w)), ((["cab", "bed", "aha", "dad"],),)),
    _T("bucket_by_length", "words: List[str]", "Dict[int, List[str]]",
       "Group the words by their length. The keys of the resulting dictionary are the lengths in increasing "
       "order, and each group keeps the original order of its words.",
       lambda words: {n: [w for w in words if len(w) == n] for n in sorted({len(w) for w in words})},
       ((["hi", "sun", "ok", "moon", "sky"],), ([],))),
    _T("binary_search_index", "sorted_nums: List[int], target: int", "int",
       "Given a list of distinct integers sorted in increasing order, find target with binary search and return "
       "its index, or -1 if it is not in the list.",
       _binary_search_index, (([1, 3, 5, 7, 9], 7), ([1, 3, 5], 4), ([], 1))),
    _T("insert_position", "sorted_nums: list[int], value: int", "int",
       "Return the index at which value must be inserted into the sorted list to keep it sorted. If value is "
       "already present, return the index just after its last occurrence.",
       lambda sorted_nums, value: bisect.bisect_right(sorted_nums, value), (([1, 3, 3, 5], 3), ([1, 3, 5], 0))),
    _T("sum_nested", "data: list", "int",
       "Return the sum of all integers in data, a list whose elements are integers or further lists of the same "
       "kind.",
       _sum_nested, (([1, [2, 3], [[4]], []],), ([],))),
    _T("max_depth", "nested: list", "int",
       "Return the nesting depth of a list: a list without sublists has depth 1, and every level of nested "
       "lists adds one.",
       _max_depth, (([1, 2],), ([1, [2, [3]], []],))),
    # ---- dictionaries
    _T("argmax_key", "d: Dict[str, int]", "Optional[str]",
       "Return the key with the largest value in d; on ties, the first such key in the dictionary's order. An "
       "empty dictionary gives None.",
       lambda d: max(d, key=d.get) if d else None, (({"a": 3, "b": 7, "c": 7},), ({},))),
    _T("invert_mapping", "mapping: Dict[str, str]", "Dict[str, List[str]]",
       "Return a dictionary that maps every value of mapping to the sorted list of keys that have this value.",
       lambda mapping: {v: sorted(k for k in mapping if mapping[k] == v) for v in mapping.values()},
       (({"ann": "red", "bob": "blue", "al": "red"},),)),
    _T("merge_counts", "a: Dict[str, int], b: Dict[str, int]", "Dict[str, int]",
       "Add up two count dictionaries: every key of the result maps to the sum of its counts in a and b, where "
       "a missing key counts as 0. The keys of the result are sorted.",
       lambda a, b: {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))},
       (({"x": 1, "y": 2}, {"y": 5, "z": 1}), ({}, {"q": 3}))),
    _T("filter_by_minimum", "d: dict[str, int], threshold: int", "dict[str, int]",
       "Return the entries of d whose value is at least threshold, in their original order.",
       lambda d, threshold: {k: v for k, v in d.items() if v >= threshold},
       (({"a": 5, "b": 1, "c": 9}, 5), ({"a": 1}, 2))),
    _T("flatten_keys", "data: Dict[str, Dict[str, int]]", "Dict[str, int]",
       "Flatten a two-level dictionary by joining each outer key and inner key with a dot.",
       lambda data: {f"{k}.{j}": v for k, inner in data.items() for j, v in inner.items()},
       (({"db": {"port": 5432, "pool": 4}, "web": {"port": 80}},),)),
    _T("word_index", "lines: List[str]", "Dict[str, List[int]]",
       "Build an index that maps every lower-cased word to the line numbers, starting at 1, of the lines it "
       "appears on, each number once. Words are separated by spaces and the keys of the index are sorted.",
       _word_index, ((["The cat", "a cat and a dog", "the end"],),)),
    _T("char_frequency_sorted", "s: str", "List[Tuple[str, int]]",
       "Return (character, count) pairs for the characters of s, the most frequent first; characters that occur "
       "equally often are ordered by character.",
       lambda s: sorted(Counter(s).items(), key=lambda kv: (-kv[1], kv[0])), (("banana",), ("",))),
    _T("degree_counts", "edges: List[Tuple[str, str]]", "Dict[str, int]",
       "Given the edges of an undirected graph as pairs of node names, return how many edges touch each node, "
       "with the nodes sorted by name.",
       lambda edges: dict(sorted(Counter(x for e in edges for x in e).items())),
       (([("a", "b"), ("b", "c"), ("a", "c"), ("c", "d")],), ([],))),
    _T("reachable", "graph: Dict[str, List[str]], start: str", "List[str]",
       "graph maps every node to the list of nodes it has an edge to. Return all nodes that can be reached from "
       "start by following edges, including start itself, in sorted order.",
       _reachable, (({"a": ["b"], "b": ["c"], "c": [], "d": ["a"]}, "a"), ({"x": []}, "x"))),
    # ---- algorithms
    _T("max_profit", "prices: List[int]", "int",
       "You are given the price of a stock on consecutive days. Return the largest profit you can make by "
       "buying on one day and selling on a later day, or 0 if no profit is possible.",
       _max_profit, (([7, 1, 5, 3, 6, 4],), ([7, 6, 4, 3, 1],))),
    _T("min_coins", "amount: int, coins: List[int]", "int",
       "Return the smallest number of coins with the given denominations, each available in unlimited supply, "
       "that add up to amount, or -1 if amount cannot be made.",
       _min_coins, ((11, [1, 2, 5]), (3, [2]), (0, [1]))),
    _T("climb_ways", "steps: int", "int",
       "A child runs up a staircase with the given number of steps, taking one, two or three steps at a time. "
       "Return the number of different ways the child can reach the top.",
       _climb_ways, ((3,), (5,), (1,))),
    _T("grid_paths", "rows: int, cols: int", "int",
       "A robot starts in the top-left cell of a grid with the given numbers of rows and columns and can only "
       "move right or down. Return the number of different paths to the bottom-right cell.",
       lambda rows, cols: math.comb(rows + cols - 2, rows - 1), ((2, 3), (3, 3), (1, 5)), True),
    _T("longest_common_subsequence", "a: str, b: str", "int",
       "Return the length of the longest sequence of characters that appears in both a and b in the same "
       "order, not necessarily contiguously.",
       _lcs_length, (("abcde", "ace"), ("abc", "def"))),
    _T("edit_distance", "a: str, b: str", "int",
       "Return the smallest number of single-character insertions, deletions and substitutions that turn a "
       "into b.",
       _edit_distance, (("kitten", "sitting"), ("", "abc"), ("same", "same"))),
    _T("knapsack_value", "weights: List[int], values: List[int], capacity: int", "int",
       "Each item has a weight and a value, and every item can be taken at most once. Return the largest total "
       "value of items whose total weight does not exceed capacity.",
       _knapsack_value, (([1, 3, 4, 5], [1, 4, 5, 7], 7), ([5], [10], 4))),
    _T("count_islands", "grid: List[str]", "int",
       "The grid is a list of equal-length strings made of '#' for land and '.' for water. Return the number of "
       "islands, where an island is a group of land cells connected horizontally or vertically.",
       _count_islands, ((["##..", "#..#", "..##"],), (["...."],))),
    _T("shortest_path_length", "grid: List[str]", "int",
       "You are given a maze as a list of equal-length strings, where '.' is open and '#' is a wall. Moving one "
       "cell up, down, left or right at a time, return the smallest number of moves from the top-left cell to "
       "the bottom-right cell, or -1 if it cannot be reached.",
       _shortest_path_length, ((["..#", "#..", "#.."],), ([".#", "#."],))),
    _T("has_cycle", "n: int, edges: List[Tuple[int, int]]", "bool",
       "An undirected graph has nodes 0 to n - 1 and the given edges. Return True if the graph contains a "
       "cycle.",
       _has_cycle, ((4, [(0, 1), (1, 2), (2, 0)]), (4, [(0, 1), (1, 2), (2, 3)]))),
    _T("topological_order", "n: int, edges: List[Tuple[int, int]]", "List[int]",
       "Nodes are numbered 0 to n - 1 and every edge (a, b) means that a must come before b. Return an order "
       "of all nodes that respects every edge, always taking the smallest available node next, or an empty "
       "list if the edges contain a cycle.",
       _topological_order, ((4, [(2, 0), (0, 1), (3, 1)]), (2, [(0, 1), (1, 0)]))),
    _T("water_trapped", "heights: List[int]", "int",
       "The list gives the heights of adjacent bars of width 1. Return how many units of rain water are trapped "
       "between the bars after it rains.",
       _water_trapped, (([0, 1, 0, 2, 1, 0, 1, 3, 2, 1, 2, 1],), ([3, 0, 2],), ([],))),
    _T("meeting_rooms", "meetings: list[tuple[int, int]]", "int",
       "Each meeting is a (start, end) pair with start < end, and a meeting that ends at time t frees its room "
       "for a meeting that starts at t. Return the minimum number of rooms needed to hold all the meetings.",
       _meeting_rooms, (([(0, 30), (5, 10), (15, 20)],), ([(1, 2), (2, 3)],))),
    _T("fuel_stops", "distance: int, tank: int, stations: List[int]", "int",
       "A car drives tank kilometres on a full tank and starts with a full tank. stations lists the positions "
       "of the fuel stations along the road in increasing order. Return the least number of stops needed to "
       "drive distance kilometres, or -1 if that is impossible.",
       _fuel_stops, ((100, 40, [30, 50, 70, 90]), (50, 60, []), (100, 30, [20, 70]))),
    # ---- numbers
    _T("digit_product", "n: int", "int",
       "Return the product of the decimal digits of the non-negative integer n.",
       lambda n: math.prod(int(d) for d in str(n)), ((235,), (3042,), (7,))),
    _T("digital_root", "n: int", "int",
       "Repeatedly replace the non-negative integer n by the sum of its digits until a single digit remains, "
       "and return that digit.",
       _digital_root, ((942,), (5,), (99999,))),
    _T("is_harshad", "n: int", "bool",
       "A positive integer is a Harshad number if it is divisible by the sum of its digits. Return True if n is "
       "a Harshad number.",
       lambda n: n % sum(map(int, str(n))) == 0, ((18,), (19,), (1,))),
    _T("count_divisors", "n: int", "int",
       "Return the number of positive divisors of the positive integer n, including 1 and n.",
       lambda n: sum(n % d == 0 for d in range(1, n + 1)), ((12,), (7,), (1,))),
    _T("distinct_prime_factors", "n: int", "List[int]",
       "Return the distinct prime numbers that divide n, for n >= 2, in increasing order.",
       _distinct_prime_factors, ((60,), (13,), (1024,)), True),
    _T("nth_prime", "n: int", "int",
       "Return the n-th prime number, counting 2 as the first one.",
       _nth_prime, ((1,), (6,), (25,))),
    _T("primes_between", "low: int, high: int", "list[int]",
       "Return all prime numbers p with low <= p <= high in increasing order.",
       lambda low, high: [p for p in range(low, high + 1) if _is_prime(p)], ((10, 30), (0, 2), (24, 28)), True),
    _T("collatz_steps", "n: int", "int",
       "Starting from the positive integer n, repeatedly halve n when it is even and replace it by 3 * n + 1 "
       "when it is odd. Return the number of steps needed to reach 1.",
       _collatz_steps, ((6,), (1,), (27,))),
    _T("reverse_integer", "n: int", "int",
       "Reverse the decimal digits of n but keep its sign. Leading zeros of the reversed number disappear.",
       lambda n: (-1 if n < 0 else 1) * int(str(abs(n))[::-1]), ((123,), (-120,), (0,))),
    _T("is_perfect_number", "n: int", "bool",
       "A perfect number equals the sum of its positive divisors other than itself, like 6 = 1 + 2 + 3. Return "
       "True if n is a perfect number.",
       lambda n: n > 1 and sum(d for d in range(1, n) if n % d == 0) == n, ((28,), (12,), (1,))),
    _T("square_pyramid", "n: int", "int",
       "Return 1 * 1 + 2 * 2 + ... + n * n, the number of balls in a square pyramid with n layers.",
       lambda n: sum(i * i for i in range(1, n + 1)), ((3,), (10,), (0,))),
    _T("binomial", "n: int, k: int", "int",
       "Return the number of ways to choose k items out of n distinct items, which is 0 when k > n.",
       lambda n, k: math.comb(n, k), ((5, 2), (10, 0), (3, 4)), True),
    _T("from_base", "digits: str, base: int", "int",
       "Interpret digits as a number written in the given base, between 2 and 16, using 0-9 and the lower-case "
       "letters a-f as digits, and return its value.",
       lambda digits, base: int(digits, base), (("101", 2), ("ff", 16), ("21", 3))),
    _T("gray_code", "n: int", "List[int]",
       "Return the n-bit Gray code sequence that starts at 0: all 2 ** n numbers, where consecutive numbers "
       "differ in exactly one bit.",
       lambda n: [i ^ (i >> 1) for i in range(2 ** n)], ((2,), (3,), (0,))),
    _T("bit_counts", "n: int", "list[int]",
       "Return, for every integer from 0 to n, the number of 1 bits in its binary representation.",
       lambda n: [bin(i).count("1") for i in range(n + 1)], ((5,), (0,))),
    _T("is_power_of_two", "n: int", "bool",
       "Return True if n is a power of two, such as 1, 2, 4 or 8, and False otherwise.",
       lambda n: n > 0 and n & (n - 1) == 0, ((64,), (6,), (0,))),
    _T("next_power_of_two", "n: int", "int",
       "Return the smallest power of two that is greater than or equal to the positive integer n.",
       lambda n: 1 << (n - 1).bit_length(), ((5,), (16,), (1,))),
    _T("lcm_of_list", "nums: List[int]", "int",
       "Return the least common multiple of a list of positive integers; the empty list gives 1.",
       lambda nums: functools.reduce(lambda a, b: a * b // math.gcd(a, b), nums, 1), (([4, 6, 10],), ([7],), ([],)),
       True),
    _T("reduce_fraction", "num: int, den: int", "Tuple[int, int]",
       "Return the fraction num / den in lowest terms as a (numerator, denominator) tuple with a positive "
       "denominator.",
       _reduce_fraction, ((6, 8), (3, -9), (0, 5)), True),
    _T("add_fractions", "a: Tuple[int, int], b: Tuple[int, int]", "Tuple[int, int]",
       "Fractions are given as (numerator, denominator) tuples. Return the sum of a and b in lowest terms.",
       _add_fractions, (((1, 2), (1, 3)), ((3, 4), (1, 4)))),
    _T("hypotenuse", "a: float, b: float", "float",
       "Return the length of the hypotenuse of a right triangle with legs a and b, rounded to three decimals.",
       lambda a, b: round(math.hypot(a, b), 3), ((3.0, 4.0), (1.0, 1.0)), True),
    _T("circle_area", "radius: float", "float",
       "Return the area of a circle with the given radius, rounded to two decimals.",
       lambda radius: round(math.pi * radius ** 2, 2), ((1.0,), (2.5,)), True),
    _T("distance", "p: Tuple[float, float], q: Tuple[float, float]", "float",
       "Return the Euclidean distance between the points p and q in the plane, rounded to two decimals.",
       lambda p, q: round(math.dist(p, q), 2), (((0.0, 0.0), (3.0, 4.0)), ((1.0, 2.0), (2.0, 3.0))), True),
    _T("polygon_perimeter", "points: List[Tuple[int, int]]", "float",
       "The points are the corners of a polygon in order. Return its perimeter, rounded to two decimals.",
       lambda points: round(sum(math.dist(points[i], points[i - 1]) for i in range(len(points))), 2),
       (([(0, 0), (4, 0), (4, 3)],), ([(0, 0), (1, 0), (1, 1), (0, 1)],)), True),
    _T("polygon_area", "points: list[tuple[int, int]]", "float",
       "The points are the corners of a simple polygon, listed in order around it. Return the area of the "
       "polygon.",
       lambda points: abs(sum(points[i - 1][0] * points[i][1] - points[i][0] * points[i - 1][1]
                              for i in range(len(points)))) / 2,
       (([(0, 0), (4, 0), (4, 3)],), ([(0, 0), (2, 0), (2, 2), (0, 2)],))),
    _T("fahrenheit_to_celsius", "degrees_f: float", "float",
       "Convert a temperature from degrees Fahrenheit to degrees Celsius, rounded to one decimal.",
       lambda degrees_f: round((degrees_f - 32) * 5 / 9, 1), ((212.0,), (98.6,), (-40.0,))),
    _T("mean_and_range", "values: List[float]", "Tuple[float, float]",
       "Return the mean of a non-empty list of values and the difference between its largest and smallest "
       "value, both rounded to two decimals.",
       lambda values: (round(sum(values) / len(values), 2), round(max(values) - min(values), 2)),
       (([2.0, 4.5, 1.5],), ([3.0],))),
    _T("population_variance", "values: list[float]", "float",
       "Return the population variance of values, the mean squared distance from their mean, rounded to three "
       "decimals.",
       lambda values: round(statistics.pvariance(values), 3), (([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0],),
                                                               ([1.0, 2.0],))),
    _T("mode_values", "nums: List[int]", "List[int]",
       "Return all values that occur most often in nums, in increasing order.",
       lambda nums: sorted(v for v, c in Counter(nums).items() if c == max(Counter(nums).values())),
       (([1, 2, 2, 3, 3],), ([4],), ([],))),
    _T("weighted_average", "values: List[float], weights: List[float]", "float",
       "Return the average of values weighted by weights, rounded to two decimals.",
       lambda values, weights: round(sum(v * w for v, w in zip(values, weights)) / sum(weights), 2),
       (([80.0, 90.0], [1.0, 3.0]), ([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]))),
    _T("is_automorphic", "n: int", "bool",
       "A number is automorphic when its square ends with the number itself, as 76 does (76 * 76 = 5776). "
       "Return True if the non-negative integer n is automorphic.",
       lambda n: str(n * n).endswith(str(n)), ((25,), (7,), (376,))),
    _T("integer_sqrt", "n: int", "int",
       "Return the largest integer r with r * r <= n, for a non-negative integer n.",
       lambda n: math.isqrt(n), ((17,), (16,), (0,)), True),
    _T("factorial_trailing_zeros", "n: int", "int",
       "Return the number of zeros at the end of the decimal representation of n factorial.",
       lambda n: sum(n // 5 ** i for i in range(1, 30)), ((5,), (25,), (3,))),
    _T("bits_to_flip", "a: int, b: int", "int",
       "Return how many bits must be flipped to turn the non-negative integer a into b.",
       lambda a, b: bin(a ^ b).count("1"), ((10, 20), (7, 7))),
    _T("identity_matrix", "n: int", "List[List[int]]",
       "Return the n by n identity matrix as a list of rows.",
       lambda n: [[int(i == j) for j in range(n)] for i in range(n)], ((3,), (1,))),
    _T("pascal_row", "n: int", "List[int]",
       "Return row n of Pascal's triangle, where row 0 is [1].",
       lambda n: [math.comb(n, k) for k in range(n + 1)], ((4,), (0,)), True),
    _T("triangle_type", "a: int, b: int, c: int", "str",
       "Return 'equilateral', 'isosceles' or 'scalene' for a triangle with side lengths a, b and c, or "
       "'invalid' if no triangle has these sides.",
       _triangle_type, ((3, 3, 3), (3, 4, 3), (3, 4, 5), (1, 2, 3))),
    _T("sum_multiples", "limit: int, factors: List[int]", "int",
       "Return the sum of all positive integers below limit that are divisible by at least one of the factors.",
       lambda limit, factors: sum(n for n in range(1, limit) if any(n % f == 0 for f in factors)),
       ((20, [3, 5]), (10, [7]))),
    # ---- everyday stories
    _T("compound_growth", "principal: float, rate: float, years: int", "float",
       "You put principal dollars in a savings account that pays interest at the given yearly rate, such as "
       "0.05 for five percent, added once a year. Return the balance after the given number of years, rounded "
       "to cents.",
       lambda principal, rate, years: round(principal * (1 + rate) ** years, 2), ((1000.0, 0.05, 2), (500.0, 0.1, 0))),
    _T("split_bill", "total: float, people: int, tip_percent: float", "float",
       "Friends share a restaurant bill equally after adding a tip of tip_percent percent. Return how much "
       "each person pays, rounded to two decimals.",
       lambda total, people, tip_percent: round(total * (1 + tip_percent / 100) / people, 2),
       ((100.0, 4, 20.0), (57.5, 3, 0.0))),
    _T("change_due", "price_cents: int, paid_cents: int", "Dict[int, int]",
       "A cashier returns change with coins of 25, 10, 5 and 1 cents, always using the largest coin that fits. "
       "Return a dictionary from coin value to the number of coins of that value, leaving out unused coins.",
       _change_due, ((135, 200), (99, 100), (50, 50))),
    _T("parking_fee", "minutes: int", "int",
       "A parking garage is free for the first 30 minutes and then charges 2 dollars for every started hour, "
       "with a maximum of 20 dollars a day. Given how many minutes a car stayed, less than a day, return the "
       "fee in dollars.",
       lambda minutes: 0 if minutes <= 30 else min(20, 2 * math.ceil((minutes - 30) / 60)), ((25,), (91,), (1000,)),
       True),
    _T("tax_owed", "income: int", "float",
       "Income up to 10000 is not taxed, the part between 10000 and 40000 is taxed at 20 percent and the part "
       "above 40000 at 40 percent. Return the total tax owed on income, rounded to two decimals.",
       _tax_owed, ((8000,), (25000,), (50000,))),
    _T("count_leap_years", "start: int, end: int", "int",
       "Return how many leap years of the Gregorian calendar lie between the years start and end, both "
       "included.",
       lambda start, end: sum(calendar.isleap(y) for y in range(start, end + 1)), ((1996, 2004), (1899, 1901))),
    _T("day_of_year", "date: str", "int",
       "Given a date written as 'YYYY-MM-DD', return its day number within its year, where January 1st is "
       "day 1.",
       lambda date: datetime.date.fromisoformat(date).timetuple().tm_yday, (("2023-02-01",), ("2024-12-31",))),
    _T("weekday_name", "date: str", "str",
       "Return the English name of the day of the week of a date written as 'YYYY-MM-DD'.",
       lambda date: _WEEKDAYS[datetime.date.fromisoformat(date).weekday()], (("2000-01-01",), ("2024-07-04",))),
    _T("minutes_between", "t1: str, t2: str", "int",
       "Times are written as 'HH:MM' on a 24-hour clock. Return how many minutes pass from t1 until the next "
       "time the clock shows t2, going past midnight if needed.",
       _minutes_between, (("09:15", "10:00"), ("23:30", "00:15"), ("12:00", "12:00"))),
    _T("clock_angle", "hour: int, minute: int", "float",
       "Return the smaller angle, in degrees, between the hour hand and the minute hand of an analog clock "
       "that shows the given time.",
       _clock_angle, ((3, 0), (12, 30), (9, 45))),
    _T("elevator_floors", "requests: List[int], start: int", "int",
       "An elevator starts at floor start and visits the requested floors in the given order. Return the total "
       "number of floors it travels.",
       lambda requests, start: sum(abs(b - a) for a, b in zip([start] + requests, requests)),
       (([5, 2, 8], 0), ([], 3))),
    _T("inventory_update", "stock: Dict[str, int], sold: List[str]", "Dict[str, int]",
       "A shop keeps its stock as a dictionary from item name to quantity, and sold lists the items sold, one "
       "entry per unit. Return the new stock, leaving out items whose quantity dropped to zero.",
       _inventory_update, (({"pen": 3, "ink": 1}, ["pen", "ink"]), ({"cup": 2}, []))),
    _T("rank_runners", "times: Dict[str, float]", "List[str]",
       "The finishing times of the runners of a race, in seconds, are given as a dictionary. Return the names "
       "from fastest to slowest; runners with equal times are ordered by name.",
       lambda times: sorted(times, key=lambda name: (times[name], name)),
       (({"Eve": 12.5, "Bo": 11.9, "Al": 12.5},),)),
    _T("team_points", "results: List[Tuple[str, str, int, int]]", "Dict[str, int]",
       "Each result is (home team, away team, home goals, away goals). A win is worth 3 points, a draw 1 point "
       "and a loss nothing. Return the points of every team, with the teams sorted by name.",
       _team_points, (([("Lions", "Bears", 2, 1), ("Bears", "Owls", 0, 0), ("Owls", "Lions", 3, 1)],),)),
    _T("busiest_hour", "timestamps: List[str]", "int",
       "Each timestamp is written as 'HH:MM'. Return the hour that contains the most timestamps; if several "
       "hours tie, return the earliest of them.",
       lambda timestamps: min(Counter(int(t[:2]) for t in timestamps).items(), key=lambda kv: (-kv[1], kv[0]))[0],
       ((["09:15", "13:05", "09:59", "13:30", "17:00"],), (["23:59"],))),
    _T("tally_votes", "votes: List[str]", "str",
       "Every entry of votes is the name of a candidate. Return the candidate with the most votes; if several "
       "candidates tie, the one who reached that number of votes first wins.",
       _tally_votes, ((["ann", "bob", "bob", "ann", "cy"],), (["zoe"],))),
    _T("queue_wait_times", "service: List[int]", "List[int]",
       "Customers wait in a single queue, and serving the i-th customer takes service[i] minutes. Return how "
       "many minutes each customer waits before being served.",
       lambda service: [0] + list(itertools.accumulate(service))[:-1] if service else [],
       (([3, 1, 4],), ([],))),
    _T("matching_socks", "colors: List[str]", "int",
       "Return the number of complete pairs of socks that can be formed from a pile, where a pair is two socks "
       "of the same color.",
       lambda colors: sum(c // 2 for c in Counter(colors).values()),
       ((["red", "blue", "red", "green", "red", "blue"],), ([],))),
    _T("share_candies", "candies: int, children: int", "Tuple[int, int]",
       "Candies are shared equally among children and the leftovers go to the teacher. Return a tuple with the "
       "number of candies for each child and the number for the teacher.",
       lambda candies, children: divmod(candies, children), ((17, 5), (12, 4))),
]
del _T


def _doctest_style(name: str, variant: int = 0) -> tuple[bool, int]:
    """(docstring starts on the opening-quotes line, example style 0-2) for a task: fixed, from its name.
    Variant 1 flips the first and moves to the next example style."""
    h = int(hashlib.md5(f"doctest-style:{name}".encode()).hexdigest(), 16)
    same_line, style = h % 2 == 0, (0, 0, 1, 2)[h // 2 % 4]
    return (same_line, style) if variant == 0 else (not same_line, (style + 1) % 3)


def _doctest_params(task: DoctestTask) -> list[str]:
    return [a.arg for a in ast.parse(f"def f({task.params}): pass").body[0].args.args]


def doctest_examples(task: DoctestTask) -> list[tuple[tuple, str]]:
    """(arguments, repr of the reference implementation's result) for each example of ``task``."""
    return [(args, repr(task.ref(*copy.deepcopy(args)))) for args in task.examples]


VARIANTS = {0: "", 1: "/alt", 2: "/ex", 3: "/bare"}
"""Renderings of each task and the suffix of their keys in ``code_doctest``."""


def render_doctest(task: DoctestTask, variant: int = 0) -> str:
    """The HumanEval-style prompt: typing/math imports when needed, the typed signature and a docstring with
    the task's examples (outputs computed by its reference implementation), ending with the closing quotes.
    ``variant`` (``VARIANTS``): 0 and 1 differ in docstring layout and example style, 2 puts an "Examples:"
    header above ``>>>`` examples, 3 has no examples (the description alone)."""
    same_line, style = _doctest_style(task.name, min(variant, 1))
    if variant == 2:
        style = 3
    typing_names = sorted(set(re.findall(r"\b(List|Dict|Tuple|Optional)\b", f"{task.params} {task.ret}")))
    imports = ([f"from typing import {', '.join(typing_names)}"] if typing_names else []) + \
        (["import math"] if task.uses_math else [])
    lines = textwrap.wrap(task.doc, 96)
    body = [] if same_line else [""]
    body += lines
    examples = doctest_examples(task) if variant != 3 else []
    if style == 3:
        body += ["", "Examples:"]
        for args, out in examples:
            body += [f">>> {task.name}({', '.join(map(repr, args))})", out]
    elif variant == 3:
        pass
    elif style == 0:
        for args, out in examples:
            body += [f">>> {task.name}({', '.join(map(repr, args))})", out]
    elif style == 1:
        body += ["", "For example:"] + [f"{task.name}({', '.join(map(repr, args))}) == {out}" for args, out in examples]
    else:
        names = _doctest_params(task)
        for i, (args, out) in enumerate(examples, 1):
            body += ["", "Example:" if len(examples) == 1 else f"Example {i}:",
                     "    Input: " + ", ".join(f"{n} = {a!r}" for n, a in zip(names, args)), f"    Output: {out}"]
    doc = "\n".join(("    " + ln) if ln else "" for ln in body)
    doc = '    """ ' + doc.lstrip() if same_line else '    """' + doc
    head = "\n".join(imports) + "\n\n\n" if imports else ""
    return f"{head}def {task.name}({task.params}) -> {task.ret}:\n{doc}\n    \"\"\"\n"
