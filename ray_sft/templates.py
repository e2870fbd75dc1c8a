"""Named prompt templates. Pure data: the spec validates names against this table, data and generate render them.

The recipe trains on one template and prompts with another (no system line, a colon after 回答); both are kept
byte for byte so a recipe job reproduces the notebook exactly.
"""

SYSTEM_LINE = "あなたは優秀なアシスタントです。指示に対して適切な回答を行なってください。"

TRAIN_TEMPLATES = {
    # The notebook's training prompt, byte for byte (leading newline included; `context` ignored).
    "recipe": "\n" + SYSTEM_LINE + "\n### 指示\n{instruction}\n### 回答\n{response}",
    # Same, with the dolly `context` column as an input block when the row has one.
    "recipe_context": "\n" + SYSTEM_LINE + "\n### 指示\n{instruction}\n### 入力\n{context}\n### 回答\n{response}",
}

INFERENCE_TEMPLATES = {
    # The notebook's inference prompt: no system line, and a colon after 回答.
    "recipe": "\n### 指示\n{instruction}\n### 回答:\n",
    # Train-matching prompt: the training template up to where the response starts.
    "train_match": "\n" + SYSTEM_LINE + "\n### 指示\n{instruction}\n### 回答\n",
}

# A template with a context block falls back to this one for rows whose context is empty.
CONTEXT_FALLBACK = {"recipe_context": "recipe"}
