"""Token counts estimated from characters, where no tokenizer is at hand.

Switchboard talks to models whose tokenizers it does not have, so where it
needs a size before (the context budget) or without (a stream that ended with
no usage) the upstream's count, it uses the usual rule of thumb for English
text and JSON with OpenAI tokenizers: about four characters a token, rounded up.
"""

from __future__ import annotations

from switchboard.v1 import common_pb2

CHARS_PER_TOKEN = 4


def estimate_tokens(text_or_chars: str | int) -> int:
    """Estimated tokens of a text, or of that many characters: `ceil(chars / 4)`.

    0 for the empty string (or 0 characters).
    """
    chars = text_or_chars if isinstance(text_or_chars, int) else len(text_or_chars)
    return -(-chars // CHARS_PER_TOKEN)


def estimated_usage(input_tokens: int, output_chars: int) -> common_pb2.Usage:
    """Usage when the upstream reported none (a cancelled or broken stream).

    Args:
        input_tokens: the prompt's estimate (the session service's, of the context).
        output_chars: characters generated (text and tool-call arguments).

    Returns:
        Every count set, and `estimated` true.
    """
    output_tokens = estimate_tokens(output_chars)
    return common_pb2.Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        estimated=True,
    )
