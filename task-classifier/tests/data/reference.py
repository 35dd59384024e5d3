"""Reference embeddings for tests/embedding.rs, computed once with sentence-transformers.

Run (a venv with torch and `pip install sentence-transformers`; the model directory from
`tmoctl model fetch all-minilm-l6-v2`):
    python reference.py ~/.cache/tmo-edge/models/all-minilm-l6-v2 > reference-embeddings.json
The directory holds only config.json, tokenizer.json and model.safetensors, so the pooling
(mean) and normalisation are given here as the package's modules.json declares them.
"""
import json
import sys

import sentence_transformers
from sentence_transformers import SentenceTransformer, models

SENTENCES = [
    "Please preheat the oven to 400 degrees Fahrenheit.",
    "What are the calorie counts for potatoes and cucumbers?",
    "Can you recommend a quick vegetarian dinner?",
    # Longer than the 128 tokens tokenizer.json truncates at, shorter than max_seq_length 256.
    " ".join(["I am chopping onions, carrots and celery for a soup, and I wonder whether I should"
              " roast them first or put them straight into the pot with the stock."] * 6),
]

model_dir = sys.argv[1]
transformer = models.Transformer(model_dir, max_seq_length=256)
pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")
embeddings = model.encode(SENTENCES, batch_size=1, convert_to_numpy=True)
tokens = [len(model.preprocess([s])["input_ids"][0]) for s in SENTENCES]
json.dump(
    {
        "made_with": f"sentence-transformers {sentence_transformers.__version__}, batch_size=1",
        "cases": [
            {"text": s, "tokens": n, "embedding": [float(v) for v in e]}
            for s, n, e in zip(SENTENCES, tokens, embeddings)
        ],
    },
    sys.stdout,
    indent=1,
)
