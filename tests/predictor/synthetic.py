"""A synthetic CASTILLO-schema dataset whose response lengths follow a known rule of the prompt."""
import numpy as np

from lenserve.predictor.dataset import LengthRow

TOPICS = ["dogs", "the ocean", "tax law", "bread", "volcanoes", "jazz", "chess", "rain", "trains", "bees",
          "the moon", "coffee", "printing", "castles", "rivers", "glass", "maps", "owls", "salt", "clocks"]
MODELS = {"small-llm": 1.0, "verbose-llm": 2.0}


def expected_length(kind: str, n: int) -> float:
    return {"sentences": 25.0 * n, "word": 3.0, "essay": 700.0, "list": 12.0 * n}[kind]


def make_rows(num_prompts: int, seed: int = 0, models=MODELS) -> list[LengthRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_prompts):
        topic = TOPICS[rng.integers(len(TOPICS))]
        kind = ["sentences", "word", "essay", "list"][rng.integers(4)]
        n = int(rng.integers(1, 13))
        text = {
            "sentences": f"Write {n} sentences about {topic}.",
            "word": f"In one word, what colour do you associate with {topic}?",
            "essay": f"Write a detailed essay about {topic}.",
            "list": f"List {n} facts about {topic}.",
        }[kind]
        text += " " + " ".join(TOPICS[j] for j in rng.integers(len(TOPICS), size=rng.integers(0, 4)))
        for model, factor in models.items():
            mu = np.log(expected_length(kind, n) * factor)
            sizes = np.maximum(1, np.round(np.exp(mu + 0.25 * rng.standard_normal(10)))).astype(int)
            rows.append(LengthRow(prompt_id=f"s{seed}-{i}", model=model, prompt_text=text,
                                  input_size=len(text.split()) + 5, output_sizes=sizes.tolist()))
    return rows
