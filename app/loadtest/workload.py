"""What the load tester sends and when: prompts, random text of a token length, conversations,
and arrival times."""

from __future__ import annotations

import random
from pathlib import Path

# Generic questions for `--num-prompts` without a prompts file.
BUILTIN_PROMPTS = [
    "What is the capital of France, and what is it known for?",
    "Explain how a hash table works and when it performs badly.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Summarise the causes of the First World War in five sentences.",
    "How does public-key cryptography let two strangers agree on a secret?",
    "Describe photosynthesis to a ten-year-old.",
    "What are the trade-offs between SQL and document databases?",
    "Write a haiku about a rainy Monday morning.",
    "Explain the difference between a process and a thread.",
    "Give three tips for writing clear technical documentation.",
    "Why is the sky blue during the day and red at sunset?",
    "Compare the bubble sort and merge sort algorithms.",
    "Plan a three-day trip to Kyoto for someone who loves gardens.",
    "What does a compiler do between reading source code and writing machine code?",
    "Explain what inflation is and how central banks try to control it.",
    "Write a polite email declining a meeting invitation.",
    "How do vaccines train the immune system?",
    "What is the halting problem, and why does it matter?",
    "Describe the water cycle in a few paragraphs.",
    "List the planets of the solar system with one fact about each.",
    "What makes a good unit test?",
    "Explain how a transformer language model predicts the next token.",
    "Translate 'knowledge is power' into French, German and Spanish.",
    "What are the main differences between TCP and UDP?",
    "Give a recipe for a simple vegetable soup.",
    "How does GPS work out where you are?",
    "Write a limerick about a cat who learned to code.",
    "Why do we have leap years?",
    "Explain the CAP theorem with an example.",
    "What should someone consider before adopting a dog?",
    "Describe how a bill becomes law in a parliamentary democracy.",
    "What is the difference between weather and climate?",
]

# Plain words for random text: common, short, mostly one token each in large vocabularies.
_WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information back "
    "parent face others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education foot boy age policy "
    "music market sense nation plan college interest death experience effect class control care "
    "field development role effort rate heart drug show leader light voice wife police mind price "
    "report decision son view relationship town road arm difference value building action model "
    "season society tax director position player record paper space ground form event official "
    "matter center couple site project activity star table need court oil situation cost industry "
    "figure street image phone data picture practice piece land product doctor wall patient worker "
    "news test movie north love support technology step baby computer type attention film tree "
    "source organization hair window evidence population truth song bank goal river garden blue"
)
WORDS = _WORDS.split()


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped. `\\n` in a line stands for a newline."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return prompts


def random_words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(n, 1)))


def words_for_tokens(tokens: int, tokens_per_word: float) -> int:
    return max(1, round(tokens / tokens_per_word))


def poisson_arrivals(rng: random.Random, n: int, qps: float | None) -> list[float]:
    """Offsets in seconds from the start of a block: exponential gaps at `qps` (a Poisson process),
    all zero when `qps` is None (as fast as the concurrency allows)."""
    if qps is None:
        return [0.0] * n
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(qps)
    return out


class Conversation:
    """One user of the multi-round mode: the shared system prompt, then question, answer, question..."""

    def __init__(self, system_prompt: str | None, history: bool) -> None:
        self.system_prompt = system_prompt
        self.history = history
        self.turns: list[dict[str, str]] = []

    def messages(self, question: str, tag: str = "") -> list[dict[str, str]]:
        """What this round sends: the whole conversation so far with `history`, else only the
        system prompt and the new question. `tag` opens the first message (see Run.tag)."""
        messages: list[dict[str, str]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": tag + self.system_prompt})
            tag = ""
        if self.history:
            messages.extend(self.turns)
        if tag and messages:
            first = messages[0]
            messages[0] = {**first, "content": tag + first["content"]}
            tag = ""
        messages.append({"role": "user", "content": tag + question})
        return messages

    def answered(self, question: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
