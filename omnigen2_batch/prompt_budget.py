"""How long a prompt the model can take, checked at plan time instead of failing mid-run.

The transformer gives every token of a job's joint sequence an Omni-RoPE position (model/rope.py):
text token i sits at (i, i, i) on the three axes; each input image after the text takes
max(rows, cols) more on axis 0, and the output image sits at the sum. Every position must be
inside the transformer's tables (`axes_lens` rows each), or the lookup fails deep in the text
path (an IndexError). So a job fits when

    tokens <= min(axes_lens)   and   tokens + sum over inputs of max(rows, cols) < axes_lens[0]

where tokens counts the chat template around the prompt and an input's rows and cols are its
model size (images.model_input_size) / 16. The negative prompt goes through the same path and
must fit too. Tiny: axes_lens (512, 128, 128), so 128 tokens, 88 after the template.

Tokens are counted exactly with the model's own tokenizer.json (the `tokenizers` library, no
torch) when it is on this machine: always for "tiny" and "toy", for a local folder or a hub id
already in the Hugging Face cache. Otherwise the UTF-8 byte count stands in: a byte-level BPE
(Qwen's) never makes more tokens than bytes, so that bound never lets a failing prompt through.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .config import TOY_DIR, TOY_MODEL
from .images import MODEL_MULTIPLE, model_input_size

TINY_TOKENIZER = Path(__file__).parent / "model" / "assets" / "tiny_tokenizer" / "tokenizer.json"
TINY_AXES = (512, 128, 128)  # model/tiny.py TRANSFORMER_CONFIG["axes_lens"] (a test holds them equal)
RELEASED_AXES = (10_000, 10_000, 10_000)  # the released OmniGen2 transformer/config.json
# model/pipeline.py's SYSTEM_PROMPT and chat template, repeated: importing it imports torch.
SYSTEM_PROMPT = ("You are a helpful assistant that generates high-quality images based on user "
                 "instructions.")


def chat_text(prompt: str) -> str:
    """The text the pipeline tokenizes for `prompt` (Qwen chat template, no generation prompt)."""
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
            f"<|im_start|>user\n{prompt}<|im_end|>\n")


def image_positions(size: tuple[int, int], max_side: int) -> int:
    """Axis-0 positions an input image of `size` takes: max(rows, cols) of its token grid."""
    return max(model_input_size(size, max_side)) // MODEL_MULTIPLE


@dataclass(frozen=True)
class TextBudget:
    model: str
    axes: tuple[int, int, int]  # the transformer's axes_lens
    tokenizer: Path | None  # None: count UTF-8 bytes, an upper bound on tokens

    def room(self, input_positions: int) -> int:
        """The most tokens a text may have in a job whose inputs take `input_positions`."""
        return min(min(self.axes), self.axes[0] - 1 - input_positions)

    def unit(self) -> str:
        return "tokens" if self.tokenizer else "tokens at most (counted as UTF-8 bytes: no " \
                                              f"tokenizer for {self.model} on this machine)"

    def count(self, texts: list[str]) -> dict[str, int]:
        """Tokens of each text after the chat template, by text."""
        unique = list(dict.fromkeys(texts))
        templated = [chat_text(text) for text in unique]
        if self.tokenizer is None:
            return {text: len(full.encode("utf-8")) for text, full in zip(unique, templated)}
        encoded = load_tokenizer(self.tokenizer).encode_batch(templated)
        return {text: len(tokens.ids) for text, tokens in zip(unique, encoded)}


@lru_cache(maxsize=4)
def load_tokenizer(path: Path):
    from tokenizers import Tokenizer  # Rust tokenizers: no torch, loads in milliseconds

    return Tokenizer.from_file(str(path))


def text_budget(model: str) -> TextBudget:
    """The budget of a model spec as plan.py has it: "tiny", a hub id or an absolute folder."""
    if model == "tiny":
        return TextBudget(model, TINY_AXES, TINY_TOKENIZER)
    folder = TOY_DIR if model == TOY_MODEL else Path(model) if model.startswith("/") else cached_snapshot(model)
    if folder is None:
        return TextBudget(model, RELEASED_AXES, None)
    tokenizer = folder / "processor" / "tokenizer.json"
    return TextBudget(model, config_axes(folder / "transformer" / "config.json"),
                      tokenizer if tokenizer.is_file() else None)


def config_axes(config: Path) -> tuple[int, int, int]:
    try:
        axes = json.loads(config.read_text(encoding="utf-8"))["axes_lens"]
        return tuple(int(axes[i]) for i in range(3))
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return RELEASED_AXES  # what loading would then refuse is not a prompt problem


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of a hub model already in the local cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "transformer/config.json")
    except ValueError:  # not a repo id the hub accepts; loading will say so
        return None
    return Path(found).parent.parent if isinstance(found, str) else None
