"""Writes the JSONL files of the shipped chitchat tasks from the chitchat-dataset corpus (PyPI chitchat-dataset
0.9.0, read by qatflow.data.read_chitchat), seeded: the same files on every machine.

    PYTHONPATH=nemo_run python nemo_run/qatflow/eval_tasks/make_chitchat_tasks.py

- chitchat_next_turn.jsonl: multiple choice. The last turns of a real conversation, speakers A and B; the choices
  are the turn that really came next and three turns of other conversations (of similar length, so length alone
  does not give the answer away).
- chitchat_quote.jsonl: generation. The same kind of excerpt (other conversations) and the instruction to repeat
  one speaker's last message word for word, after one solved example of another excerpt and with the answer's
  opening quote given; the answer is that message (exact match up to the closing quote, case and punctuation
  ignored).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qatflow.data import read_chitchat

HERE = Path(__file__).resolve().parent
SEED = 18
EXAMPLES = 150
CONTEXT_TURNS = 4
CHOICES = 4
MAX_WORDS = 30  # turns longer than this are left out: CPU runs stay short


def _clean(text: str) -> str:
    return " ".join(text.split())  # a chitchat turn is several chat lines: one line each here


def _conversations() -> list[list[str]]:
    found = []
    for record in read_chitchat():
        turns = [_clean(message["content"]) for message in record["messages"]]
        if len(turns) >= CONTEXT_TURNS + 1 and all(turns):
            found.append(turns)
    return found


def _excerpt(turns: list[str]) -> str:
    """Turns as lines 'A: ...' / 'B: ...', the last turn's speaker being B."""
    speakers = ("A", "B") if len(turns) % 2 == 0 else ("B", "A")
    return "\n".join(f"{speakers[index % 2]}: {turn}" for index, turn in enumerate(turns))


def next_turn(conversations: list[list[str]], rng: random.Random) -> list[dict]:
    pool = [(index, turn) for index, turns in enumerate(conversations) for turn in turns
            if 3 <= len(turn.split()) <= MAX_WORDS]
    rows = []
    for index in rng.sample(range(len(conversations)), len(conversations)):
        turns = conversations[index]
        cuts = [cut for cut in range(CONTEXT_TURNS, len(turns))
                if 3 <= len(turns[cut].split()) <= MAX_WORDS
                and all(len(turn.split()) <= MAX_WORDS for turn in turns[cut - CONTEXT_TURNS:cut])]
        if not cuts:
            continue
        cut = rng.choice(cuts)
        answer = turns[cut]
        words = len(answer.split())
        similar = [turn for other, turn in pool if other != index and abs(len(turn.split()) - words) <= 2
                   and turn != answer]
        choices = rng.sample(similar, CHOICES - 1) + [answer]
        rng.shuffle(choices)
        # The excerpt ends with B's turn; the choices are A's reply.
        context = _excerpt(turns[cut - CONTEXT_TURNS:cut])
        rows.append({"context": f"{context}\nA:", "choices": choices, "label": choices.index(answer),
                     "conversation": index})
        if len(rows) == EXAMPLES:
            break
    return rows


QUESTION = "Question: What was A's last message? Repeat it word for word.\nAnswer: A said \""


def quote(conversations: list[list[str]], rng: random.Random, used: set[int]) -> list[dict]:
    found = []
    for index in rng.sample(range(len(conversations)), len(conversations)):
        if index in used:
            continue
        turns = conversations[index]
        cuts = [cut for cut in range(CONTEXT_TURNS, len(turns) + 1)
                if all(len(turn.split()) <= MAX_WORDS for turn in turns[cut - CONTEXT_TURNS:cut])
                and 3 <= len(turns[cut - 2].split()) <= 12 and '"' not in turns[cut - 2]]
        if not cuts:
            continue
        cut = rng.choice(cuts)
        found.append((index, turns[cut - CONTEXT_TURNS:cut]))  # the last turn is B's, the one before A's
        if len(found) == EXAMPLES:
            break
    rows = []
    for position, (index, excerpt) in enumerate(found):
        # One solved example from the next excerpt shows the format; the prompt then opens the answer's quote, so
        # the reply is the quoted message itself, ending at the closing quote.
        _, shown = found[(position + 1) % len(found)]
        example = f"{_excerpt(shown)}\n\n{QUESTION}{shown[-2]}\""
        rows.append({"prompt": f"{example}\n\n{_excerpt(excerpt)}\n\n{QUESTION}", "answer": excerpt[-2],
                     "conversation": index})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} examples")


def main() -> None:
    conversations = _conversations()
    rng = random.Random(SEED)
    mc = next_turn(conversations, rng)
    write(HERE / "chitchat_next_turn.jsonl", mc)
    # Other conversations than the multiple-choice task's: the two tasks do not share an excerpt.
    write(HERE / "chitchat_quote.jsonl", quote(conversations, rng, {row["conversation"] for row in mc}))


if __name__ == "__main__":
    main()
