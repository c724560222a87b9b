"""How much an encoder's embeddings change when it is exported and quantized: cosine similarity to the source model's
embeddings and agreement of nearest-neighbour rankings, on a small built-in retrieval set (query, passage) pairs
that includes near misses (same topic, other answer), where a rank flips first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PackagerError
from .gates import tolerance

PAIRS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("What is the capital of Germany?", "Berlin is the capital of Germany and its most populous city."),
    ("How do I reset my router?", "Hold the reset button on the back of the router for ten seconds."),
    ("How do I restart my laptop?", "Open the start menu, choose power, then restart the computer."),
    ("Which planet is closest to the sun?", "Mercury is the smallest planet and the nearest to the Sun."),
    ("Which planet is the largest?", "Jupiter is the biggest planet in the solar system."),
    ("How long should I boil an egg?", "A soft-boiled egg takes about six minutes in boiling water."),
    ("How long should I bake bread?", "Bake the loaf for 35 to 40 minutes until the crust is golden."),
    ("What is the boiling point of water?", "At sea level water boils at 100 degrees Celsius."),
    ("What is the freezing point of water?", "Pure water freezes at 0 degrees Celsius."),
    ("Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa in the early sixteenth century."),
    ("How do I cancel my subscription?", "You can end your plan at any time under Account > Billing > Cancel."),
    ("How do I change my password?", "Go to Settings > Security and choose a new password."),
    ("What time does the store open on Sunday?", "On Sundays we open at 10 am and close at 4 pm."),
    ("Where is the nearest train station?", "The central station is a five-minute walk north of the square."),
    ("Is it going to rain tomorrow?", "Tomorrow's forecast: heavy showers in the afternoon."),
    ("How hot will it be this weekend?", "Temperatures will reach 31 degrees on Saturday and Sunday."),
    ("How many legs does a spider have?", "Spiders are arachnids with eight legs."),
    ("How many legs does an insect have?", "All insects have six legs and three body parts."),
    ("What does a CPU do?", "The processor executes the instructions of programs."),
    ("What does RAM do?", "Memory holds the data and programs a computer is using right now."),
    ("How do I sort a list in Python?", "Call sorted(items) or items.sort() to order a Python list."),
    ("How do I reverse a string in Python?", "Use slicing with a negative step: text[::-1]."),
    ("What is photosynthesis?", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("Why is the sky blue?", "Air molecules scatter blue sunlight more than red light."),
    ("How far is the moon?", "The Moon is about 384,000 kilometres from Earth."),
    ("How old is the universe?", "The universe is roughly 13.8 billion years old."),
    ("Can I bring my dog on the train?", "Small pets travel free; dogs need a lead and a ticket."),
    ("Can I bring a bicycle on the bus?", "Bicycles are not allowed on buses except folding ones."),
    ("What is the refund policy?", "Unused items can be returned within 30 days for a full refund."),
    ("How much does shipping cost?", "Delivery is free on orders over 50 euros, otherwise 4.95."),
    ("My phone battery drains quickly", "Lower the screen brightness and close apps running in the background."),
    ("My screen is cracked", "A cracked display can be replaced at any of our repair centres."),
    ("Translate 'thank you' into Spanish", "In Spanish, thank you is 'gracias'."),
    ("Translate 'good morning' into German", "In German, good morning is 'Guten Morgen'."),
    ("What is the speed of light?", "Light travels at about 299,792 kilometres per second in a vacuum."),
    ("What is the speed of sound?", "Sound moves through air at roughly 343 metres per second."),
    ("Who was the first person on the moon?", "Neil Armstrong stepped onto the Moon in July 1969."),
    ("When did the Second World War end?", "The Second World War ended in 1945."),
)


@dataclass(frozen=True)
class EncoderMetrics:
    cosine_mean: float  # of each sentence's embedding to the reference's
    cosine_min: float
    top1_agreement: float  # share of queries whose nearest neighbour is the reference's
    reference_accuracy: float  # share of queries whose nearest passage is their own (the reference)
    candidate_accuracy: float
    sentences: int
    queries: int

    def as_dict(self) -> dict[str, float | int]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class EncoderVerdict:
    tier: str
    passed: bool
    degradation: float
    message: str


def sentences() -> list[str]:
    """Queries first, then passages."""
    return [q for q, _ in PAIRS] + [p for _, p in PAIRS]


def compare(reference: np.ndarray, candidate: np.ndarray) -> EncoderMetrics:
    """Both [2 x pairs, dims] for sentences(), L2-normalised. Every sentence is a query against all the others (its
    nearest neighbour must stay the same), and each question against the passages (retrieval accuracy)."""
    n = len(PAIRS)
    cosines = np.sum(reference * candidate, axis=1)
    agree = np.mean(_nearest(reference) == _nearest(candidate))
    gold = np.arange(n)
    accuracy = [float(np.mean(np.argmax(e[:n] @ e[n:].T, axis=1) == gold)) for e in (reference, candidate)]
    return EncoderMetrics(float(cosines.mean()), float(cosines.min()), float(agree), accuracy[0], accuracy[1],
                          len(reference), len(reference))


def _nearest(embeddings: np.ndarray) -> np.ndarray:
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argmax(similarity, axis=1)


def judge(tier: str, metrics: EncoderMetrics) -> EncoderVerdict:
    """The tier's limit (packager/gates.py) applies to nearest-neighbour disagreement and to the mean cosine distance;
    the larger decides."""
    limit = tolerance(tier)
    measures = {"nearest-neighbour disagreement": 1 - metrics.top1_agreement,
                "mean cosine distance": 1 - metrics.cosine_mean}
    worst_name, worst = max(measures.items(), key=lambda item: item[1])
    passed = worst < limit
    message = f"{'passes' if passed else 'exceeds'} the {tier} tier (< {limit:.1%}): {worst_name} {worst:.2%}"
    if not passed:
        message += " — build with --quant fp32 or choose a looser --tier"
    return EncoderVerdict(tier, passed, worst, message)


def check_shapes(reference: np.ndarray, candidate: np.ndarray) -> None:
    if reference.shape != candidate.shape:
        raise PackagerError(f"the exported encoder gives embeddings of shape {candidate.shape}, the source "
                            f"{reference.shape}")
