"""Text in, text out: the tokenizer and chat templates (:mod:`.tokenizer`,
:mod:`.chat_template`), sampling and stop conditions (:mod:`.sampling`) and the per-sequence
decode state that ties them together (:mod:`.decoding`). See ``docs/text.md``."""
