"""Write the demo's sentiment data: ``python data/make_demo_data.py`` -> data/demo/{train,eval}.jsonl.

Short reviews built from templates with a fixed seed; label 1 is positive, 0 negative. The eval split is held out
by construction: its subjects and two of its sentence templates never occur in training, and a tenth of the rows
in both splits use negation ("was not awful" is positive), so word spotting alone does not reach full accuracy.
No download; the same files on every machine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "fantastic", "lovely", "brilliant",
            "charming", "pleasant", "outstanding", "enjoyable", "impressive", "amazing", "terrific", "solid"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "disappointing", "boring", "poor", "mediocre",
            "unpleasant", "annoying", "lousy", "bland", "dull", "frustrating", "painful", "miserable"]
TRAIN_SUBJECTS = ["movie", "book", "restaurant", "hotel", "concert", "album", "phone", "laptop", "museum",
                  "pizza", "coffee", "service", "course", "podcast", "play", "camera"]
EVAL_SUBJECTS = ["film", "novel", "cafe", "resort", "festival", "song", "tablet", "gallery", "burger", "lecture"]
SHARED_TEMPLATES = [
    "The {subject} was {adj}.",
    "I thought the {subject} was {adj}.",
    "What a {adj} {subject}!",
    "Honestly, the {subject} felt {adj} from start to finish.",
    "My friends said the {subject} was {adj}, and they were right.",
    "Everything about the {subject} was {adj}.",
]
TRAIN_TEMPLATES = SHARED_TEMPLATES + ["I would call this {subject} {adj}.", "Our evening at the {subject} was {adj}."]
EVAL_TEMPLATES = SHARED_TEMPLATES + ["All in all, a {adj} {subject}.", "The {subject} turned out {adj}."]
NEGATED = ["The {subject} was not {adj} at all.", "I would not say the {subject} was {adj}."]
NEGATION_SHARE = 0.1
SEED = 0
OUT = Path(__file__).resolve().parent / "demo"


def review(rng: random.Random, subjects: list[str], templates: list[str]) -> dict[str, object]:
    """One labelled review: a sentiment word in a template, or (rarely) the opposite word negated."""
    label = rng.randrange(2)
    if rng.random() < NEGATION_SHARE:
        template, words = rng.choice(NEGATED), (NEGATIVE if label == 1 else POSITIVE)
    else:
        template, words = rng.choice(templates), (POSITIVE if label == 1 else NEGATIVE)
    return {"text": template.format(subject=rng.choice(subjects), adj=rng.choice(words)), "label": label}


def write(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def main(out: Path = OUT, n_train: int = 800, n_eval: int = 200) -> None:
    rng = random.Random(SEED)
    write(out / "train.jsonl", [review(rng, TRAIN_SUBJECTS, TRAIN_TEMPLATES) for _ in range(n_train)])
    write(out / "eval.jsonl", [review(rng, EVAL_SUBJECTS, EVAL_TEMPLATES) for _ in range(n_eval)])


if __name__ == "__main__":
    main()
