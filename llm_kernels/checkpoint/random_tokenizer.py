"""A small deterministic tokenizer for random checkpoints (no network, no download).

:func:`write_random_tokenizer` writes into a checkpoint directory

* ``tokenizer.json``: a byte-level BPE (GPT-2 / Qwen pre-tokenizer and decoder, every byte
  representable) trained with the ``tokenizers`` library on a fixed built-in corpus (English,
  code, CJK, emoji and seeded pseudo-words) up to ``min(vocab_size, MAX_VOCAB)`` ids, so every
  id it produces is a valid model id. Special tokens ``<|endoftext|>`` (id 0),
  ``<|im_start|>`` (1), ``<|im_end|>`` (2), then the 256 byte symbols and the merges; the
  last two ids are the added (non-special) ``<think>`` / ``</think>``;
* ``tokenizer_config.json``: ``eos_token`` ``<|im_end|>``, ``pad_token`` ``<|endoftext|>``,
  no BOS, and a Qwen-style ChatML chat template (system / user / assistant / tool turns,
  earlier turns' ``<think>`` blocks dropped, ``enable_thinking=False`` closes an empty think
  block in the generation prompt);
* ``generation_config.json``: greedy (``do_sample: false``), ``eos_token_id`` =
  [``<|im_end|>``, ``<|endoftext|>``].

The files are byte-identical across runs (the trainer is deterministic on a fixed corpus).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

__all__ = ["write_random_tokenizer", "CHAT_TEMPLATE", "MAX_VOCAB", "MIN_VOCAB", "SPECIAL_TOKENS", "TOKENIZER_FILES"]

# the files of a Hugging Face tokenizer directory (copied along with a checkpoint)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "special_tokens_map.json")
MAX_VOCAB = 4096  # larger model vocabularies keep their upper ids unused (as real padded vocabularies do)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")
MIN_VOCAB = len(SPECIAL_TOKENS) + 256 + len(THINK_TOKENS)

CHAT_TEMPLATE = """{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- raise_exception('a system message must come first') }}
        {%- endif %}
        {{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'user' or message.role == 'tool' %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content | default('', true) %}
        {%- set reasoning = message.reasoning_content | default('', true) %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.last and reasoning %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

_TEXT = """The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
A language model reads tokens and writes tokens; the tokenizer turns text into ids and back.
def generate(prompt, max_tokens=32):
    return model.sample(tokenizer.encode(prompt), temperature=0.7, top_p=0.9)
for i in range(10): print(i * 2 + 1)
The weather is nice, and the numbers are 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024.
你好，世界！今天天气很好。我们一起学习语言模型。こんにちは世界。안녕하세요 세계.
Emoji: 😀 🚀 ✨ 👍 🎉 ❤️ — café, naïve, résumé, Straße, Ελληνικά, русский язык.
"""
_SYLLABLES = ("ka ri to na shi mo lu ve pa de zo qui ber stan tion ing er ly ment ous pre con dis "
              "tra gen al ic um or an ex in re com pro sub ter").split()


def _corpus() -> list[str]:
    rng = random.Random(1234)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    return [_TEXT] * 20 + lines


def write_random_tokenizer(out_dir: str | os.PathLike, vocab_size: int) -> Path | None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``
    (see the module docstring) for a model with ``vocab_size`` ids into ``out_dir``.

    Returns ``out_dir``, or None (nothing written) when ``vocab_size`` < :data:`MIN_VOCAB`
    (no room for the 256 byte symbols and the special tokens)."""
    if vocab_size < MIN_VOCAB:
        return None
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    target = min(vocab_size, MAX_VOCAB) - len(THINK_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=target, special_tokens=list(SPECIAL_TOKENS), min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }
    gen = {"do_sample": False, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"]}
    _write(out / "tokenizer.json", tok.to_str(pretty=True) + "\n")
    _write(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    _write(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
