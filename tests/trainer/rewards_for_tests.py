"""Reward functions the online-trainer tests pass as `module:function`."""


def sevens(prompt, response, **_):
    """Share of the response's characters that are '7': learnable from a random model."""
    return response.count("7") / max(1, len(response))


def flaky(prompt, response, **_):
    """Raises on responses starting with 1, NaN on those starting with 2."""
    if response.startswith("1"):
        raise RuntimeError("judge unavailable")
    return float("nan") if response.startswith("2") else sevens(prompt, response)


def spaces(prompts, completions, **_):
    """TRL's batched form on conversational completions: the share of spaces in each reply (the
    replies of a random subword model differ in it, so advantages are not all zero)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [t.count(" ") / max(1, len(t)) for t in texts]
