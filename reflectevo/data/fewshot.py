"""Worked examples for the trial prompt, written for this project (2-3 per task).

Each example is (question, thought, answer); :func:`examples_block` renders them with the task's action
syntax. The block is the same text for every question of a task, so prompts share a cacheable prefix.
"""
from __future__ import annotations

EXAMPLES: dict[str, list[tuple[str, str, str]]] = {
    "logiqa": [
        ("All members of the chess club study at the science school. Some students of the science school "
         "play the violin.\nWhich of the following must be true?\nA.Some members of the chess club play the "
         "violin.\nB.Some students of the science school are chess club members or violin players.\nC.No "
         "member of the chess club plays the violin.\nD.Every violin player is a member of the chess club.",
         "The premises only tell me that some science-school students play the violin; they say nothing about "
         "which chess members play, so A, C and D can each be false. B only needs one science-school student "
         "who is a chess member or a violinist, and the violinists guarantee that.",
         "B"),
        ("A town put brighter street lights on Main Street last year, and reported burglaries on Main Street "
         "fell by 30%. The mayor concludes that brighter lights keep burglars away.\nWhich of the following, "
         "if true, most weakens the mayor's conclusion?\nA.Towns with brighter lights usually report fewer "
         "burglaries.\nB.Brighter street lights cost more to run.\nC.Last year the police also doubled their "
         "patrols on Main Street.\nD.Some residents of Main Street dislike the new lights.",
         "To weaken the claim I need another cause for the drop. Doubled patrols in the same year and the "
         "same street explain the fall without the lights. A supports the mayor, B and D are irrelevant.",
         "C"),
        ("Peer learning means that learners of similar standing teach and learn from one another, with no "
         "designated expert leading.\nWhich of the following is an example of peer learning?\nA.A professor "
         "lectures first-year students.\nB.A student watches a recorded lesson by a specialist.\nC.A coach "
         "corrects a player's technique during training.\nD.Two classmates quiz each other on vocabulary "
         "before a test.",
         "A, B and C all have an expert teaching a learner. Only in D do two learners of the same level teach "
         "each other without an expert.",
         "D"),
    ],
    "math": [
        ("What is the sum of the solutions of $x^2 - 5x + 6 = 0$?",
         "The quadratic factors as $(x-2)(x-3)=0$, so the solutions are $2$ and $3$ and their sum is $5$.",
         "5"),
        ("A bag holds 3 red and 5 blue marbles. One marble is drawn at random. What is the probability that "
         "it is red? Express your answer as a common fraction.",
         "There are $3+5=8$ marbles and 3 of them are red, so the probability is $\\frac{3}{8}$.",
         "\\frac{3}{8}"),
        ("How many positive divisors does $36$ have?",
         "$36 = 2^2 \\cdot 3^2$, and a divisor picks an exponent 0-2 for each prime, so there are "
         "$(2+1)(2+1) = 9$ divisors.",
         "9"),
    ],
    "mbpp": [
        ("Write a function to return the second largest distinct number in a list.\nYour code should pass "
         "these tests:\nassert second_largest([4, 1, 7, 7, 3]) == 4\nassert second_largest([10, 20]) == 10\n"
         "assert second_largest([5, 9, 9, 2, 8]) == 8",
         "Duplicates must not count twice, so I take the set of values, sort it from largest to smallest and "
         "return the element at index 1.",
         "def second_largest(nums):\n    distinct = sorted(set(nums), reverse=True)\n    return distinct[1]"),
        ("Write a python function to count the vowels in a string.\nYour code should pass these tests:\n"
         "assert count_vowels('hello') == 2\nassert count_vowels('sky') == 0\nassert count_vowels('AEIou') == 5",
         "Upper-case vowels count too, so I lower-case the string and count the characters found in 'aeiou'.",
         "def count_vowels(s):\n    return sum(1 for ch in s.lower() if ch in 'aeiou')"),
    ],
    "bigbench": [
        ("Decide whether the second sentence follows from the first.\n\nSentences: Every bird in the cage is "
         "a parrot. So the cage contains at least one parrot.\nOptions:\nA. entailment\nB. no-entailment",
         "The first sentence is also true of an empty cage, in which case there is no parrot at all. So the "
         "second sentence does not follow.",
         "B"),
        ("Based only on the passage, say whether the claim is True, False or Neither.\n\nPassage: The Danube "
         "flows through ten countries, more than any other river in the world.\nClaim: The Danube flows "
         "through Austria.\nOptions:\nA. True\nB. False\nC. Neither",
         "The passage gives the number of countries but never names them, so it neither supports nor "
         "contradicts the claim about Austria.",
         "C"),
        ("The museum opened in 1952 in a former railway station. Its largest hall holds a steam locomotive "
         "built in 1899.\n\nQuestion: What did the museum building use to be?",
         "The text says the museum opened in a former railway station, so the building used to be a railway "
         "station. The answer is a short phrase from the text.",
         "a railway station"),
    ],
    "bigbench-free": [
        ("The museum opened in 1952 in a former railway station. Its largest hall holds a steam locomotive "
         "built in 1899.\n\nQuestion: What did the museum building use to be?",
         "The text says the museum opened in a former railway station. The answer is a short phrase from the "
         "text.",
         "a railway station"),
        ("Maria ordered the soup, but the waiter brought a salad, so she sent it back and waited twenty more "
         "minutes.\n\nQuestion: What did Maria order?",
         "The first clause says what she ordered; the salad was the waiter's mistake.",
         "the soup"),
    ],
    # names the arithmetic generator never draws (tasks._NAMES): no generated question is a worked example
    "arithmetic": [
        ("Omar has 6 shells. Omar finds 3 more. How many shells does Omar have now?",
         "Omar starts with 6 and finds 3 more: 6 + 3 = 9.",
         "9"),
        ("Pia has 12 cards. Then Pia gives away 5. A friend gives Pia 4 more cards. How many cards does Pia "
         "have now?",
         "Start with 12. Giving away 5 leaves 12 - 5 = 7. Getting 4 more gives 7 + 4 = 11.",
         "11"),
    ],
}


def examples_block(task_name: str, format_action) -> str:
    """The worked examples of a task as one text block (``format_action(answer) -> str`` gives the action)."""
    parts = []
    for question, thought, answer in EXAMPLES[task_name]:
        parts.append(f"Question: {question}\nThought: {thought}\nAction: {format_action(answer)}")
    return "\n\n".join(parts)
